"""Rate limits without Ray: the bucket arithmetic on both backends (SQLite; Redis against a real redis-server),
its atomicity under concurrent takers, the route table, and the edge middleware on the real app factory."""

from __future__ import annotations

import concurrent.futures
import uuid

import httpx
import pytest
from fastapi import APIRouter

from deployments.support import settings
from graphs.api import edge as http
from graphs.api import ratelimit
from graphs.api.ratelimit import Budget, RedisBuckets, SQLiteBuckets

T0 = 1_700_000_000.0


@pytest.fixture(params=["sqlite", "redis"])
def buckets(request, tmp_path):
    if request.param == "sqlite":
        return SQLiteBuckets(tmp_path / "ratelimits.sqlite3")
    return RedisBuckets(request.getfixturevalue("redis_url"), prefix=f"t{uuid.uuid4().hex[:8]}")


def another_process(buckets, tmp_path):
    """A second ingress replica's view of the same buckets."""
    if isinstance(buckets, SQLiteBuckets):
        return SQLiteBuckets(tmp_path / "ratelimits.sqlite3")
    kwargs = buckets.redis.connection_pool.connection_kwargs
    return RedisBuckets(f"redis://{kwargs['host']}:{kwargs['port']}/{kwargs.get('db', 0)}", prefix=buckets.prefix)


def test_a_fresh_bucket_allows_the_burst_then_refuses(buckets):
    budget = Budget(rate=0.5, burst=3)
    taken = [buckets.take("c", budget, now=T0) for _ in range(4)]
    assert [d.allowed for d in taken] == [True, True, True, False]
    assert [d.remaining for d in taken] == [2, 1, 0, 0]
    assert [d.limit for d in taken] == [3, 3, 3, 3]
    assert [d.reset for d in taken] == [2, 4, 6, 6]  # seconds until full again at 0.5 token/s
    assert taken[-1].retry_after == 2 and taken[0].retry_after == 0
    assert taken[-1].headers() == {"RateLimit-Limit": "3", "RateLimit-Remaining": "0", "RateLimit-Reset": "6",
                                   "Retry-After": "2"}
    assert "Retry-After" not in taken[0].headers()


def test_tokens_come_back_at_the_rate_and_never_beyond_the_burst(buckets):
    budget = Budget(rate=2.0, burst=2)
    assert all(buckets.take("c", budget, now=T0).allowed for _ in range(2))
    refused = buckets.take("c", budget, now=T0 + 0.25)  # half a token so far
    assert not refused.allowed and refused.retry_after == 1
    assert buckets.take("c", budget, now=T0 + 0.5).allowed  # one whole token after 1/rate seconds
    assert not buckets.take("c", budget, now=T0 + 0.5).allowed
    rested = [buckets.take("c", budget, now=T0 + 3600) for _ in range(3)]  # an hour: full, not 7200 tokens
    assert [d.allowed for d in rested] == [True, True, False]


def test_a_clock_that_goes_back_adds_nothing(buckets):
    budget = Budget(rate=1.0, burst=1)
    assert buckets.take("c", budget, now=T0).allowed
    assert not buckets.take("c", budget, now=T0 - 100).allowed
    assert buckets.take("c", budget, now=T0 + 1).allowed


def test_clients_and_budgets_are_separate_buckets(buckets):
    budget = Budget(rate=0.001, burst=1)
    assert buckets.take("generate:addr:10.0.0.1", budget, now=T0).allowed
    assert not buckets.take("generate:addr:10.0.0.1", budget, now=T0).allowed
    assert buckets.take("generate:addr:10.0.0.2", budget, now=T0).allowed
    assert buckets.take("read:addr:10.0.0.1", budget, now=T0).allowed


def test_two_replicas_share_one_budget_under_concurrency(buckets, tmp_path):
    budget = Budget(rate=0.001, burst=25)
    replicas = [buckets, another_process(buckets, tmp_path)]
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        decisions = list(pool.map(lambda i: replicas[i % 2].take("shared", budget, now=T0), range(80)))
    assert sum(d.allowed for d in decisions) == 25  # never more: each take is one atomic step
    assert sorted(d.remaining for d in decisions if d.allowed) == list(range(25))


def test_sqlite_forgets_buckets_that_have_refilled(tmp_path):
    buckets = SQLiteBuckets(tmp_path / "ratelimits.sqlite3")
    buckets.take("old", Budget(rate=1.0, burst=2), now=T0)
    buckets.take("new", Budget(rate=1.0, burst=2), now=T0 + 3600)  # sweeps: "old" has been full for an hour
    keys = [k for (k,) in buckets._db().execute("SELECT key FROM buckets")]
    assert keys == ["new"]


def test_redis_buckets_expire_once_full(redis_url):
    buckets = RedisBuckets(redis_url, prefix=f"t{uuid.uuid4().hex[:8]}")
    buckets.take("c", Budget(rate=0.5, burst=4))
    ttl = buckets.redis.pttl(f"{buckets.prefix}:rate:c")
    assert 2000 < ttl <= 3000  # one token to regain at 0.5/s, plus a second's grace


@pytest.mark.parametrize(("method", "path", "budget"), [
    ("POST", "/generate", "generate"),
    ("POST", "/sdapi/v1/txt2img", "generate"),
    ("POST", "/v1/images/memory", "generate"),
    ("POST", "/process", "generate"),
    ("POST", "/derivatives/clip-focal", "generate"),
    ("POST", "/controlnet/detect", "generate"),
    ("GET", "/controlnet/model_list", "read"),
    ("POST", "/generate/text2img", "submit"),
    ("POST", "/generate/async", "submit"),
    ("POST", "/generate/batch-sizes", "submit"),
    ("GET", "/jobs/job_1_abc", "read"),
    ("POST", "/jobs/job_1_abc/cancel", "read"),
    ("GET", "/generate", "read"),
    ("GET", "/nowhere", "read"),
])
def test_the_route_table(method, path, budget):
    assert ratelimit.classify(method, path) == budget


def test_every_expensive_route_of_the_app_has_an_expensive_budget():
    from graphs.app import app

    expensive = {"generate": set(), "submit": set()}
    for path, operations in app.openapi()["paths"].items():
        for method in operations:
            budget = ratelimit.classify(method.upper(), path.replace("{job_id}", "job_1_abc"))
            if budget in expensive:
                expensive[budget].add(path)
    assert expensive["submit"] == {f"/generate/{k}" for k in ("text2img", "img2img", "inpaint", "style-transfer",
                                                              "async", "batch-sizes")}
    assert expensive["generate"] == {"/generate", "/v1/images/memory", "/v1/images/subject", "/process",
                                     "/derivatives", "/derivatives/clip-focal", "/sdapi/v1/txt2img",
                                     "/sdapi/v1/img2img", "/sdapi/v1/extra-single-image",
                                     "/sdapi/v1/extra-batch-images", "/provenance/verify", "/controlnet/detect"}


# --- the middleware -----------------------------------------------------------------------------------------------

@pytest.fixture
def make_client(monkeypatch, tmp_path):
    created: list[list[str]] = []

    def build(**env) -> tuple[httpx.AsyncClient, list[str]]:
        monkeypatch.setenv("JOBS_DATA_DIR", str(tmp_path))
        for key, value in env.items():
            monkeypatch.setenv(key, value)
        settings.current.cache_clear()
        app = http.create_app()
        router = APIRouter()
        made: list[str] = []

        @router.get("/health/")
        async def health():
            return {"status": "healthy"}

        @router.post("/generate/text2img", status_code=202)
        async def submit(body: dict):
            made.append(body["prompt"])
            return {"id": len(made)}

        @router.get("/jobs")
        async def jobs():
            return {"total": len(made)}

        app.include_router(router)
        created.append(made)
        return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test"), made

    yield build
    settings.current.cache_clear()


TIGHT = {"RATE_LIMIT_SUBMIT_BURST": "2", "RATE_LIMIT_SUBMIT_PER_SECOND": "0.01"}


@pytest.mark.anyio
async def test_beyond_the_budget_is_429_and_creates_nothing(make_client):
    client, made = make_client(**TIGHT)
    first = await client.post("/generate/text2img", json={"prompt": "a"})
    assert first.status_code == 202
    assert (first.headers["ratelimit-limit"], first.headers["ratelimit-remaining"]) == ("2", "1")
    assert first.headers["ratelimit-reset"] == "100" and "retry-after" not in first.headers
    assert (await client.post("/generate/text2img", json={"prompt": "b"})).status_code == 202
    refused = await client.post("/generate/text2img", json={"prompt": "c"})
    assert refused.status_code == 429
    body = refused.json()
    assert set(body) == {"error", "code", "details"} and body["code"] == "RATE_LIMITED"
    assert body["details"]["budget"] == "submit" and body["details"]["retry_after_seconds"] == 100
    assert refused.headers["retry-after"] == "100" and refused.headers["ratelimit-remaining"] == "0"
    assert made == ["a", "b"]  # the refused submit never reached its route
    listing = await client.get("/jobs")  # another budget: still open
    assert listing.json() == {"total": 2} and listing.headers["ratelimit-limit"] == "500"


@pytest.mark.anyio
async def test_health_is_never_limited(make_client):
    client, _ = make_client(RATE_LIMIT_READ_BURST="1", RATE_LIMIT_READ_PER_SECOND="0.01")
    answers = [await client.get("/health/") for _ in range(5)]
    assert [a.status_code for a in answers] == [200] * 5
    assert all("ratelimit-limit" not in a.headers for a in answers)
    assert (await client.get("/jobs")).status_code == 200
    assert (await client.get("/jobs")).status_code == 429
    assert (await client.get("/openapi.json")).status_code == 200


@pytest.mark.anyio
async def test_with_auth_off_a_bearer_token_buys_no_budget_of_its_own(make_client):
    client, made = make_client(**TIGHT)
    answers = [await client.post("/generate/text2img", json={"prompt": token},
                                 headers={"authorization": f"Bearer {token}"}) for token in ("one", "two", "three")]
    assert [a.status_code for a in answers] == [202, 202, 429]  # one caller, its address, whatever it calls itself
    assert (await client.post("/generate/text2img", json={"prompt": "anon"})).status_code == 429
    assert made == ["one", "two"]


@pytest.mark.anyio
async def test_respelling_the_token_buys_no_fresh_budget(make_client):
    client, made = make_client(AUTH_ENABLED="true", AUTH_TOKEN="secret", **TIGHT)
    for header in ("Bearer secret", "bearer secret", "BEARER secret", "Bearer secret ", "Bearer  secret"):
        await client.post("/generate/text2img", json={"prompt": header}, headers={"authorization": header})
    assert made == ["Bearer secret", "bearer secret"]


@pytest.mark.anyio
async def test_a_refused_token_spends_no_budget(make_client):
    client, _ = make_client(AUTH_ENABLED="true", AUTH_TOKEN="secret", **TIGHT)
    for _ in range(5):
        assert (await client.post("/generate/text2img", json={"prompt": "x"},
                                  headers={"authorization": "Bearer wrong"})).status_code == 401
    good = {"authorization": "Bearer secret"}
    assert (await client.post("/generate/text2img", json={"prompt": "x"}, headers=good)).status_code == 202


@pytest.mark.anyio
async def test_limits_can_be_switched_off(make_client):
    client, made = make_client(RATE_LIMITS_ENABLED="false", **TIGHT)
    answers = [await client.post("/generate/text2img", json={"prompt": "x"}) for _ in range(5)]
    assert [a.status_code for a in answers] == [202] * 5 and "ratelimit-limit" not in answers[0].headers


@pytest.mark.anyio
async def test_an_unreachable_store_lets_requests_through(make_client):
    client, made = make_client(JOB_STORE_URL="redis://127.0.0.1:1/0", **TIGHT)  # nothing listens on port 1
    answers = [await client.post("/generate/text2img", json={"prompt": "x"}) for _ in range(3)]
    assert [a.status_code for a in answers] == [202] * 3 and len(made) == 3
