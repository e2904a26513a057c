"""The native API's ``controlnets`` field: ControlNet units on ``POST /generate`` and ``/generate/async``, and on
the jobs' ``/generate/text2img``, ``/img2img``, ``/inpaint`` and ``/style-transfer``.

A unit here is one unit of A1111's ControlNet extension under the native API's names, and becomes the same
``ControlUnit`` the base runs (``graphs/api/a1111_controlnet.py`` maps the extension's): ``model`` is the
extension's model, ``preprocessor`` its module, ``scale`` its weight, ``threshold_a`` and ``threshold_b`` its two
sliders (each preprocessor's own: canny's two thresholds, mlsd's value and distance thresholds, threshold's level, a
sigma, a rate, a gamma), also named ``low_threshold`` and ``high_threshold`` (canny's and mlsd's first names). Units
are checked when a request is accepted, a queued job's too: its ControlNet is one of the base's (``GET /models``
lists them), its preprocessor is offered (a depth, line-art, pose, soft-edge or M-LSD one where its model is
configured: ``GET /models`` lists them too), its sliders are within its own bounds, its image decodes, and a
text-to-image unit has one (an edit's unit without one takes the edit's init image, as the extension does). A refusal
names its field as the body's own validation does: ``controlnets.0.model``.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator

from deployments.support.control import (
    BOUNDS,
    MAX_UNITS,
    RESOLUTION,
    SLIDERS,
    ControlMode,
    ControlUnit,
    Preprocessor,
    out_of_bounds,
    read,
)
from deployments.support.errors import InvalidInput, UnknownModel
from deployments.support.imaging import Fit
from graphs.api.fields import image_field

FIELD = "controlnets"
FIRST_NAMES = {"threshold_a": "low_threshold", "threshold_b": "high_threshold"}  # the names canny's and mlsd's had


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
                                       "network), openpose_hand, openpose_face, openpose_full (with each person's "
                                       "hands, face, or both: coloured finger bones and blue keypoints, white face "
                                       "keypoints, by the base's hand and face networks), openpose_faceonly (the "
                                       "faces alone), softedge_hed, softedge_pidinet (its soft edges, white on "
                                       "black, by the base's HED or PiDiNet network), softedge_hedsafe, "
                                       "softedge_pidisafe (the "
                                       "same in three levels), scribble_hed, scribble_pidinet (bold white strokes "
                                       "along its edges), mlsd (its straight lines, white on black, by the base's "
                                       "M-LSD network), threshold (white where its darkest channel is above "
                                       "threshold_a), "
                                       "scribble_xdog (its strokes by a difference of Gaussians, white on black), "
                                       "blur_gaussian (blurred, sigma threshold_a), tile_resample (shrunk by "
                                       "threshold_a), recolor_luminance, recolor_intensity (its lightness or value "
                                       "in grey, gamma threshold_a; then the finished images' own, as the extension "
                                       "puts it back), shuffle (its pixels moved by a random flow drawn "
                                       "from the request's seed), t2ia_color_grid (its colours in 64-pixel cells), "
                                       "tile_colorfix, tile_colorfix+sharp (the image as it is, for a tile "
                                       "ControlNet, and every sampling step's colours pulled to its own, blurred "
                                       "over threshold_a latents); GET /models lists those offered")
    scale: float = Field(1.0, ge=0.0, le=2.0, description="how strongly it guides (A1111's weight); 0: not at all")
    guidance_start: float = Field(0.0, ge=0.0, le=1.0, description="the fraction of the denoising steps where it "
                                  "starts guiding")
    guidance_end: float = Field(1.0, ge=0.0, le=1.0, description="the fraction of the steps where it stops; not "
                                "before guidance_start (equal: it guides no step)")
    resize_mode: Fit = Field("crop", description="how the control map takes the image's size: stretch (A1111's "
                             "Just Resize), crop (cover and centre-crop: Crop and Resize), fill (fit inside, centred "
                             "on the map's median border colour: Resize and Fill)")
    processor_res: int = Field(int(RESOLUTION.default), ge=RESOLUTION.low, le=RESOLUTION.high, description="the "
                               "shorter side the image is resized to before its map is made: canny, the depth, "
                               "line-art, pose, soft-edge, scribble and M-LSD preprocessors, threshold, scribble_xdog, "
                               "blur_gaussian, t2ia_color_grid (shuffle runs at 512, as A1111's extension fixes "
                               "it)")
    # Each checked against the preprocessor's own slider (``_within_the_preprocessors_slider``): the fields take
    # every preprocessor's bounds.
    low_threshold: float | None = Field(None, ge=BOUNDS[1][0], le=BOUNDS[1][1], description="threshold_a by its "
                                        "first name (not both): canny's lower hysteresis threshold (1 to 255; unset: "
                                        "100), mlsd's value threshold, a line's least score (0.01 to 2; unset: 0.1)")
    high_threshold: float | None = Field(None, ge=BOUNDS[2][0], le=BOUNDS[2][1], description="threshold_b by its "
                                         "first name (not both): canny's upper hysteresis threshold (1 to 255; unset: "
                                         "200), mlsd's distance threshold, a line's least length in half the "
                                         "processor resolution's pixels (0.01 to 20; unset: 0.1)")
    threshold_a: float | None = Field(None, ge=BOUNDS[1][0], le=BOUNDS[1][1], description="the preprocessor's "
                                      "first slider (A1111's threshold_a), as the extension bounds it (GET "
                                      "/controlnet/module_list): canny's and mlsd's (see low_threshold), threshold's "
                                      "level (0 to 255; unset: 127), scribble_xdog's (1 to 64; 32), blur_gaussian's "
                                      "sigma (0.01 to 64; 9), tile_resample's down-sampling rate (1 to 8; 1), the "
                                      "recolor modules' gamma (0.1 to 2; 1), the colour fix's variation (3 to 32; "
                                      "8). Not read by a preprocessor without one")
    threshold_b: float | None = Field(None, ge=BOUNDS[2][0], le=BOUNDS[2][1], description="the preprocessor's "
                                      "second slider (A1111's threshold_b): canny's and mlsd's (see high_threshold), "
                                      "tile_colorfix+sharp's sharpness (0 to 2; 1)")
    control_mode: ControlMode = Field("balanced", description="balanced (the residuals at scale), prompt (A1111's "
                                      "'My prompt is more important': the deeper residuals weigh more, the "
                                      "shallower less) or control ('ControlNet is more important': the same "
                                      "weights, added to the prompt's UNet rows alone)")
    pixel_perfect: bool = Field(False, description="a preprocessor that reads processor_res (shuffle too): run at "
                                "the resolution A1111's Pixel Perfect works out from the image's size, the "
                                "generation size and resize_mode (processor_res is then not read)")

    @field_validator("guidance_end")
    @classmethod
    def _not_before_start(cls, end: float, info: ValidationInfo) -> float:
        start = info.data.get("guidance_start")
        if start is not None and end < start:
            raise ValueError(f"guidance_end={end} is before guidance_start={start}")
        return end

    @field_validator("low_threshold", "high_threshold", "threshold_a", "threshold_b")
    @classmethod
    def _within_the_preprocessors_slider(cls, value: float | None, info: ValidationInfo) -> float | None:
        """Within the preprocessor's slider (a preprocessor without one does not read it); a slider sent once."""
        module, name = info.data.get("preprocessor"), str(info.field_name)
        if module is None or value is None:
            return value
        slot = 1 if name in ("low_threshold", "threshold_a") else 2
        first = FIRST_NAMES.get(name)
        if first is not None and info.data.get(first) is not None:
            slider = SLIDERS[module][slot]
            what = f"{module}'s {slider.label}" if slider is not None else "one value"
            raise ValueError(f"{name} and {first} name the same slider ({what}): send one")
        why = out_of_bounds(module, slot, value, name)
        if why is not None:
            raise ValueError(why)
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
        # Each slider by either name (never both: see the validator); unset, its default.
        a = unit.low_threshold if unit.low_threshold is not None else unit.threshold_a
        b = unit.high_threshold if unit.high_threshold is not None else unit.threshold_b
        out.append(ControlUnit(model=unit.model, image=None if unit.image is None else image_field(unit.image,
                                                                                                   f"{where}.image"),
                               module=unit.preprocessor, conditioning_scale=unit.scale,
                               guidance_start=unit.guidance_start, guidance_end=unit.guidance_end,
                               resize_mode=unit.resize_mode, **read(unit.preprocessor, unit.processor_res, a, b),
                               control_mode=unit.control_mode, pixel_perfect=unit.pixel_perfect))
    return out
