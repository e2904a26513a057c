"""Focal cropper: find the focal point and cut every requested size around it.

Graph position: SDXLBase -> **FocalCropper** -> (Upscaler when a crop is smaller than its target) -> ingress.
The focal point comes from detected faces (MediaPipe), or the centre when there are none. For each target size
the crop is the largest rectangle of the target's aspect ratio that fits the image and keeps every face whole
(centred on the focal point when the faces cannot all fit), then resized to the target.
"""

from __future__ import annotations

import asyncio

from PIL import Image
from ray import serve

from deployments.support import faces as face_lib
from deployments.support.config import FocalCropperConfig
from deployments.support.cropping import Crop, CropSize, Focus, crop_box, derivatives
from deployments.support.errors import InvalidInput
from deployments.support.generation import StageResult
from deployments.support.imaging import Format, encode, pil_to_array, to_rgb
from deployments.support.logs import replica_logging
from deployments.support.metrics import StageMetrics


class Cropper:
    def __init__(self, config: FocalCropperConfig) -> None:
        self.config = config
        self.detector: face_lib.MediaPipeDetector | face_lib.RetinaFaceDetector
        if config.retinaface:
            from deployments.support.device import resolve

            device, _ = resolve(config.device)
            self.detector = face_lib.RetinaFaceDetector(config.retinaface, device, config.min_detection_confidence)
        else:
            self.detector = face_lib.MediaPipeDetector(config.min_detection_confidence)

    def focus(self, image: Image.Image) -> Focus:
        found = self.detector.detect(pil_to_array(image))
        if not found:
            return Focus((image.width / 2, image.height / 2), [], "centre")
        # Weight each face by its area: the main subject dominates, background faces still count.
        areas = [(f.box[2] - f.box[0]) * (f.box[3] - f.box[1]) for f in found]
        total = sum(areas)
        x = sum(f.centre[0] * a for f, a in zip(found, areas, strict=True)) / total
        y = sum(f.centre[1] * a for f, a in zip(found, areas, strict=True)) / total
        return Focus((x, y), [f.box for f in found], "faces")

    def crop(
        self,
        image: Image.Image,
        sizes: list[CropSize],
        focus: Focus | None = None,
        fmt: Format | None = None,
        quality: int = 90,
        derivative_widths: list[int] | None = None,
    ) -> tuple[Focus, list[Crop]]:
        if not sizes:
            raise InvalidInput("at least one size is required", field="sizes")
        image = to_rgb(image)
        focus = focus or self.focus(image)
        crops = []
        for size in sizes:
            if size.width * size.height > self.config.max_output_pixels:
                raise InvalidInput(f"{size.name}: {size.width}x{size.height} is too large", field="sizes")
            box = crop_box(image.size, (size.width, size.height), focus)
            region = image.crop(box)
            upscaled = region.width < size.width or region.height < size.height
            out = region.resize((size.width, size.height), Image.Resampling.LANCZOS)
            crop = Crop(size.name, box, out, upscaled)
            if fmt is not None:
                crop.encoded = encode(out, fmt, quality)
                crop.derivatives = derivatives(out, derivative_widths or [], fmt, quality)
            crops.append(crop)
        return focus, crops


@serve.deployment(ray_actor_options={"num_cpus": 0.5}, max_ongoing_requests=8, health_check_period_s=10)
class FocalCropper:
    def __init__(self, config: dict | FocalCropperConfig | None = None) -> None:
        replica_logging()  # before anything here logs
        self.model = Cropper(FocalCropperConfig.model_validate(config or {}))
        self.metrics = StageMetrics("focal_cropper")

    async def focus(self, image) -> Focus:
        """``image``: an image or the previous stage's result."""
        return await asyncio.to_thread(self.model.focus, StageResult.of(image).image)

    async def crop(self, image, sizes: list[CropSize], focus: Focus | None = None,
                   fmt: Format | None = None, quality: int = 90,
                   derivative_widths: list[int] | None = None) -> tuple[Focus, list[Crop]]:
        source = StageResult.of(image)
        with self.metrics.track():
            found, crops = await asyncio.to_thread(self.model.crop, source.image, sizes, focus, fmt, quality,
                                                   derivative_widths)
        verdict = source.info["nsfw"][0] if "nsfw" in source.info else None
        for crop in crops:  # a crop of a screened image carries its verdict, so the image need not travel for it
            crop.nsfw = verdict
        self.metrics.produced(len(crops))
        return found, crops
