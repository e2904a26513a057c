"""Overlays over HTTP against the live service: ``/process``'s overlay operation (the README's example body),
``/generate``'s and ``/generate/async``'s ``overlay``, and hostile overlays refused with a 422 naming the field."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
from PIL import Image

from tests.conftest import ROOT
from tests.helpers import b64, decode_b64, error, pixels, submit, wait

pytestmark = pytest.mark.integration

RED_LOGO = b64(Image.new("RGBA", (60, 30), (255, 0, 0, 255)))
GENERATION = {"prompt": "a lighthouse", "width": 128, "height": 128, "num_inference_steps": 2, "seed": 21,
              "use_refiner": False}


def changed(before: Image.Image, after: Image.Image) -> tuple[int, int, int, int]:
    ys, xs = np.nonzero(np.any(pixels(before.convert("RGB")) != pixels(after.convert("RGB")), axis=2))
    return int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1


def readme_body(image: str) -> dict:
    readme = (ROOT / "README.md").read_text()
    block = re.search(r"## Overlays.*?```\n(.*?)```", readme, re.S).group(1)
    return json.loads(block.replace("<base64 PNG>", "{image}", 1).replace("<base64 PNG>", RED_LOGO)
                      .replace("{image}", image))


def test_readme_process_example(service):
    plain = Image.new("RGB", (400, 300), (40, 60, 80))
    answer = service.post("/process", json=readme_body(b64(plain)))
    assert answer.status_code == 200, answer.text
    out = decode_b64(answer.json()["imageData"]).convert("RGB")
    assert out.size == (400, 300)
    logo_pixel = out.getpixel((16 + 5, 16 + 5))  # the logo at 0.4 opacity: red over the background
    assert abs(logo_pixel[0] - (0.4 * 255 + 0.6 * 40)) <= 2 and abs(logo_pixel[2] - 0.6 * 80) <= 2
    caption = np.any(pixels(out) != pixels(plain), axis=2)
    caption[: 16 + 60, : 16 + 60] = False  # leave the logo out
    ys, xs = np.nonzero(caption)
    assert xs.min() > 200 and ys.min() > 225  # bottom right
    assert 384 - 2 <= xs.max() + 1 <= 384 and 284 - 2 <= ys.max() + 1 <= 284  # within the 16-pixel margin


def test_generate_draws_its_overlay_after_generation(service):
    plain = service.post("/generate", json=GENERATION).json()
    marked = service.post("/generate", json={**GENERATION, "overlay": {"logo": RED_LOGO, "position": "bottom-right",
                                                                       "size": 0.25, "margin": 4}}).json()
    assert marked["overlay_applied"] and not plain["overlay_applied"] and marked["seed"] == plain["seed"]
    before, after = decode_b64(plain["image"]), decode_b64(marked["image"])
    assert changed(before, after) == (128 - 4 - 32, 128 - 4 - 16, 124, 124)  # 0.25 of 128 wide, half as high


def test_an_async_job_draws_its_overlay(service):
    job = submit(service, "/generate/async", {**GENERATION, "overlay": {"logo": RED_LOGO, "position": "top-left",
                                                                        "margin": 0, "size": 0.5}})
    assert wait(service, job["jobId"])["status"] == "completed"
    image = decode_b64(service.get(f"/jobs/{job['jobId']}/result").json()["imageData"])
    assert image.getpixel((2, 2))[:3] == (255, 0, 0) and image.getpixel((63, 31))[:3] == (255, 0, 0)
    assert image.getpixel((70, 40))[:3] != (255, 0, 0)


@pytest.mark.parametrize(("overlay", "field"), [
    ({"text": "x", "opacity": 2}, "overlays.0.opacity"),
    ({"text": "x", "font": "no-such-font"}, "overlays.0.font"),
    ({"text": "x" * 501}, "overlays.0.text"),
    ({"text": "x", "color": "ultraviolet"}, "overlays.0.color"),
    ({"logo": b64(Image.new("RGB", (2100, 2100)))}, "overlays.0.logo"),
    ({"text": "x", "logo": RED_LOGO}, "overlays.0.text"),
])
def test_hostile_overlays_are_a_422_naming_the_field(service, overlay, field):
    body = {"image": b64(Image.new("RGB", (32, 32))), "operations": ["overlay"], "overlays": [overlay]}
    error(service.post("/process", json=body), 422, "INVALID_INPUT", field)


def test_a_bad_overlay_on_generate_is_refused_before_generating(service):
    error(service.post("/generate", json={**GENERATION, "overlay": {"text": "x", "font": "nope"}}), 422,
          "INVALID_INPUT", "overlay.font")
    before = service.get("/queue/status").json()["queuedJobs"]
    error(service.post("/generate/async", json={**GENERATION, "overlay": {"text": "x", "margin": -1}}), 422,
          "INVALID_INPUT", "overlay.margin")
    assert service.get("/queue/status").json()["queuedJobs"] == before
