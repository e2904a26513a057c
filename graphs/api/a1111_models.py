"""Automatic1111's request and response shapes, as its clients send and expect them."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from deployments.support.errors import InvalidInput
from deployments.support.generation import (
    LATENT_UPSCALE_MODES,
    MAX_NOISE_MULTIPLIER,
    MAX_S_CHURN,
    MAX_S_NOISE,
    MAX_S_TMAX,
    MAX_S_TMIN,
    Churn,
)
from deployments.support.prompts import Padding
from deployments.support.samplers import MIN_STRENGTH
from graphs.api.fields import Guidance, Prompt, Seed, Side, Steps

MAX_IMAGES = 16


class _A1111(BaseModel):
    model_config = ConfigDict(extra="ignore")  # A1111 clients send many fields we do not use

    @model_validator(mode="before")
    @classmethod
    def _as_a1111_reads_it(cls, data: Any) -> Any:
        """A1111 declares every field Optional, and clients replay its ``parameters`` with their nulls
        (``"seed": null``, ``"override_settings": null``): a null field takes its default, as in A1111. Its
        models (pydantic 1) also truncate a number with a fraction sent for a whole one (a client's
        ``"hr_second_pass_steps": steps / 2``), where pydantic 2 refuses it."""
        if not isinstance(data, dict):
            return data
        whole = {name for name, f in cls.model_fields.items() if f.annotation is int}
        return {key: int(value) if key in whole and isinstance(value, float) and math.isfinite(value) else value
                for key, value in data.items() if value is not None}


# A1111's own always-on scripts, which it names by title, lower-cased: sent by clients that drive them, accepted
# here and not applied (the answer's warnings say so). Any other is an extension's, which is not installed here.
BUILTIN_SCRIPTS = frozenset({"refiner", "seed", "sampler", "comments", "hypertile", "extra options",
                             "soft inpainting"})
EXTENSION_SCRIPTS = "controlnet"  # the ControlNet extension's units: graphs/api/a1111_controlnet.py reads them


# A1111's values of the hires fix's second-pass fields that mean "as the first pass".
SAME_AS_FIRST_PASS = frozenset({None, "", "Use same checkpoint", "Use same sampler", "Use same scheduler"})

# A1111 1.10's settings that change its images, with their defaults: an ``override_settings`` value other than the
# default is not applied here, and the answer's warnings say so. Settings that change nothing in an image (where it is
# saved, its format, the page's) pass silently; ``sd_model_checkpoint`` is applied, and so are the churn settings
# (``CHURN_SETTINGS``, read by ``churn()``, warned of by ``churn_unapplied``). ``initial_noise_multiplier`` changes
# nothing there either: A1111's img2img reads the saved option when the request is made, before its overrides hold
# (``graphs.api.a1111_options``), and its txt2img never reads it.
IMAGE_SETTINGS: dict[str, object] = {
    "eta_noise_seed_delta": 0, "eta_ancestral": 1.0, "eta_ddim": 0.0, "s_churn": 0.0, "s_tmin": 0.0, "s_tmax": 0.0,
    "s_noise": 1.0, "sigma_min": 0.0, "sigma_max": 0.0, "rho": 0.0, "always_discard_next_to_last_sigma": False,
    "sgm_noise_multiplier": False, "uni_pc_variant": "bh1", "uni_pc_order": 3, "token_merging_ratio": 0.0,
    "token_merging_ratio_hr": 0.0, "img2img_fix_steps": False, "s_min_uncond": 0.0,
    "sd_vae": "Automatic", "sdxl_clip_l_skip": False, "randn_source": "CPU",
    # An inpainting checkpoint's masked image is the init image lerped to grey by it; here it is grey (its default).
    "inpainting_mask_weight": 1.0,
}
# Values that mean the default: A1111 runs no replacement VAE for these, and its "CPU" noise is this service's (one
# CPU generator per image, seeded with the image's seed); "GPU" (A1111's default) and "NV" draw other noise.
SAME_SETTING = {"sd_vae": {"Automatic", "None", ""}}

# k-diffusion's churn settings (request fields and ``override_settings`` keys alike), their defaults and A1111's
# slider bounds. Euler applies them here (``Churn``); the ``override_settings`` keys are read by ``churn()``, not
# named by ``settings_unapplied``.
CHURN_SETTINGS: dict[str, tuple[float, float]] = {"s_churn": (0.0, MAX_S_CHURN), "s_tmin": (0.0, MAX_S_TMIN),
                                                  "s_tmax": (0.0, MAX_S_TMAX), "s_noise": (1.0, MAX_S_NOISE)}
# How A1111 1.10's CFG denoiser meets a prompt and a negative prompt of different lengths: these options, read while
# a request runs (its override_settings over the saved ones); v0 wins over the other; neither (the default): calls of
# their own.
PADDING_SETTINGS: dict[str, bool] = {"pad_cond_uncond": False, "pad_cond_uncond_v0": False}
# The A1111 samplers whose k-diffusion function takes them (its ``sampler_extra_params``): all four, or s_noise alone.
TAKES_CHURN = frozenset({"Euler", "Heun", "DPM2"})
TAKES_S_NOISE = frozenset({"Euler a", "DPM2 a", "DPM++ 2S a", "DPM++ SDE", "DPM++ 2M SDE", "DPM++ 2M SDE Heun",
                           "DPM++ 3M SDE", "DPM fast"})


StyleName = Annotated[str, Field(max_length=256)]


class Txt2ImgRequest(_A1111):
    prompt: Prompt = ""
    negative_prompt: Prompt = ""
    seed: Seed = -1
    sampler_name: str | None = Field(None, max_length=64, description="none: the deployment's default sampler")
    sampler_index: str | None = Field(None, max_length=64, description="A1111's older spelling, read when "
                                      "sampler_name is absent")
    scheduler: str | None = Field(None, max_length=64, description="an A1111 scheduler name or label; none: Automatic")
    batch_size: int = Field(1, ge=1, le=MAX_IMAGES)
    n_iter: int = Field(1, ge=1, le=MAX_IMAGES)
    steps: Steps = 50  # A1111's API default (its web page's is 20)
    cfg_scale: Guidance = 7.0
    width: Side = 512
    height: Side = 512
    restore_faces: bool = False
    script_name: str | None = Field(None, max_length=256, description="none is installed: a name is a 422, as in "
                                    "A1111 for a script it lacks")
    script_args: list = []
    alwayson_scripts: dict = Field({}, description="ControlNet's units (the extension's API) applied; A1111's own "
                                   "(Refiner, Seed, Sampler, ...) accepted and not applied, with a warning; another "
                                   "extension's is a 422, as in A1111 without it")
    denoising_strength: float = Field(0.75, ge=0.0, le=1.0)
    enable_hr: bool = False
    hr_scale: float = Field(2.0, ge=0.0, le=4.0, description="not read when hr_resize_x or hr_resize_y is set")
    hr_resize_x: int = Field(0, ge=0, le=4096, description="the hires width; 0: hr_scale, or the aspect ratio")
    hr_resize_y: int = Field(0, ge=0, le=4096, description="the hires height; both set: cover them, then crop")
    hr_upscaler: str = "Latent"
    hr_second_pass_steps: int = Field(0, ge=0, le=150)
    refiner_checkpoint: str | None = None
    refiner_switch_at: float = Field(0.8, ge=0.0, le=1.0, description="with refiner_checkpoint: strictly between 0 "
                                     "and 1; ignored without one")
    override_settings: dict = {}
    override_settings_restore_afterwards: bool = Field(
        True, description="false: the override_settings checkpoint stays the default afterwards")
    send_images: bool = Field(True, description="false: the answer's images are left out, as in A1111")
    save_images: bool = Field(False, description="nothing is saved on the server here; with two images or more "
                              "the answer starts with A1111's grid of them (the return_grid option)")
    disable_extra_networks: bool = Field(False, description="true: <lora:...> tags are removed, not applied")
    # A1111's fields that change its images (unapplied() names those set that are not applied).
    styles: list[StyleName] = Field([], max_length=64, description="saved styles merged into the prompts, by name "
                                    "(GET /sdapi/v1/prompt-styles)")
    subseed: Seed = Field(-1, description="the variation seed of the first image (the next count up); -1 draws one")
    subseed_strength: float = Field(0.0, ge=0.0, le=1.0, description="variation seeds (txt2img and both hires "
                                    "passes, img2img and inpainting): each image's noise moved this far towards "
                                    "its variation seed's, as A1111 slerps it. Above 0 every image of the request "
                                    "has the seed itself")
    seed_resize_from_w: int = Field(-1, ge=-1, le=4096, description="with seed_resize_from_h: the seed's noise made "
                                    "at this size and pasted centred; 0 or -1: off")
    seed_resize_from_h: int = Field(-1, ge=-1, le=4096)
    tiling: bool = Field(False, description="seamless tiling: the UNet's and the VAE's convolutions pad circularly "
                         "(not the refiner's)")
    eta: float | None = Field(None, ge=0.0, le=1.0, description="DDIM's eta (none: 0); the ancestral and SDE "
                              "samplers run A1111's default of 1 (another value is named in the warnings)")
    # k-diffusion's churn, applied to Euler (A1111's UI bounds; none: override_settings, else the default).
    s_churn: float | None = Field(None, ge=0.0, le=MAX_S_CHURN, description="Euler: the churn (0: none)")
    s_tmin: float | None = Field(None, ge=0.0, le=MAX_S_TMIN, description="Euler: the least sigma churned")
    s_tmax: float | None = Field(None, ge=0.0, le=MAX_S_TMAX, description="Euler: the largest sigma churned (0: "
                                 "no limit)")
    s_noise: float | None = Field(None, ge=0.0, le=MAX_S_NOISE, description="Euler: the churn noise's scale")
    # The hires fix's second pass (a Latent one runs on the first pass's checkpoint: see unapplied).
    hr_checkpoint_name: str | None = Field(None, max_length=256, description="the second pass's checkpoint; none: "
                                           "the first pass's")
    hr_sampler_name: str | None = Field(None, max_length=64, description="the second pass's sampler; none: the "
                                        "first pass's")
    hr_scheduler: str | None = Field(None, max_length=64, description="the second pass's schedule; none: the first "
                                     "pass's")
    hr_prompt: str = Field("", max_length=10_000, description="the second pass's prompt; empty: the first pass's")
    hr_negative_prompt: str = Field("", max_length=10_000, description="the second pass's negative prompt; empty: "
                                    "the first pass's")

    @model_validator(mode="before")
    @classmethod
    def _sides_as_latents(cls, data: Any) -> Any:
        """A1111 makes a side that is no multiple of 8 at the multiple below it (its latents are an eighth of
        the size), where this service's sides must be multiples of 8: rounded down here, as A1111's answer is."""
        if isinstance(data, dict):
            for side in ("width", "height"):
                value = data.get(side)
                if isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value):
                    data = {**data, side: int(value) - int(value) % 8}
        return data

    def scripts(self) -> list[str]:
        """A warning for each of A1111's own scripts sent (not applied here); an extension's script, which is not
        installed here, is refused as A1111 refuses one it lacks."""
        if self.script_name:
            raise InvalidInput(f"script {self.script_name!r} not found: no scripts are installed here "
                               "(GET /sdapi/v1/scripts)", field="script_name")
        for name in self.alwayson_scripts:
            if name.lower() not in BUILTIN_SCRIPTS | {EXTENSION_SCRIPTS}:
                raise InvalidInput(f"always on script {name!r} not found: the ControlNet extension alone is "
                                   "installed here (GET /sdapi/v1/scripts)", field=f"alwayson_scripts.{name}")
        return [f"A1111's {name!r} script is not applied here: its arguments were ignored"
                for name in self.alwayson_scripts if name.lower() != EXTENSION_SCRIPTS]

    def settings_unapplied(self, vaes: set[str]) -> list[str]:
        """A warning for each of ``override_settings`` that would change A1111's image and is not applied here (at
        its default it says nothing; ``sd_vae`` naming one of the replacement ``vaes`` the checkpoints run with is
        applied); A1111's CLIP skip reaches an SDXL checkpoint only with ``sdxl_clip_l_skip``."""
        overrides = self.override_settings
        same = {**SAME_SETTING, "sd_vae": SAME_SETTING["sd_vae"] | vaes}
        named = [key for key, default in IMAGE_SETTINGS.items() if key not in CHURN_SETTINGS
                 and key in overrides and overrides[key] != default and overrides[key] not in tuple(same.get(key, ()))]
        if overrides.get("sdxl_clip_l_skip") is True and overrides.get("CLIP_stop_at_last_layers", 1) != 1:
            named.append("CLIP_stop_at_last_layers")
        return [f"override_settings.{key} is not applied here: the image was made without it" for key in named]

    def unapplied(self) -> list[str]:
        """A warning for each field set that would change A1111's image and is not applied here (left at its
        default, or at the value that means "as the first pass", a field says nothing)."""
        latent = self.hr_upscaler in LATENT_UPSCALE_MODES  # one base call: the first pass's checkpoint
        named = [
            ("hr_checkpoint_name", latent and self.enable_hr and self.hr_checkpoint_name not in SAME_AS_FIRST_PASS),
        ]
        return [f"{field} is not applied here: the image was made without it" for field, applies in named if applies]

    def churn(self) -> Churn:
        """The churn settings as A1111 1.10's k-diffusion sampler reads them: an ``override_settings`` value (its
        option) other than the default wins, else the field, else the default. A value outside A1111's bounds, or
        an override that is no number, is refused naming its field."""
        values: dict[str, float] = {}
        for key, (default, most) in CHURN_SETTINGS.items():
            field = f"override_settings.{key}"
            value = self.override_settings.get(key, default)
            if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
                raise InvalidInput(f"{field}={value!r} is not a number", field=field)
            if not 0.0 <= value <= most:
                raise InvalidInput(f"{field}={value} is outside 0 to {most:g}", field=field)
            own = getattr(self, key)
            values[key] = float(value) if value != default else (own if own is not None else default)
        return Churn(**values)

    def under(self, options: Mapping[str, object]) -> Txt2ImgRequest:
        """This request as A1111 1.10 runs it under the saved ``options`` (``POST /sdapi/v1/options``): its settings
        while it runs are the saved ones with its ``override_settings`` over them, which ``churn()`` and
        ``cond_padding()`` read (A1111's sampler and CFG denoiser read its options then)."""
        saved = {key: options[key] for key in (*CHURN_SETTINGS, *PADDING_SETTINGS) if key in options}
        return self.model_copy(update={"override_settings": {**saved, **self.override_settings}})

    def cond_padding(self) -> Padding:
        """How a prompt and a negative prompt of different lengths in chunks meet, as A1111 1.10's CFG denoiser
        reads its options: ``pad_cond_uncond_v0`` wins, then ``pad_cond_uncond``; neither, each runs in UNet calls
        of its own. A value that is no boolean is refused naming its field."""
        for key in PADDING_SETTINGS:
            value = self.override_settings.get(key, False)
            if not isinstance(value, bool):
                raise InvalidInput(f"override_settings.{key}={value!r} is not a boolean",
                                   field=f"override_settings.{key}")
        if self.override_settings.get("pad_cond_uncond_v0"):
            return "v0"
        return "empty" if self.override_settings.get("pad_cond_uncond") else "off"

    def churn_unapplied(self, sampler: str, made: str = "the image was made") -> list[str]:
        """A warning for each churn setting that A1111's ``sampler`` would have applied and does not run here: all
        four on Heun and DPM2, s_noise on the ancestral and SDE samplers (Euler runs them; the other samplers take
        none in A1111 either). ``made``: what ran without them (the hires fix's second pass, for its sampler)."""
        churn = self.churn()
        if sampler == "Euler" or not (churn.churns and sampler in TAKES_CHURN
                                      or churn.s_noise != 1.0 and sampler in TAKES_S_NOISE):
            return []
        keys = [key for key, (default, _) in CHURN_SETTINGS.items() if getattr(churn, key) != default
                and (sampler in TAKES_CHURN or key == "s_noise")]
        return [f"{key} is not applied to {sampler} here: {made} without it" for key in keys]

    @property
    def sampler(self) -> str | None:
        """The sampler the client named (A1111 reads ``sampler_name or sampler_index``), or None."""
        return self.sampler_name or self.sampler_index


class Img2ImgRequest(Txt2ImgRequest):
    init_images: list[str] = Field(..., min_length=1, max_length=MAX_IMAGES)
    mask: str | None = None
    mask_blur: int = Field(4, ge=0, le=64, description="the mask's blur (a Gaussian's standard deviation in pixels) "
                           "both ways; when sent, it sets mask_blur_x and mask_blur_y, as in A1111")
    mask_blur_x: int = Field(4, ge=0, le=64, description="the blur along the rows, where mask_blur is not sent")
    mask_blur_y: int = Field(4, ge=0, le=64, description="the blur along the columns, where mask_blur is not sent")
    inpainting_fill: int = Field(0, ge=0, le=3, description="with a mask, what the masked area starts from "
                                 "(A1111's masked content): 0 fill (the image's colours blurred in from around the "
                                 "mask; A1111's API default), 1 original, 2 latent noise, 3 latent nothing")
    inpaint_full_res: bool = Field(True, description="A1111's 'Inpaint area' (its API's default: true): true, "
                                   "'Only masked': the mask's region of the init image (its bounding box once "
                                   "blurred, inpaint_full_res_padding wider, grown to width x height's aspect ratio) "
                                   "is inpainted at width x height and pasted back, the answer at the init image's "
                                   "own size (a blank mask: image-to-image of the whole image, as in A1111); false, "
                                   "'Whole picture': the init image at width x height is inpainted")
    inpaint_full_res_padding: int = Field(0, ge=0, le=4096, description="'Only masked': the pixels added around the "
                                          "mask's bounding box (A1111's API default 0; its page's is 32)")
    inpainting_mask_invert: int = Field(0, ge=0, le=1, description="1: the mask's black area is repainted")
    resize_mode: int = Field(0, ge=0, le=3, description="how init images take the size: 0 stretch, 1 crop and "
                             "resize (cover, centre-crop), 2 resize and fill (fit, edges stretched out), 3 as 0")
    denoising_strength: float = Field(0.75, ge=MIN_STRENGTH, le=1.0)
    include_init_images: bool = Field(False, description="true: the answer's parameters echo init_images and mask")
    image_cfg_scale: float | None = Field(None, description="accepted: only InstructPix2Pix checkpoints read it, "
                                          "as in A1111")
    initial_noise_multiplier: float | None = Field(None, ge=0.0, le=MAX_NOISE_MULTIPLIER, description="the noise "
                                                   "added to the image times this (after the variation seed); "
                                                   "none: the saved option (POST /options), as A1111 reads it")


    def mask_blurs(self) -> tuple[int, int]:
        """The mask's blur along the rows and along the columns: ``mask_blur`` both ways when the client sent it,
        else ``mask_blur_x`` and ``mask_blur_y`` (A1111 sets both from mask_blur when it is a number)."""
        if "mask_blur" in self.model_fields_set:
            return self.mask_blur, self.mask_blur
        return self.mask_blur_x, self.mask_blur_y


class ImagesResponse(BaseModel):
    images: list[str]
    parameters: dict
    info: str


class ExtrasRequest(_A1111):
    image: str
    resize_mode: int = Field(0, ge=0, le=1, description="0: scale by upscaling_resize; 1: to cover _w x _h")
    upscaling_resize: float = Field(2.0, gt=0.0, le=8.0)
    upscaling_resize_w: int = Field(512, ge=8, le=8192)
    upscaling_resize_h: int = Field(512, ge=8, le=8192)
    upscaling_crop: bool = Field(True, description="resize_mode 1: crop the covering image to _w x _h")
    upscaler_1: str = "None"
    upscaler_2: str = "None"
    extras_upscaler_2_visibility: float = Field(0.0, ge=0.0, le=1.0)
    upscaler_2_visibility: float | None = Field(None, ge=0.0, le=1.0, description="seed 004's spelling")
    gfpgan_visibility: float = Field(0.0, ge=0.0, le=1.0)
    codeformer_visibility: float = Field(0.0, ge=0.0, le=1.0)
    codeformer_weight: float = Field(0.0, ge=0.0, le=1.0)


class ExtrasResponse(BaseModel):
    html_info: str
    image: str


class BatchImage(_A1111):
    data: str
    name: str = ""


class ExtrasBatchRequest(ExtrasRequest):
    image: str = ""
    imageList: list[BatchImage] = Field(..., min_length=1, max_length=MAX_IMAGES)


class ExtrasBatchResponse(BaseModel):
    html_info: str
    images: list[str]


class OptionsRequest(_A1111):
    """A1111 clients post whole option sets; the default checkpoint and the answers' file format are what apply
    here."""

    sd_model_checkpoint: str | None = Field(None, max_length=256)
    samples_format: Literal["png", "jpg", "jpeg", "webp"] | None = Field(
        None, description="the file format of the images txt2img, img2img and the extras routes answer")
    jpeg_quality: int | None = Field(None, ge=1, le=100, description="the quality of JPEG and WebP answers")
    webp_lossless: bool | None = Field(None, description="WebP answers lossless (jpeg_quality then sets the effort)")
    return_grid: bool | None = Field(None, description="with save_images and two images or more, the grid of them "
                                     "first in images, as A1111 answers")
    initial_noise_multiplier: float | None = Field(None, ge=0.0, le=MAX_NOISE_MULTIPLIER, description="img2img's "
                                                   "noise multiplier for requests that do not set their own")
    # Euler's churn (A1111 reads these while a request runs: one other than its default wins over the request's
    # field, as an override_settings key does) and how a prompt and a negative prompt of different lengths meet.
    s_churn: float | None = Field(None, ge=0.0, le=MAX_S_CHURN, description="Euler's churn (0: none)")
    s_tmin: float | None = Field(None, ge=0.0, le=MAX_S_TMIN, description="Euler: the least sigma churned")
    s_tmax: float | None = Field(None, ge=0.0, le=MAX_S_TMAX, description="Euler: the largest sigma churned (0: "
                                 "no limit)")
    s_noise: float | None = Field(None, ge=0.0, le=MAX_S_NOISE, description="Euler: the churn noise's scale")
    pad_cond_uncond: bool | None = Field(None, description="a prompt and a negative prompt of different lengths: "
                                         "the shorter padded with the empty prompt's chunks (off: UNet calls of "
                                         "their own)")
    pad_cond_uncond_v0: bool | None = Field(None, description="as pad_cond_uncond, the negative prompt's last "
                                            "vector repeated or the negative prompt cut (wins over "
                                            "pad_cond_uncond)")


class PngInfoRequest(BaseModel):
    image: str


class InterrogateRequest(_A1111):
    image: str = Field("", description="the image, base64 or a data URI")
    model: str = Field("clip", max_length=64, description="the interrogator: 'clip' (a BLIP caption) is the one "
                       "offered here; A1111's 'deepdanbooru' is not")


class Interrogation(BaseModel):
    """A1111's answer to ``/interrogate``: the image's caption."""

    caption: str


# --- the shapes A1111 answers with (its clients read these fields) ------------------------------------------------

class Empty(BaseModel):
    """``{}``: what A1111 answers to an action with nothing to report."""

    model_config = ConfigDict(extra="forbid")


class ProgressState(BaseModel):
    skipped: bool
    interrupted: bool
    job: str
    job_count: int
    job_timestamp: str
    job_no: int
    sampling_step: int
    sampling_steps: int


class Progress(BaseModel):
    progress: float = Field(..., ge=0.0, le=1.0)
    eta_relative: float
    state: ProgressState
    current_image: str | None = Field(None, description="a live latent preview, base64 PNG")
    textinfo: str | None = None


class SdModel(BaseModel):
    title: str
    model_name: str
    hash: str | None
    sha256: str | None
    filename: str
    config: str | None


class SamplerItem(BaseModel):
    name: str
    aliases: list[str]
    options: dict


class SchedulerItem(BaseModel):
    name: str
    label: str
    aliases: list[str] | None
    default_rho: float
    need_inner_model: bool


class UpscalerItem(BaseModel):
    name: str
    model_name: str | None
    model_path: str | None
    model_url: str | None
    scale: float


class FaceRestorerItem(BaseModel):
    name: str
    cmd_dir: str | None


class LoraItem(BaseModel):
    name: str
    alias: str
    path: str | None
    metadata: dict


class Options(BaseModel):
    """The options that apply here; A1111 clients ignore the ones they do not read."""

    model_config = ConfigDict(extra="allow")

    sd_model_checkpoint: str
    samples_format: str
    jpeg_quality: int
    webp_lossless: bool
    return_grid: bool
    initial_noise_multiplier: float


class PngInfo(BaseModel):
    info: str
    items: dict
    parameters: dict


class NamedFile(BaseModel):
    """One item of ``/sd-vae`` and ``/sd-modules``."""

    model_config = ConfigDict(protected_namespaces=())

    model_name: str
    filename: str


class LatentUpscaleMode(BaseModel):
    name: str


class PromptStyle(BaseModel):
    name: str
    prompt: str | None
    negative_prompt: str | None


class Embedding(BaseModel):
    step: int | None
    sd_checkpoint: str | None
    sd_checkpoint_name: str | None
    shape: int
    vectors: int


class Embeddings(BaseModel):
    loaded: dict[str, Embedding]
    skipped: dict[str, Embedding]


class Hypernetwork(BaseModel):
    name: str
    path: str | None


class RealesrganItem(BaseModel):
    name: str
    path: str | None
    scale: int | None


class ScriptsList(BaseModel):
    txt2img: list[str]
    img2img: list[str]


class ScriptArg(BaseModel):
    label: str | None = None
    value: Any = None
    minimum: Any = None
    maximum: Any = None
    step: Any = None
    choices: list[str] | None = None


class ScriptInfo(BaseModel):
    name: str | None
    is_alwayson: bool | None
    is_img2img: bool | None
    args: list[ScriptArg]


class Extension(BaseModel):
    name: str
    remote: str
    branch: str
    commit_hash: str
    version: str
    commit_date: str
    enabled: bool


class CmdFlags(BaseModel):
    """The command-line flags of A1111 that have a counterpart here; clients read them with defaults."""

    model_config = ConfigDict(extra="allow")

    api: bool
    nowebui: bool
    listen: bool
    port: int
    server_name: str | None


class Ram(BaseModel):
    free: float
    used: float
    total: float


class Memory(BaseModel):
    ram: Ram
    cuda: dict = Field(..., description="system/active/allocated/reserved/inactive/events bytes, or {'error': ...}")
