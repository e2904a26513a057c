"""Every generation plan: each reads like its flow diagram and only calls deployment handles.

standard:     base (-> refiner as expert ensemble, on latents) (-> faces)
hires fix:    base at 768 -> upscaler x2 (Real-ESRGAN, Lanczos if unavailable) -> refiner img2img at 1536,
              strength 0.35 (-> faces)
A1111 batch:  base (-> refiner on latents from refiner_switch_at) | base -> upscaler -> base img2img
batch sizes:  one base per aspect class, all in flight at once -> focal crops per size (-> neural upscale of
              the base region)
seed 001:     the user's photo through IP-Adapter, seed 001's defaults
seed 003:     one base call (txt2img, img2img, inpaint, style transfer through IP-Adapter)

With the NSFW filter on, every plan ends in the safety checker (after faces; it draws the request's overlay, if
any, before it screens, so what it screens is what is delivered): it replaces flagged images, reports ``nsfw`` per
image and, as the last stage, encodes (and so marks: watermark and content credentials, ``StageResult.encode``). It
is awaited with ``settled`` like every chained stage.

Every base call goes to a replica that holds the request's checkpoint (``base_for``: Serve model multiplexing); the
ingress has resolved the checkpoint's name (and the default) before a plan starts, so a plan never waits on a
name that does not exist and a default changed meanwhile never moves a request in flight.

Each API family maps its request into one plan input here (``seed000``, ``seed003``), so the sync and async
paths share the mapping. This module is longer than most: it keeps every plan in one place.

Each stage is handed the previous stage's ``DeploymentResponse``: Serve resolves it in the next replica, so
latents and images travel replica to replica through the object store, never through the ingress. The ingress
awaits the chain once, at the end. Every degradation (no refiner, Lanczos instead of Real-ESRGAN, no face
restorer, a failed post-process) is recorded in the report, never silent.
"""

from __future__ import annotations

import logging
import math
from dataclasses import asdict, dataclass, field
from typing import Any

from PIL import Image
from ray.serve.handle import DeploymentHandle

from deployments.support import control, model_free
from deployments.support.cropping import CropSize
from deployments.support.errors import UnknownModel
from deployments.support.generation import (
    LATENT_UPSCALE_MODES,
    Encoding,
    GenerationRequest,
    LatentHires,
    RefineRequest,
    StageResult,
    encoded,
    resolve_seeds,
)
from deployments.support.samplers import evaluations
from deployments.support.settings import Settings
from graphs.api.control_fields import control_units
from graphs.api.errors import call, unwrap
from graphs.api.fields import image_field
from graphs.flights import Recorded, settled
from graphs.jobs.sizes import SizeTable

logger = logging.getLogger(__name__)

HIRES_BASE = 768
HIRES_STRENGTH = 0.35
ENSEMBLE_SPLIT = 0.8


@dataclass
class Handles:
    base: DeploymentHandle
    refiner: DeploymentHandle | None
    upscaler: DeploymentHandle
    faces: DeploymentHandle
    board: DeploymentHandle | None = None  # the progress board (graphs/board.py)
    safety: DeploymentHandle | None = None  # the safety checker, only while the NSFW filter is on

    def __post_init__(self) -> None:
        """Stage handles record their calls in the current flight; the board's are not stage calls."""
        self.base, self.upscaler, self.faces = (Recorded(h) for h in (self.base, self.upscaler, self.faces))
        if self.refiner is not None:
            self.refiner = Recorded(self.refiner)
        if self.safety is not None:
            self.safety = Recorded(self.safety)

    async def check_upscalers(self, named: dict[str, str]) -> None:
        """Refuse the first unknown upscaler by the request field that named it (``named``: field -> name), before
        any work starts. The replica answers a refusal as a value; it is raised here, at the edge."""
        refusal = await call(self.upscaler.check.remote(named))
        if refusal is not None:
            raise UnknownModel(refusal["message"], field=refusal["field"], details=refusal["details"])

    def last(self, encode: Encoding | None) -> Encoding | None:
        """What the last model stage of a plan encodes: nothing when the safety checker comes after it."""
        return None if self.safety is not None else encode

    def screen(self, last, encode: Encoding | None = None):
        """The safety checker after the plan's last stage (it encodes, when asked), or that stage itself."""
        if self.safety is None:
            return last
        return self.safety.check.remote(last, encode)


def safety_stage(checker: DeploymentHandle | None, enabled: bool | None, settings: Settings):
    """The checker's handle when the filter is on (``enabled``, else ENABLE_NSFW_FILTER), else None. A filter that is
    on without a checker deployed refuses to start: it would otherwise return every image unchecked."""
    on = settings.enable_nsfw_filter if enabled is None else enabled
    if on and checker is None:
        raise ValueError("the NSFW filter is on (ENABLE_NSFW_FILTER or safety_checker.enabled) but no "
                         "safety_checker model is configured")
    return checker if on else None


@dataclass
class PlanOptions:
    use_refiner: bool = True
    hires_fix: bool = False
    neural_upscaler: str | None = "R-ESRGAN 2x+"  # None: Lanczos
    restore_faces: bool = False
    face_weight: float = 0.6
    request_id: str | None = None  # lets a job's progress be read and its generation cancelled
    encode: Encoding = field(default_factory=Encoding)  # the last stage answers with files, not pixels

    def last(self, h: Handles) -> Encoding | None:
        """What the chain's last generation stage encodes: nothing when faces or the safety checker follow."""
        return None if self.restore_faces else h.last(self.encode)


@dataclass
class Report:
    data: bytes  # the image, encoded by the stage that made it
    size: tuple[int, int]
    seed: int
    refiner_applied: bool = False
    hires_fix_applied: bool = False
    upscaler: str | None = None
    face_restoration_applied: bool = False
    faces_found: int = 0
    warnings: list[str] = field(default_factory=list)
    nsfw: bool | None = None  # None: the safety checker is off
    checkpoint: str | None = None  # the base checkpoint that made it
    degraded: bool = False  # a stage that failed was left out (faces): never cached, the next try may do better

    def facts(self) -> dict:
        """Everything but the file: what a cached answer keeps beside it."""
        return {k: v for k, v in asdict(self).items() if k != "data"}

    @classmethod
    def from_facts(cls, data: bytes, facts: dict) -> Report:
        """A cached answer again (facts this version no longer has are left out)."""
        known = set(cls.__dataclass_fields__)
        return cls(data=data, **{k: v for k, v in facts.items() if k in known and k != "data"})


def base_for(h: Handles, request: GenerationRequest) -> Any:
    """The base handle, routed to a replica that holds the request's checkpoint (or, when none does, to the one
    holding the fewest, which loads it)."""
    return h.base.options(multiplexed_model_id=request.checkpoint) if request.checkpoint else h.base


def _refine(request: GenerationRequest, **mode) -> RefineRequest:
    """The refiner's pass over the base's output, with the request's sampler and schedule (an ensemble must run
    the base's; the refiner takes the base's default where the request names none)."""
    return RefineRequest(prompt=request.prompt, negative_prompt=request.negative_prompt, steps=request.steps,
                         guidance_scale=request.guidance_scale, sampler=request.sampler, schedule=request.schedule,
                         prompt_syntax=request.prompt_syntax, churn=request.churn,
                         cond_padding=request.cond_padding, **mode)


async def standard(h: Handles, request: GenerationRequest, opts: PlanOptions) -> Report:
    seed = resolve_seeds(request.seed, 1)[0]  # fixed here so that every stage can be launched at once
    request = request.model_copy(update={"seed": seed, "batch_size": 1})
    warnings: list[str] = []
    encode = opts.last(h)  # faces or the safety checker encode when they come last
    if opts.use_refiner and h.refiner is not None:
        base = base_for(h, request).generate.remote(request.model_copy(update={"denoising_end": ENSEMBLE_SPLIT}),
                                                 opts.request_id)
        last = h.refiner.refine_latents.remote(_refine(request, denoising_start=ENSEMBLE_SPLIT), base,
                                               opts.request_id, encode)
    else:
        if opts.use_refiner:
            warnings.append("refiner not deployed: base output returned")
        last = base_for(h, request).generate.remote(request, opts.request_id, encode)
    return await _finish(h, last, seed, opts, warnings)


async def hires_fix(h: Handles, request: GenerationRequest, opts: PlanOptions) -> Report:
    seed = resolve_seeds(request.seed, 1)[0]
    first = request.model_copy(update={"width": HIRES_BASE, "height": HIRES_BASE, "batch_size": 1, "seed": seed})
    encode = opts.last(h)
    base = base_for(h, first).generate.remote(first, opts.request_id)
    last = h.upscaler.upscale.remote(base, opts.neural_upscaler or "Lanczos", 2.0,
                                     encode=encode if h.refiner is None else None)
    warnings = []
    if h.refiner is not None:
        last = h.refiner.refine_images.remote(_refine(request, strength=HIRES_STRENGTH), last, opts.request_id,
                                              encode)
    else:
        warnings.append("refiner not deployed: upscaled image not refined")
    report = await _finish(h, last, seed, opts, warnings)
    report.hires_fix_applied = True
    return report


async def _finish(h: Handles, last, seed: int, opts: PlanOptions, warnings: list[str]) -> Report:
    """Optional face restoration on the chain's last stage, the safety checker when it is on, then the one await
    of the plan: only the final result comes back, carrying every stage's warnings and facts. A face-restoration
    failure returns the image unprocessed (seed 000), screened all the same."""
    if opts.restore_faces:
        restored = h.faces.restore.remote(last, opts.face_weight, encode=h.last(opts.encode))
        try:
            return _report(await settled(h.screen(restored, opts.encode)), seed, warnings)
        except Exception as e:  # noqa: BLE001 - seed 000: a post-processing failure returns the image unprocessed
            if h.safety is not None:
                if not await _failed(restored):
                    raise  # the faces were restored; the checker after them failed
                result = await settled(h.screen(last, opts.encode))  # an upstream failure re-raises here
            else:
                result = await encoded(await settled(last), opts.encode)
            code = getattr(unwrap(e), "code", type(unwrap(e)).__name__)
            logger.warning("face restoration failed (%s); unprocessed image returned", code)
            report = _report(result, seed, [*warnings, f"face restoration failed ({code}): unprocessed image"])
            report.degraded = True
            return report
    return _report(await settled(h.screen(last, opts.encode)), seed, warnings)


async def _failed(response) -> bool:
    try:
        await call(response)
    except Exception:  # noqa: BLE001 - only whether it failed matters
        return True
    return False


def _report(result: StageResult, seed: int, warnings: list[str]) -> Report:
    info = result.info
    return Report(data=result.encoded[0], size=result.sizes[0], seed=seed, refiner_applied="refiner" in info,
                  upscaler=info.get("upscaler"),
                  face_restoration_applied=info.get("face_restoration_applied", False),
                  faces_found=info.get("faces_found", 0), warnings=[*result.warnings, *warnings],
                  nsfw=info["nsfw"][0] if "nsfw" in info else None, checkpoint=info.get("model"))


# --- seed 000: /generate and /generate/async ---------------------------------------------------------------------

SEED000_FIELDS = ("prompt", "negative_prompt", "seed", "width", "height", "num_inference_steps", "guidance_scale",
                  "use_refiner", "hires_fix", "use_realesrgan", "use_face_restoration", "face_restoration_weight",
                  "overlay", "model")


def seed000_fields(fields: dict, hires_upscaler: str) -> dict:
    """What decides seed 000's image (the result cache's request): the fields ``seed000`` reads, sync or queued
    (ControlNet units only where there are any: a request without keeps the key it always had)."""
    units = {"controlnets": fields["controlnets"]} if fields.get("controlnets") else {}
    return {**{name: fields.get(name) for name in SEED000_FIELDS}, **units, "hires_upscaler": hires_upscaler}


async def seed000(h: Handles, fields: dict, hires_upscaler: str, request_id: str | None,
                  units: list[control.ControlUnit] | None = None) -> Report:
    """Seed 000's fields (the sync body, or the queued one) -> the standard or hires-fix plan; ``units``: its
    ``controlnets``, decoded (they guide the base's pass, the hires fix's first)."""
    request = GenerationRequest(prompt=fields["prompt"], negative_prompt=fields.get("negative_prompt", ""),
                                seed=fields.get("seed", -1), width=fields.get("width", 1024),
                                height=fields.get("height", 1024), steps=fields.get("num_inference_steps", 30),
                                guidance_scale=fields.get("guidance_scale", 7.0), checkpoint=fields.get("model"),
                                control=units or [])
    opts = PlanOptions(use_refiner=fields.get("use_refiner", True), hires_fix=fields.get("hires_fix", False),
                       neural_upscaler=hires_upscaler if fields.get("use_realesrgan", True) else None,
                       restore_faces=fields.get("use_face_restoration", False),
                       face_weight=fields.get("face_restoration_weight", 0.6), request_id=request_id,
                       encode=Encoding(overlay=fields.get("overlay")))
    return await (hires_fix if opts.hires_fix else standard)(h, request, opts)


# --- seed 001: illustrations from a user's photo ------------------------------------------------------------------

async def seed001(h: Handles, fields: dict, prompt: str, photo: Image.Image, settings: Settings,
                  request_id: str, checkpoint: str | None = None) -> StageResult:
    """The user's photo drives IP-Adapter; unset fields take seed 001's environment defaults."""
    def given(name: str, default):
        return fields[name] if fields.get(name) is not None else default

    request = GenerationRequest(
        prompt=prompt, negative_prompt=given("negative_prompt", settings.default_negative_prompt),
        steps=fields.get("num_inference_steps") or settings.default_num_inference_steps,
        ip_adapter_image=photo, ip_adapter_scale=given("ip_adapter_scale", settings.default_ip_adapter_scale),
        width=settings.illustration_size, height=settings.illustration_size, checkpoint=checkpoint)
    base = base_for(h, request).generate.remote(request, request_id, h.last(Encoding()))
    return await settled(h.screen(base, Encoding()))


# --- seed 003: the camelCase jobs --------------------------------------------------------------------------------

STYLE_AREA = 1024 * 1024  # SDXL's native area


def content_size(width: int, height: int) -> tuple[int, int]:
    """A style transfer's size: the content image's aspect, shrunk to SDXL's native area when larger (a 12 MP
    photo is far beyond the base's pixel limit) and grown to 64 on its short side when smaller, each side a
    multiple of 8 within the request's 64 to 4096."""
    scale = min(1.0, math.sqrt(STYLE_AREA / (width * height)))
    scale = max(scale, 64 / min(width, height))
    w, h = (min(4096, max(64, round(side * scale / 8) * 8)) for side in (width, height))
    return w, h


def seed003(kind: str, r: dict) -> GenerationRequest:
    """Seed 003 camelCase fields -> one SDXLBase request (style transfer: the style image through IP-Adapter), with
    its ControlNet units (the names were checked when the job was accepted; the base checks them again)."""
    units = control_units(r.get("controlnets") or [], None, edit=kind != "text2img")
    common = dict(prompt=r.get("prompt", ""), negative_prompt=r.get("negativePrompt", ""),
                  width=r.get("width", 512), height=r.get("height", 512), steps=r.get("steps", 30),
                  guidance_scale=r.get("guidanceScale", 7.5), seed=r.get("seed", -1),
                  sampler=r.get("sampler", "euler_a"), checkpoint=r.get("model"), control=units)
    if kind == "img2img":
        return GenerationRequest(**common, init_image=image_field(r["initImage"], "initImage"),
                                 strength=r.get("strength", 0.75))
    if kind == "inpaint":
        return GenerationRequest(**common, init_image=image_field(r["image"], "image"),
                                 mask=image_field(r["mask"], "mask"), strength=r.get("inpaintingStrength", 0.9))
    if kind == "style-transfer":
        content = image_field(r["contentImage"], "contentImage")
        width, height = content_size(content.width, content.height)
        common.update(width=width, height=height)
        style = image_field(r["styleImage"], "styleImage")
        return GenerationRequest(**common, init_image=content, ip_adapter_image=style,
                                 ip_adapter_scale=r.get("styleStrength", 0.7),
                                 strength=min(1.0, max(0.05, 1.0 - r.get("contentStrength", 0.3))))
    return GenerationRequest(**common)


async def seed003_job(h: Handles, request: GenerationRequest, job_id: str, parent: bytes | None = None) -> StageResult:
    """One base call on the request's checkpoint (screened when the filter is on), its images as PNG files;
    ``parent``: the upload an edit started from (the parent ingredient of the files' content credentials)."""
    how = Encoding(parent=parent)
    base = base_for(h, request).generate.remote(request, job_id, h.last(how))
    return await settled(h.screen(base, how))


# --- Automatic1111: one batch of txt2img / img2img ---------------------------------------------------------------

@dataclass
class A1111Hires:
    """A1111's hires fix of a text-to-image batch: its images at ``width`` x ``height``. When the first pass must be
    cropped to get there (A1111's ``hr_resize_x`` and ``hr_resize_y`` both set), the latent path resizes the latents
    to ``cover`` and keeps their centre, and the pixel path upscales only ``box``, the same centre of each image."""

    upscaler: str
    width: int
    height: int
    strength: float
    steps: int
    cover: tuple[int, int] | None = None
    box: tuple[int, int, int, int] | None = None
    # What the second pass runs other than the first (A1111's hr_prompt, hr_negative_prompt, hr_sampler_name,
    # hr_scheduler, hr_checkpoint_name): GenerationRequest fields.
    second: dict = field(default_factory=dict)


async def a1111_batch(h: Handles, request: GenerationRequest, request_id: str, *,
                      refiner_switch_at: float | None = None, hires: A1111Hires | None = None,
                      restore_faces: bool = False, encode: Encoding | None = None,
                      init: StageResult | None = None) -> StageResult:
    """The base, then either the refiner on its latents from ``refiner_switch_at`` or A1111's hires fix: with a
    latent upscaler, one base call that resizes its latents and denoises them again; with a pixel upscaler, the
    upscaler on every image of the batch, then a second base pass over them as img2img. Image-to-image requests
    take neither; ``init``: an edit over several images, one img2img pass over each of its images with its seed.
    The second pass runs ``hires.second``'s prompts, sampler and checkpoint where the client named others (the
    latent pass, one base call, stays on the first pass's checkpoint: its latents never leave the replica). Then
    the faces (of an inpainting as inpainted, pasted over its init image after them, as A1111 restores them), then
    the safety checker when the filter is on. The last stage encodes with ``encode`` (the
    infotexts, the upload an edit started from) and so marks the files."""
    how = None if restore_faces else h.last(encode)
    if restore_faces and request.mask is not None:  # A1111 restores the inpainted image's faces, then pastes it
        request = request.model_copy(update={"defer_paste": True})
    last: Any
    if refiner_switch_at is not None and h.refiner is not None and request.init_image is None:
        handoff = base_for(h, request).generate.remote(request.model_copy(update={"denoising_end": refiner_switch_at}),
                                                    request_id)
        last = h.refiner.refine_latents.remote(_refine(request, denoising_start=refiner_switch_at), handoff,
                                               request_id, how)
    elif hires is not None and request.init_image is None and hires.upscaler in LATENT_UPSCALE_MODES:
        width, height = hires.cover or (hires.width, hires.height)
        crop = {"crop_width": hires.width, "crop_height": hires.height} if hires.cover else {}
        own = {k: v for k, v in hires.second.items() if k in ("prompt", "negative_prompt", "sampler", "schedule")}
        latent = LatentHires(width=width, height=height, mode=hires.upscaler, strength=hires.strength,
                             steps=hires.steps, **crop, **own)
        both = request.model_copy(update={"hires": latent})
        last = base_for(h, both).generate.remote(both, request_id, how)
    elif hires is None or request.init_image is not None:
        last = base_for(h, request).generate.remote(request, request_id, how, init=init)
    else:
        # Each pass with its own ControlNet units (the extension's hr_option). The recolor units' maps go back into
        # the second pass's images alone, every such unit's (its hr_option aside), as the extension puts them into
        # A1111's finished images, never into the first pass's.
        lower = request.model_copy(update={"control": control.first_pass(request.control, hires=True),
                                           "recolor": []})
        first = base_for(h, request).generate.remote(lower, request_id)
        # A1111's hires fix resizes with Lanczos when its upscaler is "None" (images.resize_image); to the upscaler,
        # as to A1111's extras, "None" means no upscale at all.
        upscaler = "Lanczos" if hires.upscaler == "None" else hires.upscaler
        upscaled = h.upscaler.upscale.remote(first, upscaler, None, hires.width, hires.height, box=hires.box)
        # As on the latent path, the second pass runs exactly its steps whatever the strength (A1111's rule).
        # Its prompt schedule counts on from the first pass's model evaluations, as A1111's second pass does; its
        # noise takes each image's variation seed and seed resize, as the first pass's did (``passes_over``).
        counted = request.steps * evaluations(request.sampler) if request.sampler else None
        # Its units marked as in the second pass; a pixel-perfect one keeps the first pass's resolution.
        units = control.second_pass(request.control, (request.width, request.height))
        again = request.model_copy(update={"strength": hires.strength, "steps": hires.steps, "exact_steps": True,
                                           "schedule_from": counted, "control": units, **hires.second,
                                           "recolor": [u for u in request.control if u.module in model_free.RECOLOR]})
        last = base_for(h, again).generate.remote(again, request_id, how, init=upscaled)
    if restore_faces:
        last = h.faces.restore.remote(last, 0.6, encode=h.last(encode))
    return await settled(h.screen(last, encode))


# --- seed 002: one subject, every size ---------------------------------------------------------------------------

@dataclass
class SizedImage:
    name: str
    aspect: str
    image: Image.Image
    box: tuple[int, int, int, int]
    upscaled: bool
    nsfw: bool | None = None  # its base image was flagged (and replaced) by the safety checker


async def batch_sizes(h: Handles, cropper: DeploymentHandle, r: dict, table: SizeTable, upscaler: str,
                      request_id: str) -> tuple[int, int, list[SizedImage]]:
    """Group the sizes by aspect class, render one base per class in parallel with one seed, cut every size
    around the faces; a crop smaller than its target is upscaled by the neural upscaler. Returns the seed, the
    number of bases and the images."""
    sizes = table.resolve(r["sizes"])
    seed = resolve_seeds(r.get("seed", -1), 1)[0]
    groups: dict[str, list[CropSize]] = {}
    for size in sizes:
        groups.setdefault(table.aspect(size.width, size.height), []).append(size)
    base_sizes = r.get("baseSizes") or {}
    bases = {}
    for i, aspect in enumerate(groups):
        width, height = base_sizes.get(aspect) or table.bases[aspect]
        request = GenerationRequest(prompt=r["prompt"], negative_prompt=r.get("negativePrompt", ""), width=width,
                                    height=height, steps=r.get("steps", 30), seed=seed,
                                    guidance_scale=r.get("guidanceScale", 7.0), checkpoint=r.get("model"))
        # One SDXLBase call per aspect class, all in flight at once: replicas render them in parallel.
        bases[aspect] = h.screen(base_for(h, request).generate.remote(
            request, request_id if i == 0 else f"{request_id}/{aspect}"))
    crops = {a: cropper.crop.remote(bases[a], groups[a]) for a in groups}  # type: ignore[attr-defined]
    out: list[SizedImage] = []
    upscales = {}
    for aspect, pending in crops.items():
        _focus, cut = await settled(pending)
        for crop in cut:  # each carries the screened base's verdict (None with the filter off)
            if crop.upscaled:  # smaller than its target: a neural upscale of the base region, not a plain resize
                upscales[len(out)] = h.upscaler.upscale.remote(bases[aspect], upscaler, None, crop.image.width,
                                                               crop.image.height, box=crop.box)
            out.append(SizedImage(crop.name, aspect, crop.image, crop.box, crop.upscaled, crop.nsfw))
    for i, pending in upscales.items():  # all in flight at once; each base goes to the upscaler, not here
        out[i].image = (await settled(pending)).image
    return seed, len(groups), out
