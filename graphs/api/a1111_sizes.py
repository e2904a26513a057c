"""A1111's size rules, worked out in the ingress before any work starts: the hires fix's target size
(``StableDiffusionProcessingTxt2Img.calculate_target_resolution``), how img2img frames its uploads
(``images.resize_image``) and the extras' upscale to a size (``scripts/postprocessing_upscale.py``)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple

from PIL import Image, ImageOps

from deployments.support import masking
from deployments.support.imaging import Fit, cover_box, decode, frame, to_rgb
from deployments.support.masking import Box
from graphs.api.a1111_models import Img2ImgRequest
from graphs.api.fields import image_field

# A1111's img2img resize_mode; 3, "just resize (latent upscale)", frames as 0 does.
FITS: dict[int, Fit] = {0: "stretch", 1: "crop", 2: "fill", 3: "stretch"}


@dataclass(frozen=True)
class HiresSize:
    """Where the hires fix takes the first pass: resized to ``cover``, then its centre ``size`` kept (the two are
    equal unless both ``hr_resize_x`` and ``hr_resize_y`` are set)."""

    cover: tuple[int, int]
    size: tuple[int, int]

    @property
    def cropped(self) -> bool:
        return self.cover != self.size


def hires_size(width: int, height: int, scale: float, resize_x: int, resize_y: int) -> HiresSize:
    """A1111's rule: ``hr_scale`` times the size when neither ``hr_resize_x`` nor ``hr_resize_y`` is set; one of
    them, the other following the aspect ratio; both, the size that covers them at the aspect ratio, then cropped
    to them. Each side is rounded down to a multiple of 8, as the latents need."""
    if not resize_x and not resize_y:
        cover = size = (int(width * scale), int(height * scale))
    elif not resize_y:
        cover = size = (resize_x, resize_x * height // width)
    elif not resize_x:
        cover = size = (resize_y * width // height, resize_y)
    else:
        size = (resize_x, resize_y)
        if width * resize_y < resize_x * height:  # the target is wider than the image: its width decides
            cover = (resize_x, resize_x * height // width)
        else:
            cover = (resize_y * width // height, resize_y)
    return HiresSize(cover=(cover[0] // 8 * 8, cover[1] // 8 * 8), size=(size[0] // 8 * 8, size[1] // 8 * 8))


def crop_box(hires: HiresSize, width: int, height: int) -> tuple[int, int, int, int] | None:
    """The region of a ``width`` x ``height`` first pass that becomes the hires image, or None for all of it."""
    return cover_box((width, height), hires.size) if hires.cropped else None


def upscale_to(size: tuple[int, int], width: int, height: int,
               crop: bool) -> tuple[float | None, int | None, int | None, tuple[int, int, int, int] | None]:
    """The extras' ``resize_mode`` 1 as the upscaler takes it (scale, width, height, box). A1111 scales the image by
    max(width / W, height / H), so that it covers ``width`` x ``height``, and with ``upscaling_crop`` (``crop``)
    centre-crops it to that size: here the same centre is cut first and upscaled to exactly that size."""
    if crop:
        return None, width, height, cover_box(size, (width, height))
    return max(width / size[0], height / size[1]), None, None, None


def binary_mask(image: Image.Image) -> Image.Image:
    """An inpainting mask as A1111 reads an upload (``create_binary_mask`` at its ``mask_round`` default): an RGBA
    image that is not wholly opaque is its alpha channel, rounded (above 128 white, else black), as a page's
    transparent brush strokes are sent; any other image its luminance, as it is."""
    if image.mode == "RGBA" and image.getextrema()[-1] != (255, 255):
        return image.getchannel("A").point(lambda x: 255 if x > 128 else 0)
    return image.convert("L")


class Edit(NamedTuple):
    """An img2img request's inputs as the base takes them (``edit_inputs``)."""

    inits: list[Image.Image]  # framed at the request's size, or as uploaded (see edit_inputs)
    mask: Image.Image | None  # as drawn: the base blurs it and frames it by the request's resize mode
    only_masked: bool  # A1111's inpaint_full_res with a mask that is not blank once blurred
    upload: Image.Image  # the first init image as uploaded: what a ControlNet unit without an image reads


def edit_inputs(r: Img2ImgRequest, uploads: list[bytes],
                blurred_box: Callable[[Image.Image, int, int], Box | None] = masking.blurred_box) -> Edit:
    """An img2img request's init images (``uploads``) and mask, decoded and framed at its size as ``resize_mode``
    says, the mask inverted with ``inpainting_mask_invert`` (its black area is then the one repainted); and whether
    only the mask's region is inpainted (A1111's ``inpaint_full_res``, "Only masked"). One init image stretched (the
    default) is left to the base, which stretches it; several are framed here, since each becomes a pass of its own
    at the request's size. The mask is left at its size: the base blurs it there and then frames it as the init
    images are (``mask_fit``), as A1111 does. "Only masked" leaves the init images at their own size (the base cuts
    the region out and pastes it back there), the mask framed at the first one's where it has another size; with a
    mask blank once blurred it is image-to-image without a mask, as A1111 falls back: decided here by ``blurred_box``
    (the ingress asks a base replica, which blurs as it will blur the mask), so that the infotext says what ran."""
    fit = FITS[r.resize_mode]
    inits = [decode(data, field="init_images") for data in uploads]
    upload, mask = inits[0], None
    if r.mask:
        mask = binary_mask(image_field(r.mask, "mask"))
        if r.inpainting_mask_invert:
            mask = ImageOps.invert(mask)
        if r.inpaint_full_res:
            mask = masking.at_size(mask, inits[0].size, fit)
            if blurred_box(mask, *r.mask_blurs()) is not None:
                return Edit(inits, mask, True, upload)
            mask = None  # A1111 drops a mask blank once blurred: image-to-image over the whole image
    if fit != "stretch" or len(inits) > 1:
        inits = [frame(to_rgb(image), r.width, r.height, fit) for image in inits]
    return Edit(inits, mask, False, upload)
