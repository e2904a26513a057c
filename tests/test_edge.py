"""The HTTP edge without Ray: bearer auth on and off, body limits, error bodies (the real app factory)."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import logging
import time

import httpx
import pytest
from fastapi import APIRouter
from fastapi.responses import StreamingResponse

from deployments.support import settings
from graphs import flights
from graphs.api import edge as http
from graphs.api import ui

pytestmark = pytest.mark.anyio


@pytest.fixture
def make_client(monkeypatch, tmp_path):
    clients = []

    def build(peer: str = "127.0.0.1", **env) -> httpx.AsyncClient:
        monkeypatch.setenv("JOBS_DATA_DIR", str(tmp_path))  # the rate-limit buckets live there
        for key, value in env.items():
            monkeypatch.setenv(key, value)
        settings.current.cache_clear()
        app = http.create_app()
        router = APIRouter()

        @router.get("/health/")
        async def health():
            return {"status": "healthy"}

        @router.post("/echo")
        async def echo(body: dict):
            return {"size": len(str(body))}

        @router.get("/slow")
        async def slow():
            class StageCall:  # what a plan's flight holds: a DeploymentResponse
                def cancel(self):
                    stopped.append(time.monotonic())

            async with flights.flight() as calls:
                calls.append(StageCall())
                await asyncio.sleep(30)

        @router.get("/forever")
        async def forever():
            async def ticks():
                while True:
                    yield b"tick\n"
                    await asyncio.sleep(0.01)

            return StreamingResponse(ticks(), media_type="text/event-stream")

        app.include_router(router)
        app.include_router(ui.router)
        client = httpx.AsyncClient(transport=httpx.ASGITransport(app=app, client=(peer, 40000)),
                                   base_url="http://test")
        clients.append(client)
        return client

    yield build
    settings.current.cache_clear()


stopped: list[float] = []


async def test_auth_off_lets_everyone_in(make_client):
    client = make_client(AUTH_ENABLED="false")
    assert (await client.post("/echo", json={"a": 1})).status_code == 200


@pytest.mark.parametrize("header", [None, "Bearer wrong", "Basic c2VjcmV0", "Bearer ", "secret"])
async def test_auth_on_refuses_without_the_token(make_client, header):
    client = make_client(AUTH_ENABLED="true", AUTH_TOKEN="secret")
    response = await client.post("/echo", json={}, headers={"authorization": header} if header else {})
    assert response.status_code == 401
    assert response.headers["www-authenticate"] == "Bearer"
    assert response.json()["code"] == "UNAUTHORIZED"
    assert "secret" not in response.text


async def test_a1111_routes_challenge_basic_too_but_never_a_browsers_scripts(make_client):
    """A1111 clients that send --api-auth credentials only once challenged (urllib's HTTPBasicAuthHandler, curl
    --anyauth) need a Basic challenge; a page's fetch would pop up a login dialog with one."""
    client = make_client(AUTH_ENABLED="true", AUTH_TOKEN="secret")
    refused = await client.get("/sdapi/v1/options")
    assert refused.status_code == 401 and refused.headers["www-authenticate"] == 'Basic realm="imagegen", Bearer'
    fetched = await client.get("/sdapi/v1/options", headers={"sec-fetch-mode": "cors"})
    assert fetched.status_code == 401 and fetched.headers["www-authenticate"] == "Bearer"
    assert (await client.get("/sdapi/v1/options", headers={"authorization": basic("any:secret")})).status_code == 404


async def test_auth_on_accepts_the_token_and_health_stays_open(make_client):
    client = make_client(AUTH_ENABLED="true", AUTH_TOKEN="secret")
    assert (await client.post("/echo", json={}, headers={"authorization": "Bearer secret"})).status_code == 200
    assert (await client.get("/health/")).status_code == 200


def basic(pair: str) -> str:
    return "Basic " + base64.b64encode(pair.encode()).decode()


async def test_a1111_clients_authenticate_with_basic_as_a1111s_api_auth_asks(make_client):
    """The token as the password, whatever the user name; one client with the Bearer spelling of that token."""
    client = make_client(AUTH_ENABLED="true", AUTH_TOKEN="secret")
    for header, status in [(basic("webui:secret"), 200), (basic(":secret"), 200), (basic("webui:wrong"), 401),
                           (basic("secret:"), 401), (basic("secret"), 401), ("Basic not-base64!", 401)]:
        response = await client.post("/echo", json={}, headers={"authorization": header})
        assert response.status_code == status, header
    owners = {http.token_owner(h) for h in (basic("alice:secret"), basic("bob:secret"), "Bearer secret")}
    assert owners == {http.token_owner("Bearer secret")}  # one bucket, one owner of jobs, one client to interrupt


async def test_auth_enabled_without_a_token_refuses_everything(make_client):
    client = make_client(AUTH_ENABLED="true", AUTH_TOKEN="")
    assert (await client.post("/echo", json={}, headers={"authorization": "Bearer "})).status_code == 401


@pytest.mark.parametrize("header", ["bearer secret", "BEARER secret", "Bearer  secret", "Bearer secret ",
                                    "bEarer \tsecret", " Bearer secret"])
async def test_every_spelling_of_the_token_is_one_owner(header):
    # the name jobs already carry: the header as clients usually write it
    assert http.token_owner(header) == hashlib.sha256(b"Bearer secret").hexdigest()[:16]
    assert http.token_owner(header) != http.token_owner("Bearer other")
    assert http.token_owner(None) is None and http.token_owner("") is None


async def remaining(client: httpx.AsyncClient, forwarded: str) -> int:
    """What is left of the read budget that a request forwarded for ``forwarded`` spent."""
    response = await client.post("/echo", json={}, headers={"X-Forwarded-For": forwarded})
    return int(response.headers["ratelimit-remaining"])


async def test_behind_a_trusted_proxy_each_forwarded_client_has_its_own_budget(make_client):
    """The load balancer is every request's peer: its X-Forwarded-For names the client, hops of our own proxies
    skipped, and what a client wrote left of the hop the balancer appended proves nothing."""
    client = make_client(peer="10.1.2.3", TRUSTED_PROXIES="10.0.0.0/8, 2001:db8::/32", RATE_LIMIT_READ_BURST="9",
                         RATE_LIMIT_READ_PER_SECOND="0.001")
    assert [await remaining(client, "203.0.113.7"), await remaining(client, "198.51.100.9")] == [8, 8]
    assert await remaining(client, "198.51.100.1, 203.0.113.7") == 7  # a client's own claim is left of its hop
    assert await remaining(client, "203.0.113.7, 10.9.9.9") == 6  # an ingress controller behind the balancer
    assert await remaining(client, "203.0.113.7:5123") == 5  # a balancer that adds the port (Azure's)
    assert await remaining(client, "10.9.9.9") == 8  # only proxies of ours: the peer itself


async def test_an_untrusted_peer_cannot_buy_budgets_with_x_forwarded_for(make_client):
    client = make_client(peer="192.0.2.1", TRUSTED_PROXIES="10.0.0.0/8", RATE_LIMIT_READ_BURST="9",
                         RATE_LIMIT_READ_PER_SECOND="0.001")
    assert [await remaining(client, f"203.0.113.{n}") for n in range(3)] == [8, 7, 6]
    assert await remaining(client, "10.9.9.9") == 5


@pytest.mark.parametrize(("peer", "forwarded", "address"), [
    ("10.0.0.1", [b"203.0.113.7"], "203.0.113.7"),
    ("10.0.0.1", [b"198.51.100.1", b"203.0.113.7, 10.0.0.2"], "203.0.113.7"),  # two headers are one list
    ("10.0.0.1", [b"[2001:db8::7]:443"], "2001:db8::7"),
    ("10.0.0.1", [b"2001:db8::7"], "2001:db8::7"),  # bare IPv6: its colons are no port
    ("fd00::5", [b"203.0.113.7"], "203.0.113.7"),  # an IPv6 proxy
    ("10.0.0.1", [b"203.0.113.7:5678"], "203.0.113.7"),
    ("10.0.0.1", [b"unknown"], "10.0.0.1"),
    ("10.0.0.1", [], "10.0.0.1"),
    ("192.0.2.1", [b"203.0.113.7"], "192.0.2.1"),
])
def test_the_client_address_a_trusted_proxy_forwards(peer, forwarded, address):
    scope = {"client": (peer, 1), "headers": [(b"x-forwarded-for", value) for value in forwarded]}
    assert http.client_address(scope, settings.Settings(trusted_proxies="10.0.0.0/8,fd00::/8")) == address
    assert http.client_address(scope, settings.Settings()) == peer  # trusted by no one: the peer


PREFLIGHT = {"origin": "https://app.example", "access-control-request-method": "POST",
             "access-control-request-headers": "authorization, content-type"}


async def test_cors_is_off_unless_origins_are_configured(make_client):
    client = make_client()
    assert (await client.options("/echo", headers=PREFLIGHT)).status_code == 405
    answer = await client.post("/echo", json={}, headers={"origin": "https://app.example"})
    assert answer.status_code == 200 and "access-control-allow-origin" not in answer.headers


async def test_pages_on_the_allowed_origins_may_call_the_api(make_client):
    """As A1111's --cors-allow-origins and --cors-allow-origins-regex: the preflight needs no token, and even a
    refusal carries the headers that let the page read it."""
    client = make_client(AUTH_ENABLED="true", AUTH_TOKEN="secret", CORS_ALLOW_ORIGINS="https://app.example, "
                         "https://other.example", CORS_ALLOW_ORIGINS_REGEX=r"https://[a-z0-9-]+\.preview\.example")
    for origin in ("https://app.example", "https://pr-7.preview.example"):
        preflight = await client.options("/echo", headers={**PREFLIGHT, "origin": origin})
        assert preflight.status_code == 200 and preflight.headers["access-control-allow-origin"] == origin
        assert "authorization" in preflight.headers["access-control-allow-headers"].lower()
    refused = await client.options("/echo", headers={**PREFLIGHT, "origin": "https://evil.example"})
    assert refused.status_code == 400 and "access-control-allow-origin" not in refused.headers
    unauthorized = await client.post("/echo", json={}, headers={"origin": "https://app.example"})
    assert unauthorized.status_code == 401
    assert unauthorized.headers["access-control-allow-origin"] == "https://app.example"
    assert "retry-after" in unauthorized.headers["access-control-expose-headers"].lower()


async def test_the_services_own_errors_carry_the_cors_and_ratelimit_headers(make_client, caplog):
    """A page on an allowed origin reads every error as it reads a 200: a ServiceError raised by a route (404,
    422), Serve's and Ray's errors (503), and what the edge answers itself (413, 429). None is logged as a crash."""
    from ray.exceptions import ActorDiedError
    from ray.serve.exceptions import BackPressureError

    from deployments.support.errors import NotFound, UnknownModel

    client = make_client(CORS_ALLOW_ORIGINS="https://app.example", MAX_BODY_BYTES="1000",
                         RATE_LIMIT_READ_BURST="5", RATE_LIMIT_READ_PER_SECOND="0.001")
    raised = {"missing": NotFound("no such job", field="job_id"), "nope": UnknownModel("no model", field="model"),
              "busy": BackPressureError(num_queued_requests=1, max_queued_requests=1), "lost": ActorDiedError()}
    app = client._transport.app  # type: ignore[attr-defined]

    @app.get("/fail/{name}")
    async def fail(name: str):
        raise raised[name]

    origin = {"origin": "https://app.example"}
    answers = [await client.get(f"/fail/{name}", headers=origin) for name in raised]
    assert [(a.status_code, a.json()["code"]) for a in answers] == [
        (404, "NOT_FOUND"), (422, "UNKNOWN_MODEL"), (503, "MODEL_UNAVAILABLE"), (503, "MODEL_UNAVAILABLE")]
    assert answers[0].json()["details"] == {"field": "job_id"}
    assert [a.headers["ratelimit-remaining"] for a in answers] == ["4", "3", "2", "1"]
    assert (await client.post("/echo", json={}, headers=origin)).status_code == 200
    limited = await client.post("/echo", json={}, headers=origin)
    too_large = await client.post("/echo", content=b" " * 2000, headers={**origin, "content-type": "application/json"})
    assert (limited.status_code, too_large.status_code) == (429, 413)
    assert limited.headers["ratelimit-remaining"] == "0" and limited.headers["retry-after"]
    for answer in [*answers, limited, too_large]:
        assert answer.headers["access-control-allow-origin"] == "https://app.example", answer.text
        assert "retry-after" in answer.headers["access-control-expose-headers"].lower()
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]


async def test_unexpected_errors_carry_the_cors_and_ratelimit_headers_too(make_client, caplog):
    """A lost replica wrapped in an error of another kind is the 503 Ray's own are; any other error is a 500 in the
    one body shape, logged once. Both carry the headers a page on an allowed origin needs to read them."""
    from ray.exceptions import ActorDiedError

    client = make_client(CORS_ALLOW_ORIGINS="https://app.example", RATE_LIMIT_READ_BURST="5",
                         RATE_LIMIT_READ_PER_SECOND="0.001")
    app = client._transport.app  # type: ignore[attr-defined]

    @app.get("/wrapped")
    async def wrapped():
        try:
            raise ActorDiedError()
        except ActorDiedError as e:
            raise LookupError("a stage's answer was lost") from e

    @app.get("/broken")
    async def broken():
        raise ZeroDivisionError("a bug")

    origin = {"origin": "https://app.example"}
    lost, bug = await client.get("/wrapped", headers=origin), await client.get("/broken", headers=origin)
    assert (lost.status_code, lost.json()["code"], lost.json()["details"]) == (
        503, "MODEL_UNAVAILABLE", {"reason": "ActorDiedError"})
    assert lost.headers["retry-after"]
    assert (bug.status_code, bug.json()) == (500, {"error": "internal error", "code": "INTERNAL_ERROR", "details": {}})
    for answer in (lost, bug):
        assert answer.headers["access-control-allow-origin"] == "https://app.example"
        assert answer.headers["ratelimit-remaining"]
    crashes = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(crashes) == 1 and crashes[0].exc_info[0] is ZeroDivisionError


async def test_head_answers_every_get_route_with_its_headers_only(make_client):
    """Uptime checks and load balancers send HEAD; auth applies as to the GET."""
    client = make_client(AUTH_ENABLED="true", AUTH_TOKEN="secret")
    for path in ("/health/", "/ui"):
        head, get = await client.head(path), await client.get(path)
        assert (head.status_code, head.content) == (200, b"")
        assert head.headers["content-type"] == get.headers["content-type"]
        assert head.headers["content-length"] == get.headers["content-length"] == str(len(get.content))
    assert (await client.head("/forever")).status_code == 401
    assert (await client.head("/echo", headers={"authorization": "Bearer secret"})).status_code == 405  # POST only
    # A stream stops once its headers are out, on either ASGI spec's way of telling it the client is gone.
    streamed = await asyncio.wait_for(client.head("/forever", headers={"authorization": "Bearer secret"}), 5)
    assert (streamed.status_code, streamed.content) == (200, b"")
    app = client._transport.app  # type: ignore[attr-defined]
    sent: list[dict] = []

    async def receive():
        await asyncio.sleep(30)  # a client that stays: only the answer's end stops the stream

    async def send(message):
        sent.append(message)

    scope = {"type": "http", "asgi": {"version": "3.0", "spec_version": "2.4"}, "http_version": "1.1",
             "method": "HEAD", "scheme": "http", "path": "/forever", "raw_path": b"/forever", "query_string": b"",
             "root_path": "", "headers": [(b"authorization", b"Bearer secret")], "client": ("127.0.0.1", 1),
             "server": ("test", 80)}
    await asyncio.wait_for(app(scope, receive, send), 5)
    assert [m["type"] for m in sent] == ["http.response.start", "http.response.body"]
    assert sent[0]["status"] == 200 and sent[1]["body"] == b""


async def test_body_limit_declared_and_streamed(make_client):
    client = make_client(MAX_BODY_BYTES="1000")
    assert (await client.post("/echo", json={"a": "x" * 100})).status_code == 200
    big = b"{" + b" " * 2000 + b"}"
    declared = await client.post("/echo", content=big, headers={"content-type": "application/json"})
    assert declared.status_code == 413 and declared.json()["code"] == "PAYLOAD_TOO_LARGE"

    async def chunks():
        for _ in range(10):
            yield b" " * 500

    streamed = await client.post("/echo", content=chunks(), headers={"content-type": "application/json"})
    assert streamed.status_code == 413


async def test_validation_errors_name_the_field(make_client):
    client = make_client()
    response = await client.post("/echo", content=b"[1,2", headers={"content-type": "application/json"})
    assert response.status_code == 422 and response.json()["code"] == "INVALID_INPUT"
    missing = await client.get("/nowhere")
    assert missing.status_code == 404 and missing.json()["code"] == "NOT_FOUND"


async def test_ray_backpressure_is_503_with_retry_after(monkeypatch, tmp_path):
    from ray.serve.exceptions import BackPressureError

    monkeypatch.setenv("JOBS_DATA_DIR", str(tmp_path))
    app = http.create_app()

    @app.get("/busy")
    async def busy():
        raise BackPressureError(num_queued_requests=10, max_queued_requests=10)

    @app.get("/boom")
    async def boom():
        raise RuntimeError("secret internals")

    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app, raise_app_exceptions=False),
                                 base_url="http://test") as client:
        response = await client.get("/busy")
        assert response.status_code == 503 and response.headers["retry-after"]
        assert response.json()["code"] == "MODEL_UNAVAILABLE"
        boom = await client.get("/boom")
        assert boom.status_code == 500 and boom.json()["code"] == "INTERNAL_ERROR"
        assert "secret" not in boom.text


def _lost_errors() -> list:
    from ray.exceptions import (
        ActorDiedError,
        ActorUnavailableError,
        NodeDiedError,
        ObjectLostError,
        OwnerDiedError,
        RayTaskError,
        WorkerCrashedError,
    )
    from ray.serve.exceptions import RayServeException, ReplicaUnavailableError

    upstream = RayServeException("Request to deployment 'Upscaler' failed because an upstream actor died")
    upstream.__cause__ = ActorDiedError()  # how Serve's router reports a chained stage whose producer died
    return [
        pytest.param(ActorDiedError(), id="actor-died"),
        pytest.param(ActorUnavailableError("Socket closed", None), id="actor-unavailable"),
        pytest.param(upstream, id="upstream-stage-died"),
        pytest.param(RayTaskError("upscale", "traceback", ActorDiedError()), id="task-error-around-it"),
        pytest.param(ObjectLostError("ab" * 14, None, ""), id="object-lost"),
        pytest.param(OwnerDiedError("ab" * 14, None, ""), id="owner-died"),
        pytest.param(NodeDiedError("node gone"), id="node-died"),
        pytest.param(WorkerCrashedError(), id="worker-crashed"),
        pytest.param(ReplicaUnavailableError("r1"), id="replica-unavailable"),
    ]


@pytest.mark.parametrize("exc", _lost_errors())
async def test_a_replica_or_node_lost_mid_request_is_503_with_retry_after(tmp_path, monkeypatch, exc):
    """Whatever Ray raises when a replica or its node dies under a request, the client is told to come back."""
    monkeypatch.setenv("JOBS_DATA_DIR", str(tmp_path))
    app = http.create_app()

    @app.get("/lost")
    async def lost():
        raise exc

    @app.get("/chained")
    async def chained():
        raise RuntimeError("ours") from ValueError("not Ray's")

    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app, raise_app_exceptions=False),
                                 base_url="http://test") as client:
        response = await client.get("/lost")
        assert response.status_code == 503 and int(response.headers["retry-after"]) > 0, response.text
        assert response.json()["code"] == "MODEL_UNAVAILABLE"
        assert (await client.get("/chained")).status_code == 500


async def test_every_5xx_is_logged_once_with_its_code_reason_and_deployment(caplog):
    """The body says only "retry shortly": the ingress's log is where an operator finds why, and where. A 4xx is
    the client's doing and is not logged."""
    from ray.exceptions import RayTaskError
    from ray.serve._private.common import DeploymentID
    from ray.serve.exceptions import DeploymentUnavailableError, ReplicaUnavailableError

    from deployments.support.errors import GpuOutOfMemory, UnknownModel
    from graphs.api.errors import call, service_error

    async def raised_by_replica(error: Exception) -> Exception:
        """``error`` as a replica's raise reaches a route: wrapped by Ray, unwrapped by ``call``."""
        async def response():
            raise RayTaskError("handle_request", "Traceback ...", error,
                               proctitle="ray::ServeReplica:imagegen:SDXLBase.handle_request")
        try:
            await call(response())
        except Exception as e:  # noqa: BLE001 - the exception is the point
            return e
        raise AssertionError("call raised nothing")

    answers = [  # (raised, the line's start, the deployment it names)
        (await raised_by_replica(GpuOutOfMemory("sdxl_base ran out of GPU memory; retry later")),
         "answered 503 GPU_OOM: GpuOutOfMemory: sdxl_base ran out of GPU memory; retry later", "SDXLBase"),
        (DeploymentUnavailableError(DeploymentID(name="Upscaler", app_name="imagegen")),
         "answered 503 MODEL_UNAVAILABLE: DeploymentUnavailableError: ", "Upscaler"),
        (ReplicaUnavailableError("Replica(id='x1', deployment='FaceRestorer', app='imagegen')"),
         "answered 503 MODEL_UNAVAILABLE: ReplicaUnavailableError: ", "FaceRestorer"),
        (await raised_by_replica(UnknownModel("unknown upscaler 'Nope'", field="upscaler_1")), None, None),
    ]
    for exc, start, deployment in answers:
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="graphs.api.errors"):
            response = await service_error(None, exc)  # type: ignore[arg-type]
        lines = [(r.levelname, r.getMessage()) for r in caplog.records]
        if start is None:
            assert response.status_code == 422 and lines == []
            continue
        assert response.status_code == 503
        ((level, line),) = lines
        assert level == "WARNING" and line.startswith(start) and line.endswith(f"(deployment {deployment})"), line


async def test_deadline_is_408_and_stops_the_work_below(make_client):
    client = make_client(REQUEST_TIMEOUT_SECONDS="0.5")
    stopped.clear()
    started = time.monotonic()
    response = await client.get("/slow")
    assert response.status_code == 408 and response.json()["code"] == "REQUEST_TIMEOUT"
    assert response.json()["details"] == {"timeout_seconds": 0.5}
    assert len(stopped) == 1 and 0.5 <= stopped[0] - started < 2
    response = await client.get("/slow", headers={"X-Request-Timeout": "0.1"})  # a client may ask for less
    assert response.status_code == 408 and response.json()["details"] == {"timeout_seconds": 0.1}
    response = await client.get("/slow", headers={"X-Request-Timeout": "60"})  # never for more
    assert response.json()["details"] == {"timeout_seconds": 0.5} and len(stopped) == 3
    assert (await client.get("/health/")).status_code == 200


@pytest.mark.parametrize("value", ["soon", "0", "-3", "nan", "inf"])
async def test_a_bad_timeout_header_is_422(make_client, value):
    client = make_client()
    error = (await client.get("/slow", headers={"X-Request-Timeout": value})).json()
    assert error["code"] == "INVALID_INPUT" and error["details"]["field"] == "X-Request-Timeout"


async def test_every_service_error_has_its_family_status():
    """A subclass with a code of its own answers with its base class's status: a download cut short is a model
    load failure (503, retry), not an internal error; a code no class in its line has answers 500."""
    from deployments.support import errors
    from graphs.api.errors import service_error

    class Odd(errors.ServiceError):
        code = "ODD"

    cases = [(errors.DownloadIncomplete("short"), 503, "DOWNLOAD_INCOMPLETE"),
             (errors.UnsafeWeights("pickle"), 503, "UNSAFE_WEIGHTS"),
             (errors.UnknownModel("no such", field="checkpoint"), 422, "UNKNOWN_MODEL"),
             (errors.GpuOutOfMemory("full"), 503, "GPU_OOM"),
             (Odd("odd"), 500, "ODD")]
    for error, status, code in cases:
        response = await service_error(None, error)  # type: ignore[arg-type]
        assert (response.status_code, json.loads(response.body)["code"]) == (status, code)
        assert ("retry-after" in response.headers) == (status == 503)


async def test_a_failed_plan_cancels_every_call_it_launched():
    """Not only a cancelled plan: one whose stage failed stops the calls still running beside it."""
    cancelled = []

    class StageCall:
        def __init__(self, name):
            self.name = name

        def cancel(self):
            cancelled.append(self.name)

    with pytest.raises(RuntimeError):
        async with flights.flight() as calls:
            calls += [StageCall("base-square"), StageCall("base-wide")]
            raise RuntimeError("GPU_OOM on the square base")
    assert cancelled == ["base-square", "base-wide"]
    cancelled.clear()
    async with flights.flight() as calls:
        calls.append(StageCall("done"))
    assert cancelled == []  # a plan that ends well leaves its calls be


async def test_a_failed_watch_leaves_the_stage_to_answer(monkeypatch):
    """``settled`` watches the earlier calls for a lost replica; when the watch itself fails (the GCS slow while
    a node dies), the stage still gives its own answer, not the watch's error."""
    async def broken_watch(_calls):
        raise TimeoutError("Get timed out: some object(s) not ready")

    monkeypatch.setattr(flights, "_first_lost", broken_watch)

    class Response:
        def __init__(self, value, delay):
            self.value, self.delay = value, delay

        def __await__(self):
            return asyncio.sleep(self.delay, self.value).__await__()

        def cancel(self):
            pass

    async with flights.flight() as calls:
        calls.append(Response("base", 0))
        stage = Response("upscaled", flights.WATCH_EVERY_S + 0.3)
        calls.append(stage)
        assert await flights.settled(stage) == "upscaled"
