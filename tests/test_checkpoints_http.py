"""Several checkpoints over HTTP, with two ingress and two SDXLBase replicas, each base replica holding one
checkpoint (configs/cpu.yaml's ``max_loaded_checkpoints: 1``): Serve routes a request to the replica that holds
its checkpoint, every API family selects one (or gets 422 with the choices), the A1111 default is shared by the
ingress replicas and spares requests in flight, listings answer in A1111's shapes, refresh picks up dropped
files, and the latent hires fix runs on the latents."""

from __future__ import annotations

import concurrent.futures
import hashlib
import json
import logging
import os
import shutil
import time
from collections import Counter

import numpy as np
import pytest

from tests.conftest import DEPLOYMENT_OPTIONS
from tests.helpers import decode_b64, error, pixels, submit, until, wait

pytestmark = pytest.mark.integration
logger = logging.getLogger(__name__)

A, B, FILE = "tiny-sdxl-base", "tiny-sdxl-base-b", "sdxl-base-b"
QUICK = {"prompt": "a lighthouse", "width": 64, "height": 64, "num_inference_steps": 2, "seed": 5,
         "use_refiner": False}
A1111 = {"prompt": "a lighthouse", "width": 64, "height": 64, "steps": 2, "seed": 5}


@pytest.fixture(scope="module")
def replicas(service):
    from ray import serve

    from tests import cluster

    cluster.deploy({**DEPLOYMENT_OPTIONS, "Ingress": {"num_replicas": 2}, "SDXLBase": {"num_replicas": 2}})
    yield service, serve.get_deployment_handle("SDXLBase", app_name="imagegen")
    service.post("/sdapi/v1/options", json={"sd_model_checkpoint": A})
    cluster.deploy(DEPLOYMENT_OPTIONS)


def per_replica(handle, polls: int = 24) -> dict[str, dict]:
    """Each base replica's checkpoints (held, loads, evictions), by replica id (each poll reaches a random one)."""
    seen = {}
    for _ in range(polls):
        described = handle.describe.remote().result(timeout_s=60)
        seen[described["replica"]] = described["checkpoints"]
    return seen


def generate(service, model: str | None = None, **extra) -> dict:
    response = service.post("/generate", json={**QUICK, **extra, **({"model": model} if model else {})})
    assert response.status_code == 200, response.text
    return response.json()


def a1111(service, checkpoint: str | None = None, **extra) -> tuple[dict, dict]:
    overrides = {"override_settings": {"sd_model_checkpoint": checkpoint}} if checkpoint else {}
    response = service.post("/sdapi/v1/txt2img", json={**A1111, **overrides, **extra})
    assert response.status_code == 200, response.text
    body = response.json()
    return body, json.loads(body["info"])


def test_alternating_checkpoints_stay_on_the_replica_that_holds_each(replicas):
    service, handle = replicas
    start = per_replica(handle)
    assert len(start) == 2 and all(s["held"] == [A] and s["loads"] == {A: 1} for s in start.values())
    assert generate(service, B)["checkpoint"] == B  # no replica holds it: the one Serve picks loads it
    time.sleep(1.0)  # the replica's new holding reaches the routers (Serve pushes it every 0.1 s)
    for i in range(8):
        model = (A, B)[i % 2]
        assert generate(service, model, seed=i)["checkpoint"] == model
    after = per_replica(handle)
    loads = Counter()
    for state in after.values():
        loads.update(state["loads"])
    logger.info("loads per checkpoint over both replicas after 9 alternating requests: %s", dict(loads))
    print(f"two replicas, one checkpoint each, 9 alternating requests: loads {dict(loads)}, "  # noqa: T201
          f"per replica {[s['loads'] for s in after.values()]}")
    assert loads == {A: 2, B: 1}  # the two start-up loads and one of B: no request reloaded
    assert sorted(s["held"] for s in after.values()) == [[A], [B]]
    assert all(s["evicted_alive"] == 0 for s in after.values())  # the evicted default's memory is freed

    def models() -> dict:
        listed = {m["id"]: m for m in service.get("/models").json()["models"] if m["type"] == "base"}
        return listed if {r for m in listed.values() for r in m["replicas"]} == set(after) else {}

    listed = until(models)  # the board has heard from both live replicas
    assert list(listed) == [A, B, FILE]
    assert [len(listed[A]["replicas"]), len(listed[B]["replicas"])] == [1, 1]
    assert listed[A]["replicas"] != listed[B]["replicas"] and listed[A]["loaded"] and not listed[FILE]["loaded"]
    assert listed[B]["aliases"] == ["anime"] and listed[FILE]["origin"] == "folder"


def test_every_family_selects_a_checkpoint(replicas):
    service, _ = replicas
    photo, anime = generate(service, "photorealistic"), generate(service, "anime")
    assert (photo["checkpoint"], anime["checkpoint"], photo["model"]) == (A, B, "SDXL")  # seed 000 keeps "SDXL"
    assert np.abs(pixels(decode_b64(photo["image"])) - pixels(decode_b64(anime["image"]))).mean() > 5.0
    queued = wait(service, submit(service, "/generate/async", {**QUICK, "model": "anime"})["jobId"])
    assert queued["status"] == "completed" and queued["result"]["checkpoint"] == B
    job = submit(service, body={"prompt": "a fox", "width": 64, "height": 64, "steps": 2, "model": B})
    assert job["request"]["model"] == B
    assert wait(service, job["id"])["result"]["parameters"]["model"] == B
    batch = submit(service, "/generate/batch-sizes", {"prompt": "a fox", "sizes": ["64x64"], "steps": 2,
                                                      "model": "photorealistic"})
    assert wait(service, batch["jobId"])["status"] == "completed"
    first, info_a = a1111(service, A)
    second, info_b = a1111(service, f"{B} [0123456789]")  # A1111 clients send titles
    assert (info_a["sd_model_name"], info_b["sd_model_name"]) == (A, B)
    assert np.abs(pixels(decode_b64(first["images"][0])) - pixels(decode_b64(second["images"][0]))).mean() > 5.0


def test_unknown_checkpoints_are_422_with_the_choices_in_every_family(replicas):
    service, _ = replicas
    queued_before = service.get("/queue/status").json()
    nope = "sd_xl_turbo"
    attempts = [
        (service.post("/generate", json={**QUICK, "model": nope}), "model"),
        (service.post("/generate/async", json={**QUICK, "model": nope}), "model"),
        (service.post("/generate/text2img", json={"prompt": "x", "model": nope}), "model"),
        (service.post("/generate/batch-sizes", json={"prompt": "x", "sizes": ["64x64"], "model": nope}), "model"),
        (service.post("/sdapi/v1/txt2img", json={**A1111, "override_settings": {"sd_model_checkpoint": nope}}),
         "override_settings.sd_model_checkpoint"),
        (service.post("/sdapi/v1/options", json={"sd_model_checkpoint": nope}), "sd_model_checkpoint"),
        (service.post("/sdapi/v1/txt2img", json={**A1111, "refiner_checkpoint": A}), "refiner_checkpoint"),
    ]
    for response, field in attempts:
        body = error(response, 422, "UNKNOWN_MODEL", field)
        assert body["details"]["choices"], field
    assert error(attempts[0][0], 422, "UNKNOWN_MODEL")["details"]["choices"] == [
        A, B, FILE, "photorealistic", "anime", "stable-diffusion-xl", "stable-diffusion-v1.5"]
    assert service.get("/queue/status").json() == queued_before  # no job was created


def test_the_default_switch_reaches_every_ingress_and_spares_requests_in_flight(replicas):
    service, _ = replicas
    slow = {**A1111, "width": 256, "height": 256, "steps": 100, "seed": 9}
    owner = {"authorization": "Bearer checkpoint-in-flight"}
    try:
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            victim = pool.submit(service.post, "/sdapi/v1/txt2img", json=slow, headers=owner)
            until(lambda: service.get("/sdapi/v1/progress", headers=owner,
                                      params={"skip_current_image": "true"}).json()["state"]["sampling_step"] > 0)
            assert service.post("/sdapi/v1/options", json={"sd_model_checkpoint": "anime"}).status_code == 200
            titles = {service.get("/sdapi/v1/options").json()["sd_model_checkpoint"] for _ in range(12)}
            assert {t.split(" [")[0] for t in titles} == {B} and all(" [" in t for t in titles)  # both replicas
            assert {a1111(service, seed=i)[1]["sd_model_name"] for i in range(4)} == {B}
            finished = victim.result(timeout=300)
        assert finished.status_code == 200, finished.text
        assert json.loads(finished.json()["info"])["sd_model_name"] == A  # chosen when it started
        reference, _ = a1111(service, A, width=256, height=256, steps=100, seed=9)
        assert np.array_equal(pixels(decode_b64(finished.json()["images"][0])),
                              pixels(decode_b64(reference["images"][0])))  # undisturbed, pixel for pixel
        # A1111's override_settings_restore_afterwards: false makes the override the default.
        a1111(service, A, override_settings_restore_afterwards=False)
        assert service.get("/sdapi/v1/options").json()["sd_model_checkpoint"].startswith(f"{A} [")
    finally:
        service.post("/sdapi/v1/options", json={"sd_model_checkpoint": A})


def test_sd_models_and_listings_answer_in_a1111_shapes(replicas, tiny):
    service, _ = replicas
    listed = service.get("/sdapi/v1/sd-models").json()
    assert [m["model_name"] for m in listed] == [A, B, FILE, "tiny-sdxl-refiner"]
    for model in listed:
        assert set(model) == {"title", "model_name", "hash", "sha256", "filename", "config"}
        assert model["title"] == f"{model['model_name']} [{model['hash']}]" and model["hash"] == model["sha256"][:10]
    single = hashlib.sha256((tiny / "checkpoints" / "sdxl-base-b.safetensors").read_bytes()).hexdigest()
    assert listed[2]["sha256"] == single and listed[2]["filename"] == "sdxl-base-b.safetensors"
    # The refiner listed there is selectable by its title, as A1111 clients send it.
    _, info = a1111(service, refiner_checkpoint=listed[3]["title"], refiner_switch_at=0.5)
    assert "Refiner: " in info["infotexts"][0]
    paths = service.get("/openapi.json").json()["paths"]
    listings = [p for p, ops in paths.items() if p.startswith("/sdapi/v1/") and "get" in ops and "{" not in p]
    assert len(listings) >= 20
    for path in listings:
        assert service.get(path).status_code == 200, path


def test_refresh_picks_up_a_dropped_checkpoint_and_lora(replicas, tiny):
    service, _ = replicas
    tag = os.urandom(4).hex()
    checkpoint = tiny / "checkpoints" / f"dropped-{tag}.safetensors"
    lora = tiny / "loras" / f"dropped-{tag}.safetensors"
    try:
        shutil.copy(tiny / "checkpoints" / "sdxl-base-b.safetensors", checkpoint)
        shutil.copy(tiny / "loras" / "tiny-style.safetensors", lora)
        assert service.post("/sdapi/v1/refresh-checkpoints").json() == {}
        assert service.post("/sdapi/v1/refresh-loras").json() == {}
        assert f"dropped-{tag}" in [m["model_name"] for m in service.get("/sdapi/v1/sd-models").json()]
        assert f"dropped-{tag}" in [m["name"] for m in service.get("/sdapi/v1/loras").json()]
        _, info = a1111(service, f"dropped-{tag}", prompt=f"a fox <lora:dropped-{tag}:0.8>")
        assert info["sd_model_name"] == f"dropped-{tag}" and info["warnings"] == []
    finally:
        checkpoint.unlink(missing_ok=True)
        lora.unlink(missing_ok=True)
        service.post("/sdapi/v1/refresh-checkpoints")
    error(service.post("/sdapi/v1/txt2img", json={**A1111, "override_settings": {
        "sd_model_checkpoint": f"dropped-{tag}"}}), 422, "UNKNOWN_MODEL", "override_settings.sd_model_checkpoint")


def test_latent_hires_fix_resizes_the_latents(replicas):
    service, _ = replicas
    hires = {"enable_hr": True, "hr_scale": 2, "denoising_strength": 0.6, "hr_second_pass_steps": 2}
    images = {}
    for upscaler in ("Latent", "Latent (nearest)", "Lanczos"):
        body, info = a1111(service, A, hr_upscaler=upscaler, **hires)
        images[upscaler] = pixels(decode_b64(body["images"][0]))
        assert images[upscaler].shape == (128, 128, 3), upscaler
        assert f"Hires upscaler: {upscaler}" in info["infotexts"][0]
    assert np.abs(images["Latent"] - images["Lanczos"]).mean() > 2.0  # not the pixel path any more
    assert np.abs(images["Latent"] - images["Latent (nearest)"]).mean() > 0.5


def test_readme_checkpoint_examples(replicas):
    """The README's "Checkpoints" section: its config validates and every command answers as it says."""
    import shlex

    import yaml

    from graphs.app import AppArgs
    from tests.conftest import ROOT

    service, _ = replicas
    section = (ROOT / "README.md").read_text().split("## Checkpoints\n")[1].split("\n## ")[0]
    config = yaml.safe_load(section.split("```yaml\n")[1].split("```")[0])
    assert AppArgs.model_validate(config).base.max_loaded_checkpoints == 3
    commands = [shlex.split(line) for line in section.splitlines() if line.startswith("curl ")]
    assert len(commands) == 6, "the README lost its checkpoint examples"
    answers = []
    try:
        for words in commands:
            url = next(w for w in words if w.startswith("http://"))
            body = json.loads(words[words.index("-d") + 1]) if "-d" in words else None
            method = "POST" if body is not None or "-X" in words else "GET"
            response = service.request(method, url.removeprefix("http://127.0.0.1:8000"), json=body)
            assert response.status_code == 200, (url, response.text)
            answers.append(response.json())
        models, generated, hires, _, options, _ = answers
        assert [m["id"] for m in models["models"] if m["type"] == "base"] == [A, B, FILE]
        assert generated["checkpoint"] == B and generated["final_resolution"] == "256x256"
        assert decode_b64(hires["images"][0]).size == (256, 256)
        assert json.loads(hires["info"])["sd_model_name"] == FILE
        assert options["sd_model_checkpoint"].startswith(f"{B} [")
    finally:
        service.post("/sdapi/v1/options", json={"sd_model_checkpoint": A})
