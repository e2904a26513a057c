"""Automatic1111's ``/sdapi/v1/*`` (seed 004 and every A1111 client): compatible payloads, our own plumbing.

Images are plain base64 files in the saved ``samples_format`` (``graphs.api.a1111_options``): PNGs carrying A1111's
``parameters`` text chunk, or JPEGs or WebPs carrying it as their EXIF UserComment; ``info`` is a JSON string holding
``all_seeds`` and ``warnings`` (what /generate reports: an unknown LoRA ignored, a fallback upscaler, no face
found) and, with the NSFW filter on, ``nsfw`` (one flag per image; a flagged image is replaced). A fixed-seed
txt2img or img2img (its uploads part of the key) is answered from the result cache when it is on (``cached`` in
``info``). ``/interrupt`` and ``/skip`` cancel only the calling client's in-flight requests (the client is its bearer
token, else its address), never another client's.

The checkpoint is ``override_settings.sd_model_checkpoint`` or the default (``POST /sdapi/v1/options``); with
``override_settings_restore_afterwards: false`` the override becomes the default, as in A1111. Hires fix with a
``Latent*`` upscaler resizes the latents and denoises them again; with a named upscaler it upscales pixels.

Images are marked (invisible watermark, content credentials) where they are encoded, once: by a generation's last
stage (the safety checker while the filter is on: it screens the finished images, then encodes them), and for the
extras routes, whose stages answer pixels, by the Provenance deployment.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from fastapi import APIRouter, Request, Response
from PIL import Image

from deployments.support import prompts
from deployments.support.control import offered, seeded, shuffle_seed
from deployments.support.errors import GenerationCancelled, InvalidInput, UnknownModel
from deployments.support.generation import (
    LATENT_UPSCALE_MODES,
    MASKED_CONTENT,
    Encoding,
    GenerationRequest,
    StageResult,
    parse_lora_tags,
    resolve_seeds,
    variation_seeds,
)
from deployments.support.masking import InpaintArea
from deployments.support.samplers import A1111Choice, a1111_choice
from deployments.support.settings import current
from graphs import flights, plans
from graphs.api import a1111_controlnet as controlnet
from graphs.api import a1111_grid
from graphs.api import a1111_options as answer_options
from graphs.api.a1111_info import replacement_vaes
from graphs.api.a1111_infotext import infotext
from graphs.api.a1111_models import (
    CHURN_SETTINGS,
    MAX_IMAGES,
    SAME_AS_FIRST_PASS,
    Empty,
    ImagesResponse,
    Img2ImgRequest,
    Progress,
    Txt2ImgRequest,
)
from graphs.api.a1111_sizes import FITS, crop_box, edit_inputs, hires_size
from graphs.api.a1111_styles import PromptStyles
from graphs.api.body import JSONBodyRoute, blobs, json_answer
from graphs.api.checkpoints import CheckpointChoice
from graphs.api.edge import client_address, token_owner
from graphs.api.errors import call, documented, unwrap
from graphs.api.fields import MAX_PROMPT, b64_png, image_bytes
from graphs.jobs.cache import RequestCache
from graphs.jobs.store import ANONYMOUS, JobStore

if TYPE_CHECKING:
    from graphs.app import AppArgs

router = APIRouter(prefix="/sdapi/v1", tags=["automatic1111"], route_class=JSONBodyRoute,
                   responses=documented(503))
FLIGHT_TTL_S = 3600.0  # a request tracked longer than any deadline is gone with its ingress


@dataclass
class InFlight:
    """One A1111 generation of one client, shared through the job store so any ingress replica can see it."""

    id: str
    client: str
    started: float
    total_steps: int
    request_ids: list[str] = field(default_factory=list)
    batches: int = 1  # n_iter: one request id each

    def steps(self, current: tuple[int, int] | None) -> tuple[int, int]:
        """Steps done and in all, given what the running batch's replica last reported (step, of steps): each
        batch counts as many as the replica says (a hires fix adds its second pass's), else as asked."""
        per_batch = current[1] if current and current[1] else self.total_steps // max(1, self.batches)
        done = (len(self.request_ids) - 1) * per_batch + (current[0] if current else 0)
        return done, per_batch * max(self.batches, len(self.request_ids))


def images_answer(files: list[bytes], parameters: dict, info: dict) -> Response:
    """A1111's answer for ``files``: each one base64 in ``images``, spliced in as bytes (see ``json_answer``)."""
    images, payloads = blobs(files)
    return json_answer(ImagesResponse(images=images, parameters=parameters, info=json.dumps(info)), **payloads)


# The samplers whose eta diffusers runs (DDIM's step takes it), and those whose A1111 eta it cannot: their diffusers
# schedulers add noise as A1111 does at its default eta of 1, and no other.
READS_ETA = frozenset({"DDIM", "DDIM CFG++"})
ETA_ONE = frozenset({"Euler a", "DPM2 a", "DPM++ 2S a", "DPM++ SDE", "DPM++ 2M SDE", "DPM++ 2M SDE Heun",
                     "DPM++ 3M SDE"})


def mask_text(r: Img2ImgRequest, area: InpaintArea | None) -> dict:
    """An inpainting's settings as A1111 writes them, in its order: its mask mode when inverted; its blur where there
    is one (one number both ways, else a key without a value, which the infotext leaves out); where "Only masked" ran,
    the inpaint area and its padding; its masked content other than "original". ``area``: the area inpainted, None
    where a blank mask of "Only masked" was dropped (A1111 has written the mode and the blur by then, and no more)."""
    settings: dict = {}
    if r.inpainting_mask_invert:
        settings["Mask mode"] = "Inpaint not masked"
    across, down = r.mask_blurs()
    if across > 0 or down > 0:
        settings["Mask blur"] = across if across == down else None
    if area == "masked":
        settings.update({"Inpaint area": "Only masked", "Masked area padding": r.inpaint_full_res_padding})
    if area is not None and r.inpainting_fill != 1:  # "original", A1111's own default, goes unwritten
        settings["Masked content"] = MASKED_CONTENT[r.inpainting_fill]
    return settings


def eta_unapplied(eta: float | None, sampler: str) -> list[str]:
    """A warning when ``eta`` would change A1111's image and the sampler runs without it."""
    if eta is not None and eta != 1.0 and sampler in ETA_ONE:
        return [f"eta={eta} is not applied to {sampler}: it ran at A1111's default eta of 1"]
    return []


def _client(request: Request) -> str:
    """Whose requests these are, as the job store keeps them: a token's owner name (never the token itself), else
    the client's address (behind a trusted proxy, the one it forwarded)."""
    owner = token_owner(request.headers.get("authorization"))
    return f"token:{owner}" if owner else f"addr:{client_address(request.scope, current())}"


def _interrupts(client: str) -> str:
    """Where /interrupt marks the flights of ``client`` it stopped (beside, not inside, their records)."""
    return f"interrupts:{client}"


class A1111Routes(CheckpointChoice):
    handles: plans.Handles
    jobs: JobStore
    cache: RequestCache
    config: AppArgs
    provenance: object
    styles: PromptStyles

    async def _track(self, flight: InFlight) -> None:
        record = {"id": flight.id, "started": flight.started, "total_steps": flight.total_steps,
                  "request_ids": flight.request_ids, "batches": flight.batches}
        await asyncio.to_thread(self.jobs.track, flight.id, flight.client, record, FLIGHT_TTL_S)

    async def _flights(self, client: str) -> list[InFlight]:
        records = await asyncio.to_thread(self.jobs.tracked, client)
        return [InFlight(client=client, **r) for r in records]

    async def _checkpoint(self, r: Txt2ImgRequest) -> str:
        """This request's checkpoint, fixed before it starts (a default changed meanwhile does not move it)."""
        wanted = r.override_settings.get("sd_model_checkpoint")
        if wanted is not None and not isinstance(wanted, str):
            raise InvalidInput("a checkpoint name is a string", field="override_settings.sd_model_checkpoint")
        field = "override_settings.sd_model_checkpoint"
        if wanted and not r.override_settings_restore_afterwards:
            return await self.set_default_checkpoint(wanted, field)
        return await self.checkpoint(wanted, field)

    async def _refiner(self, r: Txt2ImgRequest) -> float | None:
        """Where the refiner takes over, when the request names the deployed refiner (as /sd-models lists it)."""
        wanted = (r.refiner_checkpoint or "").split(" [", 1)[0].strip()
        if wanted in ("", "None"):
            return None
        refiner = self.config.refiner
        if refiner is None or wanted != refiner.name:
            raise UnknownModel(f"unknown refiner checkpoint {wanted!r}", field="refiner_checkpoint",
                               details={"choices": [refiner.name] if refiner else []})
        if not 0.0 < r.refiner_switch_at < 1.0:  # the base must run some steps and leave some to the refiner
            raise InvalidInput(f"refiner_switch_at={r.refiner_switch_at} must lie strictly between 0 and 1 with a "
                               "refiner", field="refiner_switch_at")
        return r.refiner_switch_at

    async def _hires(self, r: Txt2ImgRequest, choice: A1111Choice) -> plans.A1111Hires | None:
        """The hires fix's sizes by A1111's rule (``hr_resize_x`` / ``hr_resize_y`` when set, else ``hr_scale``),
        within this service's limits, and what its second pass runs other than the first pass (``r``'s hires
        prompts styled as its prompts are)."""
        if not r.enable_hr:
            return None
        field = "hr_resize_x" if r.hr_resize_x else "hr_resize_y" if r.hr_resize_y else "hr_scale"
        if field == "hr_scale" and r.hr_scale < 1:
            raise InvalidInput(f"hr_scale={r.hr_scale} is below 1 with neither hr_resize_x nor hr_resize_y set",
                               field="hr_scale")
        target = hires_size(r.width, r.height, r.hr_scale, r.hr_resize_x, r.hr_resize_y)
        (width, height), cover = target.size, target.cover
        if min(width, height) < 64 or max(cover) > 4096 or width * height > self.config.base.max_pixels:
            raise InvalidInput(f"hires size {width}x{height} is out of bounds: 64 to 4096 a side, at most "
                               f"{self.config.base.max_pixels} pixels", field=field)
        second = await self._second_pass(r, choice)
        if r.hr_upscaler in LATENT_UPSCALE_MODES:  # one base call: one checkpoint (unapplied() names the other)
            second.pop("checkpoint", None)
        return plans.A1111Hires(upscaler=r.hr_upscaler, width=width, height=height,
                                strength=max(r.denoising_strength, 0.01), steps=r.hr_second_pass_steps or r.steps,
                                cover=cover if target.cropped else None, box=crop_box(target, r.width, r.height),
                                second=second)

    async def _second_pass(self, r: Txt2ImgRequest, choice: A1111Choice) -> dict:
        """The GenerationRequest fields of the hires fix's second pass that differ from the first's: A1111's
        ``hr_prompt`` and ``hr_negative_prompt`` (empty: the first pass's), ``hr_sampler_name`` and ``hr_scheduler``
        (read as the first pass's are; "Use same ..." or none: the first pass's), ``hr_checkpoint_name`` (refused
        here, naming the field, when no checkpoint has the name)."""
        second: dict = {}
        if r.hr_prompt != r.prompt:  # its LoRA tags removed too, where A1111 is told not to apply them
            second["prompt"] = parse_lora_tags(r.hr_prompt)[0] if r.disable_extra_networks else r.hr_prompt
        if r.hr_negative_prompt != r.negative_prompt:
            second["negative_prompt"] = r.hr_negative_prompt
        sampler = None if r.hr_sampler_name in SAME_AS_FIRST_PASS else r.hr_sampler_name
        scheduler = None if r.hr_scheduler in SAME_AS_FIRST_PASS else r.hr_scheduler
        if sampler or scheduler:  # the first pass's as it ran (an unknown name fell back to the default)
            hires = a1111_choice(sampler or choice.sampler, scheduler or r.scheduler,
                                 "hr_sampler_name" if sampler else "sampler_name")
            if (hires.sampler, hires.schedule) != (choice.sampler, choice.schedule):
                second.update(sampler=hires.sampler, schedule=hires.schedule)
        if r.hr_checkpoint_name and r.hr_checkpoint_name not in SAME_AS_FIRST_PASS:  # dropped in _run when the same
            second["checkpoint"] = await self.checkpoint(r.hr_checkpoint_name, "hr_checkpoint_name")
        return second

    def _choice(self, r: Txt2ImgRequest) -> A1111Choice:
        """The sampler and schedule ``r`` runs, as A1111 1.10 reads them (its "Automatic" is each sampler's own
        schedule, "DPM++ 2M Karras" is "DPM++ 2M" with Karras); for an unknown sampler the default runs, as in A1111,
        with a warning naming the field the client used."""
        field = "sampler_index" if r.sampler_index and not r.sampler_name else "sampler_name"
        default = self.config.base.default_sampler
        try:
            return a1111_choice(r.sampler or default, r.scheduler, field)
        except UnknownModel:  # A1111 runs its default sampler for a name it lacks, and says nothing
            choice = a1111_choice(default, r.scheduler)
            note = f"{field}: unknown sampler {r.sampler!r} (GET /sdapi/v1/samplers lists them): {default} ran instead"
            return A1111Choice(choice.sampler, choice.schedule, choice.label, (note, *choice.warnings))

    def _generation(self, r: Txt2ImgRequest, seed: int, choice: A1111Choice, subseed: int = -1,
                    **extra) -> GenerationRequest:
        # A1111 removes the tags of extra networks (LoRAs here) it is told not to apply.
        prompt = parse_lora_tags(r.prompt)[0] if r.disable_extra_networks else r.prompt
        return GenerationRequest(prompt=prompt, negative_prompt=r.negative_prompt, width=r.width, height=r.height,
                                 steps=r.steps, guidance_scale=r.cfg_scale, seed=seed, batch_size=r.batch_size,
                                 sampler=choice.sampler, schedule=choice.schedule, prompt_syntax="a1111",
                                 subseed=subseed, subseed_strength=r.subseed_strength,
                                 seed_resize_from_w=max(r.seed_resize_from_w, 0),
                                 seed_resize_from_h=max(r.seed_resize_from_h, 0),
                                 tiling=r.tiling, eta=r.eta if choice.sampler in READS_ETA else None,
                                 churn=churn if (churn := r.churn()).churns else None,
                                 cond_padding=r.cond_padding(), **extra)

    async def _run(self, http: Request, r: Txt2ImgRequest, parent: bytes | None = None, cache_as: str | None = None,
                   inits: list[Image.Image] | None = None, notes: list[str] | None = None, **extra) -> Response:
        if r.batch_size * r.n_iter > MAX_IMAGES:
            raise InvalidInput(f"batch_size x n_iter exceeds {MAX_IMAGES} images", field="batch_size")
        echoed = getattr(r, "include_init_images", False)  # A1111 echoes an edit's uploads only when asked
        parameters = r.model_dump(exclude=None if echoed else {"init_images", "mask"})  # as the client sent it
        asked = r
        # From here on, the prompts are as A1111 runs them: with the saved styles named merged in.
        prompt, negative, styled = await asyncio.to_thread(self.styles.apply, r.prompt, r.negative_prompt, r.styles)
        texts = {"prompt": prompt, "negative_prompt": negative}
        if r.enable_hr:  # A1111 styles the hires prompts too, the first pass's standing in for empty ones
            texts["hr_prompt"], texts["hr_negative_prompt"], _ = await asyncio.to_thread(
                self.styles.apply, r.hr_prompt or r.prompt, r.hr_negative_prompt or r.negative_prompt, r.styles)
        for name, text in texts.items():  # a style may take a prompt past what the stages accept
            if len(text) > MAX_PROMPT:
                raise InvalidInput(f"{name} with its styles merged in is {len(text)} characters, more than "
                                   f"{MAX_PROMPT}", field="styles")
        r = r.model_copy(update=texts)
        # The saved options, read once: the answers' files and grid, img2img's noise multiplier, and the settings A1111
        # reads while the request runs (its override_settings over the saved ones: churn, padding).
        saved = await asyncio.to_thread(self.jobs.options)
        options = answer_options.typed(saved)
        r = r.under(options)
        # A prompt the replicas cannot read is refused here, before it joins a batch; the replica counts its
        # chunks exactly with its tokenizers, and refuses there what this count (a lower bound) lets through.
        prompts.check(parse_lora_tags(r.prompt)[0], r.steps)
        prompts.check(r.negative_prompt, r.steps, "negative_prompt")
        if r.enable_hr:  # before the first pass runs, naming its own field
            hires_steps = r.hr_second_pass_steps or r.steps
            prompts.check(parse_lora_tags(r.hr_prompt)[0], hires_steps, "hr_prompt")
            prompts.check(r.hr_negative_prompt, hires_steps, "hr_negative_prompt")
        vaes = set(replacement_vaes(self.config))
        choice = self._choice(r)
        ignored = [*asked.scripts(), *asked.unapplied(), *asked.settings_unapplied(vaes), *styled,
                   *eta_unapplied(r.eta, choice.sampler), *r.churn_unapplied(choice.sampler),
                   *controlnet.notes(asked), *(notes or [])]
        if (r.enable_hr and r.hr_upscaler in LATENT_UPSCALE_MODES and not r.disable_extra_networks
                and parse_lora_tags(r.hr_prompt)[1] != parse_lora_tags(r.prompt)[1]):
            ignored.append("hr_prompt: its <lora:...> tags are not applied by a Latent hires fix, one base call with "
                           "the first pass's LoRAs (a pixel hires fix applies them)")
        switch, hires = await self._refiner(r), await self._hires(r, choice)  # checked before anything runs
        if hires is not None and hires.second.get("sampler") not in (None, choice.sampler):  # hr_sampler_name's pass
            ignored += r.churn_unapplied(hires.second["sampler"], "the hires fix's second pass was made")
        model = await self._checkpoint(r)
        if hires is not None and hires.second.get("checkpoint") == model:
            del hires.second["checkpoint"]
        # The checkpoint resolved (the default when none is named) is part of the request the cache sees, and so
        # are an edit's uploads.
        # What runs, as this service reads the request (A1111's Automatic is a schedule of its own per sampler, a
        # style is what the styles file says now): a change of that reading misses the entries made under the old.
        ran: dict[str, object] = {"checkpoint": model, "sampler_ran": choice.sampler, "schedule_ran": choice.schedule,
                                  "prompt_ran": r.prompt, "negative_prompt_ran": r.negative_prompt,
                                  "second_pass_ran": hires.second if hires is not None else None}
        if hires is not None and "checkpoint" in hires.second:  # its weights, as the first pass's are fingerprinted
            ran["second_pass_weights"] = await asyncio.to_thread(self._short_hash, hires.second["checkpoint"])
        if r.subseed_strength > 0 and r.subseed == -1:  # a random variation seed: a new image each time
            cache_as = None
        # The file format too: a JPEG entry never answers a request made while PNG is the saved format; and
        # whether a grid comes first; and the saved settings the request ran under.
        how = answer_options.encoding(saved).model_copy(update={"parent": parent})
        ran["churn_ran"], ran["cond_padding"] = r.churn().model_dump(), r.cond_padding()
        ran["encoding"] = answer_options.file_key(how)
        if "init_image" in extra and extra.get("noise_multiplier") is None:  # A1111's saved option, as it reads it
            extra["noise_multiplier"] = options["initial_noise_multiplier"]
        if "noise_multiplier" in extra:
            ran["noise_multiplier"] = extra["noise_multiplier"]
        if "mask_blur" in extra:  # the blurs that ran: mask_blur sent or not decides them, which the dump cannot tell
            ran["mask_blurs"] = (extra["mask_blur"], extra.get("mask_blur_y"))
        # A1111 reads return_grid while the request's override_settings hold; no grid where no image is sent.
        override = r.override_settings.get("return_grid")
        return_grid = override if isinstance(override, bool) else options["return_grid"]
        grid = bool(r.save_images and r.send_images and return_grid)
        ran["grid"] = grid
        key = await self.cache.key(cache_as, {**asked.model_dump(), **ran}, model) if cache_as else None
        hit = await self.cache.get(key)
        if hit is not None:
            return images_answer(hit.files if r.send_images else [], parameters,
                                 {**json.loads(hit.facts["info"]), "cached": True})
        files, info = await self._generate(http, r, choice, model, parameters, how, switch, hires, inits, grid,
                                           **extra)
        # A1111 answers the prompt asked, and the prompts that ran (styled) in all_prompts and the infotexts.
        info.update(prompt=asked.prompt, negative_prompt=asked.negative_prompt, styles=asked.styles)
        info["warnings"] = [*info["warnings"], *ignored]
        if not info.get("interrupted") and not info.get("skipped"):  # a whole answer only
            await self.cache.put(key, {"info": json.dumps(info)}, files)
        return images_answer(files if r.send_images else [], parameters, info)

    async def _generate(self, http: Request, r: Txt2ImgRequest, choice: A1111Choice, model: str, parameters: dict,
                        encoding: Encoding, switch: float | None, hires: plans.A1111Hires | None,
                        inits: list[Image.Image] | None, grid: bool = False, **extra) -> tuple[list[bytes], dict]:
        """The files of every image the request makes, encoded as ``encoding`` says (its infotexts added), and
        A1111's ``info`` about them. With several ``inits`` (an edit's framed uploads), image i of each batch starts
        from ``inits[i % len(inits)]``. ``grid``: A1111's grid of two images or more first (``a1111_grid``)."""
        extra["checkpoint"] = model
        job = InFlight(uuid.uuid4().hex, _client(http), time.time(), r.steps * r.n_iter, batches=r.n_iter)
        # The infotexts are written before the faces run (their stage encodes the files): the deployed restorer is
        # the one that will run, and /face-restorers names it the same way.
        restorer = (await call(self.handles.faces.describe.remote()))["restorer"] if r.restore_faces else None
        settings = self._settings_text(r, choice, switch, hires, restorer, edit="init_image" in extra,
                                       noise=extra.get("noise_multiplier", 1.0),
                                       area=extra.get("inpaint_area") if extra.get("mask") is not None else None)
        digest = await asyncio.to_thread(self._short_hash, model)  # the /sd-models hash, cached on this host
        if digest:
            settings["Model hash"] = digest
        sampler = choice.sampler  # what the base runs for this request
        files: list[bytes] = []
        seeds: list[int] = []
        subseeds: list[int] = []
        strength = r.subseed_strength
        warnings: list[str] = list(choice.warnings)  # every stage's, as /generate reports them; each said once
        nsfw: list[bool] = []
        size = (r.width, r.height)
        sizes: list[tuple[int, int]] = []  # every image's
        stopped: str | None = None
        ran: dict = {}  # what the stages of the first batch ran, for a grid's content credentials
        try:
            seed, subseed = r.seed, resolve_seeds(r.subseed, 1)[0]  # A1111 fixes a variation seed every time
            async with flights.flight():
                for batch in range(r.n_iter):
                    request_id = uuid.uuid4().hex
                    job.request_ids.append(request_id)
                    await self._track(job)
                    if await self._interrupted(job):  # came between two batches, or before this one's id was shared
                        stopped = "interrupted"
                        break
                    # The seeds are fixed here, so that the infotexts naming them travel with the request and the
                    # plan's last stage encodes the files: only they come back to the ingress.
                    own, subs = variation_seeds(seed, subseed, strength, r.batch_size)
                    if batch == 0 and extra.get("control"):  # the first batch's shuffle map serves every batch, as
                        # the extension preprocesses once a request
                        extra["control"] = seeded(extra["control"], shuffle_seed(own[0], subs[0], strength))
                    texts = [infotext(r, s, model, sampler, settings, choice.label, ss)
                             for s, ss in zip(own, subs, strict=True)]
                    how = encoding.model_copy(update={"parameters": texts})
                    request = self._generation(r, own[0], choice, subs[0], **extra)
                    several = None
                    if inits and len(inits) > 1:
                        several = StageResult(images=[inits[i % len(inits)] for i in range(r.batch_size)], seeds=own)
                    result: StageResult | None
                    try:
                        result = await plans.a1111_batch(self.handles, request, request_id, refiner_switch_at=switch,
                                                         hires=hires, restore_faces=r.restore_faces, encode=how,
                                                         init=several)
                    except Exception as e:
                        if not isinstance(unwrap(e), GenerationCancelled):
                            raise
                        result = None  # stopped before it made anything
                    if result is not None:
                        files += result.encoded
                        seeds += result.seeds
                        subseeds += subs[:len(result.seeds)]
                        warnings += result.warnings
                        nsfw += result.info.get("nsfw") or []
                        if "init_image" not in extra:  # A1111 reports an edit's width x height ("Only masked"
                            size = result.sizes[0]  # answers at the init image's size)
                        sizes += result.sizes
                        sampler = result.info.get("sampler", sampler)  # as the base reports it
                        ran = ran or result.info
                    # As A1111 numbers them: with a variation strength the seed stays and the variation seeds count on.
                    seed, subseed = (own[0] if strength > 0 else own[-1] + 1), subs[-1] + 1
                    if result is None or result.stopped:
                        # /interrupt or /skip (a deadline or a disconnect cancels the flight instead): as in A1111,
                        # the batch stopped answers with its images as they stood; after a skip the next one runs.
                        if await self._interrupted(job):
                            stopped = "interrupted"
                            break
                        stopped = stopped or "skipped"
        finally:
            await asyncio.to_thread(self.jobs.untrack, job.client, job.id)
            await asyncio.to_thread(self.jobs.untrack, _interrupts(job.client), f"{job.id}:interrupt")
        texts = [infotext(r, s, model, sampler, settings, choice.label, ss)
                 for s, ss in zip(seeds, subseeds, strict=True)]
        first = 0
        if grid and len(files) >= 2:  # A1111's grid_only_if_multiple: no grid of one image
            width, height = a1111_grid.grid_size(sizes)
            if width * height > a1111_grid.MAX_GRID_PIXELS:
                warnings.append(f"save_images: no grid was made: {width}x{height} is more than "
                                f"{a1111_grid.MAX_GRID_PIXELS // 2**20} MP")
            else:
                how = encoding.model_copy(update={"parameters": texts[:1]})
                files.insert(0, await asyncio.to_thread(a1111_grid.grid_file, files, how, ran))
                texts.insert(0, texts[0])  # A1111 writes the grid's infotext as the first image's
                first = 1
        info = {"prompt": r.prompt, "all_prompts": [r.prompt] * len(seeds), "negative_prompt": r.negative_prompt,
                "all_negative_prompts": [r.negative_prompt] * len(seeds), "seed": seeds[0] if seeds else r.seed,
                "all_seeds": seeds,
                "subseed": subseeds[0] if subseeds else subseed, "all_subseeds": subseeds,
                "subseed_strength": strength, "seed_resize_from_w": r.seed_resize_from_w,
                "seed_resize_from_h": r.seed_resize_from_h, "width": size[0], "height": size[1],
                "sampler_name": sampler, "cfg_scale": r.cfg_scale,
                "steps": r.steps, "batch_size": r.batch_size, "restore_faces": r.restore_faces,
                "sd_model_name": model, "sd_model_hash": digest, "infotexts": texts, "styles": [],
                # A1111's other keys, as this service ran the request.
                "index_of_first_image": first, "denoising_strength": r.denoising_strength, "clip_skip": 1,
                "face_restoration_model": restorer, "extra_generation_params": settings,
                "is_using_inpainting_conditioning": bool(ran.get("inpainting_conditioning")),
                "job_timestamp": time.strftime("%Y%m%d%H%M%S"), "version": "imagegen-0.1",
                "warnings": list(dict.fromkeys(warnings)), "nsfw": nsfw if self.handles.safety else None,
                "cached": False}
        if stopped:
            info[stopped] = True
        return files, info

    def _short_hash(self, model: str) -> str | None:
        """A checkpoint's A1111 short hash (its SHA-256's first ten digits), where its weights are on this host."""
        sha = self.catalog.sha256(self.catalog.entry(model).checkpoint.source)
        return sha[:10] if sha else None

    def _settings_text(self, r: Txt2ImgRequest, choice: A1111Choice, switch: float | None,
                       hires: plans.A1111Hires | None, restorer: str | None, *, edit: bool,
                       noise: float = 1.0, area: InpaintArea | None = None) -> dict:
        """What the infotext adds to the base settings, for the stages ``plans.a1111_batch`` will run: the refiner
        on a text-to-image request when one is deployed, else the hires fix; faces, by the ``restorer`` deployed
        (none: no restoration runs, and the infotext claims none); an edit's ``noise`` multiplier where it is not 1,
        as A1111 names it; an inpainting's mask settings (``area``: the area it inpaints, see ``mask_text``)."""
        settings: dict = {}
        if r.eta and choice.sampler in READS_ETA:  # A1111 names a DDIM eta other than its default 0
            settings["Eta DDIM"] = r.eta
        churn = r.churn()
        if churn.churns and choice.sampler == "Euler":  # the keys A1111 writes for its options, where they ran
            named = {"s_churn": "Sigma churn", "s_tmin": "Sigma tmin", "s_tmax": "Sigma tmax", "s_noise": "Sigma noise"}
            settings.update({text: getattr(churn, key) for key, text in named.items()
                             if getattr(churn, key) != CHURN_SETTINGS[key][0]})
        if edit:  # A1111's img2img writes its strength, and an inpainting its mask's settings
            settings["Denoising strength"] = r.denoising_strength
            if isinstance(r, Img2ImgRequest) and r.mask:
                settings.update(mask_text(r, area))
            if noise != 1.0:
                settings["Noise multiplier"] = noise
        refined = switch is not None and self.handles.refiner is not None and not edit
        if refined:
            settings.update({"Refiner": r.refiner_checkpoint, "Refiner switch at": r.refiner_switch_at})
        if hires is not None and not edit and not refined:
            settings["Denoising strength"] = r.denoising_strength
            if r.hr_resize_x or r.hr_resize_y:  # A1111 names the one that decided the size
                settings["Hires resize"] = f"{r.hr_resize_x}x{r.hr_resize_y}"
            else:
                settings["Hires upscale"] = r.hr_scale
            settings["Hires upscaler"] = r.hr_upscaler
            second = hires.second  # what the second pass ran other than the first, as A1111 names it
            settings.update({"Hires checkpoint": second.get("checkpoint"), "Hires sampler": second.get("sampler"),
                             "Hires prompt": second.get("prompt"),
                             "Hires negative prompt": second.get("negative_prompt")})
            if "schedule" in second:
                settings["Hires schedule type"] = second["schedule"] or "Automatic"
        if r.restore_faces and restorer:
            settings["Face restoration"] = restorer
        settings.update(controlnet.infotext(r))  # the extension writes its units after A1111's own settings
        return settings

    @router.post("/txt2img", response_model=ImagesResponse)
    async def txt2img(self, body: Txt2ImgRequest, http: Request) -> Response:
        """Text to image, with hires fix (enable_hr), refiner, LoRA tags and face restoration."""
        if body.enable_hr and body.hr_upscaler not in LATENT_UPSCALE_MODES:  # refused before the base runs
            await self.handles.check_upscalers({"hr_upscaler": body.hr_upscaler})
        units = await asyncio.to_thread(controlnet.control_units, body, self.config.base.controlnets, edit=False,
                                        modules=offered(self.config.base.preprocessors))
        return await self._run(http, body, cache_as="a1111-txt2img", control=units)

    @router.post("/img2img", response_model=ImagesResponse, responses=documented(400))
    async def img2img(self, body: Img2ImgRequest, http: Request) -> Response:
        """Image to image, the init images framed by resize_mode (one starts every image of the batch; several, one
        image each, the batch as large as their number, as in A1111); with a mask, inpainting (white repaints; black
        with inpainting_mask_invert): of the mask's region alone, answered at the upload's size (inpaint_full_res,
        A1111's default), or of the whole picture."""
        if len(body.init_images) > body.batch_size:  # A1111 refuses them too
            raise InvalidInput(f"{len(body.init_images)} init_images for a batch of {body.batch_size}: at most one "
                               "per image of the batch", field="init_images")
        if 1 < len(body.init_images) < body.batch_size:  # A1111 makes one image of each
            body = body.model_copy(update={"batch_size": len(body.init_images)})
        uploads = [image_bytes(data, "init_images") for data in body.init_images]
        base = self.handles.base

        def blurred_box(mask: Image.Image, across: int, down: int) -> tuple[int, int, int, int] | None:
            return base.blurred_box.remote(mask, across, down).result()  # OpenCV's blur, on a base replica

        edit = await asyncio.to_thread(edit_inputs, body, uploads, blurred_box)
        only_masked = edit.only_masked
        notes = []
        if body.mask and body.inpaint_full_res and not only_masked:  # A1111's comment, in our warnings
            notes.append("inpaint_full_res: the mask is blank once blurred: the whole image ran as image-to-image, as "
                         "A1111 falls back")
        units = await asyncio.to_thread(controlnet.control_units, body, self.config.base.controlnets, edit=True,
                                        modules=offered(self.config.base.preprocessors))
        # A unit without an image reads the first init image as uploaded, framed by img2img's resize mode, as the
        # extension reads p.init_images[0] and p.resize_mode.
        units = controlnet.from_upload(units, edit.upload, FITS[body.resize_mode])
        across, down = body.mask_blurs()
        return await self._run(http, body, uploads[0], cache_as="a1111-img2img", inits=edit.inits, notes=notes,
                               init_image=edit.inits[0], mask=edit.mask, mask_blur=across, mask_blur_y=down,
                               mask_fit=FITS[body.resize_mode],
                               masked_content=MASKED_CONTENT[body.inpainting_fill],
                               inpaint_area="masked" if only_masked else "whole",
                               inpaint_padding=body.inpaint_full_res_padding, strength=body.denoising_strength,
                               noise_multiplier=body.initial_noise_multiplier, control=units)

    @router.get("/progress", response_model=Progress)
    async def progress(self, http: Request, skip_current_image: bool = False) -> dict:
        """Progress of the calling client's current generation or, failing that, its running job (0 when idle);
        ``current_image`` is a live latent preview unless ``skip_current_image`` or the NSFW filter is on."""
        mine = await self._flights(_client(http))
        step, total, fraction, elapsed, running, job_name = 0, 0, 0.0, 0.0, None, ""
        if mine and mine[-1].request_ids:
            flight = mine[-1]
            running = flight.request_ids[-1]
            step, total = flight.steps(await self._board("progress", running))
            fraction = min(1.0, step / total) if total else 0.0
            elapsed = time.time() - flight.started
        else:
            # The caller's own job, as the rest of its state is: its token's, or one made without a token.
            owner = token_owner(http.headers.get("authorization")) or ANONYMOUS
            jobs, _ = await asyncio.to_thread(self.jobs.list_jobs, "processing", owner, 0, 1)
            if jobs:
                running, job_name = jobs[0].run_id, jobs[0].id
                reported = await self._board("progress", running)
                step, total = reported or (0, 0)
                fraction = min(1.0, jobs[0].progress / 100)
                elapsed = time.time() - (jobs[0].started_at or time.time())
        eta = elapsed / fraction - elapsed if fraction else 0.0
        image = None
        if running and not skip_current_image and self.handles.safety is None:  # unscreened: none with the filter
            preview = await self._board("preview", running)
            image = b64_png(preview) if preview is not None else None
        state = {"skipped": False, "interrupted": False, "job": job_name, "job_count": len(mine) + bool(job_name),
                 "job_timestamp": "", "job_no": 0, "sampling_step": step, "sampling_steps": total}
        return {"progress": round(fraction, 4), "eta_relative": round(eta, 2), "state": state,
                "current_image": image, "textinfo": None}

    async def _board(self, method: str, request_id: str):
        """Progress, preview or cancel of a request, through the board its replica reports to."""
        if self.handles.board is None:
            return None
        return await call(getattr(self.handles.board, method).remote(request_id))

    async def _interrupted(self, job: InFlight) -> bool:
        """Whether /interrupt (on any ingress replica) stopped ``job``: its mark, kept apart from the flight's
        record, which only the ingress running it writes."""
        marks = await asyncio.to_thread(self.jobs.tracked, _interrupts(job.client))
        return any(mark.get("id") == job.id for mark in marks)

    @router.post("/interrupt", response_model=Empty)
    async def interrupt(self, http: Request) -> dict:
        """Stop the calling client's generation after its current denoising step; as in A1111, it answers with
        the images of its finished batches and those of the batch stopped as they stood, and runs no further
        batch."""
        client = _client(http)
        for job in await self._flights(client):
            # Marked before the cancel: the ingress running it reads the mark when its batch stops.
            await asyncio.to_thread(self.jobs.track, f"{job.id}:interrupt", _interrupts(client),
                                    {"id": job.id, "started": 0}, FLIGHT_TTL_S)
            for request_id in job.request_ids:
                await self._board("stop", request_id)
        return {}

    @router.post("/skip", response_model=Empty)
    async def skip(self, http: Request) -> dict:
        """Stop the calling client's current batch after its current step (its images as they stood are kept);
        its next batch (of ``n_iter``) runs."""
        for job in await self._flights(_client(http)):
            if job.request_ids:
                await self._board("stop", job.request_ids[-1])
        return {}
