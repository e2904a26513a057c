"""The graph layer with the NSFW filter on and the result cache on, in-process (Serve's local testing mode).

Seed 001 takes no seed, so no request of it can be steered onto the tiny checker's one flagged generation: here
the checker runs with ``adjustment: 2.0`` (the strictest setting, which flags every image) to prove that a
flagged illustration is never uploaded and answers 422 ``CONTENT_FLAGGED``. The same application shows that the
filter's verdict, and its replacement, are what the result cache keeps.
"""

from __future__ import annotations

import base64

import numpy as np
import pytest
import yaml

from deployments.support.errors import ContentFlagged
from graphs.api.errors import unwrap
from graphs.api.generate import GenerateRequest
from graphs.api.illustration import MemoryRequest, SubjectRequest
from tests.conftest import ROOT
from tests.helpers import b64, decode_b64, generated, pixels, s3_client

BUCKET = "graph-safety"


@pytest.fixture(scope="module")
def monkeypatch_module():
    with pytest.MonkeyPatch.context() as patch:
        yield patch


@pytest.fixture(scope="module")
def photos(s3_server, astronaut):
    client = s3_client(s3_server)
    client.create_bucket(Bucket=BUCKET)
    client.put_object(Bucket=BUCKET, Key="avatars/user7.png", Body=base64.b64decode(b64(astronaut)))
    client.put_object(Bucket=BUCKET, Key="subjects/user7.png", Body=base64.b64decode(b64(astronaut)))
    return client


@pytest.fixture(scope="module")
def ingress(tiny, tmp_path_factory, monkeypatch_module, s3_server, photos):
    from ray import serve

    import graphs.app
    from graphs.app import build_app

    for name, value in {"TINY_MODELS": str(tiny), "JOBS_DATA_DIR": str(tmp_path_factory.mktemp("graph-safety")),
                        "MODEL_CACHE_DIR": str(tmp_path_factory.mktemp("graph-safety-hashes")),  # never the user's
                        "AWS_ENDPOINT_URL": s3_server, "S3_BUCKET_NAME": BUCKET, "AWS_ACCESS_KEY_ID": "testing",
                        "AWS_SECRET_ACCESS_KEY": "testing", "ILLUSTRATION_SIZE": "256",
                        "DEFAULT_NUM_INFERENCE_STEPS": "2"}.items():
        monkeypatch_module.setenv(name, value)
    args = yaml.safe_load((ROOT / "configs" / "cpu.yaml").read_text())["applications"][0]["args"]
    args["safety_checker"].update(enabled=True, adjustment=2.0)
    args["result_cache"] = True
    # A second in-process application in this pytest process (tests/test_graph.py runs one): Serve's ingress keeps a
    # frozen copy of the FastAPI app that the first run tied to its live replica, so this one gets a fresh copy.
    original = graphs.app.Ingress.func_or_class.__bases__[0]
    monkeypatch_module.setattr(graphs.app, "Ingress", graphs.app.Ingress.options(
        func_or_class=serve.ingress(graphs.app.app)(original)))
    return serve.run(build_app(args), name="graph-safety", _local_testing_mode=True)


def uploads(client) -> list[str]:
    listing = client.list_objects_v2(Bucket=BUCKET, Prefix="generated/")
    return [o["Key"] for o in listing.get("Contents", [])]


@pytest.mark.parametrize("body", [MemoryRequest(user_id="user7", prompt="first day at school"),
                                  SubjectRequest(user_id="user7", num_inference_steps=2)])
def test_a_flagged_illustration_is_not_uploaded(ingress, photos, body):
    method = ingress.memory if isinstance(body, MemoryRequest) else ingress.subject
    with pytest.raises(Exception) as caught:  # noqa: PT011 - the handle wraps the route's error
        method.remote(body).result()
    error = unwrap(caught.value)
    assert isinstance(error, ContentFlagged) and error.code == "CONTENT_FLAGGED"
    assert error.details["nsfw"] is True
    assert uploads(photos) == []


def test_a_flagged_generation_is_black_and_its_verdict_is_cached(ingress):
    request = GenerateRequest(prompt="anything", seed=5, width=64, height=64, num_inference_steps=2,
                              use_refiner=False)
    first = generated(ingress, request)
    assert first.nsfw is True and not first.cached
    assert pixels(decode_b64(first.image).convert("RGB")).max() == 0
    assert any("flagged by the safety checker" in w for w in first.warnings)
    again = generated(ingress, request)
    assert again.cached and again.nsfw is True and again.imageData == first.imageData
    assert again.warnings == first.warnings and again.seed == 5
    random_seed = request.model_copy(update={"seed": -1})
    assert not generated(ingress, random_seed).cached
    assert not generated(ingress, random_seed).cached


def test_face_restoration_comes_before_the_filter(ingress):
    request = GenerateRequest(prompt="a portrait", seed=6, width=128, height=128, num_inference_steps=2,
                              use_refiner=False, use_face_restoration=True)
    answer = generated(ingress, request)
    assert answer.nsfw is True and np.asarray(decode_b64(answer.image)).max() == 0
    faces = next(i for i, w in enumerate(answer.warnings) if "no face" in w)  # random weights paint no face
    flagged = next(i for i, w in enumerate(answer.warnings) if "flagged by the safety checker" in w)
    assert faces < flagged  # the faces stage ran first; the checker screened its output
