"""A ControlNet unit's map at the generation size, framed as A1111's ControlNet extension frames a detected map
(its ``detectmap_proc`` with lvmin's ``high_quality_resize``), for every preprocessor, ``none`` too.

A map is not a photo: a few-colour map (a pose's limbs, a segmentation) keeps its exact colours (nearest), and a
binary map (canny, thresholded line art) stays binary (re-thresholded with Otsu), a one-pixel-edge map one pixel
thin (non-maximum suppressed, then thinned). Anything else is resized with OpenCV's area filter to shrink and cubic
to enlarge. Images that are not ControlNet maps (init images, masks) are framed by ``imaging.frame`` instead.

OpenCV is imported where it is used: ``control`` (which imports this) is imported by the ingress too.
"""

from __future__ import annotations

import numpy as np
from PIL import Image

from deployments.support.imaging import Fit

# lvmin's thinning: hit-or-miss kernels (1 foreground, -1 background, 0 either), each in its four rotations, in
# the extension's order (every kernel at a quarter turn, then every kernel at the next).
_THIN = ([[-1, -1, -1], [0, 1, 0], [1, 1, 1]], [[0, -1, -1], [1, 1, -1], [0, 1, 0]])
# and its pruning of the stubs a thinned line keeps at its ends.
_PRUNE = ([[-1, -1, -1], [-1, 1, -1], [0, 0, -1]], [[-1, -1, -1], [-1, 1, -1], [-1, 0, 0]])
# The four directions ``nms`` compares a pixel along: a pixel stays where it is the largest along any of them.
_LINES = ([[0, 0, 0], [1, 1, 1], [0, 0, 0]], [[0, 1, 0], [0, 1, 0], [0, 1, 0]],
          [[1, 0, 0], [0, 1, 0], [0, 0, 1]], [[0, 0, 1], [0, 1, 0], [1, 0, 0]])


def _rotations(raw) -> list[np.ndarray]:
    return [np.ascontiguousarray(np.rot90(np.array(k, dtype=np.int32), quarter)) for quarter in range(4) for k in raw]


THIN_KERNELS = _rotations(_THIN)
PRUNE_KERNELS = _rotations(_PRUNE)


def nms(gray: np.ndarray) -> np.ndarray:
    """The extension's ``nake_nms``: each pixel of a one-channel map kept where it is the maximum of its three-pixel
    line along some direction (horizontal, vertical, either diagonal), zero elsewhere."""
    import cv2

    out = np.zeros_like(gray)
    for line in _LINES:
        np.putmask(out, cv2.dilate(gray, kernel=np.array(line, dtype=np.uint8)) == gray, gray)
    return out


def _thin_once(binary: np.ndarray, kernels: list[np.ndarray]) -> bool:
    """One pass of every kernel, each removing (in place) the pixels it matches; whether any was removed."""
    import cv2

    changed = False
    for kernel in kernels:
        hits = cv2.morphologyEx(binary, cv2.MORPH_HITMISS, kernel) > 127
        if hits.any():
            binary[hits] = 0
            changed = True
    return changed


def thin(binary: np.ndarray, prune: bool = True) -> np.ndarray:
    """The extension's ``lvmin_thin``: a 0/255 one-channel map thinned to one-pixel lines (at most 32 passes), then,
    with ``prune``, one pass removing the lines' end stubs. Modifies ``binary`` and returns it."""
    for _ in range(32):
        if not _thin_once(binary, THIN_KERNELS):
            break
    if prune:
        _thin_once(binary, PRUNE_KERNELS)
    return binary


def resize_map(x: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """The extension's ``high_quality_resize``: an HxWx3 uint8 map at ``size`` (width, height); a map already that
    size is returned as it is."""
    import cv2

    if x.shape[1] == size[0] and x.shape[0] == size[1]:
        return x
    pixels, new = x.shape[0] * x.shape[1], size[0] * size[1]
    colours = len(np.unique(x.reshape(-1, x.shape[2]), axis=0))
    binary = colours == 2 and int(x.min()) < 16 and int(x.max()) > 240
    one_pixel_edge = False
    if binary:
        # Mostly pixels that an opening (erode, dilate) removes: lines one pixel wide.
        square = np.ones((3, 3), dtype=np.uint8)
        opened = cv2.dilate(cv2.erode(x, square), square)
        one_pixel_edge = int((opened < x).sum()) * 2 > int((x > 127).sum())
    if 2 < colours < 200:  # a colour-coded map (a pose, a segmentation): no colour it does not have
        method = cv2.INTER_NEAREST
    elif new < pixels:
        method = cv2.INTER_AREA
    else:
        method = cv2.INTER_CUBIC  # the extension's choice for what nms then thins
    y = cv2.resize(x, size, interpolation=method)
    if not binary:
        return y
    gray = np.mean(y.astype(np.float32), axis=2).clip(0, 255).astype(np.uint8)
    if one_pixel_edge:
        gray = nms(gray)
    _, gray = cv2.threshold(gray, 0, 255, cv2.THRESH_BINARY + cv2.THRESH_OTSU)
    if one_pixel_edge:
        gray = thin(gray, prune=new > pixels)
    return np.stack([gray] * 3, axis=2)


def frame_map(image: Image.Image, width: int, height: int, fit: Fit) -> Image.Image:
    """A control map (RGB) at ``width`` x ``height`` as the extension's resize modes put it there: ``stretch`` (Just
    Resize), ``crop`` (Crop and Resize: scaled to cover, centre-cropped) or ``fill`` (Resize and Fill: scaled to fit,
    centred on the median colour of the map's border pixels)."""
    x = np.asarray(image.convert("RGB"))
    if fit == "stretch":
        return Image.fromarray(resize_map(x, (width, height)))
    old_h, old_w = x.shape[:2]
    scales = (height / old_h, width / old_w)
    k = min(scales) if fit == "fill" else max(scales)
    scaled = resize_map(x, (int(np.round(old_w * k)), int(np.round(old_h * k))))
    new_h, new_w = scaled.shape[:2]
    if fit == "crop":
        top, left = max(0, (new_h - height) // 2), max(0, (new_w - width) // 2)
        return Image.fromarray(np.ascontiguousarray(scaled[top:top + height, left:left + width]))
    # The border rows and columns, corners counted twice, as the extension concatenates them; the median truncated.
    border = np.concatenate([x[0], x[-1], x[:, 0], x[:, -1]], axis=0)
    canvas = np.tile(np.median(border, axis=0).astype(np.uint8)[None, None], (height, width, 1))
    top, left = max(0, (height - new_h) // 2), max(0, (width - new_w) // 2)
    canvas[top:top + new_h, left:left + new_w] = scaled
    return Image.fromarray(canvas)
