"""Request and result types shared by the SDXL deployments, and the checks every request passes first."""

from __future__ import annotations

import asyncio
import functools
import random
import re
import threading
import time
from collections.abc import Awaitable, Callable, Iterable
from concurrent.futures import Future
from dataclasses import dataclass, field, replace
from typing import Any, Literal

import numpy as np
from PIL import Image
from pydantic import BaseModel, ConfigDict, Field, model_validator

from deployments.support import overlay, provenance
from deployments.support.control import MAX_UNITS, ControlUnit
from deployments.support.credentials import Facts
from deployments.support.errors import GenerationCancelled, InvalidInput
from deployments.support.imaging import Fit, comment_fits
from deployments.support.imaging import encode as encode_image
from deployments.support.masking import InpaintArea, Paste
from deployments.support.model_free import Recolor
from deployments.support.overlay import Overlay
from deployments.support.prompts import Padding
from deployments.support.samplers import MIN_STRENGTH
from deployments.support.settings import current

MAX_SEED = 2**32 - 1
# A1111's slider for its img2img noise multiplier runs 0 to 1.5; its API takes any number. Beyond 2 the image
# drowns in noise the schedule never removes: refused.
MAX_NOISE_MULTIPLIER = 2.0
PromptSyntax = Literal["plain", "a1111"]
MaskedContent = Literal["fill", "original", "latent noise", "latent nothing"]
MASKED_CONTENT: tuple[MaskedContent, ...] = ("fill", "original", "latent noise", "latent nothing")  # A1111's 0..3
CANCEL_TTL_S = 600.0
_LORA_TAG = re.compile(r"<lora:([^:>]+)(?::([^:>]*))?(?::[^>]*)?>")

ProgressFn = Callable[[int, int], None]


class LoraRef(BaseModel):
    name: str = Field(..., min_length=1, max_length=128)
    weight: float = Field(1.0, ge=-4.0, le=4.0)


# A1111's latent upscale modes for hires fix -> (torch interpolate mode, antialias), as A1111 maps them.
LATENT_UPSCALE_MODES: dict[str, tuple[str, bool]] = {
    "Latent": ("bilinear", False),
    "Latent (antialiased)": ("bilinear", True),
    "Latent (bicubic)": ("bicubic", False),
    "Latent (bicubic antialiased)": ("bicubic", True),
    "Latent (nearest)": ("nearest", False),
    "Latent (nearest-exact)": ("nearest-exact", False),
}


class LatentHires(BaseModel):
    """A1111's latent hires fix: the first pass's latents resized to the hires size and denoised again, as
    image-to-image on latents, by the same checkpoint (never decoded in between), with the first pass's prompts and
    sampler or its own."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    width: int = Field(..., ge=64, le=4096, multiple_of=8, description="the size the latents are resized to")
    height: int = Field(..., ge=64, le=4096, multiple_of=8)
    crop_width: int | None = Field(None, ge=64, le=4096, multiple_of=8, description="A1111's hr_resize_x and "
                                   "hr_resize_y both set: the centre this wide (and crop_height high) is kept")
    crop_height: int | None = Field(None, ge=64, le=4096, multiple_of=8)
    mode: Literal["Latent", "Latent (antialiased)", "Latent (bicubic)", "Latent (bicubic antialiased)",
                  "Latent (nearest)", "Latent (nearest-exact)"] = "Latent"
    strength: float = Field(0.7, ge=MIN_STRENGTH, le=1.0, description="A1111 denoising_strength of the second pass")
    steps: int = Field(20, ge=1, le=150)
    # A1111's hr_prompt, hr_negative_prompt, hr_sampler_name and hr_scheduler: None, the first pass's.
    prompt: str | None = Field(None, max_length=10_000, description="the second pass's prompt")
    negative_prompt: str | None = Field(None, max_length=10_000, description="the second pass's negative prompt")
    sampler: str | None = Field(None, max_length=64, description="the second pass's sampler, with schedule")
    schedule: str | None = Field(None, max_length=64, description="with sampler: its schedule (None: its own)")

    @model_validator(mode="after")
    def _crop_inside(self) -> LatentHires:
        if (self.crop_width or 0) > self.width or (self.crop_height or 0) > self.height:
            raise ValueError(f"the crop {self.size} exceeds the resized latents' {self.width}x{self.height}")
        return self

    @property
    def size(self) -> tuple[int, int]:
        """The size of the second pass (and of the images): the crop, when there is one."""
        return self.crop_width or self.width, self.crop_height or self.height


class GenerationRequest(BaseModel):
    """Everything SDXLBase needs for one call. Images travel as PIL objects inside the Ray object store."""

    model_config = ConfigDict(arbitrary_types_allowed=True, extra="forbid")

    prompt: str = Field("", max_length=10_000)
    negative_prompt: str = Field("", max_length=10_000)
    width: int = Field(1024, ge=64, le=4096)
    height: int = Field(1024, ge=64, le=4096)
    steps: int = Field(30, ge=1, le=150)
    guidance_scale: float = Field(7.0, ge=0.0, le=30.0)
    seed: int = Field(-1, ge=-1, le=MAX_SEED)
    batch_size: int = Field(1, ge=1, le=64)
    sampler: str | None = None
    schedule: str | None = Field(None, description="A1111 'scheduler': Automatic, Karras, Exponential, ...")
    init_image: Image.Image | None = None
    strength: float = Field(0.75, ge=MIN_STRENGTH, le=1.0, description="img2img / inpaint denoising strength")
    exact_steps: bool = Field(False, description="img2img runs exactly ``steps`` denoising steps whatever the "
                              "strength (A1111's hires second pass), not int(steps x strength)")
    mask: Image.Image | None = None
    mask_blur: int = Field(4, ge=0, le=64, description="the mask's Gaussian blur, its standard deviation in the "
                           "mask's own pixels (A1111's: OpenCV's, along the rows and the columns, at the size the "
                           "mask was drawn at)")
    mask_blur_y: int | None = Field(None, ge=0, le=64, description="the blur along the columns where it differs "
                                    "from mask_blur's (A1111's mask_blur_y); None: mask_blur")
    mask_fit: Fit = Field("stretch", description="how the mask, once blurred, is framed at width x height (A1111's "
                          "resize_mode, as img2img frames the init image: stretch, crop or fill); inpaint_area "
                          "masked: how it is framed at the init image's size where it has another (before the blur)")
    masked_content: MaskedContent = Field("original", description="inpainting: what the masked area starts from, "
                                          "as A1111's inpainting_fill names it: original, the image; fill, the "
                                          "image's colours blurred in from around the mask; latent noise / latent "
                                          "nothing, the filled image's latents under the mask replaced by the "
                                          "seed's noise / zeros")
    inpaint_area: InpaintArea = Field("whole", description="whole: the init image, at the generation size, is "
                                      "inpainted; masked: A1111's 'Only masked': the mask's region (its bounding box "
                                      "once blurred, inpaint_padding wider, grown to the generation's aspect ratio) "
                                      "of the init image at its own size is inpainted at the generation size and "
                                      "pasted back, the result at the init image's size (a mask blank once blurred: "
                                      "image-to-image of the whole image, as A1111 falls back)")
    inpaint_padding: int = Field(0, ge=0, le=4096, description="inpaint_area masked: the pixels added around the "
                                 "mask's bounding box (A1111's inpaint_full_res_padding)")
    defer_paste: bool = Field(False, description="inpainting: the images come back as inpainted, not yet pasted "
                              "over the init image, each with its paste in StageResult.pastes, for a later stage to "
                              "apply (A1111 restores faces before it pastes)")
    ip_adapter_image: Image.Image | None = None
    ip_adapter_scale: float = Field(0.6, ge=0.0, le=2.0)
    loras: list[LoraRef] = []
    denoising_end: float | None = Field(None, gt=0.0, lt=1.0, description="stop early and return latents")
    checkpoint: str | None = Field(None, max_length=128, description="the base checkpoint; None: the default")
    hires: LatentHires | None = Field(None, description="text-to-image only: A1111's latent hires fix")
    prompt_syntax: PromptSyntax = Field("plain", description="plain: the prompts go to the text encoders as they "
                                        "are; a1111: read as Automatic1111 reads them (emphasis, BREAK, prompts "
                                        "past 75 tokens in chunks; see deployments.support.prompts)")
    subseed: int = Field(-1, ge=-1, le=MAX_SEED, description="A1111's variation seed of the first image (the next "
                         "ones count up from it); -1 draws one. Read only with subseed_strength above 0")
    subseed_strength: float = Field(0.0, ge=0.0, le=1.0, description="how far each image's noise moves from its "
                                    "seed's towards its variation seed's (A1111's slerp; 1: the variation seed's "
                                    "noise): text-to-image's initial noise, or the noise image-to-image and "
                                    "inpainting add to the image. Above 0, every image of the batch has the seed "
                                    "itself, as in A1111")
    seed_resize_from_w: int = Field(0, ge=0, le=4096, description="with seed_resize_from_h: the noise is made at "
                                    "this size and pasted centred, so a seed keeps its composition at another size "
                                    "(A1111); 0: off")
    seed_resize_from_h: int = Field(0, ge=0, le=4096)
    noise_multiplier: float = Field(1.0, ge=0.0, le=MAX_NOISE_MULTIPLIER, description="image-to-image and "
                                    "inpainting: A1111's initial_noise_multiplier, which scales the noise added to "
                                    "the image (after any variation seed); 1: unchanged")
    tiling: bool = Field(False, description="seamless tiling: every convolution of the UNet and the VAE pads "
                         "circularly for the run, as A1111's tiling does")
    schedule_from: int | None = Field(None, ge=1, le=300, description="A1111's prompt editing: the model "
                                      "evaluations of the pass before this one (a pixel hires fix's first), which "
                                      "this pass's schedule counts on from, as A1111's second pass does")
    eta: float | None = Field(None, ge=0.0, le=1.0, description="DDIM's eta (A1111's eta with DDIM): the share of "
                              "fresh noise each step adds; None: 0, deterministic DDIM. Other samplers do not read it")
    churn: Churn | None = Field(None, description="Euler's churn (A1111's s_churn and its window and noise scale), "
                                "in each pass Euler runs; None: none. Other samplers do not read it")
    cond_padding: Padding = Field("off", description="a1111: how a prompt and a negative prompt of different "
                                  "lengths in chunks meet (A1111's pad_cond_uncond options): off, UNet calls of "
                                  "their own at their own lengths (A1111's default); empty, the shorter padded with "
                                  "the empty prompt's chunks; v0, the negative prompt's last vector repeated up to "
                                  "the prompt's length, or the negative prompt cut there")

    control: list[ControlUnit] = Field([], max_length=MAX_UNITS, description="ControlNet units (the base's "
                                       "`controlnets`); a request with any runs in a batch of its own")
    recolor: list[ControlUnit] | None = Field(None, max_length=MAX_UNITS, description="the recolor units whose "
                                              "maps go back into this call's finished images (the extension's "
                                              "post-processing); None: those of control; empty: none (a pixel "
                                              "hires fix's first pass, whose images are not the last)")

    @property
    def varied(self) -> bool:
        """Whether variation seeds or seed resize were asked for (they may still change nothing: a resize to the
        image's own size)."""
        return self.subseed_strength > 0 or (self.seed_resize_from_w > 0 and self.seed_resize_from_h > 0)


# A1111's slider ranges for k-diffusion's churn settings: values past them are refused, not run.
MAX_S_CHURN, MAX_S_TMIN, MAX_S_TMAX, MAX_S_NOISE = 100.0, 10.0, 999.0, 1.1


class Churn(BaseModel):
    """k-diffusion's churn on Euler (A1111's ``s_churn``, ``s_tmin``, ``s_tmax``, ``s_noise``): at each step whose
    sigma lies in [s_tmin, s_tmax], noise of ``s_noise`` times the standard is added to raise sigma by a factor of
    1 + min(s_churn / steps, sqrt(2) - 1). Frozen: part of the batching key."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    s_churn: float = Field(0.0, ge=0.0, le=MAX_S_CHURN, description="0: no churn (the other three then do nothing)")
    s_tmin: float = Field(0.0, ge=0.0, le=MAX_S_TMIN, description="the least sigma churned")
    s_tmax: float = Field(0.0, ge=0.0, le=MAX_S_TMAX, description="the largest sigma churned; 0: no limit (A1111's)")
    s_noise: float = Field(1.0, ge=0.0, le=MAX_S_NOISE, description="the churn noise's scale")

    @property
    def churns(self) -> bool:
        """Whether it changes an Euler image: only a churn above 0 draws noise."""
        return self.s_churn > 0


class RefineRequest(BaseModel):
    """How to refine; what to refine (latents or images, with their seeds) is the previous stage's result."""

    model_config = ConfigDict(extra="forbid")

    prompt: str = Field("", max_length=10_000)
    negative_prompt: str = Field("", max_length=10_000)
    steps: int = Field(30, ge=1, le=150)
    guidance_scale: float = Field(7.0, ge=0.0, le=30.0)
    sampler: str | None = Field(None, description="ensemble: None runs the base's (the only one that reads its "
                                "latents right); image mode: None runs Euler")
    schedule: str | None = Field(None, description="A1111 'scheduler'; ensemble: None runs the base's")
    denoising_start: float = Field(0.8, gt=0.0, lt=1.0, description="ensemble: where the base model stopped")
    strength: float = Field(0.35, ge=MIN_STRENGTH, le=1.0, description="image mode: how much of the image is "
                            "redrawn")
    aesthetic_score: float = Field(6.0, ge=0.0, le=10.0)
    negative_aesthetic_score: float = Field(2.5, ge=0.0, le=10.0)
    seeds: list[int] = Field([], description="image mode, when the images come without seeds")
    prompt_syntax: PromptSyntax = Field("plain", description="how the prompts are read: the base request's")
    churn: Churn | None = Field(None, description="Euler's churn: the base request's, which an ensemble's steps go on "
                                "with (A1111 runs one sampling run across the switch)")
    cond_padding: Padding = Field("off", description="a1111: the base request's (see GenerationRequest)")


class Encoding(BaseModel):
    """How the last stage of a plan encodes its images, so that only bytes travel back to the ingress (and the
    ingress's event loop never spends a core on zlib)."""

    model_config = ConfigDict(extra="forbid")

    format: Literal["png", "jpeg", "webp"] = "png"
    quality: int = Field(90, ge=1, le=100)
    lossless: bool = Field(False, description="WebP's lossless mode (A1111's webp_lossless)")
    png_level: int | None = Field(None, ge=0, le=9, description="None: the PNG_COMPRESS_LEVEL setting")
    parameters: list[str] | None = Field(None, description="A1111 infotext per image: a PNG's 'parameters' chunk, "
                                         "a JPEG's or WebP's EXIF UserComment")
    overlay: Overlay | None = Field(None, description="a caption or logo drawn on each image before encoding")
    parent: bytes | None = Field(None, repr=False, description="the uploaded file an edit started from: the parent "
                                 "ingredient of its content credentials (img2img, inpainting, upscales)")


@dataclass
class StageResult:
    """What every stage returns and the next stage takes: its images (or, from the base to the refiner, latents),
    the seeds that made them, the warnings of every stage so far and what each stage did (``info``). A plan awaits
    only its last stage: everything it reports travels forward in this one object."""

    images: list[Image.Image] = field(default_factory=list)
    seeds: list[int] = field(default_factory=list)
    latents: np.ndarray | None = None
    warnings: list[str] = field(default_factory=list)
    info: dict = field(default_factory=dict)
    encoded: list[bytes] = field(default_factory=list)  # the images as files, once a stage encoded them
    sizes: list[tuple[int, int]] = field(default_factory=list)  # their sizes, which travel with the bytes
    # An inpainting's paste over its init image, one per image, where the base left it to a later stage
    # (``GenerationRequest.defer_paste``); empty once pasted (``pasted``).
    pastes: list[Paste] = field(default_factory=list)
    # What the stage that decodes ``latents`` puts back into its images (the recolor units' maps): the base hands
    # them to the refiner with its latents.
    recolors: list[Recolor] = field(default_factory=list)

    def pasted(self) -> StageResult:
        """The same result with each image pasted over the image its inpainting started from, where that was left
        to a later stage; itself when nothing is left to paste."""
        if not self.pastes:
            return self
        return replace(self, images=[paste.apply(image) for paste, image in zip(self.pastes, self.images,
                                                                                strict=True)], pastes=[])

    def encode(self, how: Encoding) -> StageResult:
        """The same result with its images as files (and their sizes) in place of pixels: overlays drawn, then the
        invisible watermark, the encoding, and the content credentials (``deployments.support.provenance``)."""
        texts: list[str | None] = [*how.parameters] if how.parameters else [None] * len(self.images)
        whole = self.pasted()
        drawn = whole.overlaid(how.overlay) if how.overlay is not None else whole
        marks = provenance.marker()
        marked = [marks.mark(image) for image in drawn.images]
        images, watermarked = [image for image, _ in marked], [done for _, done in marked]
        facts = Facts.of(drawn.info, how.parent)
        data = [marks.sign(encode_image(image, how.format, how.quality, {"parameters": text} if text else None,
                                        how.png_level, how.lossless), how.format, facts)
                for image, text in zip(images, texts, strict=False)]
        info = {**drawn.info, "watermarked": watermarked, "credentials": marks.signer is not None}
        warnings = self.warnings
        if any(text and not comment_fits(text, how.format) for text in texts):
            warnings = [*warnings, f"the infotext is too long for a {how.format.upper()}'s EXIF (64 kB): the file "
                        "carries none (a PNG or WebP would)"]
        return StageResult(seeds=self.seeds, warnings=warnings, info=info, encoded=data,
                           sizes=[image.size for image in images])

    def overlaid(self, spec: Overlay) -> StageResult:
        """The same result with the request's caption or logo drawn on each image; ``info["overlay"]`` says so (the
        content credentials then name the file a composite, since a logo is the client's pixels, not the model's)."""
        mark = overlay.prepare(spec, current().fonts_dir, "overlay")
        return replace(self, images=[overlay.draw(image, mark) for image in self.images],
                       info={**self.info, "overlay": True})

    @property
    def stopped(self) -> bool:
        """Whether A1111's /interrupt or /skip ended a diffusion stage early: its images are what that stage had
        made by then, and the diffusion stages after it hand them on untouched (A1111 skips its hires pass)."""
        return "stopped_at" in self.info

    @property
    def image(self) -> Image.Image:
        if not self.images:
            raise InvalidInput("the previous stage produced no image", field="image")
        return self.images[0]

    def then(self, images: list[Image.Image], *, warnings: Iterable[str] = (), **info) -> StageResult:
        """The next stage's result: its own images, these seeds, every warning so far and its own; the pastes
        still to do go on with images made one for one from these (face restoration, the safety checker)."""
        pastes = list(self.pastes) if len(images) == len(self.pastes) else []
        return StageResult(images=images, seeds=list(self.seeds), warnings=[*self.warnings, *warnings],
                           info={**self.info, **info}, pastes=pastes)

    def joined(self, parts: list[StageResult]) -> StageResult:
        """One result of the passes that each started from one of this result's images: their images and seeds in
        order, every warning of this result and theirs once, and what each stage ran (theirs over this one's)."""
        warnings = [w for part in [self, *parts] for w in part.warnings]
        stopped = [part.info["stopped_at"] for part in parts if part.stopped]
        # Each pass names its own variation seed: the joined result names them all, as it does the seeds.
        subseeds = [subseed for part in parts for subseed in part.info.get("subseeds", [])]
        if any(part.pastes for part in parts) and not all(part.pastes for part in parts if part.images):
            parts = [part.pasted() for part in parts]  # some passes were pasted already: the others now
        return StageResult(images=[image for part in parts for image in part.images],
                           seeds=[seed for part in parts for seed in part.seeds],
                           pastes=[paste for part in parts for paste in part.pastes],
                           warnings=list(dict.fromkeys(warnings)),
                           info={**self.info, **parts[0].info, **({"stopped_at": stopped[0]} if stopped else {}),
                                 **({"subseeds": subseeds} if subseeds else {})})

    @classmethod
    def of(cls, source: StageResult | Image.Image) -> StageResult:
        """A stage's input: the previous stage's result, or a bare image from a client."""
        if isinstance(source, StageResult):
            return source
        if isinstance(source, Image.Image):
            return cls(images=[source])
        raise InvalidInput(f"no image in {type(source).__name__}", field="image")


@dataclass
class BatchItem:
    """One request inside a batch: what it asks, its id (for cancel and progress) and, for the refiner, the
    previous stage's result. ``count`` is how many images it makes. ``handed``: its result, set from the inference
    thread when it is ready before its batch ends (an item that /interrupt or /skip stopped while its batch mates
    run on); its caller takes whichever comes first (``Batcher.submit``)."""

    request: Any
    request_id: str
    count: int = 1
    source: Any = None
    on_progress: ProgressFn | None = None
    checkpoint: Any = None  # SDXLBase: the held checkpoint it runs on (its pipelines)
    handed: Future = field(default_factory=Future)


async def encoded(result: StageResult, how: Encoding | None) -> StageResult:
    """A stage's result, encoded on a worker thread when the plan asked (never the inference thread, which has
    the next batch to run, nor the event loop)."""
    if how is None:
        return result
    import asyncio

    return await asyncio.to_thread(result.encode, how)


def parse_lora_tags(prompt: str) -> tuple[str, list[LoraRef]]:
    """Strip A1111 ``<lora:name:weight>`` tags from a prompt and return them as references."""
    refs = []
    for match in _LORA_TAG.finditer(prompt):
        name, weight = match.group(1).strip(), match.group(2)
        try:
            refs.append(LoraRef(name=name, weight=float(weight) if weight not in (None, "") else 1.0))
        except ValueError as e:
            raise InvalidInput(f"bad LoRA tag {match.group(0)!r}", field="prompt") from e
    text = re.sub(r"\s{2,}", " ", _LORA_TAG.sub("", prompt)).strip(" ,")
    return text, refs


def resolve_seeds(seed: int, count: int) -> list[int]:
    """A1111 semantics: -1 draws a random seed; a batch uses consecutive seeds."""
    first = random.SystemRandom().randint(0, MAX_SEED) if seed == -1 else seed
    return [(first + i) % (MAX_SEED + 1) for i in range(count)]


def variation_seeds(seed: int, subseed: int, strength: float, count: int) -> tuple[list[int], list[int]]:
    """The seeds and variation seeds of ``count`` images, as A1111 numbers them: with a variation strength every
    image has the seed itself and the variation seeds count up; without one the seeds count up. A -1 draws one."""
    seeds = resolve_seeds(seed, 1 if strength > 0 else count)
    return seeds * count if strength > 0 else seeds, resolve_seeds(subseed, count)


def check_size(width: int, height: int, max_pixels: int) -> None:
    for name, value in (("width", width), ("height", height)):
        if value % 8:
            raise InvalidInput(f"{name}={value} is not a multiple of 8", field=name)
    if width * height > max_pixels:
        raise InvalidInput(f"{width}x{height} exceeds {max_pixels} pixels", field="width")


class Cancellation:
    """Per-request cancel flags and progress, checked by the denoising loop between steps."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._cancelled: dict[str, float] = {}  # request id -> when the cancel arrived
        self._stopped: dict[str, float] = {}  # request id -> when A1111's /interrupt or /skip asked it to stop
        self._progress: dict[str, tuple[int, int]] = {}
        self._latents: dict[str, Any] = {}  # numpy arrays or torch tensors (this module never imports torch)
        self._finished: list[str] = []
        self._waiting: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Event]] = {}  # see ``guard``

    def keep_latents(self, request_id: str | None, latents) -> None:
        """The first image's current latents (an array or a device tensor, copied only when a preview is asked
        for, so the denoising loop never waits on a device-to-host copy)."""
        if request_id is not None:
            with self._lock:
                self._latents[request_id] = latents

    def preview(self, request_id: str) -> Image.Image | None:
        with self._lock:
            latents = self._latents.get(request_id)
        if latents is None:
            return None
        if hasattr(latents, "cpu"):  # a torch tensor, still on its device
            latents = latents.float().cpu().numpy()
        return latent_preview(latents)

    def cancel(self, request_id: str) -> None:
        """Flag a request; the flag also waits for one that has not started yet, but not for ever."""
        now = time.monotonic()
        with self._lock:
            for stale in [r for r, at in self._cancelled.items() if now - at > CANCEL_TTL_S]:
                del self._cancelled[stale]
            self._cancelled[request_id] = now
            waiting = self._waiting.get(request_id)
        if waiting is not None:
            loop, event = waiting
            loop.call_soon_threadsafe(event.set)

    def stop(self, request_id: str) -> None:
        """Flag a request to end early with what it has made so far (A1111's /interrupt and /skip): unlike a
        cancel, its caller waits for that result (``Partial``)."""
        now = time.monotonic()
        with self._lock:
            for stale in [r for r, at in self._stopped.items() if now - at > CANCEL_TTL_S]:
                del self._stopped[stale]
            self._stopped[request_id] = now

    def stops(self, items: list[BatchItem]) -> list[bool]:
        with self._lock:
            return [item.request_id in self._stopped for item in items]

    async def guard(self, request_id: str, work: Awaitable[Any]) -> Any:
        """``work``'s result, or ``GenerationCancelled`` as soon as the request is cancelled (by the progress
        board: an A1111 interrupt or a job cancel from any ingress). The batch it rides in runs on for its mates;
        only this caller stops waiting for it."""
        loop, event = asyncio.get_running_loop(), asyncio.Event()
        with self._lock:
            self._waiting[request_id] = (loop, event)
            if request_id in self._cancelled:
                event.set()
        task, waiter = asyncio.ensure_future(work), asyncio.ensure_future(event.wait())
        try:
            await asyncio.wait({task, waiter}, return_when=asyncio.FIRST_COMPLETED)
            if task.done():
                return task.result()
            raise GenerationCancelled(f"request {request_id} cancelled")
        finally:
            for pending in (task, waiter):
                pending.cancel()
            with self._lock:
                self._waiting.pop(request_id, None)

    def progress(self, request_id: str) -> tuple[int, int] | None:
        with self._lock:
            return self._progress.get(request_id)

    def running(self) -> int:
        """Requests of this replica inside their denoising loop now."""
        with self._lock:
            return len(self._progress)

    def advance(self, items: list[BatchItem], step: int, total: int) -> list[bool]:
        """Record a batch's progress; which of its items are cancelled. A cancelled item is left to finish with
        its batch mates, which it never disturbs; its outcome is ``GenerationCancelled``. (A caller that cancels
        through Serve, ``DeploymentResponse.cancel()``, is answered at once.)"""
        cancelled = []
        with self._lock:
            for item in items:
                self._progress[item.request_id] = (step, total)
                cancelled.append(item.request_id in self._cancelled)
        for item, gone in zip(items, cancelled, strict=True):
            if item.on_progress is not None and not gone:
                item.on_progress(step, total)
        return cancelled

    def is_cancelled(self, request_id: str) -> bool:
        with self._lock:
            return request_id in self._cancelled

    def callback(self, request_id: str | None, extra: ProgressFn | None = None) -> ProgressFn:
        def report(step: int, total: int) -> None:
            if request_id is not None:
                with self._lock:
                    if request_id in self._cancelled:
                        raise GenerationCancelled(f"request {request_id} cancelled at step {step}/{total}")
                    self._progress[request_id] = (step, total)
            if extra is not None:
                extra(step, total)

        return report

    def settle(self, items: list[BatchItem], results: list) -> list:
        """A batch's items done: each one's result, or its ``GenerationCancelled`` when it was cancelled while its
        batch mates ran on; their progress and flags are cleared."""
        # Every flag is read before any is cleared: the items of one request (a pass over each image of an earlier
        # stage's result) share its id, and may share a batch.
        gone = [self.is_cancelled(item.request_id) for item in items]
        settled = []
        for item, result, cancelled in zip(items, results, gone, strict=True):
            if cancelled and not isinstance(result, BaseException):
                result = GenerationCancelled(f"request {item.request_id} cancelled")
            self.finish(item.request_id)
            settled.append(result)
        return settled

    def finish(self, request_id: str | None) -> None:
        if request_id is not None:
            with self._lock:
                self._cancelled.pop(request_id, None)
                self._stopped.pop(request_id, None)
                if self._progress.pop(request_id, None) is not None:
                    self._finished.append(request_id)
                self._latents.pop(request_id, None)

    def drain(self) -> tuple[dict[str, tuple[int, int]], list[str]]:
        """What to report: the progress of every running request, and the requests finished since last asked."""
        with self._lock:
            finished, self._finished = self._finished, []
            return dict(self._progress), finished

    def undrain(self, finished: list[str]) -> None:
        """Requests ``drain`` gave out as finished whose report did not get through."""
        with self._lock:
            self._finished[:0] = finished


class Stopped(Exception):
    """Every item of a batch was stopped or cancelled: its denoising loop ends at this step."""


class Partial:
    """The items of one batch that A1111's /interrupt or /skip stopped. As in A1111, each hands back the
    sampler's estimate of its clean latents at the step it was stopped (decoded, that is a soft, finished-looking
    image, where the noisy latents would decode to noise). Its batch mates run on; when none is left running,
    the loop ends (``Stopped``).

    ``make(i)`` builds item ``i``'s result from what it kept (``answer`` builds it once): an item stopped while
    its batch mates run on is answered at once, from the inference thread, through ``BatchItem.handed``, so its
    caller does not wait for the batch to end."""

    def __init__(self, cancellation: Cancellation, items: list[BatchItem], counts: list[int],
                 make: Callable[[int], Any] | None = None) -> None:
        self.cancellation, self.items, self.make = cancellation, items, make
        self.offsets = [sum(counts[:i]) for i in range(len(counts) + 1)]
        self.kept: dict[int, tuple[Any, int, int]] = {}  # item index -> its latents, the step and the total
        self._answers: dict[int, Any] = {}
        self._estimate: Any = None
        self._watched: list[Any] = []

    def watch(self, scheduler) -> None:
        """Keep the scheduler's estimate of the clean latents from each of its steps."""
        step = scheduler.step

        @functools.wraps(step)  # the pipeline reads its signature to pass ``generator`` and ``eta``
        def recorded(model_output, timestep, sample, *args, **kwargs):
            out = step(model_output, timestep, sample, *args, **kwargs)
            self._estimate = clean_estimate(scheduler, out, model_output, timestep, sample)
            return out

        scheduler.step = recorded
        self._watched.append(scheduler)

    def release(self) -> None:
        """The schedulers as they were, and nothing of the batch kept: a pipeline holds its last scheduler until
        its next run, and with it whatever this holds (the requests' images, latents on the device)."""
        for scheduler in self._watched:
            scheduler.__dict__.pop("step", None)
        self._watched, self.items, self.kept, self._answers, self._estimate = [], [], {}, {}, None
        self.make = None

    def answer(self, i: int) -> Any:
        """Item ``i``'s result, from what it kept (built once: the one handed early is the one the batch returns)."""
        if i not in self._answers:
            assert self.make is not None
            self._answers[i] = self.make(i)
        return self._answers[i]

    def check(self, latents: Any, step: int, total: int, cancelled: list[bool]) -> None:
        """After a step: keep what each item stopped since makes; ``Stopped`` when no item runs on, else hand
        each item stopped now its result."""
        estimate = self._estimate if self._estimate is not None else latents
        now = []
        for i, stopped in enumerate(self.cancellation.stops(self.items)):
            if stopped and not cancelled[i] and i not in self.kept and estimate is not None:
                self.kept[i] = (estimate[self.offsets[i]:self.offsets[i + 1]].clone(), step, total)
                now.append(i)
        if all(gone or i in self.kept for i, gone in enumerate(cancelled)):
            raise Stopped(f"batch of {len(self.items)} stopped at step {step}/{total}")
        for i in now if self.make is not None else ():
            try:
                result = self.answer(i)
            except Exception:  # noqa: BLE001 - the batch's end answers it: the same error, or what it makes then
                self._answers.pop(i, None)
                continue
            handed = self.items[i].handed
            if handed.set_running_or_notify_cancel():  # False: its caller already took the batch's answer
                handed.set_result(result)


def clean_estimate(scheduler, out, model_output: Any = None, timestep: Any = None, sample: Any = None) -> Any:
    """A scheduler step's estimate of the clean latents: the second value of the k-diffusion style steps (Euler,
    Heun, LMS, DPM2, DPM++ SDE, DDIM, LCM), or a DPM-Solver++ / UniPC step's latest model output, which those keep
    in that form; for the rest (PLMS, PNDM, DEIS), worked out from the predicted noise as DDIM does. None where
    none can be (a model that predicts something other than the noise): the current latents stand in."""
    if isinstance(out, tuple):
        if len(out) > 1 and out[1] is not None:
            return out[1]
    else:
        for name in ("pred_original_sample", "denoised"):
            if getattr(out, name, None) is not None:
                return getattr(out, name)
    outputs = getattr(scheduler, "model_outputs", None)
    config = scheduler.config
    if outputs and outputs[-1] is not None and (config.get("algorithm_type") in ("dpmsolver++", "sde-dpmsolver++")
                                                or config.get("predict_x0") is True):
        return outputs[-1]
    alphas = getattr(scheduler, "alphas_cumprod", None)
    if alphas is None or sample is None or model_output is None or timestep is None \
            or config.get("prediction_type", "epsilon") != "epsilon":
        return None
    alpha = alphas[int(timestep)].to(device=sample.device, dtype=sample.dtype)
    return (sample - (1 - alpha).sqrt() * model_output) / alpha.sqrt()


# SDXL latent channels -> RGB, a linear fit used for live previews (no VAE decode needed).
_PREVIEW_FACTORS = np.array(
    [[0.3651, 0.4232, 0.4341], [-0.2533, -0.0042, 0.1068], [0.1076, 0.1111, -0.0362], [-0.3165, -0.2492, -0.2188]],
    dtype=np.float32,
)
_PREVIEW_BIAS = np.array([0.1084, -0.0175, -0.0011], dtype=np.float32)


def latent_preview(latents: np.ndarray) -> Image.Image:
    """4 x h x w latents -> an (h x w) RGB approximation of the image being denoised."""
    rgb = np.tensordot(latents.astype(np.float32), _PREVIEW_FACTORS, axes=([0], [0])) + _PREVIEW_BIAS
    return Image.fromarray(((np.clip(rgb, -1, 1) + 1) * 127.5).astype(np.uint8))


Mode = Literal["txt2img", "img2img", "inpaint"]


def mode_of(request: GenerationRequest) -> Mode:
    if request.mask is not None:
        if request.init_image is None:
            raise InvalidInput("a mask needs an init image", field="mask")
        return "inpaint"
    return "img2img" if request.init_image is not None else "txt2img"
