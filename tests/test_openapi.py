"""The published document: every operation declares its request body (where it takes one) and a response model."""

from __future__ import annotations

import pytest

from graphs.app import app

DOCUMENT = app.openapi()
OPERATIONS = [(path, method, op) for path, ops in DOCUMENT["paths"].items() for method, op in ops.items()]
# Actions A1111 defines without a body.
NO_BODY = {"/sdapi/v1/interrupt", "/sdapi/v1/skip", "/sdapi/v1/refresh-checkpoints", "/sdapi/v1/refresh-loras",
           "/sdapi/v1/refresh-embeddings",
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


ERROR_BODY = {"$ref": "#/components/schemas/ErrorBody"}


def documented(path: str, method: str, document: dict = DOCUMENT) -> dict[str, dict]:
    """An operation's error statuses, each with the schema of its JSON body."""
    responses = document["paths"][path][method]["responses"]
    return {status: response["content"]["application/json"]["schema"] for status, response in responses.items()
            if status >= "4"}


@pytest.mark.parametrize(("path", "method", "op"), OPERATIONS, ids=[f"{m} {p}" for p, m, _ in OPERATIONS])
def test_every_error_is_documented_with_the_body_the_service_answers(path, method, op):
    """FastAPI documents {"detail": [...]}; the service answers {"error", "code", "details"}."""
    assert all(schema == ERROR_BODY for schema in documented(path, method).values()), f"{method} {path}"
    guarded = not path.startswith(("/health", "/ui"))
    assert ("429" in documented(path, method)) == guarded  # rate limits are on by default
    assert ("413" in documented(path, method)) == ("requestBody" in op)


def test_no_schema_of_fastapis_own_error_body_is_left():
    assert not {"HTTPValidationError", "ValidationError"} & set(DOCUMENT["components"]["schemas"])
    body = DOCUMENT["components"]["schemas"]["ErrorBody"]
    assert body["required"] == ["error", "code", "details"]


@pytest.mark.parametrize(("path", "method", "statuses"), [
    ("/jobs/{job_id}", "get", {"404", "408", "422", "429", "503"}),
    ("/jobs/{job_id}/events", "get", {"404", "408", "422", "429", "503"}),
    ("/jobs/{job_id}/result", "get", {"404", "408", "409", "410", "422", "429", "503"}),
    ("/jobs/{job_id}/images/{name}", "get", {"404", "408", "410", "422", "429", "503"}),
    ("/jobs/{job_id}/cancel", "post", {"404", "408", "409", "422", "429", "503"}),
    ("/generate/text2img", "post", {"400", "408", "413", "422", "429", "503"}),  # ControlNet units' images
    ("/generate/img2img", "post", {"400", "408", "413", "422", "429", "503"}),
    ("/health/", "get", set()),
])
def test_each_route_lists_the_statuses_it_answers(path, method, statuses):
    assert set(documented(path, method)) == statuses


def test_with_auth_on_every_guarded_route_documents_401_and_the_bearer_scheme():
    from fastapi.openapi.utils import get_openapi

    from deployments.support.settings import Settings
    from graphs.api.edge import OPEN_PATHS, document_errors

    document = document_errors(get_openapi(title=app.title, version=app.version, routes=app.routes),
                               Settings(auth_enabled=True, rate_limits_enabled=False))
    assert document["components"]["securitySchemes"] == {"bearer": {"type": "http", "scheme": "bearer"}}
    for path, operations in document["paths"].items():
        for method, op in operations.items():
            guarded = not path.startswith(OPEN_PATHS)
            assert ("401" in documented(path, method, document)) == guarded, f"{method} {path}"
            assert (op.get("security") == [{"bearer": []}]) == guarded
    assert "429" not in documented("/jobs", "get", document)  # rate limits off
    assert "429" in documented("/generate/text2img", "post", document)  # a full queue still is
