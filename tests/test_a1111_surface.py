"""Integration: the Automatic1111 routes front ends call when they connect answer in A1111's shapes, with what
this service really has, and generation warnings reach A1111 clients inside ``info``."""

from __future__ import annotations

import json

import numpy as np
import pytest

from tests.helpers import b64, decode_b64, pixels

pytestmark = pytest.mark.integration

LATENT_MODES = ["Latent", "Latent (antialiased)", "Latent (bicubic)", "Latent (bicubic antialiased)",
                "Latent (nearest)", "Latent (nearest-exact)"]


def get(service, path: str):
    response = service.get(path)
    assert response.status_code == 200, (path, response.text)
    return response.json()


def test_empty_listings_have_a1111_shapes(service):
    for path in ("hypernetworks", "script-info", "extensions"):
        assert get(service, f"/sdapi/v1/{path}") == [], path
    # configs/cpu.yaml gives the base a ControlNet: the extension's always-on script is installed
    assert get(service, "/sdapi/v1/scripts") == {"txt2img": ["controlnet"], "img2img": ["controlnet"]}
    assert get(service, "/internal/ping") == {}


def test_prompt_styles_are_the_configured_files(service):
    styles = get(service, "/sdapi/v1/prompt-styles")
    assert [s["name"] for s in styles] == ["cinematic", "watercolour", "high detail"]  # configs/styles.csv
    assert all(set(s) == {"name", "prompt", "negative_prompt"} for s in styles)


def test_embeddings_are_listed_refreshed_and_read_in_prompts(service):
    """configs/cpu.yaml's embeddings_dir holds the factory's tiny-concept: two vectors of 32 + 48 wide."""
    blank = {"step": None, "sd_checkpoint": None, "sd_checkpoint_name": None}
    listed = {"loaded": {"tiny-concept": {**blank, "shape": 80, "vectors": 2}}, "skipped": {}}
    assert get(service, "/sdapi/v1/embeddings") == listed
    assert service.post("/sdapi/v1/refresh-embeddings").json() == {}
    assert get(service, "/sdapi/v1/embeddings") == listed

    def image(prompt: str) -> np.ndarray:  # pixels: each PNG carries its own provenance manifest
        body = {"prompt": prompt, "steps": 2, "width": 64, "height": 64, "seed": 5}
        response = service.post("/sdapi/v1/txt2img", json=body)
        assert response.status_code == 200, response.text
        return pixels(decode_b64(response.json()["images"][0]))

    named = image("a photo of (tiny-concept:1.1)")
    assert np.array_equal(named, image("a photo of (tiny-concept:1.1)"))
    assert np.abs(named - image("a photo of (zorblax:1.1)")).mean() > 1.0


def test_vae_and_modules_list_the_configured_vaes(service):
    # configs/cpu.yaml gives neither checkpoint a replacement VAE: each keeps its own, nothing to list.
    assert get(service, "/sdapi/v1/sd-vae") == []
    assert get(service, "/sdapi/v1/sd-modules") == []


def test_latent_upscale_modes_are_a1111s(service):
    assert get(service, "/sdapi/v1/latent-upscale-modes") == [{"name": n} for n in LATENT_MODES]


def test_realesrgan_models_are_the_loaded_upscalers(service):
    models = get(service, "/sdapi/v1/realesrgan-models")
    assert sorted(models, key=lambda m: m["name"]) == [
        {"name": "R-ESRGAN 2x+", "path": "tiny-realesrgan-x2.safetensors", "scale": 2},
        {"name": "R-ESRGAN 4x+", "path": "tiny-esrgan-x4.safetensors", "scale": 4},
    ]


def test_face_restorers_name_the_loaded_one(service):
    assert get(service, "/sdapi/v1/face-restorers") == [{"name": "RestoreFormer", "cmd_dir": None}]


def test_cmd_flags_reflect_this_service(service):
    flags = get(service, "/sdapi/v1/cmd-flags")
    assert flags["api"] is True and flags["nowebui"] is True
    assert flags["port"] == service.base_url.port  # the test cluster's Serve port
    assert flags["listen"] is False and flags["server_name"] == "127.0.0.1"  # bound to loopback
    assert flags["no_half"] is True and flags["precision"] == "full"  # tiny models run float32 on CPU


def test_memory_reports_real_ram_and_no_cuda(service):
    import psutil

    body = get(service, "/sdapi/v1/memory")
    ram = body["ram"]
    assert set(ram) == {"free", "used", "total"} and all(v > 0 for v in ram.values())
    assert ram["free"] + ram["used"] == ram["total"]
    assert ram["total"] == psutil.virtual_memory().total  # the ingress runs on this machine
    # The test cluster's GPUs are logical: the model replicas run on CPU, and A1111 says so in its own words.
    assert body["cuda"] == {"error": "unavailable"}


def test_unknown_lora_warning_reaches_info(service):
    response = service.post("/sdapi/v1/txt2img", json={
        "prompt": "a fox <lora:nope:1>", "width": 64, "height": 64, "steps": 2, "seed": 11, "n_iter": 2})
    assert response.status_code == 200, response.text
    info = json.loads(response.json()["info"])
    assert info["warnings"] == ["LoRA 'nope' not found, ignored"]  # once, though each batch reported it
    assert info["all_seeds"] == [11, 12] and info["infotexts"]  # the existing fields stay


def test_clean_txt2img_has_no_warnings(service):
    body = service.post("/sdapi/v1/txt2img", json={"prompt": "a fox", "width": 64, "height": 64, "steps": 2})
    assert json.loads(body.json()["info"])["warnings"] == []


def test_fallback_upscaler_and_missing_face_are_reported(service):
    body = service.post("/sdapi/v1/txt2img", json={
        "prompt": "portrait", "width": 64, "height": 64, "steps": 2, "seed": 3, "enable_hr": True, "hr_scale": 2,
        "hr_upscaler": "SwinIR_4x", "restore_faces": True})
    assert body.status_code == 200, body.text
    warnings = json.loads(body.json()["info"])["warnings"]
    assert "upscaler 'SwinIR_4x' is not loaded; Lanczos used instead" in warnings
    assert "no face detected: image unchanged" in warnings  # random weights paint no face


def test_nulls_take_the_defaults_over_http(service):
    """A client replaying a response's ``parameters`` sends A1111's nulls."""
    response = service.post("/sdapi/v1/txt2img", json={
        "prompt": "a fox", "width": 64, "height": 64, "steps": 2, "seed": None, "sampler_name": None,
        "refiner_checkpoint": None, "refiner_switch_at": None, "override_settings": None, "denoising_strength": None,
        "restore_faces": None, "hr_scale": None, "styles": None})
    assert response.status_code == 200, response.text
    assert json.loads(response.json()["info"])["restore_faces"] is False


def test_checkpoint_actions_answer_empty(service):
    for action in ("unload-checkpoint", "reload-checkpoint", "refresh-vae"):
        response = service.post(f"/sdapi/v1/{action}")
        assert response.status_code == 200 and response.json() == {}, action


def test_interrogate_captions_a_photo_as_a1111_answers(service, astronaut):
    """webuiapi's ``interrogate(image)`` posts ``{"image": ..., "model": "clip"}`` and reads ``caption``."""
    image = b64(astronaut)
    response = service.post("/sdapi/v1/interrogate", json={"image": image, "model": "clip"})
    assert response.status_code == 200, response.text
    body = response.json()
    assert set(body) == {"caption"} and isinstance(body["caption"], str) and len(body["caption"].split()) >= 5
    again = service.post("/sdapi/v1/interrogate", json={"image": f"data:image/png;base64,{image}"})  # clip: default
    assert again.status_code == 200 and again.json() == body


@pytest.mark.parametrize(("body", "status", "code", "field"), [
    ({"image": "not an image", "model": "clip"}, 400, "INVALID_IMAGE", "image"),
    ({"model": "clip"}, 400, "INVALID_IMAGE", "image"),  # A1111 answers 404 "Image not found"
    ({"image": "x", "model": "deepdanbooru"}, 422, "UNKNOWN_MODEL", "model"),  # A1111's other, not deployed here
    ({"image": "x", "model": "nope"}, 422, "UNKNOWN_MODEL", "model"),  # A1111: 404 "Model not found"
    ({"image": "x", "model": ["clip"]}, 422, "INVALID_INPUT", "model"),
])
def test_interrogate_refuses_by_field(service, body, status, code, field):
    response = service.post("/sdapi/v1/interrogate", json=body)
    assert response.status_code == status, response.text
    answer = response.json()
    assert set(answer) == {"error", "code", "details"} and answer["code"] == code
    assert answer["details"]["field"] == field
