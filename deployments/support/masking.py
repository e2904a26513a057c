"""Inpainting masks as A1111 1.10 prepares them (``StableDiffusionProcessingImg2Img.init``, ``modules/masking.py``):
the mask's blur, "Only masked" (the blurred mask's bounding box, padded, grown to the generation's aspect ratio
inside the image; that region of the image and of the mask inpainted at the generation size) and how an inpainted
image goes back over the one it started from (A1111's ``apply_overlay``).

The SDXL base does this work (``deployments/sdxl_base.py``); any API that inpaints reaches it through
``GenerationRequest.inpaint_area``. OpenCV is imported where it is used: the ingress imports this module too.
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
    rows, then ``down`` along the columns, each over 2 * int(2.5 * sigma + 0.5) + 1 taps (0: no blur that way)."""
    import cv2

    out = np.asarray(mask.convert("L"))
    if across > 0:
        out = cv2.GaussianBlur(out, (2 * int(2.5 * across + 0.5) + 1, 1), across)
    if down > 0:
        out = cv2.GaussianBlur(out, (1, 2 * int(2.5 * down + 0.5) + 1), down)
    return Image.fromarray(out)


def masked_box(mask: Image.Image, padding: int) -> Box | None:
    """The bounding box of the mask's non-zero pixels, ``padding`` wider on every side but never past the image;
    None for a blank mask (A1111's ``get_crop_region_v2``)."""
    box = mask.convert("L").getbbox()
    if box is None:
        return None
    left, top, right, bottom = box
    return (max(left - padding, 0), max(top - padding, 0), min(right + padding, mask.width),
            min(bottom + padding, mask.height))


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
                blur_down: int) -> Cut | None:
    """A1111's "Only masked" (``inpaint_full_res``): the mask, at the init image's size (stretched there if it
    is not), blurred; its bounding box grown by ``padding`` and then to the aspect ratio of ``width`` x ``height``
    (``to_aspect``); that region of the image and of the blurred mask framed at ``width`` x ``height`` (A1111's
    resize mode 2, resize and fill). None for a mask that is blank once blurred: A1111 then inpaints nothing and
    runs image-to-image over the whole image."""
    image = to_rgb(init)
    if mask.size != image.size:
        mask = mask.convert("L").resize(image.size, Image.Resampling.LANCZOS)
    blurred = blur(mask, blur_across, blur_down)
    box = masked_box(blurred, padding)
    if box is None:
        return None
    box = to_aspect(box, width, height, image.size)
    return Cut(image=frame(image.crop(box), width, height, "fill"),
               mask=frame(blurred.crop(box), width, height, "fill"), box=box,
               paste=Paste(original=image, alpha=blurred, box=box))
