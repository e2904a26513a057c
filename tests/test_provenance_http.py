"""Provenance over HTTP against the live service (signing with the session's throwaway CA, see conftest): what
``/generate``, the A1111 routes and the jobs return carries the invisible watermark and content credentials, and
``POST /provenance/verify`` reads them back; tampered, truncated and garbage uploads are refused or reported
invalid, never a 5xx."""

from __future__ import annotations

import base64
import io
import json
import re
import subprocess
import zlib

import pytest
from PIL import Image

from deployments.support.settings import SDXL_WATERMARK_BITS
from tests.conftest import ROOT
from tests.helpers import b64, error, submit, wait

pytestmark = pytest.mark.integration

TRAINED = "http://cv.iptc.org/newscodes/digitalsourcetype/trainedAlgorithmicMedia"
GENERATION = {"prompt": "a lighthouse", "width": 256, "height": 256, "num_inference_steps": 2, "seed": 8}


def verify(service, data: bytes | str) -> dict:
    image = data if isinstance(data, str) else base64.b64encode(data).decode()
    answer = service.post("/provenance/verify", json={"image": image})
    assert answer.status_code == 200, answer.text
    return answer.json()


def file_of(data_uri_or_b64: str) -> bytes:
    return base64.b64decode(data_uri_or_b64.split(",", 1)[-1])


@pytest.fixture(scope="module")
def generated(service) -> bytes:
    answer = service.post("/generate", json=GENERATION)
    assert answer.status_code == 200, answer.text
    return base64.b64decode(answer.json()["imageData"])


def test_a_generated_image_carries_both_marks(service, generated):
    report = verify(service, generated)
    assert report["format"] == "png" and (report["width"], report["height"]) == (256, 256)
    mark = report["watermark"]
    assert mark["found"] and mark["payload"] == SDXL_WATERMARK_BITS and mark["bit_accuracy"] == 1.0
    credentials = report["credentials"]
    assert credentials["validation_state"] == "trusted" and credentials["failures"] == []
    assert credentials["claim_generator"] == "imagegen 0.1.0"
    assert credentials["signer"] == "imagegen test signer, imagegen tests"
    assert credentials["checkpoint"] == "tiny-sdxl-base"
    assert credentials["models"] == {"checkpoint": "tiny-sdxl-base", "refiner": "tiny-sdxl-refiner"}
    assert credentials["actions"] == [{"action": "c2pa.created", "digital_source_type": TRAINED,
                                       "software_agent": "tiny-sdxl-base"}]
    assert verify(service, "data:image/png;base64," + base64.b64encode(generated).decode()) == report


def test_the_watermark_survives_webp_reencoding(service, generated):
    out = io.BytesIO()
    Image.open(io.BytesIO(generated)).save(out, format="WEBP", quality=90)
    report = verify(service, out.getvalue())
    assert report["format"] == "webp" and report["watermark"]["found"]
    assert report["watermark"]["payload"] == SDXL_WATERMARK_BITS
    assert report["credentials"] == {**report["credentials"], "present": False, "validation_state": None}


def test_a1111_images_are_marked_and_keep_their_infotext(service):
    body = service.post("/sdapi/v1/txt2img", json={"prompt": "a fox", "width": 256, "height": 256, "steps": 2,
                                                   "seed": 12}).json()
    data = file_of(body["images"][0])
    assert "Seed: 12" in Image.open(io.BytesIO(data)).info["parameters"]
    report = verify(service, data)
    assert report["watermark"]["found"] and report["credentials"]["validation_state"] == "trusted"
    assert report["credentials"]["actions"][0]["action"] == "c2pa.created"


def test_an_upscaled_upload_names_it_as_its_parent(service, generated):
    body = service.post("/sdapi/v1/extra-single-image", json={
        "image": base64.b64encode(generated).decode(), "upscaling_resize": 2, "upscaler_1": "R-ESRGAN 4x+"}).json()
    data = file_of(body["image"])
    report = verify(service, data)
    assert (report["width"], report["height"]) == (512, 512) and report["watermark"]["found"]
    credentials = report["credentials"]
    assert credentials["validation_state"] == "trusted"
    assert [a["action"] for a in credentials["actions"]] == ["c2pa.opened", "c2pa.edited"]
    assert credentials["actions"][1] == {"action": "c2pa.edited", "digital_source_type": TRAINED,
                                         "software_agent": "R-ESRGAN 4x+"}
    assert credentials["ingredients"] == [{"title": "parent.png", "relationship": "parentOf"}]


def test_an_img2img_job_names_its_init_image(service, astronaut):
    init = b64(astronaut.resize((256, 256)), "JPEG", quality=90)
    job = submit(service, "/generate/img2img", {"prompt": "a painting", "initImage": init, "width": 256,
                                                "height": 256, "steps": 2, "strength": 0.5, "seed": 4})
    done = wait(service, job["id"])
    assert done["status"] == "completed", done["error"]
    credentials = verify(service, done["result"]["images"][0])["credentials"]
    assert credentials["validation_state"] == "trusted" and credentials["checkpoint"] == "tiny-sdxl-base"
    assert [a["action"] for a in credentials["actions"]] == ["c2pa.opened", "c2pa.edited"]
    assert credentials["ingredients"] == [{"title": "parent.jpeg", "relationship": "parentOf"}]


def test_batch_sizes_images_and_derivatives_are_marked(service):
    job = service.post("/generate/batch-sizes", json={
        "prompt": "a portrait", "sizes": ["256x256"], "seed": 5, "steps": 2, "derivatives": [128],
        "baseSizes": {"square": [128, 128]}}).json()
    done = wait(service, job["job_id"])
    assert done["status"] == "completed", done["error"]
    entry = done["images"]["256x256"]
    assert entry["upscaled"]  # a 128 base: the neural upscaler made the crop
    report = verify(service, entry["imageData"])
    assert report["watermark"]["found"] and report["credentials"]["validation_state"] == "trusted"
    assert report["credentials"]["models"] == {"checkpoint": "tiny-sdxl-base", "upscaler": "R-ESRGAN 2x+"}
    small = verify(service, entry["derivatives"]["128"])
    assert small["format"] == "webp" and small["credentials"]["validation_state"] == "trusted"
    assert not small["watermark"]["checked"] and "smaller than 256x256" in small["watermark"]["reason"]


def test_tampered_truncated_and_garbage_uploads_never_cost_a_5xx(service, generated):
    renamed = bytearray(generated.replace(b"tiny-sdxl-base", b"fake-sdxl-base"))  # another checkpoint claimed
    # As written, the manifest's PNG chunk fails its CRC: the file is no whole PNG any more.
    error(service.post("/provenance/verify", json={"image": base64.b64encode(renamed).decode()}), 400,
          "INVALID_IMAGE", "image")
    start = generated.find(b"caBX") - 4  # a forger fixes the CRC: the file decodes, the credentials do not hold
    end = start + 8 + int.from_bytes(generated[start:start + 4], "big")
    renamed[end:end + 4] = zlib.crc32(renamed[start + 4:end]).to_bytes(4, "big")
    report = verify(service, bytes(renamed))
    assert report["watermark"]["found"]
    credentials = report["credentials"]
    assert credentials["validation_state"] == "invalid" and "assertion.hashedURI.mismatch" in credentials["failures"]
    for bad in (generated[: len(generated) // 2], generated[:100], b"garbage", b"\x89PNG\r\n\x1a\n"):
        error(service.post("/provenance/verify", json={"image": base64.b64encode(bad).decode()}), 400,
              "INVALID_IMAGE", "image")
    tiny = io.BytesIO()
    Image.new("RGB", (1, 1)).save(tiny, format="PNG")
    bomb = bytearray(tiny.getvalue())  # its header claims 60000x60000: refused before a pixel is decoded
    bomb[16:24] = (60_000).to_bytes(4, "big") * 2
    bomb[29:33] = zlib.crc32(bytes(bomb[12:29])).to_bytes(4, "big")
    for fmt in ("GIF", "BMP", "TIFF"):
        other = io.BytesIO()
        Image.new("RGB", (300, 300)).save(other, format=fmt)
        error(service.post("/provenance/verify", json={"image": base64.b64encode(other.getvalue()).decode()}), 400,
              "INVALID_IMAGE", "image")
    error(service.post("/provenance/verify", json={"image": base64.b64encode(bomb).decode()}), 400,
          "INVALID_IMAGE", "image")
    error(service.post("/provenance/verify", json={"image": ""}), 400, "INVALID_IMAGE", "image")
    error(service.post("/provenance/verify", json={"image": 5}), 422, "INVALID_INPUT", "image")
    error(service.post("/provenance/verify", json={"image": "A" * (5 * 1024 * 1024)}), 413, "PAYLOAD_TOO_LARGE")


def test_the_readme_example(service):
    section = (ROOT / "README.md").read_text().split("## Provenance")[1].split("\n## ")[0]
    command = re.search(r"```\n(curl .*?)\n```", section, re.S).group(1)
    url = str(service.base_url).rstrip("/")
    done = subprocess.run(["bash", "-o", "pipefail", "-c", command.replace("http://127.0.0.1:8000", url)],
                          capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert report["watermark"]["found"] and report["watermark"]["payload"] == SDXL_WATERMARK_BITS
    assert report["credentials"]["validation_state"] == "trusted"  # the tests' CA is a trust anchor here
