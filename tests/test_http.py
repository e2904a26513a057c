"""Integration: a real local Ray cluster (logical GPUs on CPU) serving configs/cpu.yaml over HTTP.

One cluster for the session (tests/conftest.py); the ingress reaches moto's S3 server through a loopback proxy
so that tests can take S3 down.
"""

from __future__ import annotations

import base64
import io
import json
import re
import time

import httpx
import numpy as np
import pytest
from PIL import Image, PngImagePlugin

from tests.conftest import BUCKET, METRICS_PORT, ROOT
from tests.helpers import b64, decode_b64, error, interrupted, pixels, s3_client

pytestmark = pytest.mark.integration


# --- seed 000 -----------------------------------------------------------------------------------------------

def test_health_is_open(service):
    assert service.get("/health/").json()["status"] == "healthy"
    assert service.get("/health").status_code == 200


def test_models_lists_what_is_loaded(service):
    body = service.get("/models").json()
    assert [m["type"] for m in body["models"]] == ["base", "base", "base", "refiner"]  # three checkpoints to select
    assert body["models"][0]["loaded"] and body["models"][-1]["loaded"] and body["default"] == "tiny-sdxl-base"
    assert body["face_restorer"]["restorer"] == "RestoreFormer"


def test_generate_standard(service):
    response = service.post("/generate", json={"prompt": "red apple", "seed": 42, "width": 256, "height": 256,
                                                "num_inference_steps": 4})
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["success"] and body["refiner_applied"] and not body["hires_fix_applied"]
    assert body["final_resolution"] == "256x256" and body["seed"] == 42 and body["model"] == "SDXL"
    assert decode_b64(body["image"]).size == (256, 256)
    assert body["image"].startswith("data:image/png;base64,")
    assert decode_b64(body["imageData"]).size == (body["width"], body["height"]) and body["format"] == "png"


def test_generate_same_seed_same_image(service):
    payload = {"prompt": "red apple", "seed": 7, "width": 128, "height": 128, "num_inference_steps": 3,
               "use_refiner": False}
    a, b = (service.post("/generate", json=payload).json() for _ in range(2))
    # The same pixels; the files differ, each signed with its own content credentials (a manifest per file).
    assert np.array_equal(pixels(decode_b64(a["imageData"])), pixels(decode_b64(b["imageData"])))
    assert not a["refiner_applied"]


def test_generate_hires_fix_with_faces(service):
    started = time.perf_counter()
    response = service.post("/generate", json={"prompt": "portrait", "seed": 1, "hires_fix": True,
                                                "use_realesrgan": True, "use_face_restoration": True,
                                                "num_inference_steps": 6})
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["hires_fix_applied"] and body["upscaler"] == "R-ESRGAN 2x+"
    assert body["final_resolution"] == "1536x1536"
    assert decode_b64(body["image"]).size == (1536, 1536)
    assert body["generation_time_seconds"] <= time.perf_counter() - started
    # Random weights paint no face: the flag says so instead of pretending.
    assert not body["face_restoration_applied"] and any("face" in w for w in body["warnings"])


def test_preset_fast_applies_and_explicit_fields_win(service):
    body = service.post("/generate", json={"prompt": "x", "preset": "fast", "num_inference_steps": 2,
                                            "width": 128}).json()
    assert body["final_resolution"] == "128x768" and not body["refiner_applied"]


@pytest.mark.parametrize("payload,field", [
    ({"prompt": "x", "width": 100}, "width"),
    ({"prompt": "x", "num_inference_steps": 0}, "num_inference_steps"),
    ({"width": 512}, "prompt"),
    ({"prompt": "x", "face_restoration_weight": 3}, "face_restoration_weight"),
])
def test_bad_input_is_a_structured_422(service, payload, field):
    error(service.post("/generate", json=payload), 422, "INVALID_INPUT", field)


def test_readme_curl_example(service):
    readme = (ROOT / "README.md").read_text()
    payload = json.loads(re.search(r"-d '(\{.*?\})'", readme).group(1))
    response = service.post("/generate", json=payload)
    assert response.status_code == 200, response.text
    assert response.json()["final_resolution"] == f"{payload['width']}x{payload['height']}"


def test_oversize_body_is_413(service):
    error(service.post("/generate", content=b"x" * (5 * 1024 * 1024),
                        headers={"content-type": "application/json"}), 413, "PAYLOAD_TOO_LARGE")


# --- seed 001 -----------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def photos(s3_server, astronaut):
    client = s3_client(s3_server)
    client.create_bucket(Bucket=BUCKET)
    client.put_object(Bucket=BUCKET, Key="avatars/user123.png", Body=base64.b64decode(b64(astronaut)))
    client.put_object(Bucket=BUCKET, Key="subjects/user123.jpg", Body=base64.b64decode(b64(astronaut, "JPEG")))
    return client


@pytest.mark.parametrize("kind,payload", [
    ("memory", {"user_id": "user123", "prompt": "first day at school", "num_inference_steps": 3}),
    ("subject", {"user_id": "user123", "ip_adapter_scale": 0.5}),
])
def test_illustration_reads_s3_and_writes_s3(service, photos, kind, payload):
    response = service.post(f"/v1/images/{kind}", json=payload)
    assert response.status_code == 200, response.text
    uri = response.json()["data"][0]["s3_uri"]
    assert re.fullmatch(rf"s3://{BUCKET}/generated/user123/{kind}_[0-9a-f]{{12}}\.png", uri)
    key = uri.removeprefix(f"s3://{BUCKET}/")
    stored = Image.open(io.BytesIO(photos.get_object(Bucket=BUCKET, Key=key)["Body"].read()))
    assert stored.size == (256, 256)


def test_illustration_errors(service, photos, s3_proxy):
    error(service.post("/v1/images/memory", json={"user_id": "nobody", "prompt": "x"}), 404, "NOT_FOUND", "user_id")
    for bad in ("../etc", "a/b", "x\u0000y"):
        error(service.post("/v1/images/subject", json={"user_id": bad}), 422, "INVALID_INPUT", "user_id")
    error(service.post("/v1/images/memory", json={"user_id": "user123"}), 422, "INVALID_INPUT", "prompt")
    s3_proxy.broken = True
    try:
        response = service.post("/v1/images/subject", json={"user_id": "user123"})
        error(response, 503, "STORAGE_UNAVAILABLE")
        assert response.headers["retry-after"]
        assert response.json()["error"] == "photo storage unavailable"  # no endpoint, bucket or key
    finally:
        s3_proxy.broken = False


# --- seed 002 -----------------------------------------------------------------------------------------------

def test_process_strips_metadata_and_converts(service, astronaut):
    info = PngImagePlugin.PngInfo()
    info.add_text("secret", "gps 51.5,-0.1")
    response = service.post("/process", json={"image": b64(astronaut, pnginfo=info),
                                              "operations": ["sanitize", "optimize", "convert-webp", "derivatives"],
                                              "widths": [128, 256, 4096]})
    assert response.status_code == 200, response.text
    body = response.json()
    out = decode_b64(body["imageData"])
    assert out.format == "WEBP" and out.size == (512, 512) and "secret" not in out.info
    assert "secret" in body["metadata"]["strippedMetadata"]
    assert [(d["width"], d["height"]) for d in body["derivatives"]] == [(128, 128), (256, 256)]


def test_process_sanitize_only_keeps_png(service, astronaut):
    body = service.post("/process", json={"image": "data:image/png;base64," + b64(astronaut),
                                          "operations": ["sanitize"]}).json()
    assert body["format"] == "png" and body["derivatives"] == []
    assert np.array_equal(np.asarray(decode_b64(body["imageData"])), np.asarray(astronaut))


def test_clip_focal_keeps_the_face(service, astronaut, astronaut_face_box):
    response = service.post("/derivatives/clip-focal", json={
        "image": b64(astronaut), "sizes": ["300x100", {"name": "story", "width": 90, "height": 160}],
        "format": "jpeg", "quality": 80})
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["focalPoint"]["source"] == "faces"
    fx0, fy0, fx1, fy1 = astronaut_face_box
    for crop in body["derivatives"]:
        x0, y0, x1, y1 = crop["box"]
        assert x0 <= fx0 and y0 <= fy0 and x1 >= fx1 and y1 >= fy1
        assert decode_b64(crop["imageData"]).format == "JPEG"
    assert [(c["width"], c["height"]) for c in body["derivatives"]] == [(300, 100), (90, 160)]


@pytest.mark.parametrize("image", ["not base64!!", base64.b64encode(b"GIF89a" + b"\0" * 40).decode(),
                                   base64.b64encode(b"\x89PNG\r\n\x1a\n" + b"\0" * 20).decode()])
def test_bad_images_are_400(service, image):
    error(service.post("/process", json={"image": image}), 400, "INVALID_IMAGE", "image")


# --- seed 004 / Automatic1111 -------------------------------------------------------------------------------

def test_a1111_txt2img_with_lora_batch_and_info(service):
    response = service.post("/sdapi/v1/txt2img", json={
        "prompt": "anime style, a fox <lora:tiny-style:0.7>", "negative_prompt": "blurry", "width": 128,
        "height": 72, "batch_size": 2, "n_iter": 2, "steps": 3, "cfg_scale": 8.0, "sampler_name": "DPM++ 2M Karras",
        "seed": 1000, "unknown_field": "ignored"})
    assert response.status_code == 200, response.text
    body = response.json()
    assert len(body["images"]) == 4 and "," not in body["images"][0]
    info = json.loads(body["info"])
    assert info["all_seeds"] == [1000, 1001, 1002, 1003] and info["seed"] == 1000
    image = decode_b64(body["images"][3])
    assert image.size == (128, 72)
    assert "Seed: 1003" in image.info["parameters"]
    assert "Sampler: DPM++ 2M, Schedule type: Karras" in image.info["parameters"]  # split, as A1111 >= 1.9 writes it
    read_back = service.post("/sdapi/v1/png-info", json={"image": body["images"][0]}).json()
    assert read_back["info"].startswith("anime style, a fox <lora:tiny-style:0.7>\nNegative prompt: blurry")


def test_a1111_hires_and_refiner(service):
    body = service.post("/sdapi/v1/txt2img", json={
        "prompt": "castle", "width": 64, "height": 64, "steps": 3, "seed": 3, "enable_hr": True, "hr_scale": 2,
        "hr_upscaler": "R-ESRGAN 4x+", "denoising_strength": 0.5}).json()
    assert decode_b64(body["images"][0]).size == (128, 128)
    body = service.post("/sdapi/v1/txt2img", json={
        "prompt": "castle", "width": 64, "height": 64, "steps": 4, "seed": 3,
        "refiner_checkpoint": "tiny-sdxl-refiner", "refiner_switch_at": 0.5}).json()
    assert "Refiner: tiny-sdxl-refiner" in json.loads(body["info"])["infotexts"][0]


def test_a1111_pixel_hires_batch_is_each_seed_alone(service):
    """A pixel hires fix of a batch (base -> upscaler -> base img2img, replica to replica, the last pass encoding)
    gives each image what its seed gives alone, at the hires size, with its own infotext."""
    hires = {"prompt": "a harbour", "width": 64, "height": 64, "steps": 2, "enable_hr": True, "hr_scale": 2,
             "hr_upscaler": "R-ESRGAN 4x+", "denoising_strength": 0.5}

    def run(**fields) -> tuple[list[Image.Image], dict]:
        response = service.post("/sdapi/v1/txt2img", json={**hires, **fields})
        assert response.status_code == 200, response.text
        body = response.json()
        return [decode_b64(data) for data in body["images"]], json.loads(body["info"])

    both, info = run(seed=40, batch_size=2)
    assert info["all_seeds"] == [40, 41] and [image.size for image in both] == [(128, 128)] * 2
    for image, seed in zip(both, (40, 41), strict=True):
        assert f"Seed: {seed}," in image.info["parameters"]
        assert "Hires upscaler: R-ESRGAN 4x+" in image.info["parameters"]
        (alone,), _ = run(seed=seed)
        assert np.abs(pixels(image) - pixels(alone)).mean() < 1.0
    assert np.abs(pixels(both[0]) - pixels(both[1])).mean() > 1.0


def test_a1111_img2img_inpaint_keeps_unmasked(service, astronaut):
    init = astronaut.resize((128, 128))
    mask = Image.new("L", (128, 128), 0)
    mask.paste(255, (0, 0, 64, 128))
    response = service.post("/sdapi/v1/img2img", json={
        "init_images": [b64(init)], "mask": b64(mask), "mask_blur": 0, "denoising_strength": 1.0,
        "prompt": "x", "width": 128, "height": 128, "steps": 3, "seed": 5, "inpainting_fill": 1})
    assert response.status_code == 200, response.text
    out = np.asarray(decode_b64(response.json()["images"][0]), dtype=np.int16)
    assert np.abs(out[:, 64:] - np.asarray(init, dtype=np.int16)[:, 64:]).max() <= 1


def test_a1111_extras(service, astronaut):
    thumb = astronaut.resize((64, 36))
    body = service.post("/sdapi/v1/extra-single-image", json={
        "image": "data:image/png;base64," + b64(thumb), "resize_mode": 0, "upscaling_resize": 2,
        "upscaler_1": "R-ESRGAN 4x+", "upscaler_2": "None", "upscaler_2_visibility": 0.0}).json()
    assert decode_b64(body["image"]).size == (128, 72)
    fallback = service.post("/sdapi/v1/extra-single-image", json={"image": b64(thumb), "upscaler_1": "SwinIR_4x"})
    assert fallback.status_code == 200 and decode_b64(fallback.json()["image"]).size == (128, 72)
    error(service.post("/sdapi/v1/extra-single-image", json={"image": b64(thumb), "upscaler_1": "Nope"}),
           422, "UNKNOWN_MODEL", "upscaler_1")
    batch = service.post("/sdapi/v1/extra-batch-images", json={
        "imageList": [{"data": b64(thumb), "name": "a"}, {"data": b64(thumb), "name": "b"}],
        "resize_mode": 1, "upscaling_resize_w": 100, "upscaling_resize_h": 50, "upscaler_1": "Lanczos"}).json()
    assert [decode_b64(i).size for i in batch["images"]] == [(100, 50), (100, 50)]


def test_a1111_listings_and_options(service):
    assert service.get("/sdapi/v1/sd-models").json()[0]["model_name"] == "tiny-sdxl-base"
    assert "DPM++ 2M Karras" in [s["name"] for s in service.get("/sdapi/v1/samplers").json()]
    assert "Karras" in [s["label"] for s in service.get("/sdapi/v1/schedulers").json()]
    assert {"R-ESRGAN 4x+", "Lanczos", "None"} <= {u["name"] for u in service.get("/sdapi/v1/upscalers").json()}
    assert service.get("/sdapi/v1/face-restorers").json() == [{"name": "RestoreFormer", "cmd_dir": None}]
    assert {x["name"] for x in service.get("/sdapi/v1/loras").json()} == {"tiny-style", "tiny-detail"}
    assert service.post("/sdapi/v1/refresh-checkpoints").status_code == 200
    assert service.get("/sdapi/v1/options").json()["sd_model_checkpoint"].startswith("tiny-sdxl-base [")
    assert service.post("/sdapi/v1/options", json={"sd_model_checkpoint": "tiny-sdxl-base"}).status_code == 200
    error(service.post("/sdapi/v1/options", json={"sd_model_checkpoint": "sd_xl_turbo"}), 422, "UNKNOWN_MODEL")
    error(service.post("/sdapi/v1/txt2img", json={"prompt": "x", "override_settings": {
        "sd_model_checkpoint": "other"}}), 422, "UNKNOWN_MODEL", "override_settings.sd_model_checkpoint")
    # An unknown sampler runs the default, as in A1111, and the answer says so.
    fallback = service.post("/sdapi/v1/txt2img", json={"prompt": "x", "sampler_name": "Nope", "width": 64,
                                                       "height": 64, "steps": 2})
    assert fallback.status_code == 200, fallback.text
    assert "unknown sampler 'Nope'" in json.loads(fallback.json()["info"])["warnings"][0]
    idle = service.get("/sdapi/v1/progress").json()
    assert idle["progress"] == 0 and idle["state"]["job_count"] == 0
    assert service.post("/sdapi/v1/interrupt").json() == {}


def test_a1111_interrupt_stops_only_the_callers_request(service):
    import concurrent.futures

    slow = {"prompt": "x", "width": 512, "height": 512, "steps": 150, "seed": 1}
    quick = {"prompt": "y", "width": 64, "height": 64, "steps": 40, "seed": 2}
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        victim = pool.submit(service.post, "/sdapi/v1/txt2img", json=slow, headers={"authorization": "Bearer a"})
        bystander = pool.submit(service.post, "/sdapi/v1/txt2img", json=quick, headers={"authorization": "Bearer b"})
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            progress = service.get("/sdapi/v1/progress", headers={"authorization": "Bearer a"}).json()
            if progress["state"]["sampling_step"] > 0:
                break
            time.sleep(0.2)
        assert 0 < progress["progress"] < 1
        service.post("/sdapi/v1/interrupt", headers={"authorization": "Bearer a"})
        interrupted(victim.result(timeout=120))
        assert bystander.result(timeout=120).status_code == 200


def test_a1111_skip_drops_the_current_batch_and_runs_the_next(service):
    """As A1111: /skip stops the batch being made, which answers with its image as it stood, and goes on with the
    next of ``n_iter``; the answer is not cached as if whole."""
    import concurrent.futures

    body = {"prompt": "skip", "width": 256, "height": 256, "steps": 60, "seed": 40, "n_iter": 2}
    owner = {"authorization": "Bearer skipper"}
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        pending = pool.submit(service.post, "/sdapi/v1/txt2img", json=body, headers=owner)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if service.get("/sdapi/v1/progress", headers=owner).json()["state"]["sampling_step"] > 0:
                break
            time.sleep(0.2)
        service.post("/sdapi/v1/skip", headers=owner)
        response = pending.result(timeout=180)
    assert response.status_code == 200, response.text
    answer = response.json()
    info = json.loads(answer["info"])
    assert info["skipped"] is True and "interrupted" not in info
    assert len(answer["images"]) == 2 and info["all_seeds"] == [40, 41]
    whole = service.post("/sdapi/v1/txt2img", json={**body, "n_iter": 1}).json()["images"][0]
    stopped, finished = (pixels(decode_b64(image)) for image in (answer["images"][0], whole))
    assert stopped.shape == finished.shape == (256, 256, 3) and np.abs(stopped - finished).mean() > 1.0


# --- operations: metrics and autoscaling --------------------------------------------------------------------

def test_stage_metrics_reach_prometheus(service):
    service.post("/generate", json={"prompt": "x", "width": 64, "height": 64, "num_inference_steps": 2,
                                    "use_refiner": False})
    service.post("/generate", json={"prompt": "x", "width": 100})  # a refused request never reaches a stage
    deadline, text = time.monotonic() + 60, ""
    while time.monotonic() < deadline:
        text = httpx.get(f"http://127.0.0.1:{METRICS_PORT}/metrics", timeout=10).text
        if 'imagegen_images_total{' in text and 'stage="sdxl_base"' in text:
            break
        time.sleep(1)
    images = [line for line in text.splitlines() if line.startswith("ray_imagegen_images_total{")
              and 'stage="sdxl_base"' in line]
    assert images and float(images[0].rsplit(" ", 1)[1]) >= 1
    assert "ray_imagegen_stage_latency_seconds_bucket{" in text
    assert "ray_imagegen_in_flight{" in text


def _running_upscalers() -> int:
    from ray import serve

    deployment = serve.status().applications["imagegen"].deployments["Upscaler"]
    return deployment.replica_states.get("RUNNING", 0)


def test_upscaler_autoscales_up_under_load_and_back_down(service, astronaut):
    """Six clients keep the upscaler busy until Serve has started a second replica (each request is short, so the
    load lasts as long as scaling up takes, no longer); once the load stops it goes back to one."""
    import concurrent.futures

    payload = {"image": b64(astronaut.resize((256, 256))), "upscaler_1": "R-ESRGAN 4x+", "upscaling_resize": 4}
    assert _running_upscalers() == 1
    peak, statuses = 1, []
    deadline = time.monotonic() + 120
    with concurrent.futures.ThreadPoolExecutor(6) as pool:
        def client() -> None:
            while peak < 2 and time.monotonic() < deadline:
                statuses.append(service.post("/sdapi/v1/extra-single-image", json=payload).status_code)

        clients = [pool.submit(client) for _ in range(6)]
        while not all(c.done() for c in clients):
            peak = max(peak, _running_upscalers())
            time.sleep(0.25)
        for c in clients:
            c.result()
    assert peak == 2 and statuses and set(statuses) == {200}
    deadline = time.monotonic() + 90
    while _running_upscalers() > 1 and time.monotonic() < deadline:
        time.sleep(1)
    assert _running_upscalers() == 1
