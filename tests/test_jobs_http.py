"""Async jobs over HTTP (seeds 002 and 003) on the shared local Ray cluster: MAX_CONCURRENT_JOBS=1,
MAX_QUEUE_SIZE=8, a 3 s lease (tests/conftest.py)."""

from __future__ import annotations

import base64
import time

import pytest
from PIL import Image

from tests.helpers import LONG, SMALL, b64, decode_b64, drain, error, submit, wait

pytestmark = pytest.mark.integration
def test_seed_003_text2img_flow_without_a_json_content_type(service):
    import json

    # The seed's own example names "stable-diffusion-v1.5": configs/cpu.yaml makes it an alias of the default.
    response = service.post("/generate/text2img", content=json.dumps({**SMALL, "model": "stable-diffusion-v1.5"}),
                            headers={"content-type": "application/x-www-form-urlencoded"})
    assert response.status_code == 202, response.text
    job = response.json()
    assert job["id"].startswith("job_") and job["type"] == "text2img" and job["status"] in ("queued", "processing")
    assert job["createdAt"].endswith("Z") and job["progress"] == 0
    done = wait(service, job["id"])
    assert done["status"] == "completed" and done["progress"] == 100
    result = done["result"]
    assert result["images"][0].startswith("data:image/png;base64,")
    assert decode_b64(result["images"][0]).size == (128, 128)
    assert result["seed"] == 11 and result["parameters"]["sampler"] == "euler_a" and result["timeTaken"] > 0
    assert result["parameters"]["model"] == "tiny-sdxl-base"
    assert done["startedAt"] and done["completedAt"] >= done["startedAt"]


@pytest.mark.parametrize("path,extra", [
    ("/generate/img2img", lambda img: {"initImage": "data:image/png;base64," + b64(img), "strength": 0.6}),
    ("/generate/inpaint", lambda img: {"image": b64(img), "mask": b64(Image.new("L", img.size, 255)),
                                       "inpaintingStrength": 0.9}),
])
def test_seed_003_image_jobs(service, astronaut, path, extra):
    image = astronaut.resize((128, 128))
    job = submit(service, path, {**SMALL, **extra(image)})
    done = wait(service, job["id"])
    assert done["status"] == "completed", done["error"]
    assert decode_b64(done["result"]["images"][0]).size == (128, 128)
    assert done["request"]["prompt"] == "a lighthouse"


def test_seed_003_style_transfer_needs_no_prompt(service, astronaut):
    job = submit(service, "/generate/style-transfer", {
        "contentImage": b64(astronaut.resize((128, 128))), "styleImage": b64(Image.new("RGB", (64, 64), "red")),
        "styleStrength": 0.7, "contentStrength": 0.3, "steps": 3})
    done = wait(service, job["id"])
    assert done["status"] == "completed", done["error"]
    assert decode_b64(done["result"]["images"][0]).size == (128, 128)


def test_submit_errors(service):
    body = error(service.post("/generate/text2img", json={"width": 128}), 422, "INVALID_INPUT", "prompt")
    assert body["error"] == "Prompt is required"
    error(service.post("/generate/img2img", json={**SMALL, "initImage": "bm90IGFuIGltYWdl"}), 400, "INVALID_IMAGE",
          "initImage")
    error(service.post("/generate/text2img", json={**SMALL, "width": 130}), 422, "INVALID_INPUT", "width")
    error(service.get("/jobs/job_0_nothing"), 404, "NOT_FOUND")
    error(service.post("/jobs/job_0_nothing/cancel"), 404, "NOT_FOUND")


def test_seed_002_async_flow_and_result(service):
    response = service.post("/generate/async", json={"prompt": "red apple", "width": 128, "height": 128,
                                                      "num_inference_steps": 3, "seed": 5})
    assert response.status_code == 202
    job_id = response.json()["jobId"]
    early = service.get(f"/jobs/{job_id}/result")
    assert early.status_code in (200, 409)
    assert wait(service, job_id)["status"] == "completed"
    result = service.get(f"/jobs/{job_id}/result").json()
    assert set(result) == {"imageData", "format", "width", "height"}
    assert decode_b64(result["imageData"]).size == (result["width"], result["height"]) == (128, 128)


def test_seed_002_batch_sizes_from_few_bases(service):
    started = time.perf_counter()
    response = service.post("/generate/batch-sizes", json={
        "prompt": "a portrait", "sizes": ["thumbnail", "og", "sidebar", "avatar"], "seed": 77, "priority": "high",
        "steps": 3, "derivatives": [64],
        "baseSizes": {"landscape": [640, 360], "square": [512, 512], "portrait": [320, 640]}})
    assert response.status_code == 202
    queued = response.json()
    assert queued["status"] == "queued" and queued["job_id"]
    done = wait(service, queued["job_id"])
    assert done["status"] == "completed", done["error"]
    assert done["bases_generated"] == 3 and done["seed"] == 77
    sizes = {name: (entry["width"], entry["height"]) for name, entry in done["images"].items()}
    assert sizes == {"thumbnail": (640, 360), "og": (1200, 630), "sidebar": (300, 600), "avatar": (512, 512)}
    assert {name: entry["aspect"] for name, entry in done["images"].items()} == {
        "thumbnail": "landscape", "og": "landscape", "sidebar": "portrait", "avatar": "square"}
    for name, entry in done["images"].items():
        assert decode_b64(entry["imageData"]).size == sizes[name]
        assert base64.b64decode(entry["imageData"], validate=True)  # plain base64, as seed 002's imageData is
        assert entry["upscaled"] == (name == "og")  # only og is larger than its crop: the neural upscaler ran
        assert decode_b64(entry["derivatives"]["64"]).width == 64
    print(f"4-size batch: {time.perf_counter() - started:.1f}s")  # noqa: T201


def test_unknown_size_is_refused(service):
    error(service.post("/generate/batch-sizes", json={"prompt": "x", "sizes": ["billboard"]}), 422,
          "INVALID_INPUT", "sizes")


def test_progress_rises_and_cancel_of_a_running_job(service):
    drain(service)
    # LONG's 150 steps: progress is sampled every 0.5 s, so a shorter job can end between a sample past 30 % and
    # the cancel on a quiet machine.
    job = submit(service, body=LONG)
    seen = []
    while len(seen) < 200:
        current = service.get(f"/jobs/{job['id']}").json()
        seen.append(current["progress"])
        if current["status"] == "completed" or current["progress"] >= 30:
            break
        time.sleep(0.1)
    assert current["status"] == "processing", current  # still running: there is something to cancel
    assert seen == sorted(seen) and seen[-1] > 0
    cancelled_at = time.monotonic()
    assert service.post(f"/jobs/{job['id']}/cancel").json()["success"]
    done = wait(service, job["id"], timeout=30)
    assert done["status"] == "cancelled"
    assert time.monotonic() - cancelled_at < 10  # stops within a denoising step (plus one heartbeat)
    assert wait(service, submit(service)["id"])["status"] == "completed"  # the slot is free again


def test_cancel_queued_priorities_and_finished(service):
    drain(service)
    blocker = submit(service, body=LONG)
    wait(service, blocker["id"], until=("processing",))
    queued = submit(service)
    low = submit(service, body={**SMALL, "priority": "low"})
    normal = submit(service, body={**SMALL, "priority": "normal"})
    high = submit(service, body={**SMALL, "priority": "high"})
    assert service.post(f"/jobs/{queued['id']}/cancel").json()["status"] == "cancelled"
    assert service.post(f"/jobs/{queued['id']}/cancel").status_code == 200  # twice is harmless
    listed = service.get("/jobs", params={"status": "cancelled"}).json()
    assert queued["id"] in [j["id"] for j in listed["jobs"]]
    service.post(f"/jobs/{blocker['id']}/cancel")
    done = {name: wait(service, j["id"]) for name, j in [("low", low), ("normal", normal), ("high", high)]}
    assert done["high"]["startedAt"] < done["normal"]["startedAt"] < done["low"]["startedAt"]
    assert service.get(f"/jobs/{queued['id']}").json()["startedAt"] is None  # it never ran
    error(service.post(f"/jobs/{high['id']}/cancel"), 409, "CONFLICT")


def test_queue_full_is_429_and_creates_nothing(service):
    drain(service)
    blocker = submit(service, body=LONG)
    wait(service, blocker["id"], until=("processing",))
    jobs = [submit(service) for _ in range(8)]
    before = service.get("/queue/status").json()
    assert before["queuedJobs"] == 8
    response = service.post("/generate/text2img", json=SMALL)
    error(response, 429, "QUEUE_FULL")
    assert int(response.headers["retry-after"]) > 0
    assert service.get("/queue/status").json()["queuedJobs"] == 8
    for job in [blocker, *jobs]:
        service.post(f"/jobs/{job['id']}/cancel")


def test_idempotency_key(service):
    drain(service)
    key = {"Idempotency-Key": f"k-{time.time()}"}
    first = submit(service, **key)
    second = submit(service, **key)
    assert first["id"] == second["id"]
    error(service.post("/generate/text2img", json={**SMALL, "seed": 99}, headers=key), 422, "INVALID_INPUT",
          "Idempotency-Key")
    wait(service, first["id"])


def test_queue_status_and_pagination(service):
    status = service.get("/queue/status").json()
    assert {"queuedJobs", "processingJobs", "completedJobs", "failedJobs", "averageProcessingTime"} <= set(status)
    assert status["completedJobs"] >= 1 and status["averageProcessingTime"] > 0
    page = service.get("/jobs", params={"status": "completed", "limit": 1}).json()
    assert len(page["jobs"]) == 1 and page["total"] >= 1


def test_runner_replica_killed_mid_job_the_job_completes_once(service):
    import ray
    from ray import serve

    drain(service)
    job = submit(service, body={**LONG, "steps": 40})
    wait(service, job["id"], until=("processing",))
    runner = serve.status().applications["imagegen"].deployments["JobRunner"]
    assert runner.status == "HEALTHY"
    actors = [a for a in ray.util.list_named_actors(all_namespaces=True) if "JobRunner" in a["name"]]
    assert actors
    for actor in actors:
        ray.kill(ray.get_actor(actor["name"], namespace=actor["namespace"]), no_restart=False)
    done = wait(service, job["id"], timeout=180)
    assert done["status"] == "completed" and done["attempts"] == 2


def test_full_restart_keeps_every_job(service):
    from ray import serve

    from tests.conftest import serve_app

    drain(service)
    running = submit(service, body={**LONG, "steps": 40})
    wait(service, running["id"], until=("processing",))
    queued = [submit(service) for _ in range(2)]
    serve.delete("imagegen")
    serve_app()
    for job in [running, *queued]:
        assert wait(service, job["id"], timeout=180)["status"] == "completed"
    error(service.get("/jobs/job_1_never"), 404, "NOT_FOUND")


def test_webhook_is_called_on_completion_and_private_targets_are_refused(service):
    from tests.helpers import Receiver

    drain(service)
    receiver, canary = Receiver(failures=1), Receiver()
    try:
        job = submit(service, body={**SMALL, "webhookUrl": receiver.url})
        assert wait(service, job["id"])["status"] == "completed"
        deadline = time.monotonic() + 30
        while len(receiver.bodies) < 2 and time.monotonic() < deadline:
            time.sleep(0.1)
        assert receiver.bodies[-1]["id"] == job["id"] and receiver.bodies[-1]["status"] == "completed"
        before = service.get("/queue/status").json()
        refused = canary.url.replace("127.0.0.1", "localhost")  # loopback, not on the allow-list
        for url in (refused, "http://10.1.2.3/hook", "http://169.254.169.254/latest"):
            error(service.post("/generate/text2img", json={**SMALL, "webhookUrl": url}), 422, "INVALID_INPUT",
                  "webhookUrl")
        assert service.get("/queue/status").json()["queuedJobs"] == before["queuedJobs"]
        assert canary.bodies == []
    finally:
        receiver.close()
        canary.close()


def test_a1111_progress_reports_a_running_job_with_a_preview(service):
    drain(service)
    job = submit(service, body={**LONG, "steps": 80})
    deadline, progress = time.monotonic() + 60, {}
    while time.monotonic() < deadline:
        progress = service.get("/sdapi/v1/progress").json()
        if progress["progress"] > 0 and progress["current_image"]:
            break
        time.sleep(0.2)
    assert progress["state"]["job"] == job["id"] and 0 < progress["progress"] < 1
    assert decode_b64(progress["current_image"]).size == (32, 32)  # 256 / 8: the latent grid
    skipped = service.get("/sdapi/v1/progress", params={"skip_current_image": True}).json()
    assert skipped["current_image"] is None
    # another caller (a token) has no running job of its own: the tokenless job is not its progress
    other = service.get("/sdapi/v1/progress", headers={"Authorization": "Bearer someone-else"}).json()
    assert other["state"]["job"] == "" and other["progress"] == 0
    service.post(f"/jobs/{job['id']}/cancel")
    wait(service, job["id"])
