"""Face restorer: detect, align, restore, paste back.

Graph position: (SDXLBase | SDXLRefiner | Upscaler) -> **FaceRestorer** -> ingress. CodeFormer (with its
fidelity ``weight``), GFPGAN or RestoreFormer through spandrel; every face is warped to the 512x512 FFHQ
template, restored, warped back with a feathered mask and blended by ``visibility``. No face: the image comes
back unchanged and flagged. No restorer loaded: skipped and flagged, never an error.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from typing import Any

import numpy as np
import torch
from PIL import Image
from ray import serve

from deployments.support import device as devices
from deployments.support import faces as face_lib
from deployments.support.config import FaceRestorerConfig
from deployments.support.errors import InvalidInput, ModelLoadError
from deployments.support.generation import Encoding, StageResult, encoded
from deployments.support.imaging import pil_to_array
from deployments.support.logs import replica_logging
from deployments.support.metrics import StageMetrics
from deployments.support.settings import Settings, current
from deployments.weights import loader

logger = logging.getLogger(__name__)

# How each restorer's raw network is called: [-1, 1] in, [-1, 1] out, as the original repositories (and A1111)
# call them. spandrel's descriptor ``__call__`` is not used: it wants [0, 1] input and clamps its output to [0, 1],
# which loses everything darker than mid-grey (and RestoreFormer's call normalises to [-1, 1] a second time).
# GFPGAN's ``return_rgb=False`` skips its intermediate-resolution RGB outputs, which are thrown away anyway.
RESTORERS = {
    "CodeFormer": lambda model, x, weight: model(x, weight=weight)[0],
    # The checkpoint's own noise buffers, not fresh noise: the same face restores the same way (the result cache).
    "GFPGAN": lambda model, x, weight: model(x, return_rgb=False, randomize_noise=False)[0],
    "RestoreFormer": lambda model, x, weight: model(x)[0],
}


class FaceEnhancer:
    def __init__(self, config: FaceRestorerConfig, settings: Settings | None = None) -> None:
        self.config = config
        self.device, dtype = devices.resolve(config.device)
        self.descriptor = None
        self.dtype = torch.float32
        self.weights = loader.WeightFiles()
        if config.model:
            self.descriptor = loader.load_spandrel(config.model, settings).to(self.device).eval()
            if self.descriptor.architecture.id not in RESTORERS:
                # Any other network's value range is unknown here; guessing it gives a washed-out or clipped face.
                raise ModelLoadError(f"{config.model}: a {self.descriptor.architecture.id} model is not a face "
                                     f"restorer (expected one of {', '.join(RESTORERS)})", field="face_restorer.model")
            self.weights.add("face_restorer", loader.resolve(config.model, settings))
            # float16 overflows in the face models' normalisations; bfloat16 has float32's range.
            self.dtype = devices.supported_dtype(self.descriptor, dtype)
            if self.dtype == torch.float16:
                self.dtype = torch.float32
            self.descriptor.to(self.dtype)
            if config.device.channels_last and self.device.type == "cuda":
                self.descriptor.model.to(memory_format=torch.channels_last)
            logger.info("face restorer: %s (%s)", self.descriptor.architecture.id, self.dtype)
        self.detector: face_lib.MediaPipeDetector | face_lib.RetinaFaceDetector
        if config.retinaface:
            self.detector = face_lib.RetinaFaceDetector(
                config.retinaface, self.device, config.min_detection_confidence, config.max_faces
            )
            self.weights.add("retinaface", loader.resolve(config.retinaface, settings))
        else:
            self.detector = face_lib.MediaPipeDetector(config.min_detection_confidence)
        self._lock = threading.Lock()
        self.oom = devices.OomGuard(self.device, "face restorer")
        self.size = 512

    @property
    def name(self) -> str | None:
        return self.descriptor.architecture.id if self.descriptor is not None else None

    def detect(self, image: Image.Image) -> list[face_lib.Face]:
        return self._faces(pil_to_array(image))

    def _faces(self, rgb: np.ndarray) -> list[face_lib.Face]:
        """The faces to restore: at most ``max_faces``, the most confident (every detector returns them first)."""
        return self.detector.detect(rgb)[: self.config.max_faces]

    def restore(self, source: StageResult | Image.Image, weight: float = 0.6, visibility: float = 1.0) -> StageResult:
        """Every image of ``source`` (a batch stays one call). ``weight``: CodeFormer fidelity (0 = strongest
        restoration, 1 = closest to input). ``info`` gains ``faces_found`` (over all images), ``face_boxes`` (of
        the first image), ``face_restoration_applied`` (to any image) and ``restorer``."""
        source = StageResult.of(source)
        source.image  # noqa: B018 - a source with no image is refused here, naming the field
        if not 0.0 <= weight <= 1.0:
            raise InvalidInput("weight must lie in [0, 1]", field="face_restoration_weight")
        if not 0.0 <= visibility <= 1.0:
            raise InvalidInput("visibility must lie in [0, 1]", field="visibility")
        outcomes = [self._restore_one(image, weight, visibility) for image in source.images]
        warnings = list(dict.fromkeys(w for _image, _boxes, _applied, w in outcomes if w))
        facts: dict[str, Any] = dict(faces_found=sum(len(boxes) for _image, boxes, _applied, _w in outcomes),
                                     face_boxes=outcomes[0][1], restorer=self.name,
                                     face_restoration_applied=any(applied for _i, _b, applied, _w in outcomes))
        # An inpainting's paste over its init image came here undone (A1111 restores the faces of what it inpainted,
        # then pastes it): done now, so faces outside the inpainted region stay as they were.
        return source.then([image for image, *_ in outcomes], warnings=warnings, **facts).pasted()

    def _restore_one(self, image: Image.Image, weight: float, visibility: float):
        """One image: (the image, its face boxes, whether it was restored, a warning or None)."""
        rgb = pil_to_array(image)
        found = self._faces(rgb)
        boxes = [f.box for f in found]
        descriptor = self.descriptor
        if descriptor is None:
            return image, boxes, False, "no face restorer loaded: faces not restored"
        if not found:
            return image, boxes, False, "no face detected: image unchanged"
        out = rgb
        with self._lock, self.oom(), torch.inference_mode():
            for face in found:
                crop, matrix = face_lib.align(out, face, self.size)
                restored = self._restore_crop(descriptor, crop, weight)
                out = face_lib.paste_back(out, restored, matrix, blend=visibility)
        return Image.fromarray(out), boxes, True, None

    def _restore_crop(self, descriptor, crop: np.ndarray, weight: float) -> np.ndarray:
        tensor = torch.from_numpy(crop).permute(2, 0, 1)[None].float().div(255).to(self.device)
        tensor = (tensor * 2 - 1).to(self.dtype)  # the face models were trained on [-1, 1]
        # Autocast in half precision: CodeFormer's codebook lookup multiplies a float32 one-hot by its weights.
        with torch.autocast(self.device.type, self.dtype, enabled=self.dtype != torch.float32):
            output = RESTORERS[descriptor.architecture.id](descriptor.model, tensor, weight)
        output = ((output.float() + 1) / 2).clamp(0, 1)
        return (output[0].permute(1, 2, 0).cpu().numpy() * 255).round().astype(np.uint8)


@serve.deployment(ray_actor_options={"num_cpus": 0.5}, max_ongoing_requests=4, health_check_period_s=10)
class FaceRestorer:
    def __init__(self, config: dict | FaceRestorerConfig) -> None:
        replica_logging()  # before anything here logs
        self.thread = devices.InferenceThread("face-restorer")
        self.model = self.thread.call(FaceEnhancer, FaceRestorerConfig.model_validate(config))
        self.metrics = StageMetrics("face_restorer")

    async def restore(self, source: StageResult | Image.Image, weight: float = 0.6,
                      visibility: float = 1.0, encode: Encoding | None = None) -> StageResult:
        """``source``: the previous stage's result, or an image; ``encode``: answer with files, not pixels."""
        with self.metrics.track():
            result = await self.thread.run(self.model.restore, source, weight, visibility)
        self.metrics.produced(1)
        return await encoded(result, encode)

    async def describe(self) -> dict:
        return {"restorer": self.model.name, "detector": type(self.model.detector).__name__,
                "dtype": str(self.model.dtype).removeprefix("torch."), **devices.memory(self.model.device)}

    async def fingerprint(self) -> dict[str, str]:
        """Hashes of the loaded weights (the result cache's key), off the inference thread; the detector counts too
        (it decides which faces are restored)."""
        detector = type(self.model.detector).__name__
        return {**await asyncio.to_thread(self.model.weights.digests),
                "faces_runtime": f"{self.model.device.type}/{self.model.dtype}/{detector}"}

    async def check_health(self) -> None:
        # Flags only: the detector and the restorer belong to the inference thread, which may be using them now.
        if self.model.config.model and self.model.descriptor is None:
            raise RuntimeError("face restorer configured but not loaded")
        devices.check_health(self.thread, self.model.oom, current().inference_stall_seconds)
