"""The graph layer for Automatic1111's routes: the ingress and the model deployments on the tiny models, in-process
with Serve's local testing mode (no cluster, no HTTP), the routes called through the ingress handle. The base's
default sampler is DDIM here, not the config's Euler a, so that what a request that names none reports can be told
apart from a hard-coded name."""

from __future__ import annotations

import json

import numpy as np
import pytest
import yaml
from starlette.requests import Request

from deployments.support.errors import InvalidInput, ServiceError
from graphs.api.a1111_models import Txt2ImgRequest
from graphs.api.errors import unwrap
from tests.conftest import ROOT
from tests.helpers import decode_b64, pixels

DEFAULT_SAMPLER = "DDIM"
SMALL = {"prompt": "a lighthouse", "width": 64, "height": 64, "steps": 2, "seed": 5}


@pytest.fixture(scope="module")
def ingress(tiny, tmp_path_factory):
    from ray import serve

    from graphs.app import build_app

    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("TINY_MODELS", str(tiny))
        patch.setenv("JOBS_DATA_DIR", str(tmp_path_factory.mktemp("a1111-graph-jobs")))
        args = yaml.safe_load((ROOT / "configs" / "cpu.yaml").read_text())["applications"][0]["args"]
        args["base"]["default_sampler"] = DEFAULT_SAMPLER
        yield serve.run(build_app(args), name="a1111-graph-test", _local_testing_mode=True)


def caller() -> Request:
    """The HTTP request a route reads its client from."""
    return Request({"type": "http", "method": "POST", "path": "/", "headers": [], "client": ("graph-test", 1)})


def answer(response) -> dict:
    """A route's JSON answer, ``info`` parsed."""
    body = json.loads(response.body)
    if isinstance(body.get("info"), str):
        body["info"] = json.loads(body["info"])
    return body


def txt2img(ingress, **fields) -> dict:
    return answer(ingress.txt2img.remote(Txt2ImgRequest(**{**SMALL, **fields}), caller()).result())


def test_no_sampler_named_reports_the_default_that_ran(ingress):
    body = txt2img(ingress)
    assert body["info"]["sampler_name"] == DEFAULT_SAMPLER
    assert f"Sampler: {DEFAULT_SAMPLER}," in decode_b64(body["images"][0]).info["parameters"]
    named = txt2img(ingress, sampler_name=DEFAULT_SAMPLER)
    assert named["images"] == body["images"]  # the default is what ran


def test_sampler_index_is_the_sampler_when_sampler_name_is_absent(ingress):
    older = txt2img(ingress, sampler_index="Euler")
    assert older["info"]["sampler_name"] == "Euler"
    assert "Sampler: Euler," in decode_b64(older["images"][0]).info["parameters"]
    euler = decode_b64(txt2img(ingress, sampler_name="Euler")["images"][0])
    assert np.array_equal(pixels(decode_b64(older["images"][0])), pixels(euler))
    assert txt2img(ingress, sampler_name="Euler", sampler_index="DDIM")["info"]["sampler_name"] == "Euler"


def refused(call) -> ServiceError:
    """The structured error a route raised (the HTTP edge answers it as a 4xx naming its field)."""
    with pytest.raises(Exception) as raised:  # noqa: PT011 - unwrapped and checked below
        call()
    error = unwrap(raised.value)
    assert isinstance(error, ServiceError), repr(raised.value)
    return error


def test_an_unknown_sampler_is_refused_naming_the_field_that_named_it(ingress):
    assert refused(lambda: txt2img(ingress, sampler_index="Nope")).details["field"] == "sampler_index"
    assert refused(lambda: txt2img(ingress, sampler_name="Nope")).details["field"] == "sampler_name"


def test_refiner_switch_at_zero_is_ignored_without_a_refiner_and_refused_with_one(ingress):
    assert txt2img(ingress, refiner_switch_at=0)["images"] == txt2img(ingress)["images"]
    error = refused(lambda: txt2img(ingress, refiner_checkpoint="tiny-sdxl-refiner", refiner_switch_at=0))
    assert isinstance(error, InvalidInput) and error.details["field"] == "refiner_switch_at"


@pytest.mark.parametrize("upscaler", ["Latent", "Lanczos"])
def test_hires_resize_sets_the_size_instead_of_hr_scale(ingress, upscaler):
    hires = {"enable_hr": True, "hr_upscaler": upscaler, "denoising_strength": 0.5, "hr_second_pass_steps": 2}
    both = txt2img(ingress, **hires, hr_scale=0, hr_resize_x=128, hr_resize_y=96)  # cover 128x128, crop the height
    image = decode_b64(both["images"][0])
    assert image.size == (128, 96) and both["info"]["width"] == 128 and both["info"]["height"] == 96
    assert "Hires resize: 128x96," in image.info["parameters"] and "Hires upscale:" not in image.info["parameters"]
    one = txt2img(ingress, **hires, hr_scale=1, width=128, hr_resize_y=128)  # the width follows the aspect ratio
    assert decode_b64(one["images"][0]).size == (256, 128)
    error = refused(lambda: txt2img(ingress, **hires, hr_resize_x=4096, hr_resize_y=4096))
    assert isinstance(error, InvalidInput) and error.details["field"] == "hr_resize_x"
