"""A1111's ControlNet extension (Mikubill/sd-webui-controlnet), as its API clients drive it: the units of
``alwayson_scripts.ControlNet.args`` on txt2img and img2img.

A unit names one of the base's ``controlnets`` (as ``/controlnet/model_list`` lists them; A1111's ``"name [hash]"`` is
accepted too) and a preprocessor (``module``: none, canny, invert, ``lineart_standard``, and the depth, line-art, pose,
soft-edge and M-LSD modules whose model the base has: ``depth_midas`` (or ``depth``), ``depth_anything``,
``depth_anything_v2``, ``lineart_realistic`` (or ``lineart``), ``lineart_coarse``, ``lineart_anime``, ``openpose``,
``openpose_hand``, ``openpose_face``, ``openpose_faceonly``, ``openpose_full`` (the extension's DWPose and animal pose
modules are refused), ``softedge_hed`` (or ``hed``), ``softedge_hedsafe`` (``hed_safe``), ``softedge_pidinet``
(``pidinet``), ``softedge_pidisafe`` (``pidinet_safe``), ``scribble_hed`` (``fake_scribble``), ``scribble_pidinet``
(``pidinet_scribble``), ``mlsd``, and the model-free ``threshold``, ``scribble_xdog``, ``blur_gaussian``,
``tile_resample``, ``recolor_luminance``, ``recolor_intensity``, ``shuffle``, ``t2ia_color_grid`` (or ``color``),
``tile_colorfix`` and ``tile_colorfix+sharp``; the extension's labels are taken too). Its ``processor_res``,
``threshold_a`` and ``threshold_b`` are read as each module's sliders (``control.SLIDERS``), reset as the extension
resets them. ``control_mode`` and ``pixel_perfect`` run as the extension runs them
(``deployments/support/injection.py``, ``control.resolution``); a recolor unit's map goes back into the finished images
as the extension's post-processing puts it (``control.recolors``), and a colour-fix unit corrects every UNet output as
the extension's hook does (``colorfix``); a unit's ``mask``, which the extension draws with as the control image, is
named in the answer's warnings and not applied; ``low_vram`` means nothing here. The routes are in
``graphs/api/controlnet.py``.
"""

from __future__ import annotations

from collections.abc import Collection
from typing import TYPE_CHECKING, Any

from pydantic import Field, ValidationError

from deployments.support.control import (
    MAX_UNITS,
    MODEL_FREE,
    SLIDERS,
    ControlMode,
    ControlUnit,
    out_of_bounds,
    read,
)
from deployments.support.depth import ALIASES
from deployments.support.errors import InvalidInput, UnknownModel
from deployments.support.lineart import ALIASES as LINEART_ALIASES
from deployments.support.mlsd import MLSD_MODULES
from deployments.support.model_free import ALIASES as MODEL_FREE_ALIASES
from deployments.support.pose import POSE_MODULES, UNSERVED
from deployments.support.pose_parts import needs
from deployments.support.softedge import ALIASES as SOFTEDGE_ALIASES
from graphs.api.a1111_models import _A1111, Txt2ImgRequest
from graphs.api.a1111_models import EXTENSION_SCRIPTS as SCRIPT
from graphs.api.fields import image_field

if TYPE_CHECKING:
    from PIL import Image

    from deployments.support.imaging import Fit

MAX_ARGS = 16  # units sent, disabled ones included
# The extension's resize modes by number and by name (its older names too) -> the frame the control map takes.
RESIZE_MODES: dict[Any, str] = {
    0: "stretch", 1: "crop", 2: "fill", "Just Resize": "stretch", "Crop and Resize": "crop", "Resize and Fill": "fill",
    "Inner Fit (Scale to Fit)": "crop", "Scale to Fit (Inner Fit)": "crop", "Outer Fit (Shrink to Fit)": "fill",
    "Envelope (Outer Fit)": "fill",
}
RESIZE_LABELS = {"stretch": "Just Resize", "crop": "Crop and Resize", "fill": "Resize and Fill"}
CONTROL_MODES: dict[Any, str] = {0: "Balanced", 1: "My prompt is more important", 2: "ControlNet is more important"}
MODE_OF: dict[str, ControlMode] = {"Balanced": "balanced", "My prompt is more important": "prompt",
                                   "ControlNet is more important": "control"}
# The extension's HiResFixOption by index and by value -> the passes of a hires fix a unit guides (without a hires
# fix, every unit guides the one pass, as the extension reads it).
HR_OPTIONS: dict[Any, str] = {0: "both", 1: "first", 2: "second", "Both": "both", "Low res only": "first",
                              "High res only": "second"}
MODULES = {"none": "none", "canny": "canny", "invert": "invert", "invert (from white bg & black line)": "invert",
           **ALIASES, **LINEART_ALIASES, **SOFTEDGE_ALIASES,
           **{m: m for m in (*POSE_MODULES, *MLSD_MODULES)},  # openpose, mlsd: the extension's keys and labels
           **MODEL_FREE_ALIASES}  # t2ia_color_grid's key is color


class A1111Unit(_A1111):
    """One unit as the extension's API takes it (``ControlNetUnit``), with its defaults."""

    enabled: bool = Field(True, description="false: the unit is ignored")
    module: str = Field("none", max_length=128, description="the preprocessor (GET /controlnet/module_list)")
    model: str = Field("None", max_length=256, description="GET /controlnet/model_list; 'None': no ControlNet")
    weight: float = Field(1.0, ge=0.0, le=2.0)
    image: str | dict | list | None = Field(None, description="base64 or a data URI, or {'image': ..., 'mask': ...}"
                                            "; none on img2img: the init image")
    input_image: str | None = Field(None, description="the extension's older spelling of image")
    mask: str | None = None
    resize_mode: int | str = "Crop and Resize"
    processor_res: int = -1
    threshold_a: float = -1
    threshold_b: float = -1
    guidance_start: float = Field(0.0, ge=0.0, le=1.0)
    guidance_end: float = Field(1.0, ge=0.0, le=1.0)
    guidance: float | None = Field(None, ge=0.0, le=1.0, description="the extension's older spelling of guidance_end")
    control_mode: int | str = 0
    pixel_perfect: bool = False
    low_vram: bool = False
    hr_option: int | str = Field("Both", description="with a hires fix, the passes the unit guides: Both, Low res "
                                 "only, High res only (or 0, 1, 2)")
    inpaint_crop_input_image: bool = Field(True, description="img2img's 'Only masked' (inpaint_full_res): the image "
                                           "is cut to the inpainted region, as the init image is")


def script_key(r: Txt2ImgRequest) -> str | None:
    """The key of ``alwayson_scripts`` that holds ControlNet's arguments, as the client spelt it."""
    return next((key for key in r.alwayson_scripts if key.lower() == SCRIPT), None)


def _units(r: Txt2ImgRequest, models: dict[str, str] | None = None) -> tuple[str, list[tuple[int, A1111Unit]]]:
    """The field path of ControlNet's args and its enabled units with their positions (as the infotext numbers
    them); each one's fields checked, naming the field. With ``models``, their names are checked too."""
    key = script_key(r)
    if key is None:
        return "", []
    prefix = f"alwayson_scripts.{key}"
    script = r.alwayson_scripts[key]
    args = script.get("args", []) if isinstance(script, dict) else script
    if not isinstance(args, list):
        raise InvalidInput("ControlNet's args are a list of units", field=f"{prefix}.args")
    if len(args) > MAX_ARGS:
        raise InvalidInput(f"{len(args)} ControlNet units sent: at most {MAX_ARGS}", field=f"{prefix}.args")
    units = []
    for i, raw in enumerate(args):
        field = f"{prefix}.args[{i}]"
        if not isinstance(raw, dict):
            raise InvalidInput("a ControlNet unit is an object of the extension's unit fields", field=field)
        try:
            unit = A1111Unit.model_validate(raw)
        except ValidationError as e:
            error = e.errors()[0]
            where = ".".join(str(part) for part in error["loc"])
            raise InvalidInput(f"ControlNet unit {i}: {where}: {error['msg']}", field=f"{field}.{where}") from e
        end = unit.guidance if unit.guidance is not None else unit.guidance_end
        if unit.enabled and unit.guidance_start > end:
            raise InvalidInput(f"ControlNet unit {i}: guidance_start={unit.guidance_start} is after guidance_end={end}",
                               field=f"{field}.guidance_start")
        if unit.enabled:
            units.append((i, unit))
    if len(units) > MAX_UNITS:
        raise InvalidInput(f"{len(units)} enabled ControlNet units: at most {MAX_UNITS}", field=f"{prefix}.args")
    return f"{prefix}.args", units


def model_name(unit: A1111Unit) -> str | None:
    """The ControlNet a unit names, its A1111 ``[hash]`` dropped; None for the extension's 'None'."""
    name = unit.model.split(" [", 1)[0].strip()
    return None if name in ("", "None") else name


def module_of(name: str, field: str, offered: Collection[str] = MODEL_FREE) -> str:
    """A preprocessor's name as the extension's clients send it (its labels too: the invert's and lineart_standard's
    long ones, MiDaS's ``depth_midas`` for its key ``depth``, ``lineart_realistic`` for ``lineart``, the soft-edge
    labels for their keys ``hed``, ``pidinet``...), when it is ``offered`` (``control.offered``: a depth, line-art,
    pose, soft-edge or M-LSD module only where its model is configured); else a
    422 naming ``field`` and listing those offered (one of the extension's pose modules is told why, and which pose
    modules are served here)."""
    key = name.strip().lower()
    module = MODULES.get(key)
    if module is None or module not in offered:
        why = ""
        if key in UNSERVED or key in POSE_MODULES:
            served = [m for m in POSE_MODULES if m in offered]
            why = (" (the extension's DWPose and animal pose models are not served here" if key in UNSERVED
                   else f" ({key} needs {needs(key)}, and none is configured for it")
            why += (f"; of its pose modules {', '.join(served)} {'is' if len(served) == 1 else 'are'} served here)"
                    if served else "; none of its pose modules is configured here)")
        raise UnknownModel(f"ControlNet preprocessor {name!r} is not offered here{why}: {', '.join(offered)}",
                           field=field, details={"choices": list(offered)})
    return module


def _resize(unit: A1111Unit, field: str) -> str:
    fit = RESIZE_MODES.get(unit.resize_mode)
    if fit is None:
        raise InvalidInput(f"resize_mode {unit.resize_mode!r}: 0, 1, 2 or {', '.join(RESIZE_LABELS.values())}",
                           field=f"{field}.resize_mode")
    return fit


def _control_mode(unit: A1111Unit, field: str) -> str:
    labels = {**CONTROL_MODES, **{label: label for label in CONTROL_MODES.values()}}
    label = labels.get(unit.control_mode)
    if label is None:
        raise InvalidInput(f"control_mode {unit.control_mode!r}: 0, 1, 2 or {', '.join(CONTROL_MODES.values())}",
                           field=f"{field}.control_mode")
    return label


def _passes(unit: A1111Unit, field: str, hires: bool) -> str:
    passes = HR_OPTIONS.get(unit.hr_option)
    if passes is None:
        raise InvalidInput(f"hr_option {unit.hr_option!r}: 0, 1, 2 or Both, Low res only, High res only",
                           field=f"{field}.hr_option")
    return passes if hires else "both"


def sliders(unit: A1111Unit, module: str) -> tuple[int, float, float]:
    """processor_res, threshold_a, threshold_b as the extension's unit holds them for ``module``: each one the module
    has a slider for (``control.SLIDERS``) -1 or out of its bounds is its default (the extension resets such a value,
    and logs it); a value the module does not read is kept as sent."""
    values = [unit.processor_res, unit.threshold_a, unit.threshold_b]
    for slot, slider in enumerate(SLIDERS.get(module, (None, None, None))):
        if slider is not None and not slider.low <= values[slot] <= slider.high:
            values[slot] = slider.default
    return int(values[0]), values[1], values[2]


def _image(unit: A1111Unit, field: str) -> tuple[str | None, str]:
    """A unit's image payload and its field, whichever of the extension's shapes carries it."""
    image = unit.image if unit.image is not None else unit.input_image
    where = f"{field}.image" if unit.image is not None else f"{field}.input_image"
    if isinstance(image, list):  # [image, mask]
        image = image[0] if image else None
        where += "[0]"
    if isinstance(image, dict):  # {"image": ..., "mask": ...}
        image = image.get("image")
        where += ".image"
    if image is not None and not isinstance(image, str):
        raise InvalidInput("a ControlNet image is base64 or a data URI", field=where)
    return image or None, where


def control_units(r: Txt2ImgRequest, models: dict[str, str], *, edit: bool,
                  modules: Collection[str] = MODEL_FREE) -> list[ControlUnit]:
    """The ControlNet units of an A1111 request, their images decoded (a bad one is a 400 naming its field): each
    enabled unit that names a ControlNet, and one of the preprocessors ``modules`` offers. A unit without an image
    takes the init image on img2img (as the extension does) and is refused on txt2img."""
    key = script_key(r)
    if key is not None and not models:
        raise InvalidInput(f"always on script {key!r} not found: no ControlNet models are configured here",
                           field=f"alwayson_scripts.{key}")
    args, units = _units(r)
    out = []
    for i, unit in units:
        field = f"{args}[{i}]"
        module, fit = module_of(unit.module, f"{field}.module", modules), _resize(unit, field)
        mode = MODE_OF[_control_mode(unit, field)]
        name = model_name(unit)
        if name is None:
            continue  # the extension runs such a unit's preprocessor alone: nothing reaches the image
        if name not in models:
            raise UnknownModel(f"unknown ControlNet {unit.model!r} (GET /controlnet/model_list)",
                               field=f"{field}.model", details={"choices": list(models)})
        payload, where = _image(unit, field)
        if payload is None and not edit:
            raise InvalidInput(f"ControlNet unit {i} has no image (txt2img has no init image to use)",
                               field=f"{field}.image")
        res, a, b = sliders(unit, module)
        passes = _passes(unit, field, hires=bool(r.enable_hr) and not edit)
        out.append(ControlUnit(model=name, image=image_field(payload, where) if payload else None,
                               passes=passes,  # type: ignore[arg-type]
                               module=module,  # type: ignore[arg-type]
                               control_mode=mode,
                               pixel_perfect=unit.pixel_perfect,
                               conditioning_scale=unit.weight, guidance_start=unit.guidance_start,
                               guidance_end=unit.guidance if unit.guidance is not None else unit.guidance_end,
                               resize_mode=fit,  # type: ignore[arg-type]
                               crop_to_mask=unit.inpaint_crop_input_image,
                               **read(module, res, a, b)))
    return out


def notes(r: Txt2ImgRequest) -> list[str]:
    """What of the request's enabled units is not applied here, one warning each."""
    args, units = _units(r)
    out = []
    for i, unit in units:
        field = f"{args}[{i}]"
        if model_name(unit) is None:
            out.append(f"{field}: no ControlNet model: the unit was ignored")
            continue
        if unit.mask or isinstance(unit.image, dict) and unit.image.get("mask") or isinstance(unit.image, list):
            # The extension takes a mask that is not blank as the control image itself (module none): not here.
            out.append(f"{field}: the unit's mask is not applied here (the extension would draw with it as the "
                       "control image)")
        module = MODULES.get(unit.module.strip().lower())
        if module is None:
            continue
        # A negative value means the default (-1: not set); one set out of the module's bounds, a note. With Pixel
        # Perfect the resolution is computed, whatever processor_res says.
        values = (-1 if unit.pixel_perfect else unit.processor_res, unit.threshold_a, unit.threshold_b)
        for slot, value in enumerate(values):
            why = out_of_bounds(module, slot, value) if value >= 0 else None
            slider = SLIDERS[module][slot]
            if why is not None and slider is not None:
                reset = f": it ran at {slider.default:g}, as the extension resets it" if slider.shown else ""
                out.append(f"{field}.{why}{reset}")
    return out


def infotext(r: Txt2ImgRequest) -> dict[str, str]:
    """The infotext's ``ControlNet i`` settings, one per enabled unit with a model (numbered as sent), as the
    extension writes them: ``Module: canny, Model: name, Weight: 1.0, Resize Mode: Crop and Resize, ...``."""
    args, units = _units(r)
    out = {}
    for i, unit in units:
        if model_name(unit) is None:  # it changed nothing in the image
            continue
        field = f"{args}[{i}]"
        module = MODULES.get(unit.module.strip().lower(), unit.module)
        res, a, b = sliders(unit, module)
        end = unit.guidance if unit.guidance is not None else unit.guidance_end
        values = {"Module": module, "Model": unit.model, "Weight": unit.weight,
                  "Resize Mode": RESIZE_LABELS.get(RESIZE_MODES.get(unit.resize_mode, ""), unit.resize_mode),
                  "Processor Res": res, "Threshold A": a, "Threshold B": b, "Guidance Start": unit.guidance_start,
                  "Guidance End": end, "Pixel Perfect": unit.pixel_perfect, "Control Mode": _control_mode(unit, field)}
        out[f"ControlNet {i}"] = ", ".join(f"{key}: {value}" for key, value in values.items())
    return out


def from_upload(units: list[ControlUnit], upload: Image.Image, fit: Fit) -> list[ControlUnit]:
    """img2img's units, each without an image given the first init image as uploaded (``upload``) and img2img's
    resize mode (``fit``), as the extension reads ``p.init_images[0]`` and ``p.resize_mode`` for such a unit: its map
    is made of the upload itself and framed as the init image is (Pixel Perfect estimates from the upload's size)."""
    return [u if u.image is not None else u.model_copy(update={"image": upload, "resize_mode": fit}) for u in units]
