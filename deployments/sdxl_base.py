"""SDXL base: the first stage of every generation plan.

Graph position: ingress -> **SDXLBase** -> (SDXLRefiner | Upscaler | FaceRestorer | FocalCropper).
Text-to-image, image-to-image, inpainting, IP-Adapter (a photo as prompt, which also gives style transfer:
a style image through IP-Adapter applied to a content image), LoRA and per-request samplers. With
``denoising_end`` it stops early and hands raw latents to the refiner (expert ensemble), never a decoded image.
"""

from __future__ import annotations

import asyncio
import logging
import math
import threading
import uuid
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageFilter
from ray import serve
from ray.serve.handle import DeploymentHandle

from deployments.support import device as devices
from deployments.support import fastpath
from deployments.support.batching import Batcher, outcome
from deployments.support.config import Batching, SDXLBaseConfig
from deployments.support.errors import GenerationCancelled, ServiceError, UnknownModel
from deployments.support.generation import (
    BatchItem,
    Cancellation,
    Encoding,
    GenerationRequest,
    LoraRef,
    ProgressFn,
    StageResult,
    check_size,
    encoded,
    mode_of,
    parse_lora_tags,
    resolve_seeds,
)
from deployments.support.imaging import to_rgb
from deployments.support.metrics import StageMetrics
from deployments.support.reporting import Reporter
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
        self.weights = loader.WeightFiles()  # what was loaded, for the result cache's key
        self.weights.add("checkpoint", loader.resolve(config.model.source, settings))
        if config.vae:
            self.weights.add("vae", loader.resolve(config.vae.source, settings))
        if config.ip_adapter:
            folder = loader.resolve(config.ip_adapter, settings)
            self._load_ip_adapter(pipe, folder)
            self.weights.add("ip_adapter", folder)
        self.loras = self._load_loras(pipe, config.lora_dir, settings)
        for name, path in self.loras.items():
            self.weights.add(f"lora:{name}", path)
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
        """One request on its own (a batch of one: the same code path as a batched request)."""
        item = BatchItem(request, request_id or uuid.uuid4().hex, request.batch_size, on_progress=on_progress)
        return outcome(self.generate_batch([item])[0])

    def generate_batch(self, items: list[BatchItem]) -> list[StageResult | BaseException]:
        """One pipeline call for compatible requests (same ``batch_key``); each item keeps its own seeds, so its
        pixels are those it would get alone. Returns one outcome per item: its result or its own error."""
        outcomes: list[StageResult | BaseException | None] = [None] * len(items)
        prompts: dict[int, str] = {}
        seeds: dict[int, list[int]] = {}
        for i, item in enumerate(items):
            try:
                check_size(item.request.width, item.request.height, self.config.max_pixels)
                prompts[i] = parse_lora_tags(item.request.prompt)[0]
                seeds[i] = resolve_seeds(item.request.seed, item.request.batch_size)
            except ServiceError as e:
                outcomes[i] = e
        live = list(prompts)
        if not live:
            return [o for o in outcomes if o is not None]
        batch = [items[i] for i in live]
        request = batch[0].request
        mode = mode_of(request)
        warnings: list[str] = []
        loras: list[LoraRef] = []
        results: list[StageResult | BaseException]
        try:
            with self._lock, self.oom():
                loras = self._apply_loras(request.loras, warnings, strict=True)
                loras += self._apply_loras_from_prompt(parse_lora_tags(request.prompt)[1], loras, warnings)
                results = self._run(mode, batch, [prompts[i] for i in live], [seeds[i] for i in live], warnings)
        except Exception as e:  # noqa: BLE001 - each item gets the error it would have got alone
            results = [e] * len(live)
        for i, item, result in zip(live, batch, results, strict=True):
            if self.cancellation.is_cancelled(item.request_id) and not isinstance(result, BaseException):
                result = GenerationCancelled(f"request {item.request_id} cancelled")
            self.cancellation.finish(item.request_id)
            if isinstance(result, StageResult):
                result.info.update(mode=mode, prompt=prompts[i], loras={r.name: r.weight for r in loras},
                                   sampler=request.sampler or self.config.default_sampler, model=self.config.name)
            outcomes[i] = result
        return [o for o in outcomes if o is not None]

    def _apply_loras_from_prompt(self, tagged: list[LoraRef], explicit: list[LoraRef], warnings: list[str]):
        if not tagged:
            return []
        merged = {r.name: r for r in explicit}
        merged.update({r.name: r for r in tagged})
        active = self._apply_loras(list(merged.values()), warnings, strict=False)
        return [r for r in active if r.name not in {e.name for e in explicit}]

    def _run(self, mode, items: list[BatchItem], prompts: list[str], seeds: list[list[int]],
             warnings: list[str]) -> list[StageResult | BaseException]:
        request: GenerationRequest = items[0].request
        pipe = {"txt2img": self.txt2img, "img2img": self.img2img, "inpaint": self.inpaint}[mode]
        sampler = request.sampler or self.config.default_sampler
        pipe.scheduler = build_scheduler(sampler, self.scheduler_config, request.schedule)
        counts = [len(s) for s in seeds]
        offsets = [sum(counts[:i]) for i in range(len(counts) + 1)]

        def per_image(values: list) -> list:
            return [value for value, n in zip(values, counts, strict=True) for _ in range(n)]

        def on_step_end(_pipe, step, _timestep, callback_kwargs):
            cancelled = self.cancellation.advance(items, step + 1, total_steps)
            if all(cancelled):
                raise GenerationCancelled(f"batch of {len(items)} cancelled at step {step + 1}/{total_steps}")
            latents = callback_kwargs.get("latents")
            if latents is not None:
                for item, offset in zip(items, offsets, strict=False):
                    self.cancellation.keep_latents(item.request_id, latents[offset])
            return callback_kwargs

        kwargs: dict = dict(
            prompt=per_image(prompts),
            # Empty negatives stay None: SDXL then uses zero embeddings, not the encoding of "" (batch_key keeps
            # requests with and without one apart).
            negative_prompt=per_image([i.request.negative_prompt for i in items]) if request.negative_prompt
            else None,
            num_inference_steps=request.steps,
            guidance_scale=request.guidance_scale,
            num_images_per_prompt=1,
            # One CPU generator per image: a seed gives the same image on any device and in any batch.
            generator=[torch.Generator("cpu").manual_seed(s) for group in seeds for s in group],
            callback_on_step_end=on_step_end,
        )
        total_steps = request.steps
        mask = init = None
        if request.init_image is None:
            kwargs.update(width=request.width, height=request.height)
        else:
            inits = [to_rgb(i.request.init_image).resize((request.width, request.height), Image.Resampling.LANCZOS)
                     for i in items]
            init = inits[0]
            # A1111 runs at least one step at low strength; diffusers would run none and fail.
            steps = max(request.steps, math.ceil(1 / request.strength))
            kwargs.update(image=per_image(inits), strength=request.strength, num_inference_steps=steps)
            total_steps = max(1, int(steps * request.strength))
            if request.mask is not None:  # inpainting runs alone (see batch_key)
                mask = self._prepare_mask(request.mask, request)
                kwargs.update(mask_image=mask, width=request.width, height=request.height)
        if self.ip_adapter_loaded:
            reference = request.ip_adapter_image  # a reference runs alone; a batch has none
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
            handed = latents.float().cpu().numpy()
            return [StageResult(images=[], seeds=s, latents=handed[a:b], warnings=list(warnings))
                    for s, a, b in zip(seeds, offsets, offsets[1:], strict=False)]
        images = self.decode(latents)
        if mask is not None and init is not None:
            images = [self._keep_unmasked(init, image, mask) for image in images]
        return [StageResult(images=images[a:b], seeds=s, warnings=list(warnings))
                for s, a, b in zip(seeds, offsets, offsets[1:], strict=False)]

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

    def fingerprint(self) -> dict[str, str]:
        """Content hashes of every loaded weight file, and what else decides the pixels (the result cache's key)."""
        return {**self.weights.digests(), "base_runtime": f"{self.device.type}/{self.dtype}",
                "base_defaults": f"{self.config.default_sampler}/{self.config.fast.fp8}"}


def batch_key(request: GenerationRequest) -> tuple | None:
    """What requests must share to run in one pipeline call; ``None``: this one runs alone (an inpainting mask
    and an IP-Adapter reference belong to one request)."""
    mode = mode_of(request)
    if mode == "inpaint" or request.ip_adapter_image is not None:
        return None
    tagged = parse_lora_tags(request.prompt)[1]
    return (mode, request.width, request.height, request.steps, request.sampler, request.schedule,
            request.guidance_scale, tuple((r.name, r.weight) for r in request.loras),
            tuple((r.name, r.weight) for r in tagged), bool(request.negative_prompt), request.denoising_end,
            request.strength if mode == "img2img" else None)


@serve.deployment(ray_actor_options={"num_cpus": 0.5}, max_ongoing_requests=16, health_check_period_s=10)
class SDXLBase:
    """Thin Serve shell: loads the model once per replica; compatible requests are batched (``batching`` in the
    config, or ``user_config`` at run time) and every batch runs on the replica's one inference thread."""

    def __init__(self, config: dict | SDXLBaseConfig, board: DeploymentHandle | None = None) -> None:
        config = SDXLBaseConfig.model_validate(config)
        self.thread = devices.InferenceThread("sdxl-base")
        self.model = self.thread.call(BaseGenerator, config)
        self.thread.call(self.model.warm_up)
        self.metrics = StageMetrics("sdxl_base")
        self.reporter = Reporter(board, "sdxl_base", self.model.cancellation)
        self.batcher: Batcher[BatchItem] = Batcher(self._run_batch, config.batching, size=lambda item: item.count)

    def reconfigure(self, user_config: dict) -> None:
        """``user_config: {max_batch_size, batch_wait_timeout_s}`` retunes batching without a restart."""
        self.batcher.configure(Batching.model_validate({**self.batcher.config.model_dump(), **user_config}))

    async def _run_batch(self, items: list[BatchItem]) -> list[StageResult | BaseException]:
        with self.metrics.track():
            outcomes = await self.thread.run(self.model.generate_batch, items)
        self.metrics.produced(sum(len(o.images) or len(o.seeds) for o in outcomes if isinstance(o, StageResult)))
        return outcomes

    async def generate(self, request: GenerationRequest, request_id: str | None = None,
                       encode: Encoding | None = None) -> StageResult:
        """``encode``: this is the plan's last stage; answer with files, not pixels."""
        item = BatchItem(request, request_id or uuid.uuid4().hex, request.batch_size)
        self.reporter.start()
        try:
            return await encoded(await self.batcher.submit(batch_key(request), item), encode)
        except asyncio.CancelledError:  # cancelled through Serve (a cancel, deadline or disconnect upstream)
            self.model.cancellation.cancel(item.request_id)
            raise

    async def cancel(self, request_id: str) -> None:
        self.model.cancellation.cancel(request_id)

    async def progress(self, request_id: str) -> tuple[int, int] | None:
        return self.model.cancellation.progress(request_id)

    async def preview(self, request_id: str) -> Image.Image | None:
        """A latent-space approximation of the image being denoised, or None when the request is not running."""
        return self.model.cancellation.preview(request_id)

    async def describe(self) -> dict:
        return {**self.model.describe(), "batching": {**self.batcher.config.model_dump(), **self.batcher.counts}}

    async def fingerprint(self) -> dict[str, str]:
        """Hashes of the loaded weights: hashed once, off the inference thread."""
        return await asyncio.to_thread(self.model.fingerprint)

    async def check_health(self) -> None:
        if not self.model.healthy():
            raise RuntimeError("SDXL base: repeated out-of-memory failures")
