"""The HTTP edge: the FastAPI app, error bodies, auth, body limits and image fields.

Errors are raised as typed ``ServiceError``s everywhere below; this module alone turns them into status codes,
with one body shape for every route: ``{"error", "code", "details"}`` (seed 002), ``details.field`` naming
the offending field.
"""

import asyncio
import base64
import binascii
import contextlib
import functools
import hashlib
import hmac
import logging
from collections.abc import AsyncIterator, Awaitable, Callable

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from PIL import Image
from pydantic import BaseModel, Field
from pydantic_settings import BaseSettings, SettingsConfigDict
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Receive, Scope, Send

from deployments.errors import InvalidImage, ServiceError, Unauthorized
from deployments.imaging import decode

logger = logging.getLogger(__name__)

STATUS = {
    "INVALID_INPUT": 422,
    "INVALID_IMAGE": 400,
    "UNKNOWN_MODEL": 422,
    "NOT_FOUND": 404,
    "UNAUTHORIZED": 401,
    "CANCELLED": 409,
    "CONFLICT": 409,
    "QUEUE_FULL": 429,
    "PAYLOAD_TOO_LARGE": 413,
    "REQUEST_TIMEOUT": 408,
    "GPU_OOM": 503,
    "MODEL_UNAVAILABLE": 503,
    "STORAGE_UNAVAILABLE": 503,
    "MODEL_LOAD_FAILED": 503,
}


class ApiSettings(BaseSettings):
    """Environment of the HTTP edge (seed 001 names)."""

    model_config = SettingsConfigDict(extra="ignore")

    auth_enabled: bool = Field(False, alias="AUTH_ENABLED")
    auth_token: str = Field("", alias="AUTH_TOKEN", repr=False)
    max_body_bytes: int = Field(32 * 1024 * 1024, alias="MAX_BODY_BYTES")
    request_timeout_s: float = Field(300.0, gt=0, alias="REQUEST_TIMEOUT_SECONDS")


class ErrorBody(BaseModel):
    error: str
    code: str
    details: dict


def error_response(code: str, message: str, details: dict | None = None, headers: dict | None = None) -> JSONResponse:
    status = STATUS.get(code, 500)
    if status in (429, 503):
        headers = {"Retry-After": "5", **(headers or {})}
    body = ErrorBody(error=message, code=code, details=details or {})
    return JSONResponse(body.model_dump(), status_code=status, headers=headers)


async def _service_error(_request: Request, exc: Exception) -> JSONResponse:
    from ray.exceptions import RayActorError
    from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError, ReplicaUnavailableError

    error = unwrap(exc)
    if isinstance(error, BackPressureError | DeploymentUnavailableError | ReplicaUnavailableError | RayActorError):
        # A full queue or a replica being replaced: the client should come back shortly.
        return error_response("MODEL_UNAVAILABLE", "the service is busy or restarting; retry shortly",
                              {"reason": type(error).__name__})
    if not isinstance(error, ServiceError):
        logger.error("unhandled %s", type(error).__name__, exc_info=error)
        return error_response("INTERNAL_ERROR", "internal error")
    headers = {"WWW-Authenticate": "Bearer"} if error.code == "UNAUTHORIZED" else None
    return error_response(error.code, error.message, error.details, headers)


async def _validation_error(_request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)  # registered for this type only
    errors = exc.errors()
    first = errors[0] if errors else {}
    field = ".".join(str(p) for p in first.get("loc", ()) if p not in ("body", "query"))
    details = {"field": field, "errors": [{k: e.get(k) for k in ("loc", "msg", "type")} for e in errors]}
    return error_response("INVALID_INPUT", f"{field}: {first.get('msg', 'invalid')}", details)


async def _http_error(_request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, HTTPException)
    code = {404: "NOT_FOUND", 405: "METHOD_NOT_ALLOWED", 413: "PAYLOAD_TOO_LARGE"}.get(exc.status_code, "HTTP_ERROR")
    body = ErrorBody(error=str(exc.detail), code=code, details={})
    return JSONResponse(body.model_dump(), status_code=exc.status_code, headers=exc.headers)


def unwrap(error: BaseException) -> BaseException:
    """Ray wraps an exception raised in a replica; the original carries our code and field."""
    cause = getattr(error, "cause", None)
    return cause if isinstance(cause, BaseException) else error


@functools.cache
def api_settings() -> ApiSettings:
    """Read in the serving process on first use: the app object itself is built, and pickled, elsewhere."""
    return ApiSettings()


class BodyLimit:
    """Refuse bodies over the limit with 413 before they are read whole (declared or streamed length)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    @property
    def max_bytes(self) -> int:
        return api_settings().max_body_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope.get("headers", [])).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            return await self._refuse(send)
        seen, refused = 0, False

        async def counted():
            # A streamed body over the limit: answer 413 at once, then tell the app the client has gone.
            nonlocal seen, refused
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > self.max_bytes and not refused:
                refused = True
                await self._refuse(send)
            return {"type": "http.disconnect"} if refused else message

        async def guarded_send(message) -> None:
            if not refused:  # the app's own answer to a refused request is dropped
                await send(message)

        await self.app(scope, counted, guarded_send)

    async def _refuse(self, send: Send) -> None:
        response = error_response("PAYLOAD_TOO_LARGE", f"request body exceeds {self.max_bytes} bytes",
                                  {"limit": self.max_bytes})
        await send({"type": "http.response.start", "status": 413, "headers": response.raw_headers})
        await send({"type": "http.response.body", "body": response.body})


OPEN_PATHS = ("/health", "/docs", "/openapi.json", "/redoc")
TIMEOUT_HEADER = b"x-request-timeout"


class Deadline:
    """Every request gets at most ``REQUEST_TIMEOUT_SECONDS`` (a client may ask for less with
    ``X-Request-Timeout: <seconds>``). Past it the handler is cancelled, which stops the work below it (see
    ``stop_on_cancel``), and the client gets 408 ``REQUEST_TIMEOUT``."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        limit = api_settings().request_timeout_s
        asked = dict(scope.get("headers", [])).get(TIMEOUT_HEADER)
        if asked is not None:
            try:
                seconds = float(asked)
                if not 0 < seconds < float("inf"):
                    raise ValueError(seconds)
            except ValueError:
                response = error_response("INVALID_INPUT", "X-Request-Timeout must be a positive number of seconds",
                                          {"field": "X-Request-Timeout"})
                return await response(scope, receive, send)
            limit = min(limit, seconds)
        started = False

        async def tracking_send(message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await asyncio.wait_for(self.app(scope, receive, tracking_send), limit)
        except TimeoutError:
            if started:  # a streamed answer was already under way: all we can do is stop
                return
            response = error_response("REQUEST_TIMEOUT", f"request exceeded its {limit:g} s deadline; its work was "
                                      "cancelled", {"timeout_seconds": limit})
            await response(scope, receive, send)


@contextlib.asynccontextmanager
async def stop_on_cancel(stop: Callable[[], Awaitable[object]]) -> AsyncIterator[None]:
    """Run ``stop`` when the handler is cancelled (deadline passed, or the client went away) before re-raising:
    a replica thread in a denoising loop does not notice a cancelled caller, a cancel flag it checks each step."""
    try:
        yield
    except asyncio.CancelledError:
        with contextlib.suppress(Exception):
            await asyncio.shield(stop())
        raise


class BearerAuth:
    """Seed 001 auth for every route but health and the docs: 401 with ``WWW-Authenticate: Bearer``."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        settings = api_settings()
        if scope["type"] == "http" and settings.auth_enabled and not scope["path"].startswith(OPEN_PATHS):
            header = dict(scope.get("headers", [])).get(b"authorization", b"").decode("latin-1")
            try:
                check_bearer(settings, header)
            except Unauthorized as e:
                response = error_response(e.code, e.message, headers={"WWW-Authenticate": "Bearer"})
                return await response(scope, receive, send)
        await self.app(scope, receive, send)


def create_app() -> FastAPI:
    app = FastAPI(
        title="imagegen",
        version="0.1.0",
        description="SDXL image generation on Ray Serve. Serves the seed APIs: /generate, /v1/images/*, "
        "/process, /derivatives/clip-focal and Automatic1111's /sdapi/v1/*.",
    )
    app.add_exception_handler(Exception, _service_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(HTTPException, _http_error)
    app.add_middleware(Deadline)
    app.add_middleware(BearerAuth)
    app.add_middleware(BodyLimit)  # outermost: runs before anything reads the body
    return app


def check_bearer(settings: ApiSettings, authorization: str | None) -> None:
    """Seed 001 auth: when enabled, ``Authorization: Bearer <AUTH_TOKEN>``; compared in constant time."""
    if not settings.auth_enabled:
        return
    scheme, _, token = (authorization or "").partition(" ")
    expected = settings.auth_token.encode()
    if scheme.lower() != "bearer" or not expected or not hmac.compare_digest(token.strip().encode(), expected):
        raise Unauthorized("missing or invalid bearer token")


def token_owner(authorization: str | None) -> str | None:
    """A stable, non-reversible name for the bearer token that made a request (jobs belong to it)."""
    return hashlib.sha256(authorization.encode()).hexdigest()[:16] if authorization else None


def image_field(value: str, field: str) -> Image.Image:
    """Decode a data URI or plain base64 image; a malformed one is a 400 naming the field, never a 500."""
    payload = value.split(",", 1)[1] if value.startswith("data:") else value
    try:
        raw = base64.b64decode(payload, validate=False)
    except (binascii.Error, ValueError) as e:
        raise InvalidImage(f"{field}: not valid base64", field=field) from e
    if not raw:
        raise InvalidImage(f"{field}: empty image", field=field)
    return decode(raw, field=field)


def b64_png(image: Image.Image, pnginfo: dict[str, str] | None = None) -> str:
    from deployments.imaging import encode

    return base64.b64encode(encode(image, "png", pnginfo=pnginfo)).decode()


async def call(response):
    """Await a deployment response, re-raising a replica's ServiceError as itself."""
    try:
        return await response
    except Exception as e:
        cause = unwrap(e)
        if isinstance(cause, ServiceError) and cause is not e:
            raise cause from None
        raise
