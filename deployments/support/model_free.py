"""ControlNet preprocessors that run no model, beside canny, invert (``control``) and lineart_standard
(``lineart``): their maps as A1111's ControlNet extension (Mikubill/sd-webui-controlnet) makes them, pixel for pixel
(the same OpenCV and numpy operations in the same order, 8-bit truncations included).

At ``processor_res`` (the image's shorter side there, ``control.at_resolution``; the extension's
``resize_image_with_pad``, whose padding none of these reads but scribble_xdog's blurs):

- ``threshold``: white where the image's smallest channel is above the level (threshold_a, 127), black elsewhere.
- ``scribble_xdog``: the image padded to 64s with its edge pixels; the smallest channel of its Gaussian blur at
  sigma 5 minus its blur at sigma 0.5 (in float32), that difference as the extension stores it (255 minus it,
  clipped and truncated to 8 bits, taken back from 255) doubled in 8 bits, white where above threshold_a (32). The
  doubling wraps past 255 as the extension's does, so a difference of 128 or more counts as itself minus 128: the
  darkest cores of thick strokes can come out black, as they do there.
- ``blur_gaussian``: OpenCV's Gaussian blur of the 8-bit image at sigma threshold_a (9).
- ``shuffle``: the image's pixels moved by a smooth random flow (the extension's ``ContentShuffleDetector``): two
  fields of uniform noise on a 256-pixel grid, cubic-interpolated to the image, each stretched to 0..1 and scaled
  to the width (x) and the height (y), read bilinearly. Its resolution is not a slider: 512 (Pixel Perfect's where
  that is on), as the extension fixes it. The noise is numpy's legacy generator seeded as the extension seeds it
  (``seed``: ``control.shuffle_seed``), so a request's map is the same each time, and the extension's for that seed.
- ``t2ia_color_grid`` (the extension's key ``color``): the image with its shorter side at ``processor_res`` (area
  filter, enlarging too), shrunk cubically to one pixel per 64, then enlarged back nearest: a grid of 64-pixel
  colour cells.

At the image's own size (no processor_res):

- ``tile_resample``: the image shrunk by the down-sampling rate (threshold_a, 1; area filter, each side truncated);
  below 1.1 the image as it is.
- ``recolor_luminance``: the lightness of OpenCV's 8-bit Lab conversion, which the extension asks of the RGB array
  as if it were BGR (so red weighs as blue would: kept), to the power gamma (threshold_a, 1), truncated, as grey.
- ``recolor_intensity``: the value (the largest channel) to the power gamma, the same way.

A recolor unit's map does more than guide: the extension puts it back into every finished image (``Recolor``), whose
Lab lightness (luminance) or HSV value (intensity) becomes the map's grey; there the image is converted as RGB, as it
is (the map's lightness was read as BGR).

- ``tile_colorfix``, ``tile_colorfix+sharp``: the image as it is; what they do is a correction of every sampling
  step's predicted image (its blurred latents swapped for the control image's), ``colorfix``'s, in the base.

This module is imported by the ingress (its names): OpenCV is imported where used.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image

COLORFIX = ("tile_colorfix", "tile_colorfix+sharp")  # the image as their map; ``colorfix`` is what they do
MODULES = ("threshold", "scribble_xdog", "blur_gaussian", "tile_resample", "recolor_luminance", "recolor_intensity",
           "shuffle", "t2ia_color_grid", *COLORFIX)
# The modules whose map is made of the image at processor_res (``control.at_resolution``); t2ia_color_grid resizes
# on its own terms and the others work at the image's size.
AT_RESOLUTION = ("threshold", "scribble_xdog", "blur_gaussian", "shuffle")
KEYS = {"t2ia_color_grid": "color"}  # the extension's key where it is not our name (its label is ours)
ALIASES = {"color": "t2ia_color_grid", **{m: m for m in MODULES}}  # the names its clients send
SHUFFLE_RES = 512  # shuffle's fixed resolution (the extension hides its slider)
SHUFFLE_CELL = 256  # the spacing of shuffle's noise grid, in pixels
COLOR_CELL = 64  # t2ia_color_grid's cell
XDOG_SIGMAS = (0.5, 5.0)  # scribble_xdog's narrow and wide blurs
RESAMPLE_FROM = 1.1  # tile_resample leaves the image as it is below this rate
RECOLOR = ("recolor_luminance", "recolor_intensity")  # the modules whose map goes back into the finished images


def make(module: str, rgb: np.ndarray, resolution: int, a: float, seed: int = 0) -> np.ndarray:
    """``module``'s map of an RGB array (8-bit): at processor_res already for the ``AT_RESOLUTION`` modules, at its
    own size for the others (``resolution``: t2ia_color_grid's). ``a``: the module's threshold_a (none reads
    threshold_b); ``seed``: shuffle's."""
    if module == "threshold":
        return _grey(np.where(rgb.min(axis=2) > a, 255, 0).astype(np.uint8))
    if module == "scribble_xdog":
        return xdog(rgb, a)
    if module == "blur_gaussian":
        import cv2

        return cv2.GaussianBlur(rgb, (0, 0), float(a))
    if module == "tile_resample":
        return resample(rgb, a)
    if module in ("recolor_luminance", "recolor_intensity"):
        return recolor(rgb, a, luminance=module == "recolor_luminance")
    if module == "shuffle":
        return shuffle(rgb, np.random.RandomState(seed))
    if module == "t2ia_color_grid":
        return color_grid(rgb, resolution)
    if module in COLORFIX:
        return rgb
    raise ValueError(f"{module!r} is not a model-free module here ({', '.join(MODULES)})")


def _grey(one: np.ndarray) -> np.ndarray:
    return np.repeat(one[..., None], 3, axis=2)


def xdog(rgb: np.ndarray, level: float) -> np.ndarray:
    """scribble_xdog's map: the narrow blur taken from the wide one, on the image padded to 64s."""
    import cv2

    from deployments.support.lineart import padded

    height, width = rgb.shape[:2]
    x = padded(rgb).astype(np.float32)
    narrow, wide = (cv2.GaussianBlur(x, (0, 0), sigma) for sigma in XDOG_SIGMAS)
    stored = (255 - (wide - narrow).min(axis=2)).clip(0, 255).astype(np.uint8)  # the extension's "dog"
    doubled = (255 - stored) * np.uint8(2)  # 8-bit: wraps past 255, as the extension's does
    return _grey(np.where(doubled > level, 255, 0).astype(np.uint8))[:height, :width]


def resample(rgb: np.ndarray, rate: float) -> np.ndarray:
    """tile_resample's map: the image shrunk by ``rate`` (each side truncated, at least one pixel)."""
    import cv2

    if rate < RESAMPLE_FROM:
        return rgb
    height, width = rgb.shape[:2]
    size = (max(1, int(width / rate)), max(1, int(height / rate)))  # the extension's int() of the division
    return cv2.resize(rgb, size, interpolation=cv2.INTER_AREA)


def recolor(rgb: np.ndarray, gamma: float, *, luminance: bool) -> np.ndarray:
    """recolor_luminance's or recolor_intensity's map: the one channel as 0..1 in float32, to the power ``gamma``,
    back to 0..255 truncated."""
    import cv2

    if luminance:  # the extension's BGR-to-Lab conversion of an RGB array
        channel = cv2.cvtColor(rgb, cv2.COLOR_BGR2LAB)[:, :, 0]
    else:
        channel = cv2.cvtColor(rgb, cv2.COLOR_BGR2HSV)[:, :, 2]
    level = (channel.astype(np.float32) / 255.0) ** np.float32(gamma)
    return _grey((level * 255.0).clip(0, 255).astype(np.uint8))


@dataclass(frozen=True)
class Recolor:
    """A recolor unit's map as the extension's post-processing puts it back into a finished image: ``level`` (the
    framed map's first channel, height x width, 8-bit) in place of the image's Lab lightness (``luminance``) or its
    HSV value. It travels with the base's latents to the refiner, which decodes them."""

    luminance: bool
    level: np.ndarray

    def apply(self, image: Image.Image) -> Image.Image:
        """``image`` with its lightness (or value) replaced: OpenCV's 8-bit RGB to Lab (or HSV), the channel
        swapped, back to RGB. The extension does it on A1111's float sample, truncated to 8 bits first and read back
        over 255 after: on the decoded 8-bit image both round trips keep every level. An image of another size is
        returned as it is, as the extension's size check returns it (a hires fix stopped in its first pass)."""
        import cv2

        rgb = np.asarray(image.convert("RGB"))
        if rgb.shape[:2] != self.level.shape:
            return image
        there, back, channel = ((cv2.COLOR_RGB2LAB, cv2.COLOR_LAB2RGB, 0) if self.luminance
                                else (cv2.COLOR_RGB2HSV, cv2.COLOR_HSV2RGB, 2))
        converted = cv2.cvtColor(rgb, there)
        converted[:, :, channel] = self.level
        return Image.fromarray(cv2.cvtColor(converted, back))


def recolored(images: list[Image.Image], maps: list[Recolor]) -> list[Image.Image]:
    """Each image with every map put back in turn, in the units' order (the extension runs its post-processors so):
    of two maps for the same channel the last one stands."""
    out = []
    for image in images:
        for one in maps:
            image = one.apply(image)
        out.append(image)
    return out


def noise_field(random: np.random.RandomState, height: int, width: int, cell: int = SHUFFLE_CELL) -> np.ndarray:
    """One of shuffle's flow fields (the extension's ``make_noise_disk``, one channel): uniform noise, one value per
    ``cell`` pixels and two more each way, enlarged cubically to the image plus a cell each side, cropped to the
    image and stretched to 0..1 (float64)."""
    import cv2

    coarse = random.uniform(low=0, high=1, size=(height // cell + 2, width // cell + 2, 1))
    smooth = cv2.resize(coarse, (width + 2 * cell, height + 2 * cell), interpolation=cv2.INTER_CUBIC)
    field = smooth[cell:cell + height, cell:cell + width]
    field = field - field.min()
    return field / field.max()


def shuffle(rgb: np.ndarray, random: np.random.RandomState) -> np.ndarray:
    """shuffle's map: each pixel read (bilinearly) where the two noise fields point, x drawn first."""
    import cv2

    height, width = rgb.shape[:2]
    x = noise_field(random, height, width) * float(width - 1)
    y = noise_field(random, height, width) * float(height - 1)
    flow = np.stack([x, y], axis=2).astype(np.float32)
    return cv2.remap(rgb, flow, None, cv2.INTER_LINEAR)


def color_size(width: int, height: int, resolution: int) -> tuple[int, int]:
    """t2ia_color_grid's size for an image of ``width`` x ``height``: its shorter side at ``resolution``, the longer
    rounded (half to even) from the aspect as the extension computes it."""
    if height < width:
        return int(round(width / height * resolution)), resolution
    return resolution, int(round(height / width * resolution))


def color_grid(rgb: np.ndarray, resolution: int) -> np.ndarray:
    """t2ia_color_grid's map: the image at ``resolution`` (area filter), its 64-pixel cells' colours (cubic
    shrink), enlarged back nearest."""
    import cv2

    width, height = color_size(rgb.shape[1], rgb.shape[0], resolution)
    sized = cv2.resize(rgb, (width, height), interpolation=cv2.INTER_AREA)
    # At least one cell: Pixel Perfect can ask for less than a cell's 64 pixels (the extension then fails).
    cells = cv2.resize(sized, (max(1, width // COLOR_CELL), max(1, height // COLOR_CELL)),
                       interpolation=cv2.INTER_CUBIC)
    return cv2.resize(cells, (width, height), interpolation=cv2.INTER_NEAREST)
