"""Errors at the HTTP edge: every typed ``ServiceError`` raised below becomes one status code and one body shape
for every route, ``{"error", "code", "details"}`` (seed 002), ``details.field`` naming the offending field."""

from __future__ import annotations

import logging
import re
from typing import Any

from fastapi import Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field
from starlette.exceptions import HTTPException

from deployments.support.errors import STATUS, ServiceError, status_of

logger = logging.getLogger(__name__)


class ErrorBody(BaseModel):
    """The body of every error answer."""

    error: str = Field(description="what went wrong, for a person")
    code: str = Field(description="what went wrong, for a program: INVALID_INPUT, NOT_FOUND, RATE_LIMITED...")
    details: dict[str, Any] = Field(description="details.field names the offending field (a body field, a query "
                                    "parameter or a header); the other keys depend on the code")


# What each error status means, as the OpenAPI document tells it.
DOCUMENTED = {
    400: "an image that cannot be decoded (INVALID_IMAGE)",
    401: "missing or invalid bearer token (UNAUTHORIZED), with WWW-Authenticate: Bearer",
    404: "not found (NOT_FOUND): no such job, photo or file; details.field names what named it",
    408: "the request ran past its deadline and its work was cancelled (REQUEST_TIMEOUT)",
    409: "the job is not in a state that allows it (CONFLICT): already finished, or not completed yet",
    410: "the job's image expired or was removed (RESULT_EXPIRED)",
    413: "the body is over MAX_BODY_BYTES (PAYLOAD_TOO_LARGE)",
    422: "an invalid value (INVALID_INPUT and the like); details.field names it",
    429: "rate limited (RATE_LIMITED), or a submit to a full job queue (QUEUE_FULL); with Retry-After",
    503: "busy or restarting, a model or the storage unavailable (MODEL_UNAVAILABLE, STORAGE_UNAVAILABLE...), "
         "with Retry-After",
}


def documented(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI ``responses`` for error statuses, each with the one error body."""
    return {status: {"model": ErrorBody, "description": DOCUMENTED[status]} for status in statuses}


def error_response(code: str, message: str, details: dict | None = None, headers: dict | None = None,
                   status: int | None = None) -> JSONResponse:
    status = status or STATUS.get(code, 500)
    if status in (429, 503):
        headers = {"Retry-After": "5", **(headers or {})}
    body = ErrorBody(error=message, code=code, details=details or {})
    return JSONResponse(body.model_dump(), status_code=status, headers=headers)


def handled() -> tuple[type[Exception], ...]:
    """What ``service_error`` answers by type: ours and Ray's (a lost replica, a full queue, a replica's error)."""
    from ray.exceptions import RayError
    from ray.serve.exceptions import RayServeException

    return ServiceError, RayError, RayServeException


async def service_error(_request: Request, exc: Exception) -> JSONResponse:
    """Every 5xx answered here is logged once, at WARNING, with its code, its reason and the deployment where it is
    known: the body tells the client to retry, so the log is the operator's only trace. A 4xx is the client's own
    doing and stays out of the log."""
    from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError

    error = unwrap(exc)
    busy = error if isinstance(error, BackPressureError | DeploymentUnavailableError) else lost(exc)
    if busy is not None:
        # A full queue, or a replica (or its node) gone mid-request: the client should come back shortly.
        _log_5xx(503, "MODEL_UNAVAILABLE", busy, exc)
        return error_response("MODEL_UNAVAILABLE", "the service is busy or restarting; retry shortly",
                              {"reason": type(busy).__name__})
    if not isinstance(error, ServiceError):
        logger.error("unhandled %s", type(error).__name__, exc_info=error)
        return error_response("INTERNAL_ERROR", "internal error")
    status = status_of(error)
    if status >= 500:
        _log_5xx(status, error.code, error, exc)
    headers = {"WWW-Authenticate": "Bearer"} if error.code == "UNAUTHORIZED" else None
    return error_response(error.code, error.message, error.details, headers, status)


def _log_5xx(status: int, code: str, reason: BaseException, raised: BaseException) -> None:
    text = str(reason).strip().splitlines()
    why = f"{type(reason).__name__}: {text[0][:200]}" if text else type(reason).__name__
    deployment = deployment_of(raised)
    logger.warning("answered %d %s: %s%s", status, code, why, f" (deployment {deployment})" if deployment else "")


# How Ray names a replica's deployment: its actor class (``ServeReplica:<app>:<deployment>``, in a task error's
# process title and an actor error's text), a deployment or replica id (``deployment='<name>'``), a replica's
# full id (``SERVE_REPLICA::<app>#<deployment>#<id>``).
_DEPLOYMENT = re.compile(r"ServeReplica:[^:\s]*:(\w+)|deployment='(\w+)'|SERVE_REPLICA::(?:[^#\s]*#)?(\w+)#")


def deployment_of(error: BaseException) -> str | None:
    """The deployment whose replica raised or lost ``error``, where Ray's errors in its chain name it, else None
    (an error of the ingress's own). ``call`` re-raises a replica's ServiceError without Ray's wrapper as its
    cause, but with it as its context, which is followed too."""
    current: BaseException | None = error
    for _ in range(8):  # a short chain; the bound only guards against a cycle
        if current is None:
            return None
        named = getattr(getattr(current, "_deployment_id", None), "name", None)
        if isinstance(named, str):
            return named
        for text in (getattr(current, "proctitle", None), getattr(current, "actor_repr", None), str(current)):
            match = _DEPLOYMENT.search(text) if isinstance(text, str) else None
            if match:
                return next(group for group in match.groups() if group)
        cause = getattr(current, "cause", None)
        current = cause if isinstance(cause, BaseException) and cause is not current \
            else current.__cause__ or current.__context__
    return None


async def validation_error(_request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)  # registered for this type only
    errors = exc.errors()
    first = errors[0] if errors else {}
    field = ".".join(str(p) for p in first.get("loc", ()) if p not in ("body", "query", "path", "header"))
    if first.get("type") == "json_invalid" or not field:
        field = "body"
    details = {"field": field, "errors": [{k: e.get(k) for k in ("loc", "msg", "type")} for e in errors]}
    message = f"{field}: {first.get('msg', 'invalid')}"
    if field == "prompt" and first.get("type") == "missing":
        message = "Prompt is required"  # seed 003's words, which its clients show
    return error_response("INVALID_INPUT", message, details)


async def http_error(_request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, HTTPException)
    code = {404: "NOT_FOUND", 405: "METHOD_NOT_ALLOWED", 413: "PAYLOAD_TOO_LARGE"}.get(exc.status_code, "HTTP_ERROR")
    body = ErrorBody(error=str(exc.detail), code=code, details={})
    return JSONResponse(body.model_dump(), status_code=exc.status_code, headers=exc.headers)


def lost(error: BaseException) -> BaseException | None:
    """The Ray error in ``error``'s chain that says a replica, its process or its node went away mid-call (taking
    the objects it had made with it), or None. The request was not at fault: sent again, it runs on a survivor.

    Ray raises these as they are, inside a ``RayTaskError`` (``cause``), or, when the stage that died produced the
    input of the next one, as a ``RayServeException`` whose ``__cause__`` is the ``ActorDiedError``.
    """
    from ray.exceptions import LocalRayletDiedError, NodeDiedError, ObjectLostError, RayActorError, WorkerCrashedError
    from ray.serve.exceptions import ReplicaUnavailableError

    gone = (RayActorError, ObjectLostError, NodeDiedError, WorkerCrashedError, LocalRayletDiedError,
            ReplicaUnavailableError)
    current: BaseException | None = error
    for _ in range(8):  # a short chain; the bound only guards against a cycle
        if current is None or isinstance(current, gone):
            return current
        cause = getattr(current, "cause", None)
        current = cause if isinstance(cause, BaseException) else current.__cause__
    return None


def unwrap(error: BaseException) -> BaseException:
    """Ray wraps an exception raised in a replica; the original carries our code and field."""
    cause = getattr(error, "cause", None)
    return cause if isinstance(cause, BaseException) else error


async def call(response):
    """Await a deployment response, re-raising a replica's ServiceError as itself."""
    try:
        return await response
    except Exception as e:
        cause = unwrap(e)
        if isinstance(cause, ServiceError) and cause is not e:
            raise cause from None
        raise
