"""Helpers shared by the test modules (test modules never import each other): images and pixels, error bodies,
S3 clients, job submission and waiting, a webhook receiver."""

from __future__ import annotations

import base64
import io
import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
from PIL import Image


def pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image, dtype=np.int16)


def s3_client(endpoint: str):
    import boto3

    return boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1")


def decode_b64(data: str) -> Image.Image:
    return Image.open(io.BytesIO(base64.b64decode(data.split(",", 1)[-1])))


def b64(image: Image.Image, fmt: str = "PNG", **save) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **save)
    return base64.b64encode(buffer.getvalue()).decode()


def error(response, status: int, code: str, field: str | None = None) -> dict:
    assert response.status_code == status, response.text
    body = response.json()
    assert body["code"] == code and set(body) == {"error", "code", "details"}
    if field is not None:
        assert body["details"]["field"] == field
    return body


SMALL = {"prompt": "a lighthouse", "width": 128, "height": 128, "steps": 3, "seed": 11}
LONG = {"prompt": "a long one", "width": 256, "height": 256, "steps": 150, "seed": 3}


def wait(service, job_id: str, until=("completed", "failed", "cancelled"), timeout: float = 120,
         headers: dict | None = None) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job = service.get(f"/jobs/{job_id}", headers=headers).json()
        if job["status"] in until:
            return job
        time.sleep(0.2)
    raise AssertionError(f"job {job_id} stuck in {job['status']}")


def submit(service, path="/generate/text2img", body=None, **headers) -> dict:
    response = service.post(path, json=body or SMALL, headers=headers)
    assert response.status_code == 202, response.text
    return response.json()


def drain(service) -> None:
    for job in service.get("/jobs", params={"status": "queued", "limit": 500}).json()["jobs"]:
        service.post(f"/jobs/{job['id']}/cancel")
    for job in service.get("/jobs", params={"status": "processing"}).json()["jobs"]:
        service.post(f"/jobs/{job['id']}/cancel")
        wait(service, job["id"])


class Receiver:
    """A loopback HTTP server that records POSTs and fails the first ``failures`` of them with 500."""

    def __init__(self, failures: int = 0) -> None:
        self.bodies: list[dict] = []
        self.failures = failures
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):  # noqa: N802 - http.server's naming
                body = json.loads(self.rfile.read(int(self.headers["content-length"])))
                receiver.bodies.append(body)
                status = 500 if len(receiver.bodies) <= receiver.failures else 200
                self.send_response(status)
                self.end_headers()

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hook"

    def close(self) -> None:
        self.server.shutdown()
