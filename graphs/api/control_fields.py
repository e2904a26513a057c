"""The native API's ``controlnets`` field: ControlNet units on ``POST /generate`` and ``/generate/async``, and on
the jobs' ``/generate/text2img``, ``/img2img``, ``/inpaint`` and ``/style-transfer``.

A unit here is one unit of A1111's ControlNet extension under the native API's names, and becomes the same
``ControlUnit`` the base runs (``graphs/api/a1111_controlnet.py`` maps the extension's): ``model`` is the
extension's model, ``preprocessor`` its module, ``scale`` its weight, ``low_threshold`` and ``high_threshold`` its
threshold_a and threshold_b (canny's two thresholds, mlsd's value and distance thresholds). Units are checked when a
request is accepted, a queued job's too: its ControlNet is one of the base's (``GET /models`` lists them), its
preprocessor is offered (a depth, line-art, pose, soft-edge or M-LSD one where its model is configured: ``GET
/models`` lists them too), its thresholds are within its own bounds, its image decodes, and a text-to-image unit has
one (an edit's unit without one takes the edit's init image, as the extension does). A refusal names its field as the
body's own validation does: ``controlnets.0.model``.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator

from deployments.support.control import (
    CANNY_HIGH,
    CANNY_LOW,
    CANNY_RES,
    LEAST_THRESHOLD,
    MAX_UNITS,
    PROCESSOR_RES,
    THRESHOLDS,
    ControlMode,
    ControlUnit,
    Preprocessor,
)
from deployments.support.errors import InvalidInput, UnknownModel
from deployments.support.imaging import Fit
from graphs.api.fields import image_field

FIELD = "controlnets"


class ControlNetUnit(BaseModel):
    """One ControlNet unit: which ControlNet, on what image, how strongly and over which steps."""

    model_config = ConfigDict(extra="forbid")

    model: str = Field(..., min_length=1, max_length=128, description="the ControlNet: a name GET /models lists "
                       "in controlnets (the base's configured ControlNets)")
    image: str | None = Field(None, description="the control image, base64 or a data URI (before the "
                              "preprocessor); omitted on an edit (img2img, inpaint, style transfer): the edit's "
                              "own image. Text-to-image needs one")
    preprocessor: Preprocessor = Field("none", description="what is made of the image first: none (the image is "
                                       "the control map), canny (its edges, white on black), invert (line art "
                                       "drawn black on white, inverted), depth_midas, depth_anything, "
                                       "depth_anything_v2 (its depth, nearest brightest, by the base's depth model "
                                       "of that name), lineart_standard (its dark strokes, white on black), "
                                       "lineart_realistic, lineart_coarse, lineart_anime (its line art, white on "
                                       "black, by the base's line-art network of that name), openpose (each body's "
                                       "keypoints and limbs in OpenPose's colours on black, by the base's body pose "
                                       "network), softedge_hed, softedge_pidinet (its soft edges, white on black, by "
                                       "the base's HED or PiDiNet network), softedge_hedsafe, softedge_pidisafe (the "
                                       "same in three levels), scribble_hed, scribble_pidinet (bold white strokes "
                                       "along its edges), mlsd (its straight lines, white on black, by the base's "
                                       "M-LSD network); GET /models lists those offered")
    scale: float = Field(1.0, ge=0.0, le=2.0, description="how strongly it guides (A1111's weight); 0: not at all")
    guidance_start: float = Field(0.0, ge=0.0, le=1.0, description="the fraction of the denoising steps where it "
                                  "starts guiding")
    guidance_end: float = Field(1.0, ge=0.0, le=1.0, description="the fraction of the steps where it stops; not "
                                "before guidance_start (equal: it guides no step)")
    resize_mode: Fit = Field("crop", description="how the control map takes the image's size: stretch (A1111's "
                             "Just Resize), crop (cover and centre-crop: Crop and Resize), fill (fit inside, centred "
                             "on the map's median border colour: Resize and Fill)")
    processor_res: int = Field(CANNY_RES[0], ge=CANNY_RES[1], le=CANNY_RES[2], description="canny, the depth, "
                               "line-art, pose, soft-edge, scribble and M-LSD preprocessors: the shorter side the "
                               "image is resized to before its map is made")
    # Checked against the preprocessor's own bounds (``_within_the_preprocessors_bounds``): the fields take the union.
    low_threshold: float | None = Field(None, ge=LEAST_THRESHOLD, le=CANNY_LOW[2], description="A1111's threshold_a: "
                                        "canny's lower hysteresis threshold (1 to 255; unset: 100), mlsd's value "
                                        "threshold, a line's least score (0.01 to 2; unset: 0.1)")
    high_threshold: float | None = Field(None, ge=LEAST_THRESHOLD, le=CANNY_HIGH[2], description="A1111's "
                                         "threshold_b: canny's upper hysteresis threshold (1 to 255; unset: 200), "
                                         "mlsd's distance threshold, a line's least length in half the processor "
                                         "resolution's pixels (0.01 to 20; unset: 0.1)")
    control_mode: ControlMode = Field("balanced", description="balanced (the residuals at scale), prompt (A1111's "
                                      "'My prompt is more important': the deeper residuals weigh more, the "
                                      "shallower less) or control ('ControlNet is more important': the same "
                                      "weights, added to the prompt's UNet rows alone)")
    pixel_perfect: bool = Field(False, description="canny, depth, line art, openpose, soft edge, scribble and mlsd: "
                                "run at the resolution A1111's Pixel Perfect works out from the image's size, the "
                                "generation size and resize_mode (processor_res is then not read)")

    @field_validator("guidance_end")
    @classmethod
    def _not_before_start(cls, end: float, info: ValidationInfo) -> float:
        start = info.data.get("guidance_start")
        if start is not None and end < start:
            raise ValueError(f"guidance_end={end} is before guidance_start={start}")
        return end

    @field_validator("low_threshold", "high_threshold")
    @classmethod
    def _within_the_preprocessors_bounds(cls, value: float | None, info: ValidationInfo) -> float | None:
        module = info.data.get("preprocessor")
        if value is not None and module in THRESHOLDS:
            _, low, high = THRESHOLDS[module][0 if info.field_name == "low_threshold" else 1]
            if not low <= value <= high:
                raise ValueError(f"{info.field_name}={value:g} is outside {module}'s {low:g} to {high:g}")
        return value


ControlNets = Annotated[list[ControlNetUnit], Field(max_length=MAX_UNITS, description=(
    f"ControlNet units (at most {MAX_UNITS}), each guiding the base's denoising with a control image; empty: none"))]


def control_units(units: Sequence[ControlNetUnit | dict], models: Collection[str] | None, *, edit: bool,
                  field: str = FIELD, modules: Collection[str] | None = None) -> list[ControlUnit]:
    """The base's units of a request's ``controlnets`` (as sent, or as a queued job keeps them), each image decoded.
    ``models``: the base's ControlNets, and ``modules`` the preprocessors offered (``control.offered``), or None
    where the base is left to check them (a job accepted when they were checked). ``edit``: the request has an init
    image for a unit without one."""
    out = []
    for i, raw in enumerate(units):
        unit = raw if isinstance(raw, ControlNetUnit) else ControlNetUnit.model_validate(raw)
        where = f"{field}.{i}"
        if models is not None and unit.model not in models:
            configured = f"GET /models lists {', '.join(models)}" if models else "none is configured here"
            raise UnknownModel(f"unknown ControlNet {unit.model!r} ({configured})", field=f"{where}.model",
                               details={"choices": list(models)})
        if modules is not None and unit.preprocessor not in modules:
            raise UnknownModel(f"ControlNet preprocessor {unit.preprocessor!r} is not offered here "
                               f"({', '.join(modules)}; a depth, line-art, pose, soft-edge or M-LSD one needs its "
                               "model configured)",
                               field=f"{where}.preprocessor", details={"choices": list(modules)})
        if unit.image is None and not edit:
            raise InvalidInput(f"ControlNet unit {i} has no image (text-to-image has no init image to use)",
                               field=f"{where}.image")
        sized = unit.preprocessor in PROCESSOR_RES
        # canny's and mlsd's thresholds as sent, an unset one its slider's default; the others read none: canny's
        # defaults, as A1111's units keep them.
        read = unit.preprocessor in THRESHOLDS
        first, second = THRESHOLDS.get(unit.preprocessor, THRESHOLDS["canny"])
        low = unit.low_threshold if read and unit.low_threshold is not None else first[0]
        high = unit.high_threshold if read and unit.high_threshold is not None else second[0]
        out.append(ControlUnit(model=unit.model, image=None if unit.image is None else image_field(unit.image,
                                                                                                   f"{where}.image"),
                               module=unit.preprocessor, conditioning_scale=unit.scale,
                               guidance_start=unit.guidance_start, guidance_end=unit.guidance_end,
                               resize_mode=unit.resize_mode,
                               processor_res=unit.processor_res if sized else CANNY_RES[0],
                               threshold_a=low, threshold_b=high,
                               control_mode=unit.control_mode, pixel_perfect=unit.pixel_perfect))
    return out
