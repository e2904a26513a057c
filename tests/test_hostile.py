"""Hostile input on every route of ``/openapi.json``, against the live service: malformed JSON of every kind,
out-of-range query values, odd path values and odd headers get a structured 4xx naming the field, never a 5xx.

Each request carries ``X-Request-Timeout`` so that anything that did validate cannot hold the test.
"""

from __future__ import annotations

import pytest

from graphs.app import app
from tests.helpers import drain, error

pytestmark = pytest.mark.integration

OPERATIONS = [(path, method.upper(), op) for path, ops in app.openapi()["paths"].items()
              for method, op in ops.items()]
WITH_BODY = [(p, m) for p, m, op in OPERATIONS if "requestBody" in op]
WITH_QUERY = [(p, m, [x["name"] for x in op.get("parameters", []) if x["in"] == "query"]) for p, m, op in OPERATIONS
              if any(x["in"] == "query" for x in op.get("parameters", []))]
WITH_PATH = [(p, m) for p, m, op in OPERATIONS if "{" in p]
HEADERS = {"X-Request-Timeout": "2"}

MALFORMED = {
    "truncated": b'{"prompt": "a',
    "NaN": b'{"prompt": "a", "seed": NaN, "width": Infinity}',
    "deep nesting": b"[" * 100_000 + b"]" * 100_000,
    "invalid UTF-8": b'{"prompt": "\xff\xfe\xfd"}',
    "a string": b'"prompt"',
    "a list": b"[]",
    "null": b"null",
    "wrong types": b'{"prompt": {"$ne": 1}, "width": "wide", "seed": 1e400, "steps": [1], "samples_format": 5}',
    "too many values": b'{"prompt": "a", "x": [' + b"[]," * 150_000 + b"[]]}",
    "a lone surrogate": b'{"prompt": "a", "override_settings": {"CLIP_stop_at_last_layers": "\\ud800"}}',
}


def fill(path: str, value: str = "job_1_abc") -> str:
    return path.replace("{job_id}", value)


def refused(response, field: str | None = None) -> dict:
    """A structured 4xx: the error body shape, naming a field."""
    assert 400 <= response.status_code < 500, (response.status_code, response.text[:300])
    body = error(response, response.status_code, response.json().get("code", ""))
    if field is not None:
        assert body["details"]["field"] == field, body
    return body


def test_the_document_lists_every_family():
    assert len(WITH_BODY) >= 15 and WITH_QUERY and WITH_PATH


@pytest.mark.parametrize(("path", "method"), WITH_BODY)
@pytest.mark.parametrize("content_type", ["application/json", "text/plain"])
def test_malformed_json_is_a_4xx_naming_the_field(service, path, method, content_type):
    for label, body in MALFORMED.items():
        response = service.request(method, fill(path), content=body,
                                   headers={**HEADERS, "content-type": content_type})
        answer = refused(response)
        assert answer["details"]["field"], (label, answer)
        if label in ("truncated", "NaN", "deep nesting", "invalid UTF-8"):
            assert answer["details"]["field"] == "body", (label, answer)


@pytest.mark.parametrize(("path", "method", "names"), WITH_QUERY)
def test_out_of_range_query_values_are_refused(service, path, method, names):
    for name in names:
        for value in ("1" + "0" * 21, "-" + "1" * 22, "1e309", "NaN", "x" * 5000, "\x00"):
            response = service.request(method, fill(path), params={name: value}, headers=HEADERS)
            assert response.status_code < 500, (name, value, response.text[:300])
            if response.status_code >= 400:
                refused(response)


def test_a_huge_offset_is_refused_by_name(service):
    refused(service.get("/jobs", params={"offset": str(10**21)}), "offset")
    refused(service.get("/jobs", params={"limit": "0"}), "limit")


@pytest.mark.parametrize(("path", "method"), WITH_PATH)
def test_odd_path_values_are_refused(service, path, method):
    for value in ("x" * 5000, "..%2F..%2Fetc%2Fpasswd", "%00", "\u00e9t\u00e9", "job_1_" + "a" * 80, "job 1"):
        response = service.request(method, fill(path, value), headers=HEADERS)
        assert 400 <= response.status_code < 500, (value, response.status_code, response.text[:300])
        refused(response)


@pytest.mark.parametrize(("path", "method", "op"), OPERATIONS, ids=[f"{m} {p}" for p, m, _ in OPERATIONS])
def test_odd_headers_never_cost_a_5xx(service, path, method, op):
    odd = [
        {"X-Request-Timeout": "nan"}, {"X-Request-Timeout": "-1"}, {"X-Request-Timeout": "1e999"},
        {"Authorization": "Bearer " + "x" * 8000, **HEADERS}, {"Authorization": b"Basic \xe9"},
        {"content-type": "application/json; charset=utf-16", **HEADERS},
        {"Idempotency-Key": "k" * 1000, **HEADERS},
    ]
    for headers in odd:
        body = b"{" if "requestBody" in op else None  # invalid, so nothing behind the route starts working
        response = service.request(method, fill(path), content=body, headers=headers)
        assert response.status_code < 500, (headers.keys(), response.status_code, response.text[:300])
        if "X-Request-Timeout" in headers and headers["X-Request-Timeout"] != "2":
            refused(response, "X-Request-Timeout")


def test_a_bad_idempotency_key_is_refused_and_creates_no_job(service):
    before = service.get("/queue/status").json()["queuedJobs"]
    for key in ("k" * 1000, "two words"):
        response = service.post("/generate/text2img", json={"prompt": "x", "width": 64, "height": 64, "steps": 1},
                                headers={"Idempotency-Key": key})
        refused(response, "Idempotency-Key")
    assert service.get("/queue/status").json()["queuedJobs"] == before
    drain(service)


@pytest.mark.parametrize(("path", "changes", "field"), [
    ("/generate/text2img", {"sampler": "bogus"}, "sampler"),
    ("/generate/text2img", {"prompt": "a cat <lora:x:zz>"}, "prompt"),
    ("/generate/text2img", {"webhookUrl": "http://[::1"}, "webhookUrl"),
    ("/generate/text2img", {"webhookUrl": "http://100.100.100.200/latest/meta-data"}, "webhookUrl"),
    ("/generate/img2img", {"initImage": "data:image/png;base64"}, "initImage"),
    ("/generate/async", {"overlay": {"text": "hi", "color": "rgb(99999999999999999999,0,0)"}}, "overlay.color"),
])
def test_a_job_that_would_fail_later_is_refused_at_submit_and_creates_none(service, path, changes, field):
    before = service.get("/queue/status").json()["queuedJobs"]
    body = {"prompt": "x", "width": 64, "height": 64, "steps": 1, **changes}
    refused(service.post(path, json=body, headers=HEADERS), field)
    assert service.get("/queue/status").json()["queuedJobs"] == before
