"""Per-client rate limits: one token bucket per (client, route class), kept where every ingress replica sees it.

The ingress autoscales, so a bucket in a replica's memory would multiply a client's budget by the replica count.
The buckets live in the job store's backend instead: the SQLite data directory (one file of its own, so that a
flood of reads never waits on a job write) or Redis when ``JOB_STORE_URL`` names one. Each take is atomic: one
``BEGIN IMMEDIATE`` transaction, or one Lua script.

A bucket holds up to ``burst`` tokens and gains ``rate`` per second; a request takes one or is refused. Three
budgets (see ``ROUTES``): synchronous work on a model or image, job submits, and everything cheap.
"""

from __future__ import annotations

import math
import re
import sqlite3
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from deployments.support.settings import Settings

GENERATE, SUBMIT, READ = "generate", "submit", "read"

# (method, path as a full regular expression, budget): the first match wins. Health and the docs never get here.
ROUTES: tuple[tuple[str, re.Pattern[str], str], ...] = tuple((m, re.compile(p), c) for m, p, c in (
    ("POST", r"/generate", GENERATE),
    ("POST", r"/v1/images/(memory|subject)", GENERATE),
    ("POST", r"/sdapi/v1/(txt2img|img2img|extra-single-image|extra-batch-images)", GENERATE),
    ("POST", r"/process|/derivatives(/clip-focal)?", GENERATE),
    ("POST", r"/provenance/verify", GENERATE),
    ("POST", r"/controlnet/detect", GENERATE),  # OpenCV on a base replica, up to 16 images a call
    ("POST", r"/generate/(text2img|img2img|inpaint|style-transfer|async|batch-sizes)", SUBMIT),
    ("*", r".*", READ),  # polling, listings, cancels, options, unknown paths
))


def classify(method: str, path: str) -> str:
    """The budget a request draws on."""
    for allowed, pattern, budget in ROUTES:
        if allowed in ("*", method) and pattern.fullmatch(path):
            return budget
    return READ


@dataclass(frozen=True)
class Budget:
    rate: float  # tokens gained per second
    burst: int  # the bucket's size: requests a rested client may make at once


@dataclass(frozen=True)
class Decision:
    """One take's outcome, in the terms of the ``RateLimit-*`` and ``Retry-After`` headers (whole seconds)."""

    allowed: bool
    limit: int
    remaining: int
    reset: int  # seconds until the bucket is full again
    retry_after: int  # seconds until the next token; 0 when allowed

    def headers(self) -> dict[str, str]:
        out = {"RateLimit-Limit": str(self.limit), "RateLimit-Remaining": str(self.remaining),
               "RateLimit-Reset": str(self.reset)}
        if not self.allowed:
            out["Retry-After"] = str(self.retry_after)
        return out


def budgets(settings: Settings) -> dict[str, Budget]:
    return {
        GENERATE: Budget(settings.rate_limit_generate_per_second, settings.rate_limit_generate_burst),
        SUBMIT: Budget(settings.rate_limit_submit_per_second, settings.rate_limit_submit_burst),
        READ: Budget(settings.rate_limit_read_per_second, settings.rate_limit_read_burst),
    }


def refill(tokens: float | None, updated: float, now: float, budget: Budget) -> float:
    """The bucket's level at ``now``: a new bucket starts full; a clock that went back adds nothing."""
    if tokens is None:
        return float(budget.burst)
    return min(float(budget.burst), tokens + max(0.0, now - updated) * budget.rate)


def decide(allowed: bool, tokens: float, budget: Budget) -> Decision:
    """``tokens`` is the level after the take (unchanged when refused)."""
    # The epsilon keeps float dust (0.9999999 after a refill) from costing a client a whole extra second.
    def seconds(x: float) -> int:
        return max(0, math.ceil(x / budget.rate - 1e-9))

    return Decision(allowed=allowed, limit=budget.burst, remaining=max(0, math.floor(tokens + 1e-9)),
                    reset=seconds(budget.burst - tokens), retry_after=0 if allowed else max(1, seconds(1 - tokens)))


class Buckets(Protocol):
    errors: tuple[type[Exception], ...]  # what an unreachable backend raises

    def take(self, key: str, budget: Budget, now: float | None = None) -> Decision:
        """Take one token from ``key``'s bucket if it has one; atomic across processes."""
        ...


class SQLiteBuckets:
    """Buckets in a SQLite file beside the job store's: the single-node default."""

    errors: tuple[type[Exception], ...] = (sqlite3.Error,)
    SWEEP_SECONDS = 60.0

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self._local = threading.local()
        self._swept = 0.0
        self._db().execute("CREATE TABLE IF NOT EXISTS buckets (key TEXT PRIMARY KEY, tokens REAL NOT NULL,"
                           " updated REAL NOT NULL, full_at REAL NOT NULL)")

    def _db(self) -> sqlite3.Connection:
        db = getattr(self._local, "db", None)
        if db is None:
            db = sqlite3.connect(self.path, timeout=5, isolation_level=None)
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=NORMAL")  # a bucket lost to a power cut only forgives a client
            self._local.db = db
        return db

    def take(self, key: str, budget: Budget, now: float | None = None) -> Decision:
        now = time.time() if now is None else now
        db = self._db()
        db.execute("BEGIN IMMEDIATE")  # the read and the write below are one step for every process
        try:
            row = db.execute("SELECT tokens, updated FROM buckets WHERE key = ?", (key,)).fetchone()
            tokens = refill(row[0] if row else None, row[1] if row else now, now, budget)
            allowed = tokens >= 1
            tokens -= 1 if allowed else 0
            full_at = now + (budget.burst - tokens) / budget.rate
            db.execute("INSERT INTO buckets (key, tokens, updated, full_at) VALUES (?, ?, ?, ?) ON CONFLICT (key)"
                       " DO UPDATE SET tokens = excluded.tokens, updated = excluded.updated,"
                       " full_at = excluded.full_at", (key, tokens, now, full_at))
            if now - self._swept > self.SWEEP_SECONDS:  # a full bucket is the same as none: forget it
                self._swept = now
                db.execute("DELETE FROM buckets WHERE full_at < ?", (now,))
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise
        return decide(allowed, tokens, budget)


_LUA_TAKE = """
local rate, burst, now = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local state = redis.call('HMGET', KEYS[1], 'tokens', 'updated')
local tokens = tonumber(state[1])
if tokens == nil then
  tokens = burst
else
  tokens = math.min(burst, tokens + math.max(0, now - tonumber(state[2])) * rate)
end
local allowed = 0
if tokens >= 1 then
  tokens = tokens - 1
  allowed = 1
end
redis.call('HSET', KEYS[1], 'tokens', string.format('%.17g', tokens), 'updated', string.format('%.17g', now))
redis.call('PEXPIRE', KEYS[1], math.ceil((burst - tokens) / rate * 1000) + 1000)
return {allowed, string.format('%.17g', tokens)}
"""


class RedisBuckets:
    """Buckets in Redis (one hash per bucket, expiring once it would be full): shared by every node."""

    def __init__(self, url: str, prefix: str = "imagegen") -> None:
        import redis

        self.redis = redis.Redis.from_url(url, decode_responses=True, socket_timeout=5)
        self.prefix = prefix
        self.errors: tuple[type[Exception], ...] = (redis.RedisError,)
        self._take = self.redis.register_script(_LUA_TAKE)

    def take(self, key: str, budget: Budget, now: float | None = None) -> Decision:
        now = time.time() if now is None else now
        allowed, tokens = self._take(keys=[f"{self.prefix}:rate:{key}"], args=[budget.rate, budget.burst, now])
        return decide(bool(allowed), float(tokens), budget)


def open_buckets(settings: Settings) -> Buckets:
    """The job store's backend: Redis when ``JOB_STORE_URL`` names one, else a file in the data directory."""
    url = settings.job_store_url
    if url and url.startswith(("redis://", "rediss://", "unix://")):
        return RedisBuckets(url)
    return SQLiteBuckets(settings.jobs_data_dir / "ratelimits.sqlite3")
