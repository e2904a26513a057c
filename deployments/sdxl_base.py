"""SDXL base: the first stage of every generation plan.

Graph position: ingress -> **SDXLBase** -> (SDXLRefiner | Upscaler | FaceRestorer | FocalCropper).
Text-to-image, image-to-image, inpainting, IP-Adapter (a photo as prompt, which also gives style transfer:
a style image through IP-Adapter applied to a content image), LoRA, per-request samplers and A1111's latent
hires fix, on any of several checkpoints: Serve multiplexed models, each replica holding a few (README,
"Checkpoints"), inpainting checkpoints (a 9-channel UNet) among them, conditioned in every mode as A1111 conditions
them (``support/inpainting.py``). With ``denoising_end`` it stops early and hands raw latents to the refiner
(expert ensemble), never a decoded image.
"""

from __future__ import annotations

import asyncio
import logging
import math
import threading
import time
import uuid
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from ray import serve
from ray.serve.exceptions import RayServeException
from ray.serve.handle import DeploymentHandle

from deployments.support import colorfix, control, fastpath, inpainting, masking, model_free
from deployments.support import device as devices
from deployments.support.batching import Batcher, outcome, prepare
from deployments.support.checkpoints import Catalog
from deployments.support.composable import composing
from deployments.support.config import Batching, SDXLBaseConfig
from deployments.support.embeddings import EmbeddingFiles
from deployments.support.errors import GenerationCancelled, InvalidInput, ModelLoadError
from deployments.support.generation import (
    LATENT_UPSCALE_MODES,
    BatchItem,
    Cancellation,
    Encoding,
    GenerationRequest,
    LatentHires,
    LoraRef,
    Partial,
    ProgressFn,
    StageResult,
    Stopped,
    check_size,
    encoded,
    mode_of,
    parse_lora_tags,
    variation_seeds,
)
from deployments.support.imaging import to_rgb
from deployments.support.injection import steering
from deployments.support.logs import replica_logging
from deployments.support.metrics import StageMetrics
from deployments.support.pipelines import LoraFiles, Pipelines, Resident
from deployments.support.prompts import READING, Conditioning, PromptEncoder, subprompts
from deployments.support.reporting import Reporter
from deployments.support.samplers import build_scheduler, evaluations, img2img_steps
from deployments.support.settings import Settings, current
from deployments.support.variations import EditNoise, Variation, circular, initial_latents, noised
from deployments.weights import loader

logger = logging.getLogger(__name__)

HOLDINGS_EVERY_S = 2.0  # how often a replica repeats to the board which checkpoints it holds
S3_IDENTITY_S = 60.0  # how long the result cache's key keeps an S3 source's identity before reading it again


class BaseGenerator:
    """The SDXL base checkpoints of one replica (``Resident``: at most ``max_loaded_checkpoints`` held) and how a
    batch of requests runs on one of them, with LoRAs, IP-Adapter and per-request samplers."""

    def __init__(self, config: SDXLBaseConfig, settings: Settings | None = None, preload: bool = True) -> None:
        self.config = config
        self.settings = settings or current()
        self.device, self.dtype = devices.resolve(config.device)
        self.catalog = Catalog(config, self.settings)
        self.lora_files = LoraFiles(config.lora_dir, settings)
        self.embedding_files = EmbeddingFiles(config.embeddings_dir, settings)
        self.resident = Resident(self._load, self.device, config.max_loaded_checkpoints)
        self.controls = control.ControlNets(config, self.device, self.dtype, self.settings)  # every checkpoint's
        self.cancellation = Cancellation()
        self._lock = threading.Lock()  # the pipelines are stateful (scheduler, adapters): one call at a time
        self._loading = threading.RLock()  # one checkpoint lookup or load at a time
        self.oom = devices.OomGuard(self.device, "SDXL base")
        self._resolved: dict[str, Path] = {}  # sources the result cache's key hashed, as local paths
        self._s3 = loader.S3Fetcher(self.settings)  # its client is made on first use
        self._identities: dict[str, tuple[float, str]] = {}  # S3 source -> (when read, its identity)
        if preload:
            self.checkpoint()
        logger.info("SDXL base ready on %s (%s): %s selectable, %s held, %d LoRAs", self.device, self.dtype,
                    ", ".join(self.catalog.entries()), ", ".join(self.resident.names) or "none", len(self.loras))

    @property
    def compile_cache(self) -> Path:
        return self.settings.model_cache_dir / "compile" / "sdxl-base"

    @property
    def loras(self) -> dict[str, Path]:
        return self.lora_files.files()

    @property
    def fast(self) -> list[str]:
        """What the fast path applied (the same for every checkpoint held)."""
        held = [self.resident.held(name) for name in self.resident.names]
        return next((p.fast for p in held if p is not None), [])

    def checkpoint(self, name: str | None = None) -> Pipelines:
        """A checkpoint's pipelines by this replica's own least-recently-used policy (loaded when not held)."""
        with self._loading:
            return self.resident.get(name or self.catalog.default)

    def load(self, name: str) -> Pipelines:
        """A checkpoint's pipelines, loaded when not held, evicting nothing (Serve's multiplexer evicts)."""
        with self._loading:
            return self.resident.load(name)

    def _load(self, name: str) -> Pipelines:
        pipes = Pipelines(self.catalog.entry(name), self.config, self.device, self.dtype, self.settings,
                          self.compile_cache)
        pipes.add_loras(self.loras)
        pipes.inversions.sync(self.embedding_files.files())
        self.warm_up(pipes)  # compilation per checkpoint happens here, not in its first request
        return pipes

    def warm_up(self, pipes: Pipelines | None = None) -> None:
        pipes = pipes or self.checkpoint()
        steps = self.config.fast.warmup_steps
        fastpath.warm_up(f"SDXL base {pipes.name}", self.config.fast, self.device, self.compile_cache,
                         lambda w, h, n: self.generate(GenerationRequest(prompt="warm-up", width=w, height=h,
                                                                         steps=steps, seed=0, batch_size=n),
                                                       pipes=pipes))

    def refresh(self) -> dict[str, list[str]]:
        """Read the checkpoint, LoRA and embedding folders again (A1111's refresh-checkpoints, refresh-loras and
        refresh-embeddings). A checkpoint held takes the embeddings read here before its next batch runs."""
        return {"checkpoints": list(self.catalog.entries(rescan=True)),
                "loras": sorted(self.lora_files.files(rescan=True)),
                "embeddings": sorted(self.embedding_files.files(rescan=True))}

    def sync_embeddings(self, pipes: Pipelines) -> None:
        """Bring a held checkpoint's embeddings up to the folder (a no-op when it holds them already)."""
        with self._lock:
            pipes.inversions.sync(self.embedding_files.files())

    def generate(self, request: GenerationRequest, request_id: str | None = None,
                 on_progress: ProgressFn | None = None, pipes: Pipelines | None = None) -> StageResult:
        """One request on its own (a batch of one: the same code path as a batched request)."""
        item = BatchItem(request, request_id or uuid.uuid4().hex, request.batch_size, on_progress=on_progress,
                         checkpoint=pipes)
        return outcome(self.generate_batch([item])[0])

    def generate_batch(self, items: list[BatchItem]) -> list[StageResult | BaseException]:
        """One pipeline call for compatible requests (same ``batch_key``, so one checkpoint); each item keeps its
        own seeds, so its pixels are those it would get alone. Returns one outcome per item: its result or its
        own error. Items arrive with their checkpoint held (under Serve) or it is looked up here."""
        def check(item: BatchItem) -> tuple[str, list[int], list[str], list[Variation | None], masking.Cut | None]:
            request = item.request
            check_request(request, self.config.max_pixels)
            notes = variation_warnings(request)
            cut = None
            if request.mask is not None and request.inpaint_area == "masked":
                cut = cut_of(request)
                if cut is None:  # A1111 inpaints nothing then: image-to-image over the whole image, the mask dropped
                    item.request = request = request.model_copy(update={"mask": None, "inpaint_area": "whole"})
                    notes.append("inpaint_area: the mask is blank once blurred: the whole image ran as image-to-image "
                                 "(as A1111 falls back)")
            prompt = parse_lora_tags(request.prompt)[0]
            held = item.checkpoint or self.checkpoint(request.checkpoint)
            self.sync_embeddings(held)  # before its chunks are counted: an embedding's vectors are tokens
            if request.prompt_syntax == "a1111":  # a prompt that cannot be read fails its own request alone
                chunk_counts(held, request, self.config.default_sampler)
            seeds, subseeds = variation_seeds(request.seed, request.subseed, request.subseed_strength,
                                              request.batch_size)
            return prompt, seeds, notes, variations_of(request, subseeds), cut

        outcomes, passed = prepare(items, check)
        live = list(passed)
        if not live:
            return outcomes
        prompts = {i: passed[i][0] for i in live}
        seeds = {i: passed[i][1] for i in live}
        varied = {i: passed[i][3] for i in live}
        cuts = [passed[i][4] for i in live]
        batch = [items[i] for i in live]
        request = batch[0].request
        mode = mode_of(request)
        warnings: list[str] = []
        loras: list[LoraRef] = []
        results: list[StageResult | BaseException]
        pipes: Pipelines | None = None
        try:
            pipes = batch[0].checkpoint or self.checkpoint(request.checkpoint)
            with self._lock, self.oom():
                loras = pipes.apply_loras(self.loras, request.loras, parse_lora_tags(request.prompt)[1], warnings)
                # The refiner's ensemble pass reads the sampler and schedule here: the latents are in their space.
                ran = dict(mode=mode, loras={r.name: r.weight for r in loras}, schedule=request.schedule,
                           sampler=request.sampler or self.config.default_sampler, model=pipes.name,
                           **({"hires_upscaler": request.hires.mode} if request.hires is not None else {}),
                           # A1111's is_using_inpainting_conditioning: an inpainting checkpoint conditions every mode
                           **({"inpainting_conditioning": True} if inpainting.holds_inpainting(pipes.txt2img) else {}),
                           **({"tiling": True} if request.tiling else {}))
                results = self._run(mode, pipes, batch, [prompts[i] for i in live], [seeds[i] for i in live],
                                    warnings, [dict(ran, prompt=prompts[i], **variation_info(varied[i]),
                                                    **noise_info(items[i].request), **region_info(cut))
                                               for i, cut in zip(live, cuts, strict=True)],
                                    [varied[i] for i in live], cuts)
        except Exception as e:  # noqa: BLE001 - each item gets the error it would have got alone
            results = [e] * len(live)
        for i, result in zip(live, self.cancellation.settle(batch, results), strict=True):
            if isinstance(result, StageResult):  # what of its own options did not apply: its alone
                result.warnings += [w for w in passed[i][2] if w not in result.warnings]
            outcomes[i] = result
        for item in items:
            item.checkpoint = None  # an evicted checkpoint this batch kept alive can go now
        del pipes
        self.resident.sweep()
        return outcomes

    def _run(self, mode, pipes: Pipelines, items: list[BatchItem], prompts: list[str], seeds: list[list[int]],
             warnings: list[str], info: list[dict], varied: list[list[Variation | None]],
             cuts: list[masking.Cut | None]) -> list[StageResult | BaseException]:
        """The denoising of one batch; each item's result, with ``info`` (what ran, item by item) in it.
        ``varied``: each image's variation seed (None where it has none); ``cuts``: each item's "Only masked"
        region (an inpainting runs alone), None where it inpaints the whole picture or does not inpaint."""
        request: GenerationRequest = items[0].request
        cut = cuts[0] if request.mask is not None else None
        # Control units run alone (batch_key); with a latent hires fix, those of its first pass (A1111's hr_option).
        units = control.first_pass(request.control, hires=request.hires is not None)
        # An inpainting checkpoint runs every mode on its inpainting pipeline, conditioned as A1111 conditions it
        # (``inpainting``): a 9-channel UNet reads a mask and a masked image beside the latents.
        nine = inpainting.holds_inpainting(pipes.txt2img)
        kind = "inpaint" if nine else mode
        pipe = self.controls.pipeline(pipes, kind, units)
        sampler = request.sampler or self.config.default_sampler
        flat = [s for group in seeds for s in group]
        pipe.scheduler = build_scheduler(sampler, pipes.scheduler_config, request.schedule, seeds=flat,
                                         warnings=warnings, churn=request.churn)
        limit = pipes.scheduler_config.get("num_train_timesteps", 1000)
        counts = [len(s) for s in seeds]
        offsets = [sum(counts[:i]) for i in range(len(counts) + 1)]
        done = [0]  # steps of earlier passes (the hires fix has two)
        # An A1111 request's prompts over the pass that runs: which texts each image conditions on, step by step.
        scheduled: list[Conditioning | None] = [None]
        per_step = evaluations(sampler)  # A1111 counts prompt editing's steps in model evaluations
        evals = [per_step]  # the running pass's (a hires pass may run another sampler)

        def per_image(values: list) -> list:
            return [value for value, n in zip(values, counts, strict=True) for _ in range(n)]

        # A request's preview is its first image (the items of one request may share the batch).
        previewed = {item.request_id: offset for item, offset in reversed(list(zip(items, offsets, strict=False)))}

        def stopped(i: int) -> StageResult:
            """Item ``i``'s result from what it kept when /interrupt or /skip stopped it: decoded even for the
            refiner, since the stages after it hand its images on."""
            kept, step, total = partial.kept[i]
            pastes: list[masking.Paste] = []
            if step == 1 and items[i].source is not None:
                # Stopped as it began (the stop came while an earlier stage ran, as the upscaler of A1111's hires
                # fix): that stage's image, handed on as it is, rather than one step's estimate.
                made = [items[i].request.init_image]
            else:
                made, pastes = finished(self.decode(kept, pipes))
            return StageResult(images=made, seeds=seeds[i], warnings=list(warnings), pastes=pastes,
                               info={**info[i], "stopped_at": [step, total]})

        def finished(images: list[Image.Image]) -> tuple[list[Image.Image], list[masking.Paste]]:
            """The decoded images as a result holds them: the recolor units' maps put back (``recolors``, made
            before the denoising), as the extension post-processes A1111's decoded batch before its faces and its
            paste; then an inpainting's pasted over its init image (the VAE's round trip would otherwise alter the
            pixels its mask keeps), or left unpasted with their pastes (``defer_paste``)."""
            images = model_free.recolored(images, recolors)
            if paste is None:
                return images, []
            if request.defer_paste:
                return images, [paste] * len(images)
            return [paste.apply(image) for image in images], []

        partial = Partial(self.cancellation, items, counts, stopped)
        partial.watch(pipe.scheduler)

        def on_step_end(pipe, step, _timestep, callback_kwargs):
            # A second-order sampler (Heun, DPM2, DPM++ SDE) calls this twice a step but once on the last; PLMS (PNDM)
            # once more than its steps (its first timestep twice, to start its multistep history).
            at = min(done[0] + step // getattr(pipe.scheduler, "order", 1) + 1, total_steps)
            cancelled = self.cancellation.advance(items, at, total_steps)
            if all(cancelled):
                raise GenerationCancelled(f"batch of {len(items)} cancelled at step {at}/{total_steps}")
            latents = callback_kwargs.get("latents")
            if repaint is not None and latents is not None:  # an inpainting checkpoint's kept area, blended back
                latents = callback_kwargs["latents"] = repaint.blend(pipe, step, latents)
            partial.check(latents, at, total_steps, cancelled)
            if latents is not None:
                for request_id, offset in previewed.items():
                    self.cancellation.keep_latents(request_id, latents[offset])
            if scheduled[0] is not None:
                scheduled[0].step_end(pipe, step, callback_kwargs, evals[0])
            return callback_kwargs

        # Empty negatives stay None: SDXL then uses zero embeddings, not the encoding of "" (batch_key keeps
        # requests with and without one apart).
        negatives = per_image([i.request.negative_prompt for i in items]) if request.negative_prompt else None
        hires_texts: Conditioning | None = None
        if request.prompt_syntax == "a1111":  # batch_key: the whole batch is read one way
            # Encoded here, with the LoRAs of the batch set on the pipeline's own encoders and the checkpoint's
            # textual-inversion embeddings, every text of both passes' schedules; each image's row follows its own
            # schedule (``on_step_end``).
            prompt_encoder = PromptEncoder(pipe, pipes.inversions.vocabulary)
            scheduled[0] = first = prompt_encoder.scheduled(per_image(prompts), negatives, request.steps * per_step,
                                                            first_pass=request.schedule_from,
                                                            padding=request.cond_padding)
            texts: dict = first.at(0)
            if request.hires is not None:  # its own prompts (batch_key: the batch's hires are the same) or these
                hires_prompts, hires_negatives = hires_texts_of(request.hires, per_image(prompts), negatives)
                hires_texts = prompt_encoder.scheduled(hires_prompts, hires_negatives,
                                                       request.hires.steps * hires_evaluations(request.hires, sampler),
                                                       first_pass=request.steps * per_step,
                                                       padding=request.cond_padding)
        else:  # diffusers tokenizes these: the embeddings' names are rewritten into their tokens first
            vocabulary = pipes.inversions.vocabulary
            texts = dict(prompt=per_image([vocabulary.rewrite(p) for p in prompts]),
                         negative_prompt=[vocabulary.rewrite(n) for n in negatives] if negatives else None)
        # One CPU generator per image: a seed gives the same image on any device and in any batch.
        generators = [torch.Generator("cpu").manual_seed(s) for s in flat]
        kwargs: dict = dict(
            **texts,
            num_inference_steps=request.steps,
            guidance_scale=request.guidance_scale,
            eta=request.eta or 0.0,  # read by DDIM's step alone (the pipeline passes it where the step takes it)
            num_images_per_prompt=1,
            generator=generators,
            callback_on_step_end=on_step_end,
        )
        if scheduled[0] is not None and (scheduled[0].moves or (hires_texts is not None and hires_texts.moves)):
            kwargs["callback_on_step_end_tensor_inputs"] = ["latents", "prompt_embeds", "add_text_embeds"]
        total_steps = request.steps
        mask = init = None
        repaint: inpainting.Repaint | None = None  # what an inpainting call does under its mask beside diffusers
        paste: masking.Paste | None = None  # how an inpainting goes back over its init image
        edit: EditNoise | None = None  # image-to-image's randomness, where anything changes it
        variations = [v for group in varied for v in group]
        if request.init_image is None:
            kwargs.update(width=request.width, height=request.height)
            if nine:  # A1111's txt2img_image_conditioning: a grey image wholly masked, from noise alone
                kwargs.update(inpainting.text_to_image(len(flat), request.width, request.height))
            # The noise has the VAE's latent channels (an inpainting UNet reads 5 more, which are not noise).
            shape = (len(flat), pipe.vae.config.latent_channels, request.height // 8, request.width // 8)
            if any(v is not None and v.changes(shape[1:]) for v in variations):
                # Drawn as the pipeline would draw them (in its prompt embeddings' dtype), from the generators it
                # is then given, so an image without a variation keeps its pixels and its generator's state.
                encoder = getattr(pipe, "text_encoder_2", None)
                dtype = encoder.dtype if encoder is not None else pipe.unet.dtype
                kwargs["latents"] = initial_latents(shape, generators, flat, variations, dtype,
                                                    pipe._execution_device)
        else:
            if cut is not None:  # "Only masked": the mask's region, at the generation size
                inits = [cut.image]
            else:
                inits = [to_rgb(i.request.init_image).resize((request.width, request.height),
                                                             Image.Resampling.LANCZOS) for i in items]
            init = inits[0]
            steps, total_steps = img2img_steps(request.steps, request.strength, exact=request.exact_steps,
                                               limit=limit)
            if total_steps < request.steps and request.exact_steps:
                warnings.append(f"hires: {total_steps} of {request.steps} second-pass steps ran: at strength "
                                f"{request.strength} more would exceed the schedule's {limit} timesteps")
            kwargs.update(image=per_image(inits), strength=request.strength, num_inference_steps=steps)
            # What diffusers draws for each encoded image (its posterior sample, then the noise added to it), varied
            # and scaled image by image, as A1111's img2img varies and scales its noise (an inpainting checkpoint's
            # masked image is sampled after them and stays as drawn).
            edit = EditNoise.of(flat, variations, per_image([i.request.noise_multiplier for i in items]), generators)
            if request.mask is not None:  # inpainting runs alone (see batch_key)
                if cut is not None:
                    mask, paste = cut.mask, cut.paste
                else:
                    mask = self._prepare_mask(request.mask, request)
                    paste = masking.Paste(init, masking.overlay_alpha(mask))
                kwargs.update(mask_image=mask, width=request.width, height=request.height)
                if request.masked_content != "original":  # A1111 fills the pixels for the latent fills too
                    kwargs["image"] = per_image([inpainting.filled(image, mask) for image in inits])
                repaint = inpainting.Repaint.of(request.masked_content, mask, request.width, request.height, nine)
            elif nine:  # A1111's img2img_image_conditioning without a mask: a mask of ones, the image masked away
                kwargs.update(inpainting.image_to_image(request.width, request.height))
        if request.hires is not None:
            hires_steps = img2img_steps(request.hires.steps, request.hires.strength, exact=True, limit=limit)[1]
            total_steps += hires_steps
            if hires_steps < request.hires.steps:
                warnings.append(f"hires: {hires_steps} of {request.hires.steps} second-pass steps ran: at strength "
                                f"{request.hires.strength} more would exceed the schedule's {limit} timesteps")
        if pipes.ip_adapter_loaded:
            reference = request.ip_adapter_image  # a reference runs alone; a batch has none
            pipe.set_ip_adapter_scale(request.ip_adapter_scale if reference is not None else 0.0)
            # The adapted UNet always expects image embeddings: a blank image at scale 0 changes nothing.
            kwargs["ip_adapter_image"] = to_rgb(reference) if reference is not None else Image.new("RGB", (64, 64))
        elif request.ip_adapter_image is not None:
            warnings.append("no IP-Adapter is loaded: the reference image was ignored")
        if request.denoising_end is not None:
            kwargs["denoising_end"] = request.denoising_end
        # "Only masked": each unit's image is cut to the region as the init image is, as the extension cuts it.
        framed = cut_units(units, cut) if cut is not None else units
        kwargs.update(self.controls.kwargs(kind, framed, init, request.width, request.height,
                                           control.shuffle_seed(flat[0], request.subseed, request.subseed_strength)))
        # The maps the recolor units put back into the finished images (at a hires fix's size), or hand the refiner
        # with the latents; those of every pass, as the extension makes them before it samples.
        recoloring = request.recolor if request.recolor is not None else request.control
        recolors = control.recolors(cut_units(recoloring, cut) if cut is not None else recoloring, init,
                                    *(request.hires.size if request.hires is not None else (request.width,
                                                                                           request.height)))
        # The colour-fix units' control images, encoded for the correction of every UNet output (``colorfix``).
        fixing = [u for u in framed if u.module in model_free.COLORFIX]
        fixes = colorfix.fixes(pipe, fixing, [control.control_image(u, init, request.width, request.height)
                                              for u in fixing])
        # The batch's stop bookkeeping holds its images and device latents: let go of them however it ends. Tiling
        # (batch_key: the whole batch or none of it) holds for every decode too, those of stopped items included.
        second = pipes.inpaint if nine else pipes.img2img  # a latent hires fix's second pass
        tiled = {id(m): m for m in (pipe.unet, pipe.vae, second.unet, pipes.txt2img.vae,
                                    getattr(pipe, "controlnet", None)) if m is not None}
        # AND or a subprompt's weight, or a prompt and a negative prompt of different lengths (either pass): the UNet
        # of both passes' pipelines runs its calls as A1111's would while the batch runs, reading the running pass's
        # conditioning.
        composed = (composing([pipe, second], lambda: scheduled[0])
                    if any(c is not None and c.reshapes for c in (scheduled[0], hires_texts)) else nullcontext())
        try:
            with circular(*tiled.values(), enabled=request.tiling), composed, \
                    steering(pipe, control.active(units)), colorfix.fixing(pipe, fixes), \
                    noised(pipe, edit, pure=mode == "inpaint" and request.strength == 1.0), \
                    inpainting.repainting(pipe, repaint), \
                    inpainting.from_the_image(pipe, enabled=nine and mode == "img2img"):
                latents = None
                try:
                    with fastpath.attention(self.config.fast):
                        latents = pipe(**kwargs, output_type="latent").images
                        if request.hires is not None:
                            done[0] = request.steps
                            if hires_texts is not None:  # A1111 schedules the second pass's prompts anew
                                scheduled[0], evals[0] = hires_texts, hires_evaluations(request.hires, sampler)
                                kwargs.update(hires_texts.at(0))
                            latents = self._hires_pass(pipes, request, request.hires, latents, seeds, kwargs, partial,
                                                       variations, warnings)
                except Stopped:  # no item runs on: each is stopped (its result is kept in ``partial``) or cancelled
                    pass
                results: list[StageResult | BaseException] = []
                handed: np.ndarray | None = None
                decoded: tuple[list[Image.Image], list[masking.Paste]] | None = None  # decoded once for the batch
                for i, (own, a, b) in enumerate(zip(seeds, offsets, offsets[1:], strict=False)):
                    if i in partial.kept:
                        results.append(partial.answer(i))
                    elif latents is None:
                        results.append(GenerationCancelled(f"request {items[i].request_id} cancelled"))
                    elif request.denoising_end is not None:
                        handed = latents.float().cpu().numpy() if handed is None else handed
                        results.append(StageResult(images=[], seeds=own, latents=handed[a:b], warnings=list(warnings),
                                                   info=dict(info[i]), recolors=recolors))
                    else:
                        decoded = finished(self.decode(latents, pipes)) if decoded is None else decoded
                        made, pastes = decoded
                        results.append(StageResult(images=made[a:b], seeds=own, warnings=list(warnings),
                                                   info=dict(info[i]), pastes=pastes[a:b]))
                return results
        finally:
            partial.release()

    def _hires_pass(self, pipes: Pipelines, request: GenerationRequest, hires: LatentHires, latents: torch.Tensor,
                    seeds: list[list[int]], first: dict, partial: Partial, variations: list[Variation | None],
                    warnings: list[str]) -> torch.Tensor:
        """A1111's latent hires fix: resize the first pass's latents as the mode says, then denoise them again at
        the hires size with the same checkpoint and the hires fix's prompts (``first``'s embeddings, swapped in
        already) and sampler, from the same seeds (A1111 reseeds), and with the same variation seeds, mixed into this
        pass's noise at its size, as A1111 mixes them. On an inpainting checkpoint, its inpainting pipeline runs it on
        text-to-image's conditioning at the hires size (A1111's ``sample_hr_pass`` at ``inpainting_mask_weight`` 1)."""
        interpolation, antialias = LATENT_UPSCALE_MODES[hires.mode]
        size = (hires.height // 8, hires.width // 8)
        upscaled = torch.nn.functional.interpolate(latents.float(), size=size, mode=interpolation,
                                                   antialias=antialias).to(latents.dtype)
        if hires.crop_width or hires.crop_height:  # A1111 truncates the resized latents around their centre
            width, height = hires.size
            cut_y, cut_x = size[0] - height // 8, size[1] - width // 8
            upscaled = upscaled[:, :, cut_y // 2:size[0] - (cut_y + 1) // 2, cut_x // 2:size[1] - (cut_x + 1) // 2]
        nine = inpainting.holds_inpainting(pipes.txt2img)
        pipe = pipes.inpaint if nine else pipes.img2img
        flat = [s for group in seeds for s in group]
        if hires.sampler is not None:  # A1111's hr_sampler_name / hr_scheduler
            pipe.scheduler = build_scheduler(hires.sampler, pipes.scheduler_config, hires.schedule, seeds=flat,
                                             warnings=warnings, churn=request.churn)
        else:  # the first pass warned already
            pipe.scheduler = build_scheduler(request.sampler or self.config.default_sampler, pipes.scheduler_config,
                                             request.schedule, seeds=flat, churn=request.churn)
        partial.watch(pipe.scheduler)
        # A1111 runs exactly the second pass's steps whatever the strength: ask for steps / strength of them.
        asked = img2img_steps(hires.steps, hires.strength, exact=True,
                              limit=pipes.scheduler_config.get("num_train_timesteps", 1000))[0]
        if control.second_pass(request.control):  # the plain image-to-image pipeline runs this pass
            warnings.append("ControlNet: a Latent hires fix's second pass ran without it (a pixel hires fix applies "
                            "it to both passes)")
        kwargs = {k: v for k, v in control.dropped(first).items()
                  if k not in ("width", "height", "denoising_end", "latents", "mask_image")}
        kwargs.update(image=upscaled, strength=hires.strength, num_inference_steps=asked,
                      generator=[torch.Generator("cpu").manual_seed(s) for s in flat])
        if nine:
            kwargs.update(inpainting.latent_hires(len(flat), *hires.size))
        # The pipeline noises the resized latents once, with noise it draws first from each generator (latents: no
        # posterior sample before it): that noise, varied. A1111 applies no noise multiplier to this pass.
        with noised(pipe, EditNoise.of(flat, variations)), inpainting.from_the_image(pipe, enabled=nine):
            return pipe(**kwargs, output_type="latent").images

    def decode(self, latents: torch.Tensor, pipes: Pipelines | None = None) -> list[Image.Image]:
        return fastpath.decode((pipes or self.checkpoint()).txt2img, latents)

    @staticmethod
    def _prepare_mask(mask: Image.Image, request: GenerationRequest) -> Image.Image:
        """A whole picture's mask as A1111 makes it: blurred at the size it was drawn at, then framed at the
        generation size by the request's ``mask_fit`` (``masking.whole_picture``)."""
        return masking.whole_picture(mask, request.width, request.height, request.mask_fit, *blurs(request))

    def describe(self) -> dict:
        return {
            "name": self.catalog.default,
            "checkpoints": self.resident.describe(),
            "device": str(self.device),
            "dtype": str(self.dtype).removeprefix("torch."),
            "loras": sorted(self.loras),
            "embeddings": self.embeddings_listed(),
            "ip_adapter": self.config.ip_adapter is not None,
            "controlnets": self.controls.names,
            "preprocessors": self.controls.modules,
            "fast_path": self.fast,
            **devices.memory(self.device),
            "running": self.cancellation.running(),
        }

    def embeddings_listed(self) -> dict[str, dict[str, dict]]:
        """A1111's /sdapi/v1/embeddings answer, as the default checkpoint holds them (else the first one held; all
        SDXL checkpoints have encoders of the same widths); nothing loaded while none is held."""
        for name in dict.fromkeys([self.catalog.default, *self.resident.names]):
            pipes = self.resident.held(name)
            if pipes is not None:
                return pipes.inversions.listed()
        return {"loaded": {}, "skipped": {}}

    def healthy(self) -> bool:
        return self.oom.healthy()

    def fingerprint(self, checkpoint: str | None = None) -> dict[str, str]:
        """What decides the pixels of a request on ``checkpoint`` (the result cache's key): that checkpoint's SHA-256
        as the catalogue computes it (A1111's hash, kept per file version in MODEL_CACHE_DIR, so never hashed
        twice), the VAE's, IP-Adapter's and LoRAs', precision and defaults. It depends on the checkpoint named, never
        on which checkpoints this replica holds: every replica gives the same answer."""
        entry = self.catalog.entry(checkpoint or self.catalog.default)
        out = {"checkpoint": f"{entry.name}:{self._sha256(entry.checkpoint.source)}",
               "base_runtime": f"{self.device.type}/{self.dtype}",
               "base_defaults": f"{self.config.default_sampler}/{self.config.fast.fp8}",
               "prompt_reading": READING}
        if entry.checkpoint.config:  # where a single file's component configs come from
            out["checkpoint_config"] = entry.checkpoint.config
        if self.config.vae:
            out["vae"] = self._sha256(self.config.vae.source)
        if self.config.ip_adapter:
            out["ip_adapter"] = self._sha256(self.config.ip_adapter)
        for name, path in self.loras.items():
            out[f"lora:{name}"] = self._sha256(str(path))
        for name, source in self.config.controlnets.items():
            out[f"controlnet:{name}"] = self._sha256(source)
        for module, source in self.config.preprocessors.items():  # a map that runs a model is the model's
            out[f"preprocessor:{module}"] = self._sha256(source)
        for name, embedding in self.embedding_files.files().items():  # a name in a prompt reads as its vectors
            out[f"embedding:{name}"] = self._sha256(str(embedding.path))
        return out

    def _sha256(self, source: str) -> str:
        """A source's weights hashed by the catalogue (a hub id resolved to its local copy first); an S3 source is
        keyed on what the store says of its objects (``S3Fetcher.identity``), so a replica that holds no copy
        answers without downloading it, and gives the same answer as one that does (read again once a minute: an
        object replaced on S3 misses within that minute)."""
        if source.startswith("s3://"):
            read, identity = self._identities.get(source, (-S3_IDENTITY_S, ""))
            if time.monotonic() - read >= S3_IDENTITY_S:  # one listing a minute, not one per request
                identity = "s3:" + self._s3.identity(source)
                self._identities[source] = (time.monotonic(), identity)
            return identity
        path = self._resolved.get(source)
        if path is None:
            path = self._resolved[source] = loader.resolve(source, self.settings)
        digest = self.catalog.sha256(str(path))
        if digest is None:
            raise ModelLoadError(f"{source}: its weights cannot be hashed", field="checkpoint")
        return digest


def check_request(request: GenerationRequest, max_pixels: int) -> None:
    check_size(request.width, request.height, max_pixels)
    control.check(request.control, mode_of(request), request.denoising_end)
    if request.hires is not None:
        if mode_of(request) != "txt2img" or request.denoising_end is not None:
            raise InvalidInput("the latent hires fix applies to text-to-image alone", field="hires")
        check_size(*request.hires.size, max_pixels)
    if request.noise_multiplier != 1.0 and mode_of(request) == "txt2img":
        raise InvalidInput(f"noise_multiplier={request.noise_multiplier} applies to image-to-image and inpainting "
                           "alone (a text-to-image pass starts from noise only)", field="noise_multiplier")


def blurs(request: GenerationRequest) -> tuple[int, int]:
    """The mask's blur along the rows and along the columns."""
    return request.mask_blur, request.mask_blur if request.mask_blur_y is None else request.mask_blur_y


def cut_of(request: GenerationRequest) -> masking.Cut | None:
    """An inpainting's "Only masked" region (``masking.only_masked``), None for a mask blank once blurred."""
    if request.init_image is None or request.mask is None:
        raise InvalidInput("'Only masked' inpainting needs an init image and a mask", field="mask")
    return masking.only_masked(request.init_image, request.mask, request.width, request.height,
                               request.inpaint_padding, *blurs(request), fit=request.mask_fit)


def cut_units(units: list[control.ControlUnit], cut: masking.Cut) -> list[control.ControlUnit]:
    """"Only masked"'s ControlNet units, as A1111's extension frames them: a unit's own image cut to the region as
    the init image is (one without takes the init image's region); a unit that asks not to be cut
    (``crop_to_mask`` false) takes its image, or the whole init image, as it is."""
    out = []
    for unit in units:
        if unit.crop_to_mask:
            image = cut.control(unit.image, unit.resize_mode) if unit.image is not None else None
        else:
            image = unit.image if unit.image is not None else cut.paste.original
        out.append(unit.model_copy(update={"image": image}))
    return out


def region_info(cut: masking.Cut | None) -> dict:
    """What a request's ``info`` says of an "Only masked" inpainting: the region of the init image it inpainted."""
    return {"inpaint_region": list(cut.box)} if cut is not None else {}


def variations_of(request: GenerationRequest, subseeds: list[int]) -> list[Variation | None]:
    """Each image's variation seed, for a request that asks for one (None each otherwise)."""
    if not request.varied:
        return [None] * len(subseeds)
    resize = (request.seed_resize_from_w, request.seed_resize_from_h)
    return [Variation(subseed, request.subseed_strength, resize if min(resize) > 0 else None) for subseed in subseeds]


def variation_info(variations: list[Variation | None]) -> dict:
    """What a request's ``info`` says of its variation seeds: none when it has none."""
    first = variations[0] if variations else None
    if first is None:
        return {}
    return {"subseeds": [v.subseed for v in variations if v is not None], "subseed_strength": first.strength,
            "seed_resize_from": list(first.resize_from) if first.resize_from else None}


def noise_info(request: GenerationRequest) -> dict:
    """What a request's ``info`` says of A1111's initial noise multiplier: nothing at 1."""
    return {"noise_multiplier": request.noise_multiplier} if request.noise_multiplier != 1.0 else {}


def variation_warnings(request: GenerationRequest) -> list[str]:
    """What of a request's seed and tiling options does not apply to it."""
    out = []
    if request.tiling and request.denoising_end is not None:
        out.append("tiling: the refiner's steps are not tiled (the base's are)")
    return out


def chunk_counts(pipes: Pipelines, request: GenerationRequest,
                 default_sampler: str = "Euler a") -> tuple[int, ...] | None:
    """The chunks an A1111 request's prompt and negative prompt need alone with a checkpoint's tokenizers and
    embeddings, over the steps of its first pass and then (with the hires fix) of its second (None for a plain one);
    refused beyond ``MAX_CHUNKS``. A pass pads every text of the batch to its most chunks, so these belong to the
    batching key: a request's pixels never depend on its batch mates'."""
    if request.prompt_syntax != "a1111":
        return None
    encoder, prompt = PromptEncoder(pipes.txt2img, pipes.inversions.vocabulary), parse_lora_tags(request.prompt)[0]
    sampler = request.sampler or default_sampler
    per_step = evaluations(sampler)
    counts = encoder.counts(prompt, request.negative_prompt, request.steps * per_step, request.schedule_from)
    if request.hires is None:
        return counts
    hires = request.hires
    hires_prompt = parse_lora_tags(hires.prompt)[0] if hires.prompt is not None else prompt
    hires_negative = hires.negative_prompt if hires.negative_prompt is not None else request.negative_prompt
    return counts + encoder.counts(hires_prompt, hires_negative, hires.steps * hires_evaluations(hires, sampler),
                                   first_pass=request.steps * per_step)


def hires_texts_of(hires: LatentHires, prompts: list[str],
                   negatives: list[str] | None) -> tuple[list[str], list[str] | None]:
    """The prompts (LoRA tags removed) and negative prompts of a latent hires pass, per image: its own where
    A1111's hr_prompt / hr_negative_prompt named them (the same for a whole batch: ``batch_key``), else the first
    pass's. An empty negative prompt stays None, as the first pass's does."""
    if hires.prompt is not None:
        prompts = [parse_lora_tags(hires.prompt)[0]] * len(prompts)
    if hires.negative_prompt is not None:
        negatives = [hires.negative_prompt] * len(prompts) if hires.negative_prompt else None
    return prompts, negatives


def hires_evaluations(hires: LatentHires, first_sampler: str) -> int:
    """Model evaluations per step of a latent hires pass's sampler: A1111 counts its prompt editing in them."""
    return evaluations(hires.sampler or first_sampler)


def passes_over(request: GenerationRequest, source: StageResult) -> list[GenerationRequest]:
    """``request`` as one img2img pass per image of ``source``: that image at its own size (rounded down to a
    multiple of 8; an "Only masked" inpainting keeps the request's, the size its region is inpainted at), with its own
    seed and its own variation seed: the one its first pass ran (A1111's pixel hires fix mixes the same into its second
    pass's noise), else counted up from ``request.subseed`` as a batch's are."""
    count = len(source.images)
    subseeds = source.info.get("subseeds") or []
    if len(subseeds) != count:  # no variation seed (kept as asked: -1 draws none), or an edit's uploads
        subseeds = variation_seeds(request.seed, request.subseed, request.subseed_strength, count)[1] \
            if request.varied else [request.subseed] * count
    masked = request.mask is not None and request.inpaint_area == "masked"
    # Each pass's shuffle units draw from the first image's seed, as the extension's one map serves every image.
    units = request.control
    if source.seeds:
        units = control.seeded(units, control.shuffle_seed(source.seeds[0], request.subseed, request.subseed_strength))
    return [request.model_copy(update={"init_image": image, "seed": seed, "subseed": subseed, "batch_size": 1,
                                       "control": units, **({} if masked else {"width": image.width // 8 * 8,
                                                                                "height": image.height // 8 * 8})})
            for image, seed, subseed in zip(source.images, source.seeds, subseeds, strict=True)]


def batch_key(request: GenerationRequest, chunks: tuple[int, ...] | None = None) -> tuple | None:
    """What requests must share to run in one pipeline call; ``None``: this one runs alone (an inpainting mask,
    an IP-Adapter reference and ControlNet units' images, those of the recolor units it puts back too, belong to one
    request). The checkpoint is part of it: a batch never mixes two.
    ``chunks``: an A1111 request's ``chunk_counts``, which its batch mates must need too. Tiling is part of it (the
    convolutions pad one way for the whole call), and so are Euler's churn (bound into the call's one scheduler) and
    how a prompt and a negative prompt of different lengths meet (``cond_padding``: the batch's one conditioning);
    variation seeds and the noise multiplier are not (each image's noise is its own, varied and scaled in a batch
    as alone), nor are an A1111 prompt's AND and subprompt weights (``composable.Composed`` runs the other
    subprompts in a UNet call of their own and leaves a plain image's rows as they are)."""
    mode = mode_of(request)
    if mode == "inpaint" or request.ip_adapter_image is not None or request.control or request.recolor:
        return None
    tagged = parse_lora_tags(request.prompt)[1]
    return (request.checkpoint, mode, request.width, request.height, request.steps, request.sampler,
            request.schedule, request.guidance_scale, tuple((r.name, r.weight) for r in request.loras),
            tuple((r.name, r.weight) for r in tagged), bool(request.negative_prompt), request.denoising_end,
            (request.strength, request.exact_steps) if mode == "img2img" else None, request.hires,
            request.prompt_syntax, chunks, request.tiling, request.eta, request.schedule_from, request.churn,
            request.cond_padding)


BATCH_UNIT_PIXELS = 1024 * 1024


def batch_weight(item: BatchItem) -> int:
    """An item's share of ``max_batch_size``, which counts plain 1024² images: each of its images weighs one per
    1024² it covers or starts (a 2048² hires pass weighs 4; smaller images 1), so large images no longer fill a batch
    sized for SDXL's native size; times the UNet rows an image of an A1111 prompt with AND or a subprompt weight runs
    at each step against a plain image's (``unet_rows``: three subprompts under guidance are four rows where a plain
    image is two, so it weighs twice as much). Its costliest pass counts (the hires fix's may read another prompt).
    An item that weighs the whole batch or more runs alone, unsplit."""
    request = item.request
    passes = [((request.width, request.height), request.prompt)]
    if request.hires is not None:
        passes.append((request.hires.size, request.hires.prompt if request.hires.prompt is not None
                       else request.prompt))
    most = max(max(1, math.ceil(width * height / BATCH_UNIT_PIXELS)) * unet_rows(request, prompt)
               for (width, height), prompt in passes)
    return math.ceil(item.count * most)


def unet_rows(request: GenerationRequest, prompt: str) -> float:
    """The UNet rows one image of ``request`` runs at each step with ``prompt``, against a plain image's: 1 but for
    an A1111 prompt with AND or a subprompt weight, which ``composable.Composed`` runs one more row for per other
    subprompt, and, without classifier-free guidance (diffusers runs none at a scale of 1 or less), one for its
    negative prompt. A prompt that cannot be read counts as plain: its request fails before it runs."""
    if request.prompt_syntax != "a1111":
        return 1.0
    try:
        weights = [part.weight for part in subprompts(parse_lora_tags(prompt)[0])]
    except InvalidInput:
        return 1.0
    if weights == [1.0]:
        return 1.0
    guided = request.guidance_scale > 1.0
    plain = 2 if guided else 1
    return (plain + len(weights) - 1 + (0 if guided else 1)) / plain


class _Held:
    """What Serve's multiplexer keeps for a checkpoint it routes to this replica. Serve calls ``__del__`` when it
    evicts the checkpoint (its documented unload hook); the garbage collector may call it again later, which
    ``Resident.evict`` ignores."""

    def __init__(self, pipes: Pipelines, resident: Resident) -> None:
        self.pipes, self.resident = pipes, resident

    def __del__(self) -> None:
        self.resident.evict(self.pipes)


@serve.deployment(ray_actor_options={"num_cpus": 0.5}, max_ongoing_requests=16, health_check_period_s=10)
class SDXLBase:
    """Thin Serve shell around ``BaseGenerator``. Checkpoints are Serve multiplexed models: a plan routes a
    request with ``multiplexed_model_id=<checkpoint>`` to a replica that holds it, and ``_held`` loads one that
    is not held here (evicting the least recently used beyond ``max_loaded_checkpoints``). Compatible requests
    are batched (``batching``, or ``user_config`` at run time); every batch and every load runs on the replica's
    one inference thread. The replica tells the progress board which checkpoints it holds (``GET /models``)."""

    # Serve awaits an async constructor: the default checkpoint loads through Serve's multiplexer.
    async def __init__(self, config: dict | SDXLBaseConfig,  # type: ignore[misc]
                       board: DeploymentHandle | None = None) -> None:
        replica_logging()  # before anything here logs
        config = SDXLBaseConfig.model_validate(config)
        self.thread = devices.InferenceThread("sdxl-base")
        self.model: BaseGenerator = await self.thread.run(BaseGenerator, config, preload=False)
        self.metrics = StageMetrics("sdxl_base")
        self.board = board
        self.reporter = Reporter(board, "sdxl_base", self.model.cancellation)
        self.batcher: Batcher[BatchItem] = Batcher(self._run_batch, config.batching, size=batch_weight)
        self.replica = _replica_id()
        # Serve's multiplexer needs a replica; Serve's local testing mode has none, and there the replica's own
        # least-recently-used policy applies.
        self._held = None
        if self.replica:
            async def hold(name: str) -> _Held:  # a plain function: Serve keeps its cache on the function object
                return await self._load(name)

            self._held = serve.multiplexed(max_num_models_per_replica=config.max_loaded_checkpoints)(hold)
        await self._checkpoint(self.model.catalog.default)  # ready (and routable) with the default
        if board is not None and self.replica:
            self._heartbeat = asyncio.get_running_loop().create_task(self._announce_every(HOLDINGS_EVERY_S))

    async def _load(self, name: str) -> _Held:
        pipes = await self.thread.load(self.model.load, name)
        asyncio.get_running_loop().create_task(self._announce())
        return _Held(pipes, self.model.resident)

    async def _checkpoint(self, name: str) -> Pipelines:
        if self._held is None:
            return await self.thread.load(self.model.checkpoint, name)
        await asyncio.to_thread(self.model.catalog.entry, name)  # an unknown name never reaches Serve's cache
        return (await self._held(name)).pipes

    async def _announce(self) -> None:
        """Tell the board which checkpoints this replica holds and how often it loaded each."""
        if self.board is not None and self.replica:
            try:
                await self.board.hold.remote(self.replica, self.model.resident.describe())
            except Exception as e:  # noqa: BLE001 - the next announcement corrects a missed one
                logger.debug("holdings not announced: %s", e)

    async def _announce_every(self, seconds: float) -> None:
        while True:
            await self._announce()
            await asyncio.sleep(seconds)

    async def reconfigure(self, user_config: dict) -> None:
        """``user_config: {max_batch_size, batch_wait_timeout_s}`` retunes batching without a restart (async: on the
        event loop that owns the batch queues, never beside it on a thread)."""
        self.batcher.configure(Batching.model_validate({**self.batcher.config.model_dump(), **user_config}))

    async def _run_batch(self, items: list[BatchItem]) -> list[StageResult | BaseException]:
        with self.metrics.track(requests=False):
            outcomes = await self.thread.run(self.model.generate_batch, items)
        self.metrics.outcomes(outcomes)
        self.metrics.produced(sum(len(o.images) or len(o.seeds) for o in outcomes if isinstance(o, StageResult)))
        return outcomes

    async def generate(self, request: GenerationRequest, request_id: str | None = None,
                       encode: Encoding | None = None, init: StageResult | None = None) -> StageResult:
        """``encode``: this is the plan's last stage; answer with files, not pixels. ``init``: an earlier stage's
        result (A1111's pixel hires fix: the upscaler's), whose images this pass takes as img2img inputs, each at
        its own size (rounded down to a multiple of 8) with its own seed; they travel replica to replica."""
        if init is not None and init.stopped:  # A1111's hires fix after /interrupt or /skip: its first pass alone
            return await encoded(init, encode)
        checkpoint = request.checkpoint or self.model.catalog.default
        request = request.model_copy(update={"checkpoint": checkpoint})
        request_id = request_id or uuid.uuid4().hex
        items = [BatchItem(request, request_id, request.batch_size)] if init is None else [
            BatchItem(again, request_id, source=init) for again in passes_over(request, init)]
        self.reporter.start()
        try:
            with self.metrics.request():
                held = await self._checkpoint(checkpoint)
                for item in items:
                    item.checkpoint = held
                # The chunk counts tokenize the prompts here, on the event loop: a few milliseconds, since a
                # prompt's parse is cached and its length capped (and every pass of a request reads alike).
                chunks = chunk_counts(held, request, self.model.config.default_sampler)
                submitted = self.batcher.submit_all([(batch_key(item.request, chunks), item) for item in items])
                results = await self.model.cancellation.guard(request_id, submitted)
            return await encoded(results[0] if init is None else init.joined(results), encode)
        except BaseException:  # cancelled through Serve (a cancel, deadline or disconnect upstream), or one of its
            # passes failed: its other passes, already running in a batch of another size, stop within a step
            self.model.cancellation.cancel(request_id)
            raise

    async def detect(self, module: control.Preprocessor, images: list[Image.Image], resolution: int,
                     a: float | None, b: float | None) -> list[Image.Image]:
        """A ControlNet preprocessor's maps of ``images`` (A1111's /controlnet/detect): model-free arithmetic or a
        depth, line-art, pose, soft-edge or M-LSD model on a worker thread, never the inference thread, which has
        batches to run (a model takes one call at a time, whichever thread makes it)."""
        models = self.model.controls.preprocessors

        def maps() -> list[Image.Image]:
            # A CUDA out-of-memory is a retryable 503 with the cache freed, as on the inference thread.
            with self.model.oom():
                return [control.detect(image, module, resolution, a, b, models,
                                       field=f"controlnet_input_images[{i}]") for i, image in enumerate(images)]

        return await asyncio.to_thread(maps)

    async def blurred_box(self, mask: Image.Image, across: int, down: int) -> masking.Box | None:
        """Where ``mask`` is not blank once blurred as this replica blurs it (``masking.blurred_box``): the ingress
        decides A1111's "Only masked" with it, so that its infotext says what will run, without OpenCV of its own.
        On a worker thread, never the inference thread."""
        return await asyncio.to_thread(masking.blurred_box, mask, across, down)

    async def controlnet_titles(self) -> list[str]:
        """The ControlNets as A1111's extension lists them (``name [hash]``), hashed once as they loaded."""
        return list(self.model.controls.titles)

    async def refresh(self) -> dict[str, list[str]]:
        """Read the checkpoint, LoRA and embedding folders again."""
        return await asyncio.to_thread(self.model.refresh)

    async def cancel(self, request_id: str) -> None:
        self.model.cancellation.cancel(request_id)

    async def progress(self, request_id: str) -> tuple[int, int] | None:
        return self.model.cancellation.progress(request_id)

    async def preview(self, request_id: str) -> Image.Image | None:
        """A latent-space approximation of the image being denoised, or None when the request is not running."""
        return self.model.cancellation.preview(request_id)

    async def describe(self) -> dict:
        return {**self.model.describe(), "replica": self.replica,
                "batching": {**self.batcher.config.model_dump(), **self.batcher.counts}}

    async def fingerprint(self, checkpoint: str | None = None) -> dict[str, str]:
        """The result cache's key for a request on ``checkpoint`` (see ``BaseGenerator.fingerprint``): off the
        inference thread, and the same whichever replica answers, so the call needs no multiplexed routing."""
        return await asyncio.to_thread(self.model.fingerprint, checkpoint)

    async def check_health(self) -> None:
        devices.check_health(self.thread, self.model.oom, current().inference_stall_seconds)


def _replica_id() -> str | None:
    """This replica's id, or None outside a Serve replica (Serve's local testing mode)."""
    try:
        return serve.get_replica_context().replica_id.unique_id
    except RayServeException:
        return None
