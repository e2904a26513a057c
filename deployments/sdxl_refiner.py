"""SDXL refiner: the second denoising stage.

Graph position: SDXLBase -> **SDXLRefiner** -> (FaceRestorer) -> ingress. Two modes, as in cog-sdxl:
- expert ensemble: finish the base model's latents from ``denoising_start`` (no decode in between);
- refine a finished image as img2img at ``strength`` (the hires-fix pass at 1536x1536, strength 0.35).
It runs in its own replicas and loads its own weights. With ``embeddings_dir`` (the base's folder) it holds the
textual-inversion embeddings too, their ``clip_g`` vectors in its one text encoder, as A1111 applies an SDXL
embedding on its refiner, so that a prompt naming one reads alike in both stages. An ensemble's images take the
recolor units' maps the base hands on with its latents (``StageResult.recolors``): in A1111 the refiner switches
inside sampling, and the ControlNet extension puts the maps back into the images decoded after it.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import uuid
from contextlib import nullcontext, suppress
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from ray import serve
from ray.serve.handle import DeploymentHandle

from deployments.support import device as devices
from deployments.support import fastpath, model_free
from deployments.support.batching import Batcher, outcome, prepare
from deployments.support.composable import composing
from deployments.support.config import Batching, SDXLRefinerConfig
from deployments.support.embeddings import EmbeddingFiles, TextualInversions
from deployments.support.errors import GenerationCancelled, InvalidInput
from deployments.support.generation import (
    BatchItem,
    Cancellation,
    Encoding,
    Partial,
    ProgressFn,
    RefineRequest,
    StageResult,
    Stopped,
    check_size,
    encoded,
    parse_lora_tags,
)
from deployments.support.imaging import to_rgb
from deployments.support.logs import replica_logging
from deployments.support.metrics import StageMetrics
from deployments.support.prompts import Conditioning, PromptEncoder
from deployments.support.reporting import Reporter
from deployments.support.samplers import build_scheduler, evaluations, img2img_steps, resolve, schedule_options
from deployments.support.settings import Settings, current
from deployments.weights import loader

logger = logging.getLogger(__name__)

IMAGE_SAMPLER = "Euler"  # the image mode's, when the request names none (an ensemble takes the base's)


class Refiner:
    def __init__(self, config: SDXLRefinerConfig, settings: Settings | None = None) -> None:
        self.config = config
        self.settings = settings or current()
        self.device, self.dtype = devices.resolve(config.device)
        self.pipe = loader.load_sdxl(config.model, refiner=True, dtype=self.dtype, settings=settings,
                                     vae=config.vae).to(self.device)
        self.weights = loader.WeightFiles()
        self.weights.add("refiner", loader.resolve(config.model.source, settings))
        if config.vae:
            self.weights.add("refiner_vae", loader.resolve(config.vae.source, settings))
        self.fast = fastpath.apply(self.pipe, config.device, config.fast, self.device, self.compile_cache)
        self.embedding_files = EmbeddingFiles(config.embeddings_dir, settings)
        self.inversions = TextualInversions([self.pipe], f"SDXL refiner {config.name}")
        self.inversions.sync(self.embedding_files.files())
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
        """Refine each configured size at each batch size once in both modes: grey images (the hires-fix pass)
        and blank latents (the expert ensemble on a base's latents, the standard plan's)."""
        request = RefineRequest(prompt="warm-up", steps=self.config.fast.warmup_steps, strength=1.0,
                                denoising_start=0.5)  # at least one of the steps is the refiner's

        def run(width: int, height: int, batch: int) -> None:
            seeds = list(range(batch))
            grey = Image.new("RGB", (width, height), (128, 128, 128))
            self.refine_images(request, StageResult(images=[grey] * batch, seeds=seeds))
            channels = self.pipe.vae.config.latent_channels
            latents = np.zeros((batch, channels, height // 8, width // 8), np.float32)
            self.refine_latents(request, StageResult(images=[], seeds=seeds, latents=latents))

        fastpath.warm_up("SDXL refiner", self.config.fast, self.device, self.compile_cache, run)

    def refine_latents(self, request: RefineRequest, source: StageResult, request_id: str | None = None,
                       on_progress: ProgressFn | None = None) -> StageResult:
        """Expert ensemble: finish the base model's latents from ``denoising_start``; no decode in between."""
        item = BatchItem(request, request_id or uuid.uuid4().hex, source=source, on_progress=on_progress)
        return outcome(self.refine_batch([item], ensemble=True)[0])

    def chunk_counts(self, request: RefineRequest, sampler: str | None = None) -> tuple[int, int] | None:
        """The chunks an A1111 request's prompt and negative prompt need alone with this pipeline's tokenizer (None
        for a plain one), over the schedule ``sampler`` (the one that runs) counts; refused beyond ``MAX_CHUNKS``.
        Part of the batching key: a batch pads to its most."""
        if request.prompt_syntax != "a1111":
            return None
        return PromptEncoder(self.pipe, self.inversions.vocabulary).counts(
            parse_lora_tags(request.prompt)[0], request.negative_prompt,
            request.steps * evaluations(sampler or request.sampler or IMAGE_SAMPLER))

    def sync_embeddings(self) -> None:
        """Bring the embeddings up to the folder (a no-op when it holds them already)."""
        with self._lock:
            self.inversions.sync(self.embedding_files.files())

    def refine_images(self, request: RefineRequest, source: StageResult | Image.Image, request_id: str | None = None,
                      on_progress: ProgressFn | None = None) -> StageResult:
        """Refine finished images as img2img at ``strength`` (the hires-fix pass)."""
        item = BatchItem(request, request_id or uuid.uuid4().hex, source=source, on_progress=on_progress)
        return outcome(self.refine_batch([item], ensemble=False)[0])

    def refine_batch(self, items: list[BatchItem], *, ensemble: bool) -> list[StageResult | BaseException]:
        """One pipeline call for compatible items (same ``batch_key``), each with its own prompt and seeds; one
        outcome per item, its result or its own error."""
        self.sync_embeddings()  # before the chunks are counted: an embedding's vectors are tokens

        def check(item: BatchItem) -> tuple[list[int], list]:
            item.source = StageResult.of(item.source)
            runs = ensemble_sampler(item.request, item.source)[0] if ensemble else None
            self.chunk_counts(item.request, runs)  # a prompt that cannot be read fails its own request alone
            return (self._latents_of if ensemble else self._images_of)(item.request, item.source)

        outcomes, inputs = prepare(items, check)
        live = list(inputs)
        if not live:
            return outcomes
        batch = [items[i] for i in live]
        request: RefineRequest = batch[0].request
        seeds = [inputs[i][0] for i in live]
        results: list[StageResult | BaseException]
        warnings: list[str] = []
        try:
            if ensemble:
                sampler, schedule = ensemble_sampler(request, batch[0].source)  # batch_key: the same for all
                kwargs: dict = dict(image=torch.from_numpy(np.concatenate([x for i in live for x in inputs[i][1]])),
                                    denoising_start=request.denoising_start, num_inference_steps=request.steps)
                total = max(1, round(request.steps * (1 - request.denoising_start)))
                before = iterations_before(sampler, self.scheduler_config, schedule, request.steps,
                                           request.denoising_start)
            else:
                sampler, schedule = request.sampler or IMAGE_SAMPLER, request.schedule
                # As A1111 does, a low strength still runs one step; diffusers would run none and return nothing.
                steps, total = img2img_steps(request.steps, request.strength,
                                             limit=self.scheduler_config.get("num_train_timesteps", 1000))
                kwargs = dict(image=[x for i in live for x in inputs[i][1]], strength=request.strength,
                              num_inference_steps=steps)
                before = None
            results = self._run(batch, seeds, kwargs, total, sampler, schedule, warnings, before=before)
        except Exception as e:  # noqa: BLE001 - each item gets the error it would have got alone
            results = [e] * len(live)
        for i, result in zip(live, self.cancellation.settle(batch, results), strict=True):
            outcomes[i] = result
        return outcomes

    @staticmethod
    def _latents_of(request: RefineRequest, source: StageResult) -> tuple[list[int], list]:
        if source.latents is None:
            raise InvalidInput("the previous stage handed on no latents", field="latents")
        if len(source.latents) != len(source.seeds):
            raise InvalidInput("one seed per latent is required", field="seeds")
        ensemble_sampler(request, source)  # a sampler or schedule other than the base's is refused here
        return list(source.seeds), [source.latents]

    def _images_of(self, request: RefineRequest, source: StageResult) -> tuple[list[int], list]:
        seeds = source.seeds or request.seeds or [0] * len(source.images)
        if not source.images or len(seeds) != len(source.images):
            raise InvalidInput("one seed per image is required", field="seeds")
        for image in source.images:
            check_size(image.width, image.height, self.config.max_pixels)
        return list(seeds), [to_rgb(i) for i in source.images]

    def _run(self, items: list[BatchItem], seeds: list[list[int]], kwargs: dict, total: int, sampler: str,
             schedule: str | None, warnings: list[str], *, before: int | None) -> list[StageResult | BaseException]:
        """The denoising of one batch: each item's result, or ``GenerationCancelled`` for one cancelled while its
        batch mates ran on. An item that /interrupt or /skip stopped answers with what it had made by then.
        ``before``: an ensemble's, the base's loop iterations (``iterations_before``); None: the image mode."""
        request: RefineRequest = items[0].request
        ensemble = before is not None
        flat = [s for group in seeds for s in group]
        counts = [len(s) for s in seeds]
        offsets = [sum(counts[:k]) for k in range(len(counts) + 1)]

        def per_image(values: list) -> list:
            return [value for value, n in zip(values, counts, strict=True) for _ in range(n)]

        def result(k: int, images: list[Image.Image], stopped_at: list[int] | None = None) -> StageResult:
            source = items[k].source
            if stopped_at is not None and stopped_at[0] == 1 and not ensemble:
                images = list(source.images)  # stopped as it began: the image it was given, handed on
            else:  # the base's recolor maps, put back into the images it decodes for it (the extension's order)
                images = model_free.recolored(images, source.recolors)
            made = source.then(images, warnings=[w for w in warnings if w not in source.warnings],
                               refiner=self.config.name, refiner_mode="ensemble" if ensemble else "image",
                               **({"stopped_at": stopped_at} if stopped_at is not None else {}))
            made.seeds = list(seeds[k])
            return made

        def stopped(k: int) -> StageResult:
            kept, step, steps = partial.kept[k]
            return result(k, fastpath.decode(self.pipe, kept), [step, steps])

        partial = Partial(self.cancellation, items, counts, stopped)

        def on_step_end(pipe, step, _timestep, callback_kwargs):
            # A second-order sampler calls this twice a step; PLMS once more than its steps (as in the base).
            at = min(step // getattr(pipe.scheduler, "order", 1) + 1, total)
            cancelled = self.cancellation.advance(items, at, total)
            if all(cancelled):
                raise GenerationCancelled(f"batch of {len(items)} cancelled at step {at}/{total}")
            partial.check(callback_kwargs.get("latents"), at, total, cancelled)
            if conditioning is not None and before is not None:  # this pass's loop restarts at 0 after the base's
                conditioning.step_end(pipe, before + step, callback_kwargs, per_step)
            return callback_kwargs

        prompts = [parse_lora_tags(i.request.prompt)[0] for i in items]  # LoRAs belong to the base model
        # Empty negatives stay None, as in the base: the checkpoint's config decides what that means.
        negatives = per_image([i.request.negative_prompt for i in items]) if request.negative_prompt else None
        conditioning: Conditioning | None = None
        per_step = evaluations(sampler)  # A1111 counts prompt editing's steps in model evaluations
        with self._lock, self.oom():
            self.pipe.scheduler = build_scheduler(sampler, self.scheduler_config, schedule, seeds=flat,
                                                  warnings=warnings, churn=request.churn)
            if request.prompt_syntax == "a1111":  # batch_key: the whole batch is read one way
                # Its one encoder (OpenCLIP bigG) reads the syntax as the base's two do; pooled from its first chunk.
                # Every text of the schedules, composed as the base composes. A1111 switches models mid-run and
                # its step counter goes on: an ensemble's steps follow the schedule from where the base stopped.
                conditioning = PromptEncoder(self.pipe, self.inversions.vocabulary).scheduled(
                    per_image(prompts), negatives, request.steps * per_step, padding=request.cond_padding)
                order = getattr(self.pipe.scheduler, "order", 1)
                texts: dict = conditioning.at((before or 0) * per_step // order)  # as the base's step_end counts
                if conditioning.moves and before is not None:
                    kwargs["callback_on_step_end_tensor_inputs"] = ["latents", "prompt_embeds", "add_text_embeds"]
                elif conditioning.moves:
                    warnings.append("prompt editing and alternation: the refiner's image pass ran the text of the "
                                    "first step (a finished image has no step of A1111's to count on from)")
            else:  # diffusers tokenizes these: the embeddings' names are rewritten into their tokens first
                vocabulary = self.inversions.vocabulary
                texts = dict(prompt=per_image([vocabulary.rewrite(p) for p in prompts]),
                             negative_prompt=[vocabulary.rewrite(n) for n in negatives] if negatives else None)
            partial.watch(self.pipe.scheduler)
            try:
                latents = None
                composed = (composing([self.pipe], lambda: conditioning) if conditioning is not None
                            and conditioning.reshapes else nullcontext())
                with fastpath.attention(self.config.fast), composed, suppress(Stopped):  # Stopped: no item runs on
                    latents = self.pipe(
                        **texts, guidance_scale=request.guidance_scale, aesthetic_score=request.aesthetic_score,
                        negative_aesthetic_score=request.negative_aesthetic_score, num_images_per_prompt=1,
                        generator=[torch.Generator("cpu").manual_seed(s) for s in flat],
                        callback_on_step_end=on_step_end, output_type="latent", **kwargs,
                    ).images
                images = fastpath.decode(self.pipe, latents) if latents is not None else None
                results: list[StageResult | BaseException] = []
                for k, (a, b) in enumerate(zip(offsets, offsets[1:], strict=False)):
                    if k in partial.kept:
                        results.append(partial.answer(k))
                    elif images is None:
                        results.append(GenerationCancelled(f"request {items[k].request_id} cancelled"))
                    else:
                        results.append(result(k, images[a:b]))
                return results
            finally:
                partial.release()

    def describe(self) -> dict:
        return {"name": self.config.name, "device": str(self.device), "dtype": str(self.dtype).removeprefix("torch."),
                "fast_path": self.fast, **devices.memory(self.device), "running": self.cancellation.running()}

    def fingerprint(self) -> dict[str, str]:
        embeddings = {f"refiner_embedding:{name}": loader.file_sha256(e.path)
                      for name, e in self.embedding_files.files().items()}
        return {**self.weights.digests(), **embeddings,
                "refiner_runtime": f"{self.device.type}/{self.dtype}/{self.config.fast.fp8}"}


def ensemble_sampler(request: RefineRequest, source: StageResult) -> tuple[str, str | None]:
    """The sampler and schedule an ensemble pass runs: the base's, as it reports them. Its latents are in that
    sampler's space (DPM-Solver's and DDIM's variance-preserving, Euler's variance-exploding, larger by
    sqrt(1 + sigma^2)) at that schedule's noise level, so any other would misread them. The request's, or Euler,
    for latents that come without the base's report. A request naming another sampler or schedule is refused."""
    if "sampler" not in source.info:
        return request.sampler or IMAGE_SAMPLER, request.schedule
    sampler, schedule = source.info["sampler"], source.info.get("schedule")
    if request.sampler is not None and resolve(request.sampler, "sampler") != resolve(sampler, "sampler"):
        raise InvalidInput(f"sampler {request.sampler!r} cannot finish latents the base made with {sampler!r}",
                           field="sampler")
    if request.schedule is not None and (schedule_options(request.sampler or sampler, request.schedule)
                                         != schedule_options(sampler, schedule)):
        raise InvalidInput(f"schedule {request.schedule!r} cannot finish latents the base made with "
                           f"{schedule or 'Automatic'!r}", field="schedule")
    return sampler, schedule


def iterations_before(sampler: str, scheduler_config, schedule: str | None, steps: int,
                      denoising_start: float) -> int:
    """The loop iterations of a whole run of ``steps`` that come before an ensemble's first, from
    ``denoising_start``: the run's less those diffusers' img2img ``get_timesteps`` keeps (the timesteps below the
    cut-off, one more where a second-order scheduler would stop between its two evaluations). Read on a scheduler of
    its own, so that the one that runs starts fresh."""
    scheduler = build_scheduler(sampler, scheduler_config, schedule)
    scheduler.set_timesteps(steps, device="cpu")
    train = scheduler.config.num_train_timesteps
    cutoff = int(round(train - (denoising_start * train)))  # diffusers' very expression: the same rounding
    kept = int((scheduler.timesteps < cutoff).sum())
    if scheduler.order == 2 and kept % 2 == 0:
        kept += 1
    return len(scheduler.timesteps) - kept


def batch_key(request: RefineRequest, source: StageResult | Image.Image, *, ensemble: bool,
              chunks: tuple[int, int] | None = None) -> tuple:
    """What refiner requests must share to run in one pipeline call; ``chunks``: an A1111 request's
    ``Refiner.chunk_counts``, since a batch pads every prompt to its most chunks."""
    shared = (ensemble, request.steps, request.guidance_scale, request.sampler, request.schedule,
              request.aesthetic_score, request.negative_aesthetic_score, bool(request.negative_prompt),
              request.prompt_syntax, chunks, request.churn, request.cond_padding)
    if ensemble:
        latents = getattr(source, "latents", None)
        info = getattr(source, "info", {})  # the base's sampler and schedule, which the pass runs
        return (*shared, request.denoising_start, None if latents is None else tuple(latents.shape[1:]),
                info.get("sampler"), info.get("schedule"))
    images = StageResult.of(source).images
    return (*shared, request.strength, tuple(i.size for i in images))


@serve.deployment(ray_actor_options={"num_cpus": 0.5}, max_ongoing_requests=16, health_check_period_s=10)
class SDXLRefiner:
    def __init__(self, config: dict | SDXLRefinerConfig, board: DeploymentHandle | None = None) -> None:
        replica_logging()  # before anything here logs
        config = SDXLRefinerConfig.model_validate(config)
        self.thread = devices.InferenceThread("sdxl-refiner")
        self.model = self.thread.call(Refiner, config)
        self.thread.call(self.model.warm_up)
        self.metrics = StageMetrics("sdxl_refiner")
        self.reporter = Reporter(board, "sdxl_refiner", self.model.cancellation)
        self.batchers: dict[bool, Batcher[BatchItem]] = {
            True: Batcher(self._run_ensembles, config.batching, size=lambda item: item.count),
            False: Batcher(self._run_images, config.batching, size=lambda item: item.count),
        }

    async def reconfigure(self, user_config: dict) -> None:
        """``user_config: {max_batch_size, batch_wait_timeout_s}`` retunes batching without a restart (async: on the
        event loop that owns the batch queues, never beside it on a thread)."""
        for batcher in self.batchers.values():
            batcher.configure(Batching.model_validate({**batcher.config.model_dump(), **user_config}))

    async def refine_latents(self, request: RefineRequest, source: StageResult, request_id: str | None = None,
                             encode: Encoding | None = None) -> StageResult:
        """Expert ensemble on the base model's latents (``source``: the base stage's result)."""
        return await encoded(await self._submit(request, source, request_id, ensemble=True), encode)

    async def refine_images(self, request: RefineRequest, source: StageResult | Image.Image,
                            request_id: str | None = None, encode: Encoding | None = None) -> StageResult:
        """img2img on finished images (``source``: an image-bearing stage result, or an image)."""
        return await encoded(await self._submit(request, source, request_id, ensemble=False), encode)

    async def _submit(self, request: RefineRequest, source, request_id: str | None, *, ensemble: bool) -> StageResult:
        if isinstance(source, StageResult) and source.stopped:  # /interrupt or /skip ended the base early
            return source
        count = len(getattr(source, "seeds", None) or StageResult.of(source).images or [None])
        item = BatchItem(request, request_id or uuid.uuid4().hex, count, source=source)
        self.reporter.start()
        try:
            with self.metrics.request():
                runs = ensemble_sampler(request, StageResult.of(source))[0] if ensemble else None
                key = batch_key(request, source, ensemble=ensemble, chunks=self.model.chunk_counts(request, runs))
                submitted = self.batchers[ensemble].submit(key, item)
                return await self.model.cancellation.guard(item.request_id, submitted)
        except asyncio.CancelledError:  # cancelled through Serve: stop the denoising loop for this item
            self.model.cancellation.cancel(item.request_id)
            raise

    async def _run_ensembles(self, items: list[BatchItem]) -> list[StageResult | BaseException]:
        return await self._run_batch(items, ensemble=True)

    async def _run_images(self, items: list[BatchItem]) -> list[StageResult | BaseException]:
        return await self._run_batch(items, ensemble=False)

    async def _run_batch(self, items: list[BatchItem], *, ensemble: bool) -> list[StageResult | BaseException]:
        with self.metrics.track(requests=False):
            outcomes = await self.thread.run(self.model.refine_batch, items, ensemble=ensemble)
        self.metrics.outcomes(outcomes)
        self.metrics.produced(sum(len(o.images) for o in outcomes if isinstance(o, StageResult)))
        return outcomes

    async def cancel(self, request_id: str) -> None:
        self.model.cancellation.cancel(request_id)

    async def progress(self, request_id: str) -> tuple[int, int] | None:
        return self.model.cancellation.progress(request_id)

    async def describe(self) -> dict:
        return {**self.model.describe(), "batching": self.batchers[True].config.model_dump()}

    async def fingerprint(self) -> dict[str, str]:
        """Hashes of the loaded weights (the result cache's key), off the inference thread."""
        return await asyncio.to_thread(self.model.fingerprint)

    async def check_health(self) -> None:
        devices.check_health(self.thread, self.model.oom, current().inference_stall_seconds)
