"""The graph layer: the whole DAG (ingress and the five model deployments on the tiny models) run in-process with
Serve's local testing mode, the plans called through the ingress handle, no cluster and no HTTP."""

from __future__ import annotations

import base64
import io

import pytest
import yaml
from PIL import Image

from graphs.api.generate import GenerateRequest
from graphs.api.processing import ClipFocalRequest
from tests.conftest import ROOT
from tests.helpers import b64, generated


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
