"""A1111's size rules, worked out in the ingress before any work starts: the hires fix's target size
(``StableDiffusionProcessingTxt2Img.calculate_target_resolution``) and the extras' upscale to a size
(``scripts/postprocessing_upscale.py``)."""

from __future__ import annotations

from dataclasses import dataclass

from deployments.support.imaging import cover_box


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
