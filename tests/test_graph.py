"""The graph layer: the whole DAG (ingress and the five model deployments on the tiny models) run in-process with
Serve's local testing mode, the plans called through the ingress handle, no cluster and no HTTP."""

from __future__ import annotations

import base64
import io

import numpy as np
import pytest
import yaml
from PIL import Image
from pydantic import ValidationError
from starlette.requests import Request

from deployments.support.model_free import MODULES as MODEL_FREE
from graphs.api.control_fields import ControlNetUnit
from graphs.api.errors import status_of
from graphs.api.generate import GenerateRequest
from graphs.api.processing import ClipFocalRequest
from graphs.jobs.models import AsyncGenerate, Img2ImgJob, Text2ImgJob
from tests.conftest import ROOT
from tests.helpers import b64, decode_b64, generated, pixels, refused, until


@pytest.fixture(scope="module")
def ingress(tiny, tmp_path_factory, monkeypatch_module):
    from ray import serve

    from graphs.app import build_app

    monkeypatch_module.setenv("TINY_MODELS", str(tiny))
    monkeypatch_module.setenv("JOBS_DATA_DIR", str(tmp_path_factory.mktemp("graph-jobs")))
    args = yaml.safe_load((ROOT / "configs" / "cpu.yaml").read_text())["applications"][0]["args"]
    # In-process: nothing to shut down, and serve.shutdown() here would stop the session's real cluster too.
    return serve.run(build_app(args), name="graph-test", _local_testing_mode=True)


@pytest.fixture(scope="module")
def monkeypatch_module():
    with pytest.MonkeyPatch.context() as patch:
        yield patch


def image(data: str) -> Image.Image:
    return Image.open(io.BytesIO(base64.b64decode(data.split(",", 1)[-1])))


def test_standard_plan_hands_latents_to_the_refiner(ingress):
    answer = generated(ingress, GenerateRequest(prompt="a lighthouse", width=128, height=64, seed=3,
                                                num_inference_steps=4, use_refiner=True))
    assert answer.success and answer.refiner_applied and not answer.hires_fix_applied
    assert image(answer.image).size == (128, 64) and answer.seed == 3


def test_hires_fix_plan_ends_at_1536_with_faces_tried(ingress):
    answer = generated(ingress, GenerateRequest(prompt="a portrait", seed=4, num_inference_steps=2,
                                                hires_fix=True, use_face_restoration=True))
    assert answer.hires_fix_applied and answer.final_resolution == "1536x1536"
    assert image(answer.imageData).size == (1536, 1536)
    assert answer.upscaler == "R-ESRGAN 2x+"


def test_focal_crops_keep_the_face(ingress, astronaut, astronaut_face_box):
    request = ClipFocalRequest(image=b64(astronaut), sizes=["200x100", "100x200"])
    answer = ingress.clip_focal.remote(request).result()
    x0, y0, x1, y1 = astronaut_face_box
    assert [(c.width, c.height) for c in answer.derivatives] == [(200, 100), (100, 200)]
    for crop in answer.derivatives:
        left, top, right, bottom = crop.box
        assert left <= x0 and top <= y0 and right >= x1 and bottom >= y1


def test_checkpoints_are_chosen_by_name_or_alias_without_serves_multiplexer(ingress):
    """Local testing mode has no replica for Serve's multiplexer: the base replica's own LRU holds one checkpoint
    (configs/cpu.yaml) and switches."""
    def run(model: str):
        return generated(ingress, GenerateRequest(prompt="a lighthouse", width=64, height=64, seed=3,
                                                  num_inference_steps=2, use_refiner=False, model=model))

    photo, anime, again = run("photorealistic"), run("anime"), run("tiny-sdxl-base")
    assert (photo.checkpoint, anime.checkpoint, again.checkpoint) == ("tiny-sdxl-base", "tiny-sdxl-base-b",
                                                                      "tiny-sdxl-base")
    assert photo.imageData == again.imageData != anime.imageData


# --- ControlNet on the native API (graphs/api/control_fields.py) --------------------------------------------------

def edges() -> Image.Image:
    """64x64: a white square on black, edges a canny map finds."""
    square = Image.new("RGB", (64, 64), (0, 0, 0))
    square.paste((255, 255, 255), (16, 16, 48, 48))
    return square


def caller() -> Request:
    """The HTTP request a route reads its client (and its headers) from."""
    return Request({"type": "http", "method": "POST", "path": "/", "headers": [], "client": ("graph-test", 1)})


CANNY = {"model": "tiny-canny", "image": b64(edges()), "preprocessor": "canny", "resize_mode": "stretch",
         "processor_res": 64, "low_threshold": 50, "high_threshold": 150}
SMALL = {"prompt": "a lighthouse", "width": 64, "height": 64, "seed": 5, "num_inference_steps": 2,
         "use_refiner": False}


def test_a_controlnet_unit_guides_generate_and_get_models_lists_the_controlnets(ingress):
    """(That a unit maps to the base's as the same A1111 unit does: tests/test_control_fields.py; the two surfaces'
    images differ anyway, A1111's prompts being read as A1111 reads them.)"""
    def run(*units) -> np.ndarray:  # the default plan: the refiner's ensemble, the base's latents unit-guided
        answer = generated(ingress, GenerateRequest(**{**SMALL, "use_refiner": True}, controlnets=list(units)))
        assert answer.success and answer.refiner_applied and not answer.warnings
        return pixels(decode_b64(answer.imageData))

    plain, guided = run(), run(CANNY)
    assert np.abs(guided - plain).mean() > 1.0
    assert np.abs(run({**CANNY, "scale": 0}) - plain).max() <= 1  # scale 0: as if it were not there
    depth = run({**CANNY, "preprocessor": "depth_anything_v2"})  # the photo's depth map, not its edges
    assert np.abs(depth - guided).mean() > 0.5 and np.abs(depth - plain).mean() > 1.0
    # A recolor unit's map is the refined image's HSV value: the base hands it to the refiner with its latents.
    photo = edges().resize((64, 64))
    photo.paste((40, 90, 200), (0, 0, 16, 64))
    recolored = run({"model": "tiny-canny", "preprocessor": "recolor_intensity", "image": b64(photo)})
    assert np.array_equal(recolored.max(axis=2), np.asarray(photo).max(axis=2))
    listed = ingress.models.remote().result()
    assert listed["controlnets"] == ["tiny-canny"]
    assert listed["preprocessors"] == ["none", "canny", "invert", "depth_midas", "depth_anything", "depth_anything_v2",
                                       "lineart_standard", "lineart_realistic", "lineart_coarse", "lineart_anime",
                                       "openpose", "openpose_hand", "openpose_face", "openpose_faceonly",
                                       "openpose_full", "softedge_hed", "softedge_hedsafe", "softedge_pidinet",
                                       "softedge_pidisafe", "scribble_hed", "scribble_pidinet", "mlsd", *MODEL_FREE]


def test_controlnet_units_are_refused_naming_their_field(ingress):
    def generate(*units) -> None:
        generated(ingress, GenerateRequest(**SMALL, controlnets=list(units)))

    for units, code, status, field in [
        ([{**CANNY, "model": "depth-xl"}], "UNKNOWN_MODEL", 422, "controlnets.0.model"),
        ([CANNY, {**CANNY, "image": "not an image"}], "INVALID_IMAGE", 400, "controlnets.1.image"),
        ([{**CANNY, "image": None}], "INVALID_INPUT", 422, "controlnets.0.image"),  # txt2img: no init image
    ]:
        error = refused(lambda units=units: generate(*units))
        assert (error.code, status_of(error), error.details["field"]) == (code, status, field)
    # A job is refused when it is submitted, not when it runs; an edit's unit may leave its image out.
    job = refused(lambda: ingress.submit_text2img.remote(Text2ImgJob(
        prompt="a fox", controlnets=[{**CANNY, "model": "depth-xl"}]), caller()).result())
    assert (job.code, job.details["field"]) == ("UNKNOWN_MODEL", "controlnets.0.model")
    Img2ImgJob(prompt="a fox", initImage=CANNY["image"], controlnets=[{"model": "tiny-canny"}])
    # What the body's own validation refuses (a 422 naming the place, as the edge joins it).
    for units, where in [([CANNY] * 5, ("controlnets",)),
                         ([{**CANNY, "scale": 3}], ("controlnets", 0, "scale")),
                         ([{**CANNY, "preprocessor": "depth"}], ("controlnets", 0, "preprocessor")),
                         ([{**CANNY, "guidance_start": 0.8, "guidance_end": 0.2}], ("controlnets", 0, "guidance_end")),
                         ([{**CANNY, "weight": 1}], ("controlnets", 0, "weight"))]:
        with pytest.raises(ValidationError) as invalid:
            GenerateRequest(**SMALL, controlnets=units)
        assert invalid.value.errors()[0]["loc"] == where


def test_a_job_keeps_its_units_through_the_store_and_runs_them(ingress):
    """A queued text-to-image job with a unit, and a queued /generate (/generate/async): stored with it, run by the
    job runner, with the pixels of the same request on POST /generate. A job without units stores none (its view
    and cache key are what they were)."""
    def submit(**fields) -> dict:
        return ingress.submit_text2img.remote(Text2ImgJob(prompt="a lighthouse", width=64, height=64, seed=5,
                                                          steps=2, guidanceScale=7.0, **fields), caller()).result()

    def image(job_id: str) -> np.ndarray:
        def done():
            job = ingress.get_job.remote(job_id, caller(), False).result()
            return job if job["status"] in ("completed", "failed", "cancelled") else None

        finished = until(done, timeout=120)
        assert finished["status"] == "completed" and not finished["result"]["cached"], finished["error"]
        name = finished["result"]["urls"][0].rsplit("/", 1)[1]
        return pixels(Image.open(io.BytesIO(ingress.job_image.remote(job_id, name, caller()).result().body)))

    guided, plain = submit(controlnets=[CANNY]), submit()
    queued = ingress.submit_async.remote(AsyncGenerate(**SMALL, controlnets=[CANNY]), caller()).result()
    assert guided["request"]["controlnets"] == [ControlNetUnit(**CANNY).model_dump()]  # every field, as it runs
    assert "controlnets" not in plain["request"]
    sync = pixels(decode_b64(generated(ingress, GenerateRequest(**SMALL, controlnets=[CANNY])).imageData))
    made = image(guided["id"])
    assert np.array_equal(made, sync) and np.array_equal(image(queued.jobId), sync)
    assert np.abs(made - image(plain["id"])).mean() > 1.0
