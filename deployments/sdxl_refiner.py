"""SDXL refiner: the second denoising stage.

Graph position: SDXLBase -> **SDXLRefiner** -> (FaceRestorer) -> ingress. Two modes, as in cog-sdxl:
- expert ensemble: finish the base model's latents from ``denoising_start`` (no decode in between);
- refine a finished image as img2img at ``strength`` (the hires-fix pass at 1536x1536, strength 0.35).
It runs in its own replicas and loads its own weights.
"""

from __future__ import annotations

import logging
import math
import threading
from pathlib import Path

import torch
from PIL import Image
from ray import serve

from deployments.support import device as devices
from deployments.support import fastpath
from deployments.support.config import SDXLRefinerConfig
from deployments.support.errors import InvalidInput
from deployments.support.generation import (
    Cancellation,
    ProgressFn,
    RefineRequest,
    StageResult,
    check_size,
    parse_lora_tags,
)
from deployments.support.imaging import to_rgb
from deployments.support.metrics import StageMetrics
from deployments.support.samplers import build_scheduler
from deployments.support.settings import Settings, current
from deployments.weights import loader

logger = logging.getLogger(__name__)


class Refiner:
    def __init__(self, config: SDXLRefinerConfig, settings: Settings | None = None) -> None:
        self.config = config
        self.settings = settings or current()
        self.device, self.dtype = devices.resolve(config.device)
        self.pipe = loader.load_sdxl(config.model, refiner=True, dtype=self.dtype, settings=settings,
                                     vae=config.vae).to(self.device)
        self.fast = fastpath.apply(self.pipe, config.device, config.fast, self.device, self.compile_cache)
        self.scheduler_config = dict(self.pipe.scheduler.config)
        self.cancellation = Cancellation()
        self._lock = threading.Lock()
        self.oom = devices.OomGuard(self.device, "SDXL refiner")
        logger.info("SDXL refiner %r ready on %s (%s), fast path: %s", config.name, self.device, self.dtype,
                    ", ".join(self.fast) or "eager")

    @property
    def compile_cache(self) -> Path:
        return self.settings.model_cache_dir / "compile" / "sdxl-refiner"

    def warm_up(self) -> None:
        """Refine a grey image of each configured size once (image mode, the hires-fix pass)."""
        request = RefineRequest(prompt="warm-up", steps=self.config.fast.warmup_steps, strength=1.0)
        fastpath.warm_up("SDXL refiner", self.config.fast, self.device, self.compile_cache,
                         lambda w, h: self.refine_images(request, Image.new("RGB", (w, h), (128, 128, 128))))

    def refine_latents(self, request: RefineRequest, source: StageResult, request_id: str | None = None,
                       on_progress: ProgressFn | None = None) -> StageResult:
        """Expert ensemble: finish the base model's latents from ``denoising_start``; no decode in between."""
        if source.latents is None:
            raise InvalidInput("the previous stage handed on no latents", field="latents")
        if len(source.latents) != len(source.seeds):
            raise InvalidInput("one seed per latent is required", field="seeds")
        total = max(1, round(request.steps * (1 - request.denoising_start)))
        kwargs = dict(image=torch.from_numpy(source.latents), denoising_start=request.denoising_start,
                      num_inference_steps=request.steps)
        images = self._run(request, source.seeds, kwargs, total, request_id, on_progress)
        return source.then(images, refiner=self.config.name, refiner_mode="ensemble")

    def refine_images(self, request: RefineRequest, source: StageResult | Image.Image, request_id: str | None = None,
                      on_progress: ProgressFn | None = None) -> StageResult:
        """Refine finished images as img2img at ``strength`` (the hires-fix pass)."""
        source = StageResult.of(source)
        seeds = source.seeds or request.seeds or [0] * len(source.images)
        if not source.images or len(seeds) != len(source.images):
            raise InvalidInput("one seed per image is required", field="seeds")
        for image in source.images:
            check_size(image.width, image.height, self.config.max_pixels)
        # As A1111 does, a low strength still runs one step; diffusers would run none and return nothing.
        steps = max(request.steps, math.ceil(1 / request.strength))
        kwargs = dict(image=[to_rgb(i) for i in source.images], strength=request.strength, num_inference_steps=steps)
        images = self._run(request, seeds, kwargs, max(1, int(steps * request.strength)), request_id, on_progress)
        result = source.then(images, refiner=self.config.name, refiner_mode="image")
        result.seeds = list(seeds)
        return result

    def _run(self, request: RefineRequest, seeds: list[int], kwargs: dict, total: int, request_id: str | None,
             on_progress: ProgressFn | None) -> list[Image.Image]:
        prompt, _ = parse_lora_tags(request.prompt)  # LoRAs belong to the base model
        report = self.cancellation.callback(request_id, on_progress)

        def on_step_end(_pipe, step, _timestep, callback_kwargs):
            report(step + 1, total)
            return callback_kwargs

        try:
            with self._lock, self.oom():
                self.pipe.scheduler = build_scheduler(request.sampler or "Euler", self.scheduler_config)
                with fastpath.attention(self.config.fast):
                    latents = self.pipe(
                        prompt=prompt, negative_prompt=request.negative_prompt or None,
                        guidance_scale=request.guidance_scale, aesthetic_score=request.aesthetic_score,
                        negative_aesthetic_score=request.negative_aesthetic_score, num_images_per_prompt=len(seeds),
                        generator=[torch.Generator("cpu").manual_seed(s) for s in seeds],
                        callback_on_step_end=on_step_end, output_type="latent", **kwargs,
                    ).images
                    return fastpath.decode(self.pipe, latents)
        finally:
            self.cancellation.finish(request_id)

    def describe(self) -> dict:
        return {"name": self.config.name, "device": str(self.device), "dtype": str(self.dtype).removeprefix("torch."),
                "fast_path": self.fast, **devices.memory(self.device)}


@serve.deployment(ray_actor_options={"num_cpus": 0.5}, max_ongoing_requests=4, health_check_period_s=10)
class SDXLRefiner:
    def __init__(self, config: dict | SDXLRefinerConfig) -> None:
        self.thread = devices.InferenceThread("sdxl-refiner")
        self.model = self.thread.call(Refiner, SDXLRefinerConfig.model_validate(config))
        self.thread.call(self.model.warm_up)
        self.metrics = StageMetrics("sdxl_refiner")

    async def refine_latents(self, request: RefineRequest, source: StageResult,
                             request_id: str | None = None) -> StageResult:
        """Expert ensemble on the base model's latents (``source``: the base stage's result)."""
        return await self._track(self.model.refine_latents, request, source, request_id)

    async def refine_images(self, request: RefineRequest, source: StageResult | Image.Image,
                            request_id: str | None = None) -> StageResult:
        """img2img on finished images (``source``: an image-bearing stage result, or an image)."""
        return await self._track(self.model.refine_images, request, source, request_id)

    async def _track(self, method, request: RefineRequest, source, request_id: str | None) -> StageResult:
        with self.metrics.track():
            result = await self.thread.run(method, request, source, request_id)
        self.metrics.produced(len(result.images))
        return result

    async def cancel(self, request_id: str) -> None:
        self.model.cancellation.cancel(request_id)

    async def describe(self) -> dict:
        return self.model.describe()

    async def check_health(self) -> None:
        if not self.model.oom.healthy():
            raise RuntimeError("SDXL refiner: repeated out-of-memory failures")
