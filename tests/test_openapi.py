"""The published document: every operation declares its request body (where it takes one) and a response model."""

from __future__ import annotations

import pytest

from graphs.app import app

DOCUMENT = app.openapi()
OPERATIONS = [(path, method, op) for path, ops in DOCUMENT["paths"].items() for method, op in ops.items()]
# Actions A1111 defines without a body.
NO_BODY = {"/sdapi/v1/interrupt", "/sdapi/v1/skip", "/sdapi/v1/refresh-checkpoints", "/sdapi/v1/refresh-loras",
           "/sdapi/v1/unload-checkpoint", "/sdapi/v1/reload-checkpoint", "/sdapi/v1/refresh-vae",
           "/jobs/{job_id}/cancel"}


@pytest.mark.parametrize(("path", "method", "op"), OPERATIONS, ids=[f"{m} {p}" for p, m, _ in OPERATIONS])
def test_every_operation_is_declared(path, method, op):
    success = next(code for code in op["responses"] if code.startswith("2"))
    content = op["responses"][success]["content"]
    # events: a stream; a job's image: its bytes
    schema = (content.get("application/json") or content.get("text/event-stream") or content["image/png"])["schema"]
    assert schema, f"{method} {path}: no response model"
    if method in ("post", "put", "patch") and path not in NO_BODY:
        body = op["requestBody"]["content"]["application/json"]["schema"]
        assert body.get("$ref") or body.get("type"), f"{method} {path}: no request model"
    assert op.get("description") or op.get("summary"), f"{method} {path}: no docstring"


def test_the_job_submits_are_documented_with_their_models():
    submit = DOCUMENT["paths"]["/generate/text2img"]["post"]
    assert submit["requestBody"]["content"]["application/json"]["schema"]["$ref"].endswith("/Text2ImgJob")
    assert "202" in submit["responses"]
    listing = DOCUMENT["paths"]["/jobs"]["get"]
    offset = next(p for p in listing["parameters"] if p["name"] == "offset")
    assert offset["schema"]["maximum"] == 10**9
