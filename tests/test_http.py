"""Integration: a real local Ray cluster (logical GPUs on CPU) serving configs/cpu.yaml over HTTP."""

from __future__ import annotations

import base64
import io
import os
import socket
import time
from pathlib import Path

import httpx
import pytest
import yaml
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.integration


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def service(tiny):
    import ray
    from ray import serve

    from graphs.app import build_app

    os.environ["TINY_MODELS"] = str(tiny)
    config = yaml.safe_load((ROOT / "configs" / "cpu.yaml").read_text())["applications"][0]
    port = _free_port()
    ray.init(num_cpus=4, num_gpus=1, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"TINY_MODELS": str(tiny)}})
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    app = build_app(config["args"])
    serve.run(app, name="imagegen", route_prefix="/")
    with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=120) as client:
        yield client
    serve.shutdown()
    ray.shutdown()


def _decode(data_uri: str) -> Image.Image:
    return Image.open(io.BytesIO(base64.b64decode(data_uri.split(",", 1)[-1])))


def test_health_is_open(service):
    assert service.get("/health/").json() == {"status": "healthy"}


def test_models_lists_what_is_loaded(service):
    body = service.get("/models").json()
    assert [m["type"] for m in body["models"]] == ["sdxl-base", "sdxl-refiner"]
    assert body["face_restorer"]["restorer"] == "RestoreFormer"


def test_generate_standard(service):
    response = service.post("/generate", json={"prompt": "red apple", "seed": 42, "width": 256, "height": 256,
                                                "num_inference_steps": 4})
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["success"] and body["refiner_applied"] and not body["hires_fix_applied"]
    assert body["final_resolution"] == "256x256" and body["seed"] == 42
    assert _decode(body["image"]).size == (256, 256)
    assert _decode(body["imageData"]).size == (body["width"], body["height"])


def test_generate_hires_fix_with_faces(service):
    started = time.perf_counter()
    response = service.post("/generate", json={"prompt": "portrait", "seed": 1, "hires_fix": True,
                                                "use_realesrgan": True, "use_face_restoration": True,
                                                "num_inference_steps": 6})
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["hires_fix_applied"] and body["upscaler"] == "R-ESRGAN 2x+"
    assert body["final_resolution"] == "1536x1536"
    assert _decode(body["image"]).size == (1536, 1536)
    assert body["generation_time_seconds"] <= time.perf_counter() - started


@pytest.mark.parametrize("payload,field", [
    ({"prompt": "x", "width": 100}, "width"),
    ({"prompt": "x", "num_inference_steps": 0}, "num_inference_steps"),
    ({"width": 512}, "prompt"),
])
def test_bad_input_is_a_structured_422(service, payload, field):
    response = service.post("/generate", json=payload)
    assert response.status_code == 422
    body = response.json()
    assert body["code"] == "INVALID_INPUT" and body["details"]["field"] == field


def test_readme_curl_example(service):
    import json
    import re

    readme = (ROOT / "README.md").read_text()
    payload = json.loads(re.search(r"-d '(\{.*?\})'", readme).group(1))
    response = service.post("/generate", json=payload)
    assert response.status_code == 200, response.text
    assert response.json()["final_resolution"] == f"{payload['width']}x{payload['height']}"
