"""The HTTP edge: the FastAPI app and what wraps every route (body limit, bearer auth, rate limits, deadlines).

Errors are raised as typed ``ServiceError``s everywhere below; ``graphs.api.errors`` alone turns them into
status codes.
"""

import asyncio
import base64
import contextlib
import hashlib
import hmac
import logging
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network, ip_address
from typing import Any

from fastapi import FastAPI
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException
from starlette.middleware.cors import CORSMiddleware
from starlette.requests import Request
from starlette.types import ASGIApp, Receive, Scope, Send

from deployments.support.errors import Unauthorized
from deployments.support.settings import Settings, current
from graphs.api import errors, ratelimit
from graphs.api.errors import DOCUMENTED, ErrorBody, error_response
from graphs.jobs.store import ANONYMOUS

logger = logging.getLogger(__name__)

class BodyLimit:
    """Refuse bodies over the limit with 413 before they are read whole (declared or streamed length)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    @property
    def max_bytes(self) -> int:
        return current().max_body_bytes

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


# The page at /ui is open too: it asks for the token and sends it on every API call it makes.
OPEN_PATHS = ("/health", "/docs", "/openapi.json", "/redoc", "/ui")
A1111_PATHS = ("/sdapi/", "/internal/")  # Automatic1111's API: its clients may authenticate as its --api-auth asks
TIMEOUT_HEADER = b"x-request-timeout"


class Deadline:
    """Every request gets at most ``REQUEST_TIMEOUT_SECONDS`` (a client may ask for less with
    ``X-Request-Timeout: <seconds>``). Past it the handler is cancelled, which stops the work below it (see
    ``flights.flight``), and the client gets 408 ``REQUEST_TIMEOUT``."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        limit = current().request_timeout_seconds
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


class Head:
    """HEAD on every GET route, as HTTP has it (uptime checks and load balancers use it): the GET's status and
    headers, no body. A streamed answer is stopped once its headers are out."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] != "HEAD":
            return await self.app(scope, receive, send)
        done = False

        async def headers_only(message) -> None:
            nonlocal done
            if done:
                raise _Answered
            if message["type"] == "http.response.body":
                done, message = True, {"type": "http.response.body", "body": b"", "more_body": False}
            await send(message)

        async def until_answered():
            return {"type": "http.disconnect"} if done else await receive()

        with contextlib.suppress(_Answered):
            # ``head``: a route that can answer without its body (an image's size) reads it.
            await self.app({**scope, "method": "GET", "head": True}, until_answered, headers_only)


class Unexpected:
    """An error no route and no typed handler answered, answered inside the other middlewares, so that it carries
    their CORS and RateLimit-* headers (Starlette answers an ``Exception`` handler outside them all): a lost Ray
    replica wrapped in some other error is the 503 Ray's own are, anything else the logged 500. An answer already
    under way cannot be replaced: its error goes on up."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started = False

        async def sending(message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, receive, sending)
        except Exception as e:
            if started:
                raise
            answer = await errors.service_error(Request(scope), e)
            await answer(scope, receive, send)


class _Answered(Exception):
    """A HEAD answer is complete: the GET behind it has nothing more to send."""


class Cors:
    """Pages on the ``CORS_ALLOW_ORIGINS`` origins (or matching ``CORS_ALLOW_ORIGINS_REGEX``) may call the API, as
    A1111's ``--cors-allow-origins`` allows; off when neither is set. Outermost: a preflight needs no token and
    spends no budget, and every answer, a 401 or 429 too, carries the headers that let the page read it."""

    EXPOSED = ["Retry-After", "RateLimit-Limit", "RateLimit-Remaining", "RateLimit-Reset"]

    def __init__(self, app: ASGIApp) -> None:
        self.app = app
        self._inner: ASGIApp | None = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if self._inner is None:  # built in the serving process, from its settings
            settings = current()
            origins, pattern = settings.cors_origins(), settings.cors_allow_origins_regex
            self._inner = CORSMiddleware(self.app, allow_origins=origins, allow_origin_regex=pattern,
                                         allow_methods=["*"], allow_headers=["*"], expose_headers=self.EXPOSED,
                                         max_age=600) if origins or pattern else self.app
        await self._inner(scope, receive, send)


def challenge(path: str, headers: dict[bytes, bytes]) -> str:
    """The ``WWW-Authenticate`` of a 401: ``Bearer`` (seed 001); on A1111's routes ``Basic`` too, for the clients
    that send A1111's ``--api-auth`` credentials only once challenged (the password is the token). Not for a
    browser's scripts (``Sec-Fetch-Mode``), which would pop up a login dialog over the page."""
    if path.startswith(A1111_PATHS) and b"sec-fetch-mode" not in headers:
        return 'Basic realm="imagegen", Bearer'
    return "Bearer"


class BearerAuth:
    """Seed 001 auth for every route but health and the docs: 401 with ``WWW-Authenticate: Bearer`` (and Basic on
    A1111's routes: ``challenge``)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        settings = current()
        if scope["type"] == "http" and settings.auth_enabled and not scope["path"].startswith(OPEN_PATHS):
            headers = dict(scope.get("headers", []))
            header = headers.get(b"authorization", b"").decode("latin-1")
            try:
                check_bearer(settings, header)
            except Unauthorized as e:
                response = error_response(e.code, e.message, headers={"WWW-Authenticate": challenge(scope["path"],
                                                                                                      headers)})
                return await response(scope, receive, send)
        await self.app(scope, receive, send)


class RateLimit:
    """Per-client budgets every ingress replica shares (``graphs.api.ratelimit``). Beyond its budget a request is
    answered 429 ``RATE_LIMITED`` with ``Retry-After`` before anything runs; an allowed one carries the
    ``RateLimit-*`` headers. A client is its bearer token (as jobs are owned), else its address."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app
        self._buckets: ratelimit.Buckets | None = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        settings = current()
        if scope["type"] != "http" or not settings.rate_limits_enabled or scope["path"].startswith(OPEN_PATHS):
            return await self.app(scope, receive, send)
        name = ratelimit.classify(scope["method"], scope["path"])
        budget = ratelimit.budgets(settings)[name]
        if self._buckets is None:
            self._buckets = ratelimit.open_buckets(settings)
        buckets = self._buckets
        try:
            decision = await asyncio.to_thread(buckets.take, f"{name}:{client_key(scope, settings)}", budget)
        except buckets.errors as e:
            # A limiter outage must not become a service outage: let the request through, loudly.
            logger.warning("rate limits unavailable (%s); request let through", type(e).__name__)
            return await self.app(scope, receive, send)
        if not decision.allowed:
            response = error_response(
                "RATE_LIMITED", f"too many {name} requests: retry in {decision.retry_after} s",
                {"budget": name, "limit": budget.burst, "per_second": budget.rate,
                 "retry_after_seconds": decision.retry_after},
                headers=decision.headers())
            return await response(scope, receive, send)
        extra = [(k.lower().encode(), v.encode()) for k, v in decision.headers().items()]

        async def with_headers(message) -> None:
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", []), *extra]}
            await send(message)

        await self.app(scope, receive, with_headers)


def client_key(scope: Scope, settings: Settings) -> str:
    """Who spends a budget: with auth on, the bearer token's owner name; else (or without a header) the client's
    address. With auth off a header proves nothing, so it cannot buy a fresh budget either."""
    if settings.auth_enabled:
        owner = token_owner(dict(scope.get("headers", [])).get(b"authorization", b"").decode("latin-1") or None)
        if owner is not None:
            return f"token:{owner}"
    return f"addr:{client_address(scope, settings)}"


def client_address(scope: Scope, settings: Settings) -> str:
    """The peer's address, unless the peer is one of ``TRUSTED_PROXIES``: then the right-most X-Forwarded-For hop
    that is not (a load balancer appends the address it saw; what a client wrote further left proves nothing).
    Behind a load balancer every peer is the balancer, so without this every user would be one client."""
    client = scope.get("client")
    peer = client[0] if client else "unknown"
    trusted = settings.trusted_networks
    if not trusted or not _within(peer, trusted):
        return peer
    forwarded = [hop.strip() for name, value in scope.get("headers", []) if name == b"x-forwarded-for"
                 for hop in value.decode("latin-1").split(",")]
    for hop in reversed(forwarded):
        if not _within(hop, trusted):
            address = _address(hop)
            return str(address) if address is not None else peer  # not an address: it names no one
    return peer  # every hop a proxy of ours (or no header): the request started inside


def _address(text: str) -> IPv4Address | IPv6Address | None:
    """An address as proxies write it: bare, or with a port (``1.2.3.4:5678``, ``[2001:db8::1]:5678``)."""
    if text.startswith("["):
        text = text[1:].partition("]")[0]
    elif text.count(":") == 1:
        text = text.partition(":")[0]
    try:
        return ip_address(text)
    except ValueError:
        return None


def _within(text: str, networks: tuple[IPv4Network | IPv6Network, ...]) -> bool:
    address = _address(text)
    return address is not None and any(address in network for network in networks)


class EdgeApp(FastAPI):
    """The app whose OpenAPI document tells errors as they are answered (``document_errors``)."""

    def openapi(self) -> dict[str, Any]:
        if self.openapi_schema is None:
            self.openapi_schema = document_errors(super().openapi(), current())
        return self.openapi_schema


def document_errors(schema: dict[str, Any], settings: Settings) -> dict[str, Any]:
    """Every error in the document is ``ErrorBody`` (FastAPI's own ``HTTPValidationError`` is never sent), and every
    operation lists the statuses this edge answers for it, on the same rules the middlewares apply: 401 and the
    bearer scheme where auth is on, 429 where rate limits are, 408 outside the open paths, 413 for a body."""
    body = {"application/json": {"schema": {"$ref": "#/components/schemas/ErrorBody"}}}
    components = schema.setdefault("components", {})
    models = components.setdefault("schemas", {})
    models.setdefault("ErrorBody", ErrorBody.model_json_schema())
    for name in ("HTTPValidationError", "ValidationError"):
        models.pop(name, None)
    if settings.auth_enabled:
        components["securitySchemes"] = {"bearer": {"type": "http", "scheme": "bearer"}}
    for path, operations in schema.get("paths", {}).items():
        guarded = not path.startswith(OPEN_PATHS)
        for operation in operations.values():
            responses = operation.setdefault("responses", {})
            for status, response in responses.items():
                if status >= "4":  # an event stream's errors are JSON too
                    response["content"] = body
                    if status == "422":
                        response["description"] = DOCUMENTED[422]
            edge = [(guarded and settings.auth_enabled, 401), (guarded, 408),
                    ("requestBody" in operation, 413), (guarded and settings.rate_limits_enabled, 429)]
            for status in (status for applies, status in edge if applies):
                responses.setdefault(str(status), {"description": DOCUMENTED[status], "content": body})
            if guarded and settings.auth_enabled:
                operation["security"] = [{"bearer": []}]
            operation["responses"] = dict(sorted(responses.items()))
    return schema


def create_app() -> FastAPI:
    app = EdgeApp(
        title="imagegen",
        version="0.1.0",
        description="SDXL image generation on Ray Serve. Serves the seed APIs: /generate, /v1/images/*, "
        "/process, /derivatives/clip-focal and Automatic1111's /sdapi/v1/*.",
    )
    # By type: Starlette answers an ``Exception`` handler outside every middleware, without CORS or RateLimit-*
    # headers, and logs the error as a crash. The rest reach ``Unexpected``; ``Exception`` is left for a
    # middleware's own error.
    for error in errors.handled():
        app.add_exception_handler(error, errors.service_error)
    app.add_exception_handler(Exception, errors.service_error)
    app.add_exception_handler(RequestValidationError, errors.validation_error)
    app.add_exception_handler(HTTPException, errors.http_error)
    app.add_middleware(Unexpected)  # innermost: inside every middleware that adds headers
    app.add_middleware(Head)
    app.add_middleware(Deadline)
    app.add_middleware(RateLimit)  # after auth: a refused token spends no one's budget
    app.add_middleware(BearerAuth)
    app.add_middleware(BodyLimit)  # runs before anything reads the body
    app.add_middleware(Cors)  # outermost: a browser's preflight is answered before auth and rate limits
    return app


def check_bearer(settings: Settings, authorization: str | None) -> None:
    """Seed 001 auth: when enabled, ``Authorization: Bearer <AUTH_TOKEN>``, compared in constant time. A1111
    clients may authenticate as A1111's ``--api-auth`` has them do, with HTTP Basic: ``AUTH_TOKEN`` as the password,
    whatever the user name."""
    if not settings.auth_enabled:
        return
    scheme, token = _credential(authorization)
    expected = settings.auth_token.encode()
    if scheme != "Bearer" or not expected or not hmac.compare_digest(token.encode(), expected):
        raise Unauthorized("missing or invalid bearer token")


def _credential(authorization: str | None) -> tuple[str, str]:
    """An ``Authorization`` header as (scheme, token), spelled one way: the scheme as HTTP writes it (``bearer``,
    ``BEARER`` -> ``Bearer``), the token without the whitespace around it. HTTP Basic's password is the token, as
    ``Bearer <password>``: one token is one client however it is sent, whatever user name comes with it."""
    scheme, _, token = (authorization or "").strip().partition(" ")
    scheme, token = scheme.capitalize(), token.strip()
    if scheme == "Basic":
        try:
            user, colon, password = base64.b64decode(token, validate=True).decode("utf-8").partition(":")
        except ValueError:  # binascii.Error and UnicodeDecodeError are ValueErrors
            return scheme, token
        if colon:
            return "Bearer", password
    return scheme, token


def token_owner(authorization: str | None) -> str | None:
    """A stable, non-reversible name for the bearer token that made a request (jobs belong to it): one name for
    every spelling of the header that ``check_bearer`` accepts, the one it had for ``Bearer <token>``."""
    scheme, token = _credential(authorization)
    if not scheme:
        return None
    canonical = f"{scheme} {token}" if token else scheme
    return hashlib.sha256(canonical.encode()).hexdigest()[:16]


def listing_owner(authorization: str | None, settings: Settings) -> str | None:
    """Whose jobs a caller lists: with ``jobs_per_token``, its token's, or without a token the jobs made without
    one (``ANONYMOUS``: no token is not a wildcard); otherwise everyone's (None)."""
    if not settings.jobs_per_token:
        return None
    return token_owner(authorization) or ANONYMOUS


