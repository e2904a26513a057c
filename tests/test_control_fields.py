"""The native API's ``controlnets`` without Ray: a unit becomes the base's ``ControlUnit`` as the same unit of A1111's
extension does, queued jobs keep and read their units, and what no unit may be is refused naming its field."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from deployments.support.control import PREPROCESSORS
from deployments.support.errors import InvalidImage, InvalidInput, UnknownModel
from graphs import plans
from graphs.api.a1111_controlnet import control_units as a1111_units
from graphs.api.a1111_models import Img2ImgRequest, Txt2ImgRequest
from graphs.api.control_fields import ControlNetUnit, control_units
from graphs.api.jobs import _redact
from tests.helpers import b64, pixels

MODELS = {"tiny-canny": "unused: only the names are read"}
IMAGE = b64(Image.radial_gradient("L").convert("RGB").resize((48, 32)))
# (native unit, the same unit as A1111's extension takes it)
SAME = [
    ({"model": "tiny-canny", "image": IMAGE},
     {"model": "tiny-canny", "image": IMAGE}),
    ({"model": "tiny-canny", "image": IMAGE, "preprocessor": "canny", "scale": 0.6, "guidance_start": 0.1,
      "guidance_end": 0.7, "resize_mode": "stretch", "processor_res": 256, "low_threshold": 40, "high_threshold": 90},
     {"model": "tiny-canny [abcd1234]", "input_image": f"data:image/png;base64,{IMAGE}", "module": "canny",
      "weight": 0.6, "guidance_start": 0.1, "guidance": 0.7, "resize_mode": 0, "processor_res": 256,
      "threshold_a": 40, "threshold_b": 90}),
    ({"model": "tiny-canny", "image": IMAGE, "preprocessor": "invert", "resize_mode": "fill", "processor_res": 64},
     {"model": "tiny-canny", "image": IMAGE, "module": "invert (from white bg & black line)",
      "resize_mode": "Resize and Fill", "processor_res": 64}),  # not canny: the sliders are not read
    ({"model": "tiny-canny", "image": IMAGE, "preprocessor": "canny", "control_mode": "control",
      "pixel_perfect": True},
     {"model": "tiny-canny", "image": IMAGE, "module": "canny", "control_mode": 2, "pixel_perfect": True}),
    ({"model": "tiny-canny", "image": IMAGE, "control_mode": "prompt"},
     {"model": "tiny-canny", "image": IMAGE, "control_mode": "My prompt is more important"}),
    ({"model": "tiny-canny", "image": IMAGE, "preprocessor": "mlsd", "processor_res": 128, "low_threshold": 0.25},
     {"model": "tiny-canny", "image": IMAGE, "module": "mlsd", "processor_res": 128, "threshold_a": 0.25}),
]


@pytest.mark.parametrize(("native", "extension"), SAME)
def test_a_unit_is_the_base_unit_the_same_a1111_unit_is(native, extension):
    ours = control_units([ControlNetUnit(**native)], MODELS, edit=False, modules=PREPROCESSORS)
    theirs = a1111_units(Txt2ImgRequest(prompt="p", alwayson_scripts={"ControlNet": {"args": [extension]}}), MODELS,
                         edit=False, modules=PREPROCESSORS)  # every module offered: mlsd's network too
    assert len(ours) == len(theirs) == 1
    assert ours[0].model_dump(exclude={"image"}) == theirs[0].model_dump(exclude={"image"})
    assert np.array_equal(pixels(ours[0].image), pixels(theirs[0].image))


def test_an_edits_unit_without_an_image_takes_the_init_image_as_a1111s_does():
    ours = control_units([{"model": "tiny-canny"}], MODELS, edit=True)
    theirs = a1111_units(Img2ImgRequest(prompt="p", init_images=[IMAGE], alwayson_scripts={
        "ControlNet": {"args": [{"model": "tiny-canny"}]}}), MODELS, edit=True)
    assert ours == theirs and ours[0].image is None
    edit = plans.seed003("img2img", {"prompt": "p", "initImage": IMAGE, "controlnets": [{"model": "tiny-canny"}]})
    assert edit.control == ours and edit.init_image is not None  # the base frames the init image for it


def test_each_kind_of_job_reads_its_units_as_stored():
    stored = [ControlNetUnit(model="tiny-canny", image=IMAGE, scale=0.5).model_dump()]  # as a job keeps them
    for kind, images in (("text2img", {}), ("img2img", {"initImage": IMAGE}),
                         ("inpaint", {"image": IMAGE, "mask": IMAGE}),
                         ("style-transfer", {"contentImage": IMAGE, "styleImage": IMAGE})):
        request = plans.seed003(kind, {"prompt": "p", **images, "controlnets": stored})
        assert [(u.model, u.conditioning_scale, u.image.size) for u in request.control] == [("tiny-canny", 0.5,
                                                                                             (48, 32))], kind
    assert plans.seed003("text2img", {"prompt": "p"}).control == []


@pytest.mark.parametrize(("units", "models", "error", "field"), [
    ([{"model": "depth-xl", "image": IMAGE}], MODELS, UnknownModel, "controlnets.0.model"),
    ([{"model": "tiny-canny", "image": IMAGE}], {}, UnknownModel, "controlnets.0.model"),  # none configured
    ([{"model": "tiny-canny", "image": IMAGE}, {"model": "tiny-canny"}], MODELS, InvalidInput, "controlnets.1.image"),
    ([{"model": "tiny-canny", "image": "bm90IGFuIGltYWdl"}], MODELS, InvalidImage, "controlnets.0.image"),
    ([{"model": "tiny-canny", "image": ""}], MODELS, InvalidImage, "controlnets.0.image"),
])
def test_what_no_unit_may_be_is_refused_naming_its_field(units, models, error, field):
    with pytest.raises(error) as refused:
        control_units(units, models, edit=False)
    assert refused.value.field == field


def test_without_units_a_generate_requests_cache_key_is_what_it_was():
    fields = {"prompt": "p", "seed": 3, "controlnets": []}
    assert "controlnets" not in plans.seed000_fields(fields, "R-ESRGAN 2x+")
    unit = ControlNetUnit(model="tiny-canny", image=IMAGE).model_dump()
    assert plans.seed000_fields({**fields, "controlnets": [unit]}, "R-ESRGAN 2x+")["controlnets"] == [unit]


def test_a_jobs_view_leaves_out_its_units_images():
    unit = ControlNetUnit(model="tiny-canny", image="A" * 4000).model_dump()
    view = _redact({"prompt": "p", "controlnets": [unit], "sizes": ["avatar"]})
    assert view["controlnets"] == [{**unit, "image": "<4000 chars>"}] and view["sizes"] == ["avatar"]
