"""Property-based fuzzing of every operation in ``/openapi.json`` (schemathesis) against the live service:
valid and invalid inputs alike never get a 5xx, and every documented response matches its schema.

Each call carries ``X-Request-Timeout`` so that a valid but huge generation ends as a 408 (its work cancelled)
instead of holding the test for minutes; the jobs the fuzzer queues are cancelled afterwards. Schemathesis's
coverage phase sends about 70 valid bodies each to ``/generate`` and A1111's ``txt2img`` (their defaults: 1024²,
30 steps): a body asking for more work than a small one gets a shorter deadline, since it could only run into it.
"""

from __future__ import annotations

import os

import pytest
import schemathesis
from schemathesis import GenerationMode
from schemathesis.checks import content_type_conformance, not_a_server_error, response_schema_conformance

from graphs.app import app
from tests.conftest import BUCKET
from tests.helpers import drain

pytestmark = pytest.mark.integration
EXAMPLES = int(os.environ.get("SCHEMA_EXAMPLES", "8"))  # per operation and mode; `make fuzz` asks for more
DEADLINE = 1.5  # seconds: long enough for the small valid requests to answer 200 and meet the response schema
SMALL = 256 * 256 * 8  # pixels x steps: more than this would only meet DEADLINE on the tiny models
SHORT = 0.3  # the deadline of such a request


def deadline(body: object) -> float:
    """``DEADLINE``, or ``SHORT`` for a body asking for more work than ``SMALL`` (its defaults included)."""
    if not isinstance(body, dict):
        return DEADLINE
    try:
        steps = body.get("num_inference_steps", body.get("steps", 30))
        work = float(body.get("width", 1024)) * float(body.get("height", 1024)) * float(steps)
    except (TypeError, ValueError):  # not a number: refused before any work
        return DEADLINE
    return SHORT if work > SMALL else DEADLINE


# The document the service publishes at /openapi.json (the ingress's FastAPI app, built the same way).
schema = schemathesis.openapi.from_dict(app.openapi())
schema.config.generation.update(modes=[GenerationMode.POSITIVE, GenerationMode.NEGATIVE], max_examples=EXAMPLES,
                                deterministic=True)
# Changing the A1111 default checkpoint would change what later tests run; test_http covers it.
schema = schema.exclude(path="/sdapi/v1/options", method="POST")


def test_the_published_document_is_this_one(service):
    assert service.get("/openapi.json").json() == app.openapi()


@pytest.fixture(scope="module", autouse=True)
def healthy_storage_and_no_leftover_jobs(service, s3_server):
    """S3 up with its bucket (a missing bucket is a 503 by design); the jobs the fuzzer queued are cancelled."""
    import boto3

    client = boto3.client("s3", endpoint_url=s3_server, region_name="us-east-1")
    if BUCKET not in [b["Name"] for b in client.list_buckets()["Buckets"]]:
        client.create_bucket(Bucket=BUCKET)
    yield
    drain(service)


@schema.parametrize()
def test_no_5xx_and_responses_match_the_schema(case, service):
    headers = {"X-Request-Timeout": str(deadline(case.body))}
    case.call_and_validate(base_url=str(service.base_url), headers=headers, timeout=60,
                           checks=[not_a_server_error, response_schema_conformance, content_type_conformance])
