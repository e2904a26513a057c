"""Seed 002's processing service: ``POST /process``, ``/derivatives`` and ``/derivatives/clip-focal``.

``/process`` also draws seed 002's optional text overlay and watermark (operation ``overlay``; see
``deployments.support.overlay``)."""

import asyncio
import base64
import re
from typing import Literal

from fastapi import APIRouter
from PIL import Image
from pydantic import BaseModel, Field, field_validator

from deployments.support import overlay
from deployments.support.cropping import CropSize, Focus, derivatives
from deployments.support.errors import InvalidInput
from deployments.support.imaging import encode, exif_of, to_rgb
from deployments.support.settings import Settings
from graphs.api.body import JSONBodyRoute
from graphs.api.errors import call, documented
from graphs.api.fields import image_field

router = APIRouter(tags=["processing"], route_class=JSONBodyRoute, responses=documented(400))

Operation = Literal["sanitize", "overlay", "optimize", "convert-webp", "derivatives"]
DEFAULT_WIDTHS = [320, 640, 1024, 1920]
OPTIMIZE_QUALITY = 82  # seed 002: optimize = WebP, balanced
WEBP_QUALITY = 90  # seed 002: convert-webp = high-quality WebP


class Derivative(BaseModel):
    name: str | None = None
    width: int
    height: int
    format: str
    imageData: str
    box: list[int] | None = None


class ProcessRequest(BaseModel):
    image: str = Field(..., description="base64 or data URI (PNG, JPEG or WebP)")
    operations: list[Operation] = Field(["optimize", "convert-webp", "derivatives"], max_length=5)
    widths: list[int] = Field(DEFAULT_WIDTHS, max_length=16)
    quality: int | None = Field(None, ge=1, le=100)
    overlays: list[overlay.Overlay] = Field([], max_length=8, description="drawn in order by the overlay "
                                            "operation: captions and logo watermarks")


class ProcessResponse(BaseModel):
    imageData: str
    format: str
    width: int
    height: int
    derivatives: list[Derivative]
    metadata: dict


class DerivativesRequest(BaseModel):
    image: str
    widths: list[int] = Field(DEFAULT_WIDTHS, min_length=1, max_length=16)
    format: Literal["png", "jpeg", "webp"] = "webp"
    quality: int = Field(OPTIMIZE_QUALITY, ge=1, le=100)


class FocalPoint(BaseModel):
    x: float = Field(..., ge=0, allow_inf_nan=False)
    y: float = Field(..., ge=0, allow_inf_nan=False)


class ClipFocalRequest(BaseModel):
    image: str
    sizes: list[CropSize | str] = Field(..., min_length=1, max_length=32, description="objects or 'WxH'")
    focalPoint: FocalPoint | None = Field(None, description="overrides face detection")
    format: Literal["png", "jpeg", "webp"] = "webp"
    quality: int = Field(OPTIMIZE_QUALITY, ge=1, le=100)

    @field_validator("sizes", mode="before")
    @classmethod
    def parse_sizes(cls, sizes):
        out = []
        for item in sizes if isinstance(sizes, list) else []:
            if isinstance(item, str):
                match = re.fullmatch(r"(\d{1,5})x(\d{1,5})", item)
                if not match:
                    raise ValueError(f"size {item!r} is not WxH")
                out.append({"name": item, "width": int(match[1]), "height": int(match[2])})
            else:
                out.append(item)
        return out


class ClipFocalResponse(BaseModel):
    focalPoint: dict
    derivatives: list[Derivative]


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def overlays_of(body: ProcessRequest, fonts_dir) -> list[overlay.Prepared]:
    """The checked overlays; the operation and its overlays come together."""
    if "overlay" in body.operations and not body.overlays:
        raise InvalidInput("the overlay operation needs at least one of overlays", field="overlays")
    if body.overlays and "overlay" not in body.operations:
        raise InvalidInput("overlays are given but 'overlay' is not among the operations", field="operations")
    return overlay.prepare_all(body.overlays, fonts_dir, "overlays")


def process_image(image: Image.Image, body: ProcessRequest,
                  overlays: list[overlay.Prepared] | None = None) -> ProcessResponse:
    """Apply the operations in a fixed order: sanitize, overlay, optimize, convert-webp, derivatives."""
    stripped = sorted(k for k in image.info if k not in {"dpi"})
    exif = exif_of(image)  # None: a block too broken to read, stripped all the same
    if "exif" not in stripped and (exif is None or len(exif)):
        stripped.append("exif")
    # Re-encoding from raw pixels drops EXIF, XMP, ICC and text chunks: nothing but pixels survives.
    clean = Image.frombytes(image.mode, image.size, image.tobytes()) if image.mode in ("RGB", "RGBA", "L") else \
        to_rgb(image)
    clean = overlay.draw_all(clean, overlays or [])
    fmt, quality = "png", 100
    if "optimize" in body.operations:
        fmt, quality = "webp", body.quality or OPTIMIZE_QUALITY
    if "convert-webp" in body.operations:
        fmt, quality = "webp", body.quality or WEBP_QUALITY
    data = encode(clean, fmt, quality)  # type: ignore[arg-type]
    variants = []
    if "derivatives" in body.operations:
        for width, blob in derivatives(clean, body.widths, "webp", body.quality or OPTIMIZE_QUALITY).items():
            height = max(1, round(clean.height * width / clean.width))
            variants.append(Derivative(width=width, height=height, format="webp", imageData=_b64(blob)))
    return ProcessResponse(imageData=_b64(data), format=fmt, width=clean.width, height=clean.height,
                           derivatives=variants,
                           metadata={"operations": body.operations, "bytes": len(data), "strippedMetadata": stripped})


class ProcessingRoutes:
    cropper: object
    settings: Settings

    @router.post("/process", response_model=ProcessResponse)
    async def process(self, body: ProcessRequest) -> ProcessResponse:
        """Sanitize (strip metadata, re-encode), overlay text or a logo, optimize, convert to WebP and cut
        responsive derivatives."""
        overlays = await asyncio.to_thread(overlays_of, body, self.settings.fonts_dir)
        image = await asyncio.to_thread(image_field, body.image, "image")
        return await asyncio.to_thread(process_image, image, body, overlays)

    @router.post("/derivatives", response_model=ClipFocalResponse)
    async def derivatives(self, body: DerivativesRequest) -> ClipFocalResponse:
        """Responsive variants at the given widths (never wider than the image)."""
        image = to_rgb(await asyncio.to_thread(image_field, body.image, "image"))
        blobs = await asyncio.to_thread(derivatives, image, body.widths, body.format, body.quality)
        out = [Derivative(width=w, height=max(1, round(image.height * w / image.width)), format=body.format,
                          imageData=_b64(b)) for w, b in blobs.items()]
        return ClipFocalResponse(focalPoint={}, derivatives=out)

    @router.post("/derivatives/clip-focal", response_model=ClipFocalResponse, responses=documented(503))
    async def clip_focal(self, body: ClipFocalRequest) -> ClipFocalResponse:
        """Focal-preserving crops: the faces (or the given point) stay in every size."""
        image = await asyncio.to_thread(image_field, body.image, "image")
        sizes = [s if isinstance(s, CropSize) else CropSize.model_validate(s) for s in body.sizes]
        focus = Focus((body.focalPoint.x, body.focalPoint.y), [], "given") if body.focalPoint else None
        focus, crops = await call(self.cropper.crop.remote(image, sizes, focus, body.format,  # type: ignore[attr-defined]
                                                          body.quality))
        out = [Derivative(name=c.name, width=c.image.width, height=c.image.height, format=body.format,
                          imageData=_b64(c.encoded or b""), box=list(c.box)) for c in crops]
        point = {"x": focus.point[0], "y": focus.point[1], "source": focus.source, "faces": focus.faces}
        return ClipFocalResponse(focalPoint=point, derivatives=out)
