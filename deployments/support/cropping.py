"""Crop sizes, focal points and crops: the cropper's request and result types and its geometry.

They live apart from ``deployments.focal_cropper`` so the ingress and the job runner can name a size, read a crop
and cut responsive derivatives without importing the face detectors (cv2, MediaPipe) the cropper loads.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from PIL import Image
from pydantic import BaseModel, Field

from deployments.support.imaging import Format, encode


class CropSize(BaseModel):
    name: str = Field(..., min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.-]+$")
    width: int = Field(..., ge=8, le=8192)
    height: int = Field(..., ge=8, le=8192)


@dataclass
class Focus:
    point: tuple[float, float]
    faces: list[tuple[float, float, float, float]]
    source: str  # "faces" or "centre"


@dataclass
class Crop:
    name: str
    box: tuple[int, int, int, int]  # in source pixels
    image: Image.Image  # resized to the target
    upscaled: bool  # the crop was smaller than its target
    nsfw: bool | None = None  # the safety checker's verdict on the image it was cut from (None: not screened)
    encoded: bytes | None = None
    derivatives: dict[int, bytes] = field(default_factory=dict)


def crop_box(size: tuple[int, int], target: tuple[int, int], focus: Focus) -> tuple[int, int, int, int]:
    """The largest ``target``-aspect box inside ``size`` that keeps the faces whole, else centred on the focus."""
    width, height = size
    aspect = target[0] / target[1]
    crop_w, crop_h = (width, width / aspect) if width / height <= aspect else (height * aspect, height)
    crop_w, crop_h = min(crop_w, width), min(crop_h, height)
    fx, fy = focus.point
    x0, y0 = fx - crop_w / 2, fy - crop_h / 2
    if focus.faces:
        left = min(b[0] for b in focus.faces)
        top = min(b[1] for b in focus.faces)
        right = max(b[2] for b in focus.faces)
        bottom = max(b[3] for b in focus.faces)
        # Slide the window the least distance that brings the whole face union inside, when it can fit.
        if right - left <= crop_w:
            x0 = min(max(x0, right - crop_w), left)
        if bottom - top <= crop_h:
            y0 = min(max(y0, bottom - crop_h), top)
    x0 = min(max(0.0, x0), width - crop_w)
    y0 = min(max(0.0, y0), height - crop_h)
    return round(x0), round(y0), round(x0 + crop_w), round(y0 + crop_h)


def derivatives(image: Image.Image, widths: list[int], fmt: Format = "webp", quality: int = 80) -> dict[int, bytes]:
    """Responsive variants: one encoding per requested width not larger than the image, aspect kept."""
    out = {}
    for width in sorted(set(widths)):
        if not 8 <= width <= image.width:
            continue
        height = max(1, round(image.height * width / image.width))
        out[width] = encode(image.resize((width, height), Image.Resampling.LANCZOS), fmt, quality)
    return out
