"""Content safety and the result cache over HTTP: the session's cluster redeployed with the NSFW filter and the
result cache on (the Ingress and JobRunner restart; the checker itself stays), restored afterwards.

The tiny checker flags exactly one generation (``deployments.factory.safety.FLAGGED``: the tiny base's image for
that request), so every API family shows both outcomes: that request comes back replaced (black) and flagged,
the next seed comes back untouched (the pixels the base makes for it) and unflagged. With the filter on, A1111's
images are marked (watermark, content credentials) once, by the checker; cache keys follow the checkpoint.
"""

from __future__ import annotations

import base64
import io
import json
import re
import time

import numpy as np
import pytest
from PIL import Image

from deployments.factory.safety import FLAGGED
from tests.conftest import BUCKET, DEPLOYMENT_OPTIONS, ROOT
from tests.helpers import LONG, b64, decode_b64, drain, error, pixels, s3_client, submit, wait
from tests.test_events import stream

pytestmark = pytest.mark.integration

BENIGN = {**FLAGGED, "seed": FLAGGED["seed"] + 1}
SEED000 = {"prompt": FLAGGED["prompt"], "width": 64, "height": 64, "num_inference_steps": FLAGGED["steps"],
           "use_refiner": False}
SEED003 = {"prompt": FLAGGED["prompt"], "width": 64, "height": 64, "steps": FLAGGED["steps"], "guidanceScale": 7.0}
# A1111's Automatic for Euler a is its evenly spaced schedule; DDIM's stride from timestep 1 is the checkpoint's own
# (leading, offset 1), which the native routes and the factory's flagged generation run.
A1111 = {"prompt": FLAGGED["prompt"], "width": 64, "height": 64, "steps": FLAGGED["steps"], "cfg_scale": 7.0,
         "scheduler": "DDIM"}


A1111_MARKED = {"prompt": "a lighthouse at dusk", "width": 256, "height": 256, "steps": 2, "cfg_scale": 7.0,
                "seed": 31}  # large enough for the watermark (256 a side)


@pytest.fixture(scope="module")
def marked_unscreened(service) -> bytes:
    """An A1111 image as its last stage (the base) encodes and marks it with the filter off: asked before
    ``screened`` turns the filter on (which depends on this fixture, so it always comes first)."""
    answer = service.post("/sdapi/v1/txt2img", json=A1111_MARKED)
    assert answer.status_code == 200, answer.text
    assert json.loads(answer.json()["info"])["nsfw"] is None  # the filter is off
    return base64.b64decode(answer.json()["images"][0])


@pytest.fixture(scope="module")
def screened(service, marked_unscreened):
    from tests import cluster

    checker = cluster.app_args()["safety_checker"]
    cluster.deploy(DEPLOYMENT_OPTIONS, {"safety_checker": {**checker, "enabled": True}, "result_cache": True})
    yield service
    cluster.deploy(DEPLOYMENT_OPTIONS)


@pytest.fixture(scope="module")
def benign_pixels(base):
    """What the base makes for the benign request, unscreened (the session's in-process generator)."""
    from deployments.support.generation import GenerationRequest

    return pixels(base.generate(GenerationRequest(**BENIGN)).images[0])


def base_batches() -> int:
    from ray import serve

    handle = serve.get_deployment_handle("SDXLBase", app_name="imagegen")
    return handle.describe.remote().result(timeout_s=30)["batching"]["batches"]


def black(image: Image.Image) -> bool:
    return image.size == (64, 64) and pixels(image.convert("RGB")).max() == 0


def untouched(image: Image.Image, expected: np.ndarray) -> bool:
    # Batched with other requests the base may differ by rounding (under 1/255, tests/test_batching.py).
    return int(np.abs(pixels(image.convert("RGB")) - expected).max()) <= 1


def stored(data: str) -> Image.Image:
    """An image as an answer carries it: plain base64, or a data URI."""
    return Image.open(io.BytesIO(base64.b64decode(data.split(",", 1)[-1])))


# --- every API family: both outcomes ---------------------------------------------------------------------------

def test_generate_flags_and_replaces_only_the_flagged_image(screened, benign_pixels):
    flagged = screened.post("/generate", json={**SEED000, "seed": FLAGGED["seed"]})
    assert flagged.status_code == 200, flagged.text
    body = flagged.json()
    assert body["nsfw"] is True and black(decode_b64(body["image"])) and black(decode_b64(body["imageData"]))
    assert "image 1 of 1 flagged by the safety checker: replaced by a black image" in body["warnings"]
    benign = screened.post("/generate", json={**SEED000, "seed": BENIGN["seed"]}).json()
    assert benign["nsfw"] is False and untouched(decode_b64(benign["image"]), benign_pixels)
    assert not any("safety checker" in w for w in benign["warnings"])


def test_async_generate_jobs_report_nsfw(screened, benign_pixels):
    flagged = wait(screened, submit(screened, "/generate/async", {**SEED000, "seed": FLAGGED["seed"]})["jobId"])
    benign = wait(screened, submit(screened, "/generate/async", {**SEED000, "seed": BENIGN["seed"]})["jobId"])
    assert flagged["status"] == benign["status"] == "completed"
    assert flagged["result"]["nsfw"] == [True] and benign["result"]["nsfw"] == [False]
    assert black(stored(flagged["result"]["images"][0]))
    assert untouched(stored(benign["result"]["images"][0]), benign_pixels)
    result = screened.get(f"/jobs/{flagged['id']}/result").json()
    assert result["nsfw"] is True and black(decode_b64(result["imageData"]))
    assert screened.get(f"/jobs/{benign['id']}/result").json()["nsfw"] is False


def test_seed003_jobs_report_nsfw_per_image(screened, benign_pixels):
    flagged = wait(screened, submit(screened, body={**SEED003, "seed": FLAGGED["seed"]})["id"])
    benign = wait(screened, submit(screened, body={**SEED003, "seed": BENIGN["seed"]})["id"])
    assert flagged["result"]["nsfw"] == [True] and black(stored(flagged["result"]["images"][0]))
    assert any("flagged by the safety checker" in w for w in flagged["result"]["warnings"])
    assert benign["result"]["nsfw"] == [False] and untouched(stored(benign["result"]["images"][0]), benign_pixels)


def test_batch_sizes_crop_the_screened_base(screened):
    body = {"prompt": FLAGGED["prompt"], "sizes": ["64x64", "32x32"], "baseSizes": {"square": [64, 64]},
            "steps": FLAGGED["steps"], "guidanceScale": 7.0}
    flagged = wait(screened, submit(screened, "/generate/batch-sizes", {**body, "seed": FLAGGED["seed"]})["job_id"])
    benign = wait(screened, submit(screened, "/generate/batch-sizes", {**body, "seed": BENIGN["seed"]})["job_id"])
    for size in flagged["images"].values():
        assert size["nsfw"] is True and pixels(stored(size["imageData"]).convert("RGB")).max() == 0
    for size in benign["images"].values():
        assert size["nsfw"] is False and pixels(stored(size["imageData"]).convert("RGB")).max() > 0
    assert screened.get(f"/jobs/{flagged['id']}/result").json()["nsfw"] is True


def test_a1111_reports_nsfw_per_image_in_info(screened, benign_pixels):
    # One batch of two consecutive seeds: the flagged one first, then the benign one.
    answer = screened.post("/sdapi/v1/txt2img", json={**A1111, "seed": FLAGGED["seed"], "batch_size": 2})
    assert answer.status_code == 200, answer.text
    body = answer.json()
    info = json.loads(body["info"])
    assert info["all_seeds"] == [FLAGGED["seed"], BENIGN["seed"]] and info["nsfw"] == [True, False]
    first, second = (decode_b64(i) for i in body["images"])
    assert black(first) and untouched(second, benign_pixels)
    assert first.text["parameters"] == info["infotexts"][0]  # the checker wrote A1111's infotext chunk
    assert any("image 1 of 2 flagged" in w for w in info["warnings"])


def test_a1111_images_are_screened_then_marked_once(screened, marked_unscreened):
    """With the filter on the checker encodes A1111's images, and so marks them, in place of the base: the same
    pixels as the base gives them with the filter off (a second watermark would move pixels, a missing one too),
    and one signed creation."""
    body = screened.post("/sdapi/v1/txt2img", json=A1111_MARKED).json()
    info = json.loads(body["info"])
    assert info["nsfw"] == [False]
    data = base64.b64decode(body["images"][0])
    image = Image.open(io.BytesIO(data))
    assert image.info["parameters"] == info["infotexts"][0]
    assert np.array_equal(pixels(image.convert("RGB")),
                          pixels(Image.open(io.BytesIO(marked_unscreened)).convert("RGB")))
    answer = screened.post("/provenance/verify", json={"image": base64.b64encode(data).decode()})
    assert answer.status_code == 200, answer.text
    report = answer.json()
    assert report["watermark"]["found"] and report["watermark"]["bit_accuracy"] == 1.0
    credentials = report["credentials"]
    assert credentials["validation_state"] == "trusted" and credentials["ingredients"] == []
    assert [a["action"] for a in credentials["actions"]] == ["c2pa.created"]
    assert credentials["checkpoint"] == info["sd_model_name"]


def test_an_unflagged_illustration_is_uploaded(screened, s3_server, astronaut):
    client = s3_client(s3_server)
    if BUCKET not in [b["Name"] for b in client.list_buckets()["Buckets"]]:
        client.create_bucket(Bucket=BUCKET)
    client.put_object(Bucket=BUCKET, Key="avatars/safe-user.png", Body=base64.b64decode(b64(astronaut)))
    answer = screened.post("/v1/images/memory", json={"user_id": "safe-user", "prompt": "a walk",
                                                      "num_inference_steps": 2})
    assert answer.status_code == 200, answer.text
    key = answer.json()["data"][0]["s3_uri"].removeprefix(f"s3://{BUCKET}/")
    assert Image.open(io.BytesIO(client.get_object(Bucket=BUCKET, Key=key)["Body"].read())).size == (256, 256)


def test_clients_cannot_turn_the_filter_off(screened):
    body = {**SEED000, "seed": FLAGGED["seed"], "nsfw": False, "enable_nsfw_filter": False,
            "safety_checker": {"enabled": False}, "cached": True}
    assert screened.post("/generate", json=body).json()["nsfw"] is True
    a1111 = {**A1111, "seed": FLAGGED["seed"], "override_settings": {"enable_nsfw_filter": False}}
    assert json.loads(screened.post("/sdapi/v1/txt2img", json=a1111).json()["info"])["nsfw"] == [True]


@pytest.mark.parametrize("seed", [-2, 2**32, "thirteen", 1.5, None])
def test_hostile_seeds_are_a_structured_422(screened, seed):
    error(screened.post("/generate", json={**SEED000, "seed": seed}), 422, "INVALID_INPUT", "seed")


# --- the result cache -------------------------------------------------------------------------------------------

def test_an_identical_request_is_answered_from_the_cache(screened):
    request = {**SEED000, "seed": 501, "width": 128, "height": 128, "num_inference_steps": 6}
    first = screened.post("/generate", json=request).json()
    batches = base_batches()
    again = screened.post("/generate", json=request).json()
    assert not first["cached"] and again["cached"] and again["imageData"] == first["imageData"]
    assert again["seed"] == 501 and again["nsfw"] is False and again["warnings"] == first["warnings"]
    assert base_batches() == batches  # the base never ran
    # Anything else misses: another step count, another size, a random seed (never cached).
    for changed in ({"num_inference_steps": 5}, {"width": 136}, {"seed": -1}, {"seed": -1}):
        assert not screened.post("/generate", json={**request, **changed}).json()["cached"]
    assert base_batches() == batches + 4


def test_queued_and_a1111_requests_are_cached_too(screened):
    job = {**SEED003, "seed": 502}
    first = wait(screened, submit(screened, body=job)["id"])
    batches = base_batches()
    again = wait(screened, submit(screened, body={**job, "priority": "high"})["id"])
    assert not first["result"]["cached"] and again["result"]["cached"]
    assert again["result"]["images"] == first["result"]["images"] and again["result"]["seed"] == 502
    # seed 002's queued /generate shares /generate's entries.
    sync = screened.post("/generate", json={**SEED000, "seed": 503}).json()
    queued = wait(screened, submit(screened, "/generate/async", {**SEED000, "seed": 503})["jobId"])
    assert queued["result"]["cached"] and stored(queued["result"]["images"][0]).tobytes() == \
        decode_b64(sync["imageData"]).tobytes()
    a1111 = {**A1111, "seed": 504, "batch_size": 2}
    one, two = (screened.post("/sdapi/v1/txt2img", json=a1111).json() for _ in range(2))
    assert two["images"] == one["images"] and json.loads(two["info"])["cached"]
    assert not json.loads(one["info"])["cached"]
    assert base_batches() == batches + 2  # the first /generate and the first A1111 batch; the rest were hits


def test_edits_are_cached_on_their_uploads(screened, astronaut):
    """An A1111 img2img and a seed 003 img2img job hit on the same upload and seed, and miss on another upload."""
    photo, other = b64(astronaut.resize((64, 64))), b64(astronaut.resize((64, 64)).rotate(90))
    a1111 = {**A1111, "seed": 506, "init_images": [photo], "denoising_strength": 0.6}
    first, again, moved = (screened.post("/sdapi/v1/img2img", json=body).json()
                           for body in (a1111, a1111, {**a1111, "init_images": [other]}))
    assert [json.loads(answer["info"])["cached"] for answer in (first, again, moved)] == [False, True, False]
    assert again["images"] == first["images"] and moved["images"] != first["images"]
    job = {**SEED003, "seed": 507, "initImage": photo, "strength": 0.6}
    batches = base_batches()
    results = [wait(screened, submit(screened, "/generate/img2img", body)["id"])["result"]
               for body in (job, job, {**job, "initImage": other})]
    assert [r["cached"] for r in results] == [False, True, False]
    assert results[1]["images"] == results[0]["images"]
    assert base_batches() == batches + 2  # the hit ran nothing


def test_the_cache_keys_on_the_checkpoint_the_request_resolves_to(screened):
    """Another checkpoint misses; an alias of one, or the default named explicitly, is the same request."""
    request = {**SEED000, "seed": 505}
    default = screened.post("/generate", json=request).json()
    aliases = {"tiny-sdxl-base": "photorealistic", "tiny-sdxl-base-b": "anime"}  # configs/cpu.yaml
    other = next(name for name in aliases if name != default["checkpoint"])
    switched = screened.post("/generate", json={**request, "model": other}).json()
    by_alias = screened.post("/generate", json={**request, "model": aliases[other]}).json()
    named = screened.post("/generate", json={**request, "model": default["checkpoint"]}).json()
    assert not default["cached"] and not switched["cached"] and switched["checkpoint"] == other
    assert switched["imageData"] != default["imageData"]
    assert by_alias["cached"] and by_alias["imageData"] == switched["imageData"]
    assert named["cached"] and named["imageData"] == default["imageData"]


def test_readme_content_safety_example(screened):
    section = (ROOT / "README.md").read_text().split("## Content safety and the result cache")[1].split("\n## ")[0]
    body = json.loads(re.search(r"-d '(\{.*?\})'", section, re.S).group(1))
    first, second = (screened.post("/generate", json=body).json() for _ in range(2))
    assert first["nsfw"] is True and black(decode_b64(first["image"]))
    assert second["cached"] and second["imageData"] == first["imageData"]
    from graphs.app import AppArgs

    block = re.search(r"```yaml\n(.*?)```", section, re.S).group(1)
    import yaml

    args = AppArgs.model_validate({"base": {"model": {"source": "x"}}, **yaml.safe_load(block)})
    assert args.safety_checker is not None and args.safety_checker.replacement == "blur"


def test_no_previews_while_the_filter_is_on(screened):
    """A preview is the unscreened generation: with the filter on, a running job's /progress and event log show its
    steps but no picture of it."""
    drain(screened)
    job = submit(screened, body={**LONG, "steps": 60, "preview_every": 5})
    deadline, progress = time.monotonic() + 60, {}
    while time.monotonic() < deadline:
        progress = screened.get("/sdapi/v1/progress").json()
        if progress["state"]["sampling_step"] >= 10:
            break
        time.sleep(0.2)
    assert progress["state"]["job"] == job["id"] and progress["state"]["sampling_step"] >= 10
    assert progress["current_image"] is None
    assert wait(screened, job["id"])["status"] == "completed"  # run to the end: the runner logs its progress
    names = [event["event"] for event in stream(screened, job["id"])]
    assert "progress" in names and "preview" not in names
