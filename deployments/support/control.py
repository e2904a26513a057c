"""ControlNet for the SDXL base: the units a request names, their preprocessors, and the pipeline that runs them.

An SDXL ControlNet fits any SDXL base, so a replica loads its ControlNets once (``ControlNets``, on its device and
dtype) and every checkpoint it holds shares them. A request with control units runs on the ControlNet variant of
its mode's pipeline (text-to-image, image-to-image or inpainting), built from the checkpoint's own modules: no
second UNet, VAE or text encoder. The units run as one ``MultiControlNetModel`` (``injection.Injected``), which
scales and masks each unit's residuals as the extension's control mode says.

This module is imported by the ingress too (``ControlUnit`` travels in ``GenerationRequest``): torch, diffusers and
OpenCV are imported where they are used, never at the top.
"""

from __future__ import annotations

import logging
import weakref
from collections.abc import Callable, Collection, Mapping
from typing import TYPE_CHECKING, Any, Literal, NamedTuple

import numpy as np
from PIL import Image, ImageOps
from pydantic import BaseModel, ConfigDict, Field, model_validator

from deployments.support import depth, lineart, mlsd, model_free, pose, pose_parts, softedge
from deployments.support.control_maps import frame_map
from deployments.support.errors import InvalidInput, UnknownModel
from deployments.support.imaging import Fit, to_rgb

if TYPE_CHECKING:
    import torch

    from deployments.support.config import SDXLBaseConfig
    from deployments.support.settings import Settings

logger = logging.getLogger(__name__)

MAX_UNITS = 4  # A1111's extension shows 3 units by default; each one is a ControlNet pass per step
MODEL_FREE = ("none", "canny", "invert", "lineart_standard", *model_free.MODULES)
# Every preprocessor, in the order they are listed: the depth, line-art, pose, soft-edge and M-LSD ones with a model
# where it is configured.
PREPROCESSORS = ("none", "canny", "invert", *depth.DEPTH_MODULES, *lineart.LINEART_MODULES, *pose.POSE_MODULES,
                 *softedge.SOFTEDGE_MODULES, *mlsd.MLSD_MODULES, *model_free.MODULES)
Preprocessor = Literal["none", "canny", "invert", "depth_midas", "depth_anything", "depth_anything_v2",
                       "lineart_standard", "lineart_realistic", "lineart_coarse", "lineart_anime", "openpose",
                       "openpose_hand", "openpose_face", "openpose_faceonly", "openpose_full", "softedge_hed",
                       "softedge_hedsafe", "softedge_pidinet", "softedge_pidisafe", "scribble_hed",
                       "scribble_pidinet", "mlsd", "threshold", "scribble_xdog", "blur_gaussian", "tile_resample",
                       "recolor_luminance", "recolor_intensity", "shuffle", "t2ia_color_grid", "tile_colorfix",
                       "tile_colorfix+sharp"]
# A preprocessor's model (a depth estimator, a line-art network, the pose network, an edge network, M-LSD's): an
# image at the processor resolution (and for mlsd its two thresholds) -> its map.
Mapper = Callable[..., Image.Image]


class Slider(NamedTuple):
    """One of a preprocessor's sliders in A1111's extension: its label, default and bounds, and its step."""

    label: str
    default: float
    low: float
    high: float
    step: float = 1

    @property
    def shown(self) -> bool:
        """False for a value the extension fixes (shuffle's resolution): no slider, whatever is sent runs at it."""
        return self.low < self.high


def _resolution(bounds: tuple[int, int, int], step: float = 8) -> Slider:
    return Slider("Preprocessor Resolution", *bounds, step)


# The extension's sliders of each preprocessor, as its units read them: (processor_res, threshold_a, threshold_b),
# None where the module reads no such value. Labels, defaults and bounds are its preprocessor_sliders_config's (the
# same as its newer preprocessor classes'); a step is the config's, else 1 (8 for a resolution configured per module,
# as the newer classes step it; the line-art and PiDiNet modules have none configured: the default slider's 1).
RESOLUTION = _resolution((512, 64, 2048))
SLIDERS: dict[str, tuple[Slider | None, Slider | None, Slider | None]] = {
    "none": (None, None, None),
    "canny": (RESOLUTION, Slider("Canny Low Threshold", 100, 1, 255), Slider("Canny High Threshold", 200, 1, 255)),
    "invert": (None, None, None),
    **{m: (_resolution(depth.DEPTH_RES), None, None) for m in depth.DEPTH_MODULES},
    **{m: (_resolution(lineart.LINEART_RES, 1), None, None) for m in lineart.LINEART_MODULES},
    **{m: (_resolution(pose.POSE_RES), None, None) for m in pose.POSE_MODULES},
    # The HED modules' resolution is configured; the PiDiNet ones have none (the default slider's step).
    **{m: (_resolution(softedge.SOFTEDGE_RES, 8 if softedge.ARCHITECTURES[m] == "hed" else 1), None, None)
       for m in softedge.SOFTEDGE_MODULES},
    "threshold": (RESOLUTION, Slider("Binarization Threshold", 127, 0, 255), None),
    "scribble_xdog": (RESOLUTION, Slider("XDoG Threshold", 32, 1, 64), None),
    "blur_gaussian": (RESOLUTION, Slider("Sigma", 9.0, 0.01, 64.0), None),
    "tile_resample": (None, Slider("Down Sampling Rate", 1.0, 1.0, 8.0, 0.01), None),
    "recolor_luminance": (None, Slider("Gamma Correction", 1.0, 0.1, 2.0, 0.001), None),
    "recolor_intensity": (None, Slider("Gamma Correction", 1.0, 0.1, 2.0, 0.001), None),
    "shuffle": (_resolution((model_free.SHUFFLE_RES,) * 3), None, None),
    "t2ia_color_grid": (RESOLUTION, None, None),
    "tile_colorfix": (None, Slider("Variation", 8.0, 3.0, 32.0), None),
    "tile_colorfix+sharp": (None, Slider("Variation", 8.0, 3.0, 32.0), Slider("Sharpness", 1.0, 0.0, 2.0, 0.01)),
    **{m: (_resolution(mlsd.MLSD_RES), Slider("MLSD Value Threshold", *mlsd.VALUE_THRESHOLD, 0.01),
           Slider("MLSD Distance Threshold", *mlsd.DISTANCE_THRESHOLD, 0.01)) for m in mlsd.MLSD_MODULES},
}
SLOTS = ("processor_res", "threshold_a", "threshold_b")  # a unit's fields, in the order of SLIDERS' rows


def _union(slot: int) -> tuple[float, float]:
    """The smallest and largest value any module's slider in ``slot`` takes."""
    found = [row[slot] for row in SLIDERS.values() if row[slot] is not None]
    return min(s.low for s in found), max(s.high for s in found)  # type: ignore[union-attr]


# The smallest and largest value of processor_res, threshold_a and threshold_b over every module's sliders.
BOUNDS = tuple(_union(slot) for slot in range(len(SLOTS)))
ControlMode = Literal["balanced", "prompt", "control"]
# The pipeline arguments a ControlNet pass adds (``image`` too, for text-to-image: it is the control image there).
KWARGS = ("control_image", "controlnet_conditioning_scale", "control_guidance_start", "control_guidance_end")
# The preprocessors that run a model, and what each needs (the base's ``preprocessors`` configures it).
MODELS = {**{m: "a depth model" for m in depth.DEPTH_MODULES}, **{m: "a line-art model" for m in lineart.MODEL_MODULES},
          **{m: pose_parts.needs(m) for m in pose.POSE_MODULES},
          **{m: f"the {softedge.NETWORKS[softedge.ARCHITECTURES[m]]} network" for m in softedge.SOFTEDGE_MODULES},
          **{m: "M-LSD's line network" for m in mlsd.MLSD_MODULES}}
# A map's largest size in pixels: one at the sliders' largest resolution (2048) twice as long as it is wide.
MAX_MAP_PIXELS = 2 * int(RESOLUTION.high) ** 2
# The preprocessors that read processor_res, and its slider's (default, min, max) for each.
PROCESSOR_RES = {m: (int(row[0].default), int(row[0].low), int(row[0].high))
                 for m, row in SLIDERS.items() if row[0] is not None}


def read(module: str, processor_res: int, threshold_a: float | None, threshold_b: float | None) -> dict:
    """The slider values a unit of ``module`` keeps: those it reads as given (a threshold None: its default), the
    others neutral (processor_res at the default resolution, a threshold None), so that two units that run alike
    are equal."""
    row = SLIDERS[module]
    return {"processor_res": processor_res if row[0] is not None and row[0].shown else int(RESOLUTION.default),
            "threshold_a": slider_value(module, 1, threshold_a) if row[1] is not None else None,
            "threshold_b": slider_value(module, 2, threshold_b) if row[2] is not None else None}


def slider_value(module: str, slot: int, value: float | None) -> float:
    """``value`` for ``module``'s slider in ``slot``, its default where None (0 where it has no such slider)."""
    slider = SLIDERS[module][slot]
    return value if value is not None else slider.default if slider is not None else 0.0


def out_of_bounds(module: str, slot: int, value: float | None, name: str | None = None) -> str | None:
    """Why ``value`` is not one of ``module``'s slider in ``slot`` (None: it is, or None, or the module reads no
    such value), naming it as ``name`` (the slot's field by default)."""
    slider, name = SLIDERS[module][slot], name or SLOTS[slot]
    if slider is None or value is None or slider.low <= value <= slider.high:
        return None
    if not slider.shown:
        return f"{name}={value:g} is not read: {module} runs at {slider.default:g}, as the extension fixes it"
    return f"{name}={value:g} is outside {module}'s {slider.low:g} to {slider.high:g}"


def shuffle_seed(seed: int, subseed: int = -1, strength: float = 0.0) -> int:
    """The numpy seed of shuffle's noise, as the extension's ``set_numpy_seed`` makes it: the first image's seed
    plus the variation seed (-1, or a variation ``strength`` of 0: the first image's seed again), kept to 32 bits.
    A1111's routes draw a variation seed that a strength of 0 leaves unused: that one is not read, so a request with
    a fixed seed makes one map."""
    return (seed + (subseed if subseed != -1 and strength > 0 else seed)) & 0xFFFFFFFF


def seeded(units: list[ControlUnit], seed: int) -> list[ControlUnit]:
    """``units``, each shuffle unit without a seed of its own given ``seed``."""
    return [u.model_copy(update={"seed": seed}) if u.module == "shuffle" and u.seed is None else u for u in units]


class ControlUnit(BaseModel):
    """One ControlNet unit of a request: which ControlNet, on what image, how strongly and over which steps."""

    model_config = ConfigDict(arbitrary_types_allowed=True, extra="forbid", frozen=True)

    model: str = Field(..., min_length=1, max_length=128, description="a name of the base's `controlnets`")
    image: Image.Image | None = Field(None, description="the control image (before preprocessing); None: the "
                                      "request's init image (image-to-image and inpainting only), as A1111 does")
    module: Preprocessor = Field("none", description="the preprocessor: none (the image as sent), canny, invert, "
                                 "depth_midas, depth_anything, depth_anything_v2 (a configured depth model's map), "
                                 "lineart_standard, lineart_realistic, lineart_coarse, lineart_anime (line art, the "
                                 "last three by a configured network), openpose (the bodies OpenPose's configured "
                                 "body network finds), openpose_hand, openpose_face, openpose_full (with their "
                                 "hands, faces, or both, by its configured hand and face networks), "
                                 "openpose_faceonly (the faces alone), softedge_hed, softedge_hedsafe, "
                                 "softedge_pidinet, "
                                 "softedge_pidisafe, scribble_hed, scribble_pidinet (soft edges or bold scribbles "
                                 "by a configured HED or PiDiNet network), mlsd (the straight lines M-LSD's "
                                 "configured network finds), and the model-free threshold, "
                                 "scribble_xdog, blur_gaussian, tile_resample, recolor_luminance, recolor_intensity "
                                 "(whose map goes back into the finished images too: ``recolors``), shuffle, "
                                 "t2ia_color_grid (``model_free``), tile_colorfix, tile_colorfix+sharp (the image "
                                 "as it is, and its colours kept through the sampling: ``colorfix``)")
    conditioning_scale: float = Field(1.0, ge=0.0, le=2.0, description="A1111's weight: the residuals' scale")
    guidance_start: float = Field(0.0, ge=0.0, le=1.0, description="the fraction of the steps where it starts")
    guidance_end: float = Field(1.0, ge=0.0, le=1.0, description="the fraction of the steps where it stops")
    resize_mode: Fit = Field("crop", description="how the control map takes the generation size: stretch, crop "
                             "(cover, centre-crop: A1111's default 'Crop and Resize') or fill (fit, centred on the "
                             "map's median border colour)")
    processor_res: int = Field(int(RESOLUTION.default), ge=BOUNDS[0][0], le=BOUNDS[0][1], description="the shorter "
                               "side the image is resized to before its map is made, for a module that reads it "
                               "(SLIDERS), within that module's bounds")
    threshold_a: float | None = Field(None, ge=BOUNDS[1][0], le=BOUNDS[1][1], description="the module's first "
                                      "slider (SLIDERS: canny's low threshold, threshold's level, a sigma, a rate, "
                                      "a gamma), within its bounds; None: its default")
    threshold_b: float | None = Field(None, ge=BOUNDS[2][0], le=BOUNDS[2][1], description="the module's second "
                                      "slider (canny's high threshold), within its bounds; None: its default")
    seed: int | None = Field(None, ge=0, le=0xFFFFFFFF, description="shuffle's numpy seed; None: the request's "
                             "(``shuffle_seed`` of its first image's seed and its variation seed), as the extension "
                             "seeds it. A hires fix's second pass is given the first pass's")
    passes: Literal["both", "first", "second"] = Field("both", description="with a hires fix, the passes it "
                                                       "guides (A1111's hr_option): both, the first, the second")
    control_mode: ControlMode = Field("balanced", description="the extension's control mode: balanced, prompt (My "
                                      "prompt is more important: soft residual weights) or control (ControlNet is "
                                      "more important: soft weights, the conditional rows alone)")
    pixel_perfect: bool = Field(False, description="the resolution of a module that reads processor_res (shuffle "
                                "too) computed from the image's size, the generation size and the resize mode, as "
                                "the extension's Pixel Perfect computes it (processor_res is then not read)")
    pixel_target: tuple[int, int] | None = Field(None, description="pixel_perfect's target size (width, height); "
                                                 "None: the generation size. A hires fix's second pass keeps the "
                                                 "first pass's, as the extension computes it once a request")
    hires_pass: bool = Field(False, description="it guides a hires fix's second pass, where canny takes the soft "
                             "weights whatever the control mode, as the extension forces them there")
    crop_to_mask: bool = Field(True, description="'Only masked' inpainting (inpaint_area masked): its image is "
                               "framed at the init image's size and cut to the inpainted region, as the init image "
                               "is (the extension's inpaint_crop_input_image); false: framed whole")

    @model_validator(mode="before")
    @classmethod
    def _module_defaults(cls, data: Any) -> Any:
        """A threshold the module reads and was not given (or given None) is its slider's default."""
        module = data.get("module", "none") if isinstance(data, dict) else None
        row = SLIDERS.get(module, (None, None, None)) if isinstance(module, str) else ()  # else the field refuses it
        for slot, slider in enumerate(row):
            if slot and slider is not None and data.get(SLOTS[slot]) is None:
                data = {**data, SLOTS[slot]: slider.default}
        return data

    @model_validator(mode="after")
    def _guidance_in_order(self) -> ControlUnit:
        if self.guidance_start > self.guidance_end:
            raise ValueError(f"guidance_start={self.guidance_start} is after guidance_end={self.guidance_end}")
        return self

    @model_validator(mode="after")
    def _within_the_modules_sliders(self) -> ControlUnit:
        """Each value the module reads within its slider's bounds (the fields' own bounds are every module's)."""
        for slot, field in enumerate(SLOTS):
            why = out_of_bounds(self.module, slot, getattr(self, field))
            if why is not None:
                raise ValueError(why)
        return self


def at_resolution(image: Image.Image, resolution: int) -> Image.Image:
    """``image`` scaled (aspect kept) so that its shorter side is ``resolution``, as A1111's extension sizes a
    preprocessor's input: OpenCV's area filter to shrink, cubic to enlarge."""
    import cv2

    size = _scaled(image, resolution)
    if size == image.size:
        return image
    method = cv2.INTER_AREA if resolution < min(image.size) else cv2.INTER_CUBIC
    return Image.fromarray(cv2.resize(np.asarray(image), size, interpolation=method))


def pixel_perfect_resolution(size: tuple[int, int], width: int, height: int, fit: Fit) -> int:
    """The preprocessor resolution the extension's Pixel Perfect gives an image of ``size`` framed at ``width`` x
    ``height`` (its ``pixel_perfect_resolution``): the image's shorter side times the smaller of the two scale factors
    for Resize and Fill (the whole image fits), the larger otherwise (the target is covered), rounded half to even as
    numpy rounds."""
    scales = (height / size[1], width / size[0])
    scale = min(scales) if fit == "fill" else max(scales)
    return max(1, round(scale * min(size)))


def offered(configured: Collection[str]) -> list[str]:
    """The preprocessors requests may name: the model-free ones, and each depth, line-art, pose, soft-edge and M-LSD
    module whose model is configured (``configured``: the base's ``preprocessors``)."""
    return [m for m in PREPROCESSORS if m in MODEL_FREE or m in configured]


def _scaled(image: Image.Image, resolution: int) -> tuple[int, int]:
    scale = resolution / min(image.size)
    return max(1, round(image.width * scale)), max(1, round(image.height * scale))


def map_size(image: Image.Image, resolution: int, field: str = "control.image") -> tuple[int, int]:
    """The size ``at_resolution`` gives ``image``; refused, naming ``field``, past ``MAX_MAP_PIXELS``. The shorter side
    sets the scale, so a long strip makes a map as long as the strip's aspect: a 3000 x 20 upload at 512 would be
    76800 x 512, tens of GB of a network's activations."""
    size = _scaled(image, resolution)
    if size[0] * size[1] > MAX_MAP_PIXELS:
        raise InvalidInput(f"a {image.width}x{image.height} image at preprocessor resolution {resolution} makes a "
                           f"{size[0]}x{size[1]} map: at most {MAX_MAP_PIXELS // 2**20} MP (a less elongated image, "
                           "or a lower resolution)", field=field)
    return size


def _model(models: Mapping[str, Mapper] | None, module: str, field: str = "control.module") -> Mapper:
    """``module``'s model; a module whose model is not configured is refused, naming ``field``."""
    found = (models or {}).get(module)
    if found is None:
        raise UnknownModel(f"ControlNet preprocessor {module!r} needs {MODELS[module]}, and none is configured for it",
                           field=field, details={"choices": sorted(models or {})})
    return found


def detect(image: Image.Image, module: Preprocessor, resolution: int = int(RESOLUTION.default),
           a: float | None = None, b: float | None = None, estimators: Mapping[str, Mapper] | None = None,
           field: str = "control.image", seed: int = 0) -> Image.Image:
    """The control map a preprocessor makes of ``image`` (RGB), at the size it works at: a module that reads
    processor_res (``PROCESSOR_RES``) at ``resolution`` (canny: white edges on black, thresholds ``a`` and ``b``; a
    module with a model by its model in ``estimators``, the configured preprocessors' models by module;
    ``lineart_standard`` and the ``model_free`` ones need none), the others at the image's own size. ``a`` and
    ``b``: the module's threshold_a and threshold_b (None: its defaults; mlsd's value and distance thresholds);
    ``seed``: shuffle's (``shuffle_seed``; /controlnet/detect, which sends none, runs at 0). A map past
    ``MAX_MAP_PIXELS`` is refused, naming ``field``."""
    rgb = to_rgb(image)
    if module in PROCESSOR_RES:
        map_size(rgb, resolution, field)
    low, high = slider_value(module, 1, a), slider_value(module, 2, b)
    if module == "lineart_standard":
        return lineart.standard(at_resolution(rgb, resolution))
    if module in mlsd.MLSD_MODULES:
        return _model(estimators, module)(at_resolution(rgb, resolution), low, high)
    if module in MODELS:
        return _model(estimators, module)(at_resolution(rgb, resolution))
    if module == "canny":
        import cv2

        edges = cv2.Canny(np.asarray(at_resolution(rgb, resolution)), low, high)
        return Image.fromarray(edges).convert("RGB")
    if module in model_free.MODULES:
        sized = at_resolution(rgb, resolution) if module in model_free.AT_RESOLUTION else rgb
        return Image.fromarray(model_free.make(module, np.asarray(sized), resolution, low, seed))
    if module == "invert":  # A1111's "invert (from white bg & black line)": line art drawn black on white
        return ImageOps.invert(rgb)
    return rgb


def control_image(unit: ControlUnit, fallback: Image.Image | None, width: int, height: int,
                  estimators: Mapping[str, Mapper] | None = None, seed: int = 0) -> Image.Image:
    """A unit's control map at the generation size, framed by its resize mode as the extension frames a detected map
    (``control_maps.frame_map``; the image itself for ``none``); a module that reads processor_res at
    ``resolution(...)`` (those that run a model by their models in ``estimators``); shuffle drawn from the
    unit's seed, else ``seed`` (the request's, ``shuffle_seed``)."""
    source = unit.image if unit.image is not None else fallback
    if source is None:
        raise InvalidInput("a ControlNet unit needs an image in text-to-image", field="control.image")
    mapped = detect(source, unit.module, resolution(unit, source, width, height), unit.threshold_a, unit.threshold_b,
                    estimators, seed=unit.seed if unit.seed is not None else seed)
    return frame_map(mapped, width, height, unit.resize_mode)


def recolors(units: list[ControlUnit], fallback: Image.Image | None, width: int,
             height: int) -> list[model_free.Recolor]:
    """What the recolor units among ``units`` put back into the finished images (``model_free.Recolor``), in their
    order: each one's map framed at the finished images' size (``width`` x ``height``: a hires fix's), as its
    ControlNet reads it, its first channel. Every recolor unit counts, whatever its weight, guidance range or hires
    pass: the extension's post-processing reads none of them."""
    return [model_free.Recolor(unit.module == "recolor_luminance",
                               np.asarray(control_image(unit, fallback, width, height))[:, :, 0].copy())
            for unit in units if unit.module in model_free.RECOLOR]


def resolution(unit: ControlUnit, source: Image.Image, width: int, height: int) -> int:
    """The resolution a unit's preprocessor runs at on ``source``: its processor_res, or with pixel_perfect the
    extension's estimate for its target (``pixel_target``, else ``width`` x ``height``). A1111's img2img gives a unit
    without an image the upload itself (``a1111_controlnet.from_upload``), so it estimates from the upload's size as
    the extension does; elsewhere such a unit reads the init image as framed at the generation size."""
    if not unit.pixel_perfect:
        return unit.processor_res
    target = unit.pixel_target or (width, height)
    # At most the slider's largest: a small image framed at a large size would otherwise run at any resolution.
    return min(pixel_perfect_resolution(source.size, *target, unit.resize_mode), int(RESOLUTION.high))


def check(units: list[ControlUnit], mode: str, denoising_end: float | None) -> None:
    """What no pipeline can run: a unit without an image in text-to-image, and an image-to-image pass that stops
    early for the refiner (diffusers' ControlNet image-to-image pipeline has no ``denoising_end``)."""
    if len(units) > MAX_UNITS:
        raise InvalidInput(f"{len(units)} ControlNet units: at most {MAX_UNITS}", field="control")
    for i, unit in enumerate(units):
        if unit.image is None and mode == "txt2img":
            raise InvalidInput(f"ControlNet unit {i} has no image (text-to-image has no init image to use)",
                               field=f"control[{i}].image")
    if units and mode == "img2img" and denoising_end is not None:
        raise InvalidInput("ControlNet image-to-image cannot stop early for the refiner", field="control")


class _SameControlForEveryPrompt(logging.Filter):
    """diffusers warns on every call of a MultiControlNet pipeline given a list of prompts that the control images
    are the same for each of them: what a request's units mean here (one unit runs as a MultiControlNet too)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "ControlNets and you have passed" not in record.getMessage()


class ControlNets:
    """The ControlNets of one replica by name, loaded once on its device and dtype, and the ControlNet pipelines
    each held checkpoint runs them with (made on first use from its modules, kept while it is held); with the
    preprocessors' models, loaded with them: the depth estimators (``depth``), line-art networks (``lineart``), the
    pose estimator (``pose``), the soft-edge networks (``softedge``) and the line detector (``mlsd``), by module (all
    in ``preprocessors``)."""

    def __init__(self, config: SDXLBaseConfig, device: torch.device, dtype: torch.dtype,
                 settings: Settings | None = None) -> None:
        from deployments.support.checkpoints import model_hash
        from deployments.weights import loader

        self.models: dict = {}
        self.titles: list[str] = []  # as the extension lists them: "name [hash]" (A1111's old hash of the weights)
        for name, source in config.controlnets.items():
            folder = loader.resolve(source, settings)
            self.models[name] = loader.load_controlnet(str(folder), dtype, settings, name).to(device).eval()
            self.titles.append(f"{name} [{model_hash(loader.controlnet_weights(folder, dtype))}]")
        # At start, as the ControlNets: a bad folder fails the replica, not a request, and no request waits on a load.
        sources = config.preprocessors
        self.depth = depth.load({m: s for m, s in sources.items() if m in depth.DEPTH_MODULES}, device, dtype, settings)
        self.lineart = lineart.load({m: s for m, s in sources.items() if m in lineart.MODEL_MODULES}, device, settings)
        self.pose = pose.load({m: s for m, s in sources.items() if m in pose.POSE_MODULES}, device, settings)
        self.softedge = softedge.load({m: s for m, s in sources.items() if m in softedge.SOFTEDGE_MODULES}, device,
                                      settings)
        self.mlsd = mlsd.load({m: s for m, s in sources.items() if m in mlsd.MLSD_MODULES}, device, settings)
        # checkpoint pipelines -> (mode, ControlNet names) -> its ControlNet pipeline; an evicted checkpoint's go
        # with it (weak keys), so that they never keep its modules alive.
        self._pipelines: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()

    @property
    def names(self) -> list[str]:
        return list(self.models)

    @property
    def preprocessors(self) -> dict[str, Mapper]:
        """The preprocessors' models loaded, by module."""
        return {**self.depth, **self.lineart, **self.pose, **self.softedge, **self.mlsd}

    @property
    def modules(self) -> list[str]:
        """The preprocessors offered: the model-free ones and those whose models are loaded."""
        return offered(self.preprocessors)

    def resolve(self, units: list[ControlUnit], field: str = "control"):
        """The ControlNet of each unit, by name; an unknown name, or a preprocessor whose model is not configured, is
        refused naming the unit's field."""
        out = []
        for i, unit in enumerate(units):
            if unit.module not in self.modules:
                raise UnknownModel(f"ControlNet preprocessor {unit.module!r} is not offered here",
                                   field=f"{field}[{i}].module", details={"choices": self.modules})
            model = self.models.get(unit.model)
            if model is None:
                raise UnknownModel(f"unknown ControlNet {unit.model!r}", field=f"{field}[{i}].model",
                                   details={"choices": self.names})
            out.append(model)
        return out

    def pipeline(self, pipes, mode: str, units: list[ControlUnit]):
        """``mode``'s pipeline of the checkpoint ``pipes``: its own without units, else its ControlNet variant with
        the units' ControlNets (as one ``injection.Injected``, one unit too), sharing every module of it."""
        plain = {"txt2img": pipes.txt2img, "img2img": pipes.img2img, "inpaint": pipes.inpaint}[mode]
        self.resolve(units)  # every name is checked, the units that apply at no step too
        units = active(units)
        if not units:
            return plain
        from diffusers import (
            StableDiffusionXLControlNetImg2ImgPipeline,
            StableDiffusionXLControlNetInpaintPipeline,
            StableDiffusionXLControlNetPipeline,
        )

        from deployments.support.injection import Injected

        nets = self.resolve(units)
        key = (mode, tuple(u.model for u in units))
        made = self._pipelines.setdefault(pipes, {})
        if key not in made:
            cls = {"txt2img": StableDiffusionXLControlNetPipeline,
                   "img2img": StableDiffusionXLControlNetImg2ImgPipeline,
                   "inpaint": StableDiffusionXLControlNetInpaintPipeline}[mode]
            # In the checkpoint's dtype, which diffusers would otherwise turn to float32 (see ``Pipelines``).
            pipe = cls.from_pipe(pipes.txt2img, controlnet=Injected(nets), dtype=pipes.txt2img.dtype)
            pipe.set_progress_bar_config(disable=True)
            quiet = logging.getLogger(cls.__module__)
            if not any(isinstance(f, _SameControlForEveryPrompt) for f in quiet.filters):
                quiet.addFilter(_SameControlForEveryPrompt())
            made[key] = pipe
        return made[key]

    def kwargs(self, mode: str, units: list[ControlUnit], init: Image.Image | None, width: int,
               height: int, seed: int = 0) -> dict:
        """The pipeline arguments of a request's units: each control map at the generation size (a unit without an
        image takes ``init``, the request's framed init image; shuffle's drawn from ``seed``, the request's
        ``shuffle_seed``, where the unit has none), scales and guidance ranges, a list of each (the pipeline's
        ControlNet is a ``MultiControlNetModel``, one unit too)."""
        units = active(units)
        if not units:
            return {}
        models = self.preprocessors
        images = [control_image(u, init, width, height, models, seed) for u in units]
        out: dict = dict(image=images, controlnet_conditioning_scale=[u.conditioning_scale for u in units],
                         control_guidance_start=[u.guidance_start for u in units],
                         control_guidance_end=[u.guidance_end for u in units])
        if mode != "txt2img":  # there ``image`` is the init image; the control map is ``control_image``
            out["control_image"] = out.pop("image")
        return out


def first_pass(units: list[ControlUnit], hires: bool) -> list[ControlUnit]:
    """The units that guide a request's first pass: all of them, but with a hires fix those for its second alone."""
    return [u for u in units if u.passes != "second"] if hires else units


def second_pass(units: list[ControlUnit], first: tuple[int, int] | None = None) -> list[ControlUnit]:
    """The units that guide a hires fix's second pass, each then guiding all of that pass, marked as in it (canny's
    soft weights); with ``first`` (the first pass's width and height) a pixel-perfect unit keeps its resolution for
    it, as the extension preprocesses once for both passes."""
    return [u.model_copy(update={"passes": "both", "hires_pass": True,
                                 "pixel_target": u.pixel_target or (first if u.pixel_perfect else None)})
            for u in units if u.passes != "first"]


def active(units: list[ControlUnit]) -> list[ControlUnit]:
    """The units that apply at some step: one whose guidance range is empty (start at its end, as A1111 accepts)
    applies at none, and diffusers refuses such a range."""
    return [u for u in units if u.guidance_start < u.guidance_end]


def dropped(kwargs: dict) -> dict:
    """``kwargs`` without a ControlNet pass's arguments (for a plain pipeline: A1111's latent hires pass)."""
    return {k: v for k, v in kwargs.items() if k not in KWARGS}
