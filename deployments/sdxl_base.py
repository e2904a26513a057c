"""SDXL base: the first stage of every generation plan.

Graph position: ingress -> **SDXLBase** -> (SDXLRefiner | Upscaler | FaceRestorer | FocalCropper).
Text-to-image, image-to-image, inpainting, IP-Adapter (a photo as prompt, which also gives style transfer:
a style image through IP-Adapter applied to a content image), LoRA and per-request samplers. With
``denoising_end`` it stops early and hands raw latents to the refiner (expert ensemble), never a decoded image.
"""

from __future__ import annotations

import logging
import math
import threading
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageFilter
from ray import serve

from deployments.support import device as devices
from deployments.support import fastpath
from deployments.support.config import SDXLBaseConfig
from deployments.support.errors import UnknownModel
from deployments.support.generation import (
    Cancellation,
    GenerationRequest,
    LoraRef,
    ProgressFn,
    StageResult,
    check_size,
    mode_of,
    parse_lora_tags,
    resolve_seeds,
)
from deployments.support.imaging import to_rgb
from deployments.support.metrics import StageMetrics
from deployments.support.samplers import build_scheduler
from deployments.support.settings import Settings, current
from deployments.weights import loader

logger = logging.getLogger(__name__)


class BaseGenerator:
    """The SDXL base pipeline with its derived img2img / inpaint pipelines, LoRAs and IP-Adapter."""

    def __init__(self, config: SDXLBaseConfig, settings: Settings | None = None) -> None:
        from diffusers import StableDiffusionXLImg2ImgPipeline, StableDiffusionXLInpaintPipeline

        self.config = config
        self.settings = settings or current()
        self.device, self.dtype = devices.resolve(config.device)
        pipe = loader.load_sdxl(config.model, refiner=False, dtype=self.dtype, settings=settings, vae=config.vae)
        if config.ip_adapter:
            self._load_ip_adapter(pipe, loader.resolve(config.ip_adapter, settings))
        self.loras = self._load_loras(pipe, config.lora_dir, settings)
        pipe.to(self.device)
        self.fast = fastpath.apply(pipe, config.device, config.fast, self.device, self.compile_cache)
        self.txt2img = pipe
        # The derived pipelines share every module with the base one: no extra memory, one set of LoRA layers.
        self.img2img = StableDiffusionXLImg2ImgPipeline.from_pipe(pipe)
        self.inpaint = StableDiffusionXLInpaintPipeline.from_pipe(pipe)
        for p in (self.img2img, self.inpaint):
            p.set_progress_bar_config(disable=True)
        self.scheduler_config = dict(pipe.scheduler.config)
        build_scheduler(config.default_sampler, self.scheduler_config)  # fail at start-up, not per request
        self.cancellation = Cancellation()
        self._lock = threading.Lock()  # the pipelines are stateful (scheduler, adapters): one call at a time
        self.oom = devices.OomGuard(self.device, "SDXL base")
        logger.info("SDXL base %r ready on %s (%s), %d LoRAs, fast path: %s", config.name, self.device, self.dtype,
                    len(self.loras), ", ".join(self.fast) or "eager")

    @property
    def compile_cache(self) -> Path:
        return self.settings.model_cache_dir / "compile" / "sdxl-base"

    def warm_up(self) -> None:
        steps = self.config.fast.warmup_steps
        fastpath.warm_up("SDXL base", self.config.fast, self.device, self.compile_cache, lambda w, h: self.generate(
            GenerationRequest(prompt="warm-up", width=w, height=h, steps=steps, seed=0)))

    @staticmethod
    def _load_ip_adapter(pipe, folder: Path) -> None:
        from transformers import CLIPImageProcessor

        weights = folder / "ip-adapter_sdxl.safetensors"
        if not weights.exists():
            weights = next(folder.glob("*.safetensors"), weights)
        loader.check_safetensors(weights)
        processor = folder / "image_encoder" / "preprocessor_config.json"
        if processor.exists():  # encoders trained at another resolution ship their own preprocessing
            pipe.feature_extractor = CLIPImageProcessor.from_pretrained(processor.parent)
        pipe.load_ip_adapter(str(folder), subfolder="", weight_name=weights.name, image_encoder_folder="image_encoder")

    @staticmethod
    def _load_loras(pipe, lora_dir: str | None, settings: Settings | None) -> dict[str, Path]:
        if not lora_dir:
            return {}
        loras = {}
        for path in sorted(loader.resolve(lora_dir, settings).glob("*")):
            if path.suffix.lower() in loader.PICKLE_SUFFIXES | {".safetensors"}:
                try:
                    loader.check_safetensors(path)
                except loader.UnsafeWeights as e:
                    logger.warning("LoRA skipped: %s", e)
                    continue
                pipe.load_lora_weights(str(path), adapter_name=path.stem)
                loras[path.stem] = path
        return loras

    @property
    def ip_adapter_loaded(self) -> bool:
        return getattr(self.txt2img.unet, "encoder_hid_proj", None) is not None

    def _apply_loras(self, refs: list[LoraRef], warnings: list[str], *, strict: bool) -> list[LoraRef]:
        active = []
        for ref in refs:
            if ref.name not in self.loras:
                if strict:
                    choices = {"choices": list(self.loras)}
                    raise UnknownModel(f"unknown LoRA {ref.name!r}", field="loras", details=choices)
                warnings.append(f"LoRA {ref.name!r} not found, ignored")
                continue
            if ref.weight != 0.0:
                active.append(ref)
        if active:
            self.txt2img.enable_lora()
            self.txt2img.set_adapters([r.name for r in active], [r.weight for r in active])
        elif self.loras:
            self.txt2img.disable_lora()
        return active

    def generate(
        self, request: GenerationRequest, request_id: str | None = None, on_progress: ProgressFn | None = None
    ) -> StageResult:
        check_size(request.width, request.height, self.config.max_pixels)
        mode = mode_of(request)
        prompt, tagged = parse_lora_tags(request.prompt)
        seeds = resolve_seeds(request.seed, request.batch_size)
        warnings: list[str] = []
        report = self.cancellation.callback(request_id, on_progress)
        try:
            with self._lock, self.oom():
                loras = self._apply_loras(request.loras, warnings, strict=True)
                loras += self._apply_loras_from_prompt(tagged, loras, warnings)
                result = self._run(mode, request, prompt, seeds, report, warnings, request_id)
        finally:
            self.cancellation.finish(request_id)
        result.info.update(
            mode=mode,
            prompt=prompt,
            loras={r.name: r.weight for r in loras},
            sampler=request.sampler or self.config.default_sampler,
            model=self.config.name,
        )
        return result

    def _apply_loras_from_prompt(self, tagged: list[LoraRef], explicit: list[LoraRef], warnings: list[str]):
        if not tagged:
            return []
        merged = {r.name: r for r in explicit}
        merged.update({r.name: r for r in tagged})
        active = self._apply_loras(list(merged.values()), warnings, strict=False)
        return [r for r in active if r.name not in {e.name for e in explicit}]

    def _run(self, mode, request: GenerationRequest, prompt: str, seeds, report, warnings,
             request_id: str | None = None) -> StageResult:
        pipe = {"txt2img": self.txt2img, "img2img": self.img2img, "inpaint": self.inpaint}[mode]
        sampler = request.sampler or self.config.default_sampler
        pipe.scheduler = build_scheduler(sampler, self.scheduler_config, request.schedule)

        def on_step_end(_pipe, step, _timestep, callback_kwargs):
            latents = callback_kwargs.get("latents")
            if latents is not None:
                self.cancellation.keep_latents(request_id, latents[0])
            report(step + 1, total_steps)
            return callback_kwargs

        kwargs: dict = dict(
            prompt=prompt,
            negative_prompt=request.negative_prompt or None,
            num_inference_steps=request.steps,
            guidance_scale=request.guidance_scale,
            num_images_per_prompt=len(seeds),
            # CPU generators make a seed give the same image on any device.
            generator=[torch.Generator("cpu").manual_seed(s) for s in seeds],
            callback_on_step_end=on_step_end,
        )
        total_steps = request.steps
        mask = None
        if request.init_image is None:
            kwargs.update(width=request.width, height=request.height)
        else:
            init = to_rgb(request.init_image).resize((request.width, request.height), Image.Resampling.LANCZOS)
            # A1111 runs at least one step at low strength; diffusers would run none and fail.
            steps = max(request.steps, math.ceil(1 / request.strength))
            kwargs.update(image=init, strength=request.strength, num_inference_steps=steps)
            total_steps = max(1, int(steps * request.strength))
            if request.mask is not None:
                mask = self._prepare_mask(request.mask, request)
                kwargs.update(mask_image=mask, width=request.width, height=request.height)
        if self.ip_adapter_loaded:
            reference = request.ip_adapter_image
            pipe.set_ip_adapter_scale(request.ip_adapter_scale if reference is not None else 0.0)
            # The adapted UNet always expects image embeddings: a blank image at scale 0 changes nothing.
            kwargs["ip_adapter_image"] = to_rgb(reference) if reference is not None else Image.new("RGB", (64, 64))
        elif request.ip_adapter_image is not None:
            warnings.append("no IP-Adapter is loaded: the reference image was ignored")
        if request.denoising_end is not None:
            kwargs["denoising_end"] = request.denoising_end
        with fastpath.attention(self.config.fast):
            latents = pipe(**kwargs, output_type="latent").images
        if request.denoising_end is not None:
            return StageResult(images=[], seeds=seeds, latents=latents.float().cpu().numpy(), warnings=warnings)
        images = self.decode(latents)
        if mask is not None:
            images = [self._keep_unmasked(init, image, mask) for image in images]
        return StageResult(images=images, seeds=seeds, warnings=warnings)

    def decode(self, latents: torch.Tensor) -> list[Image.Image]:
        with fastpath.attention(self.config.fast):
            return fastpath.decode(self.txt2img, latents)

    @staticmethod
    def _prepare_mask(mask: Image.Image, request: GenerationRequest) -> Image.Image:
        mask = mask.convert("L").resize((request.width, request.height), Image.Resampling.NEAREST)
        if request.mask_blur:
            mask = mask.filter(ImageFilter.GaussianBlur(request.mask_blur))
        return mask

    @staticmethod
    def _keep_unmasked(init: Image.Image, generated: Image.Image, mask: Image.Image) -> Image.Image:
        """Composite in pixel space: the VAE round trip would otherwise alter pixels the mask protects."""
        original = init.resize(generated.size, Image.Resampling.LANCZOS)
        alpha = np.asarray(mask, dtype=np.float32)[..., None] / 255.0
        out = np.asarray(generated, dtype=np.float32) * alpha + np.asarray(original, dtype=np.float32) * (1 - alpha)
        return Image.fromarray(out.round().astype(np.uint8))

    def describe(self) -> dict:
        return {
            "name": self.config.name,
            "device": str(self.device),
            "dtype": str(self.dtype).removeprefix("torch."),
            "loras": sorted(self.loras),
            "ip_adapter": self.ip_adapter_loaded,
            "fast_path": self.fast,
            **devices.memory(self.device),
            "running": self.cancellation.running(),
        }

    def healthy(self) -> bool:
        return self.oom.healthy()


@serve.deployment(ray_actor_options={"num_cpus": 0.5}, max_ongoing_requests=4, health_check_period_s=10)
class SDXLBase:
    """Thin Serve shell: loads the model once per replica, runs generations in a worker thread."""

    def __init__(self, config: dict | SDXLBaseConfig) -> None:
        self.thread = devices.InferenceThread("sdxl-base")
        self.model = self.thread.call(BaseGenerator, SDXLBaseConfig.model_validate(config))
        self.thread.call(self.model.warm_up)
        self.metrics = StageMetrics("sdxl_base")

    async def generate(self, request: GenerationRequest, request_id: str | None = None) -> StageResult:
        with self.metrics.track():
            result = await self.thread.run(self.model.generate, request, request_id)
        self.metrics.produced(len(result.images) or len(result.seeds))
        return result

    async def cancel(self, request_id: str) -> None:
        self.model.cancellation.cancel(request_id)

    async def progress(self, request_id: str) -> tuple[int, int] | None:
        return self.model.cancellation.progress(request_id)

    async def preview(self, request_id: str) -> Image.Image | None:
        """A latent-space approximation of the image being denoised, or None when the request is not running."""
        return self.model.cancellation.preview(request_id)

    async def describe(self) -> dict:
        return self.model.describe()

    async def check_health(self) -> None:
        if not self.model.healthy():
            raise RuntimeError("SDXL base: repeated out-of-memory failures")
