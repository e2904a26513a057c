"""Inpainting masks as A1111 1.10 prepares them (``StableDiffusionProcessingImg2Img.init``, ``modules/masking.py``):
the mask's blur (at the size it was drawn at), the whole picture's mask (then framed at the generation size),
"Only masked" (the blurred mask's bounding box, padded, grown to the generation's aspect ratio inside the image;
that region of the image and of the mask inpainted at the generation size) and how an inpainted image goes back
over the one it started from (A1111's ``apply_overlay``).

The SDXL base does this work (``deployments/sdxl_base.py``); any API that inpaints reaches it through
``GenerationRequest.inpaint_area`` and ``mask_fit``. The ingress decides "Only masked" with ``blurred_box``, as the
base decides it. OpenCV is imported where it is used: the ingress imports this module too.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np
from PIL import Image

from deployments.support.imaging import Fit, frame, to_rgb

Box = tuple[int, int, int, int]  # left, top, right, bottom: PIL's crop box
InpaintArea = Literal["whole", "masked"]


def blur(mask: Image.Image, across: int, down: int) -> Image.Image:
    """``mask`` (mode L) blurred as A1111 blurs it: OpenCV's Gaussian of standard deviation ``across`` along the
    rows, then ``down`` along the columns, each over 2 * ``reach(sigma)`` + 1 taps (0: no blur that way)."""
    import cv2

    out = np.asarray(mask.convert("L"))
    if across > 0:
        out = cv2.GaussianBlur(out, (2 * reach(across) + 1, 1), across)
    if down > 0:
        out = cv2.GaussianBlur(out, (1, 2 * reach(down) + 1), down)
    return Image.fromarray(out)


def reach(sigma: int) -> int:
    """How far A1111's blur of standard deviation ``sigma`` reads: the kernel's radius, int(2.5 * sigma + 0.5)."""
    return int(2.5 * sigma + 0.5) if sigma > 0 else 0


def blurred_box(mask: Image.Image, across: int, down: int) -> Box | None:
    """The bounding box of ``blur(mask, across, down)``'s non-zero pixels, None where the blur leaves the mask blank,
    found by blurring only the mask's drawn region (its non-zero pixels' box) and twice the blur's reach around it:
    cheap for a large mask with a small drawn area, and exactly what the whole mask's blur gives.

    Why it is exact: OpenCV's blur of a pixel reads the pixels within its reach along the row (then along the
    column), reflected about the image's edge pixel past an edge, onto pixels no nearer the drawn ones. A pixel
    outside the drawn box grown by the reach reads only zeros, and stays 0; one inside it reads only pixels inside
    the box grown by twice the reach (the cut), or reflected at an edge of the image the cut shares onto the same
    pixels as the whole mask's blur: its value is the whole blur's."""
    mask = mask.convert("L")
    drawn = mask.getbbox()
    if drawn is None:
        return None
    x, y = reach(across), reach(down)
    cut = _grown(drawn, 2 * x, 2 * y, mask.size)
    near = _grown(drawn, x, y, mask.size)  # the only pixels that can be non-zero once blurred
    blurred = blur(mask.crop(cut), across, down)
    found = blurred.crop((near[0] - cut[0], near[1] - cut[1], near[2] - cut[0], near[3] - cut[1])).getbbox()
    if found is None:
        return None
    return found[0] + near[0], found[1] + near[1], found[2] + near[0], found[3] + near[1]


def _grown(box: Box, x: int, y: int, size: tuple[int, int]) -> Box:
    """``box`` ``x`` wider on the left and right and ``y`` on the top and bottom, within an image of ``size``."""
    left, top, right, bottom = box
    return max(left - x, 0), max(top - y, 0), min(right + x, size[0]), min(bottom + y, size[1])


def masked_box(mask: Image.Image, padding: int) -> Box | None:
    """The bounding box of the mask's non-zero pixels, ``padding`` wider on every side but never past the image;
    None for a blank mask (A1111's ``get_crop_region_v2``)."""
    box = mask.convert("L").getbbox()
    return _grown(box, padding, padding, mask.size) if box is not None else None


def to_aspect(box: Box, width: int, height: int, image_size: tuple[int, int]) -> Box:
    """``box`` grown to the aspect ratio of ``width`` x ``height`` inside an image of ``image_size`` (A1111's
    ``expand_crop_region``): its short side is lengthened (the difference truncated to whole pixels, its odd pixel
    at the far end), then the box slides back inside the image, and is cut at the image's edge when it is larger."""
    left, top, right, bottom = box
    ratio = width / height
    if (right - left) * height > (bottom - top) * width:  # wider than the generation: it grows taller
        # The same float arithmetic as A1111, so that the truncation lands on the same pixel.
        grow = int((right - left) / ratio - (bottom - top))
        top, bottom = _slide(top - grow // 2, bottom + grow - grow // 2, image_size[1])
    else:
        grow = int((bottom - top) * ratio - (right - left))
        left, right = _slide(left - grow // 2, right + grow - grow // 2, image_size[0])
    return left, top, right, bottom


def _slide(start: int, end: int, limit: int) -> tuple[int, int]:
    """A span moved back inside [0, limit] (past the end first, then past the start), then cut at the limit."""
    if end > limit:
        start, end = start - (end - limit), limit
    if start < 0:
        start, end = 0, end - start
    return start, min(end, limit)


def whole_picture(mask: Image.Image, width: int, height: int, fit: Fit, across: int, down: int) -> Image.Image:
    """The mask a whole picture is inpainted with, as A1111 makes it: blurred at its own size (the size it was
    drawn at: the blur's reach is in its pixels), then framed at the generation size by the request's resize mode
    (``imaging.frame``, A1111's ``resize_image``). The latent mask and, doubled (``overlay_alpha``), the paste's
    alpha come from it."""
    return frame(blur(mask, across, down), width, height, fit)


def overlay_alpha(mask: Image.Image) -> Image.Image:
    """How much of the inpainted image shows at each pixel when the whole picture was inpainted: the blurred
    mask at twice its strength, as A1111's overlay takes it there (its "Only masked" takes the mask as it is)."""
    doubled = np.clip(np.asarray(mask.convert("L"), dtype=np.uint16) * 2, 0, 255).astype(np.uint8)
    return Image.fromarray(doubled)


@dataclass(frozen=True)
class Paste:
    """How an inpainted image goes back over ``original``, the image the inpainting started from (A1111's
    ``apply_overlay``): ``alpha`` says how much of the inpainted image shows at each pixel. With a ``box`` ("Only
    masked"), the inpainted image is scaled to cover the box, centred, and lands there at the original's size,
    every pixel outside the box the original's own; without one it is the whole picture, at its own size."""

    original: Image.Image
    alpha: Image.Image
    box: Box | None = None

    def apply(self, image: Image.Image) -> Image.Image:
        if self.box is None:
            original = self.original
            if original.size != image.size:
                original = original.resize(image.size, Image.Resampling.LANCZOS)
            alpha = self.alpha if self.alpha.size == image.size else self.alpha.resize(image.size)
            return _blend(to_rgb(image), to_rgb(original), alpha)
        left, top, right, bottom = self.box
        placed = frame(to_rgb(image), right - left, bottom - top, "crop")  # A1111's uncrop: resize mode 1
        out = to_rgb(self.original).copy()
        out.paste(_blend(placed, out.crop(self.box), self.alpha.crop(self.box)), (left, top))
        return out


def _blend(generated: Image.Image, original: Image.Image, alpha: Image.Image) -> Image.Image:
    """``generated`` over ``original`` by ``alpha`` (0: the original's pixel exactly, 255: the generated one)."""
    weight = np.asarray(alpha, dtype=np.float32)[..., None] / 255.0
    out = np.asarray(generated, dtype=np.float32) * weight + np.asarray(original, dtype=np.float32) * (1 - weight)
    return Image.fromarray(out.round().astype(np.uint8))


@dataclass(frozen=True)
class Cut:
    """A1111's "Only masked" for one init image: the region of the image (``image``) and of the blurred mask
    (``mask``) framed at the generation size, as the pipeline inpaints them, and how the result goes back."""

    image: Image.Image
    mask: Image.Image
    box: Box
    paste: Paste

    def control(self, image: Image.Image, fit: Fit) -> Image.Image:
        """A ControlNet unit's image cut as the init image is, as A1111's extension cuts it: framed at the init
        image's size by the unit's resize mode, the region cut out, then framed at the generation size."""
        size = self.paste.original.size
        whole = frame(to_rgb(image), *size, fit) if image.size != size else to_rgb(image)
        return frame(whole.crop(self.box), *self.image.size, "fill")


def only_masked(init: Image.Image, mask: Image.Image, width: int, height: int, padding: int, blur_across: int,
                blur_down: int, fit: Fit = "stretch") -> Cut | None:
    """A1111's "Only masked" (``inpaint_full_res``): the mask, at the init image's size (framed there by ``fit``
    if it is not: ``at_size``), blurred; its bounding box grown by ``padding`` and then to the aspect ratio of
    ``width`` x ``height`` (``to_aspect``); that region of the image and of the blurred mask framed at ``width`` x
    ``height`` (A1111's resize mode 2, resize and fill). None for a mask that is blank once blurred: A1111 then
    inpaints nothing and runs image-to-image over the whole image."""
    image = to_rgb(init)
    blurred = blur(at_size(mask, image.size, fit), blur_across, blur_down)
    box = masked_box(blurred, padding)
    if box is None:
        return None
    box = to_aspect(box, width, height, image.size)
    return Cut(image=frame(image.crop(box), width, height, "fill"),
               mask=frame(blurred.crop(box), width, height, "fill"), box=box,
               paste=Paste(original=image, alpha=blurred, box=box))


def at_size(mask: Image.Image, size: tuple[int, int], fit: Fit) -> Image.Image:
    """An "Only masked" mask at its init image's ``size``: as it is, or framed there by ``fit`` (a mask drawn at
    another size; A1111 takes the region from the mask's own pixels then, which lands it elsewhere in the image)."""
    mask = mask.convert("L")
    return mask if mask.size == size else frame(mask, *size, fit)
