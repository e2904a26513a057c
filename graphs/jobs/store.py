"""Durable job records behind one interface: SQLite by default (a file under the data dir), Redis when several
nodes share the queue (``JOB_STORE_URL=redis://...``; Ray's own fault tolerance keeps its state there too).

A job is written before its id is returned. Workers claim queued jobs with a lease (highest priority first,
FIFO within a priority); a job whose lease ran out (its worker died) is claimed again, up to ``max_attempts``,
then failed with the reason. Every state change is one transaction.
"""

from __future__ import annotations

import hashlib
import json
import time
import uuid
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from deployments.support.settings import Settings

STATUSES = ("queued", "processing", "completed", "failed", "cancelled")
PRIORITIES = {"high": 0, "normal": 1, "low": 2}


@dataclass
class Job:
    id: str
    type: str
    request: dict
    status: str = "queued"
    priority: str = "normal"
    progress: float = 0.0
    created_at: float = field(default_factory=time.time)
    started_at: float | None = None
    completed_at: float | None = None
    result: dict | None = None
    error: str | None = None
    attempts: int = 0
    owner: str | None = None  # hash of the submitting token, for per-token isolation
    webhook_url: str | None = None
    cancel_requested: bool = False

    @property
    def finished(self) -> bool:
        return self.status in ("completed", "failed", "cancelled")


def new_job_id() -> str:
    """Seed 003's shape: ``job_<epoch ms>_<random>``."""
    return f"job_{int(time.time() * 1000)}_{uuid.uuid4().hex[:9]}"


def body_hash(body: dict) -> str:
    return hashlib.sha256(json.dumps(body, sort_keys=True, default=str).encode()).hexdigest()


class JobStore(Protocol):
    """What the job runner and the routes need of a store; ``sqlite_store`` and ``redis_store`` implement it."""

    max_attempts: int

    def create(self, job: Job, idempotency_key: str | None = None, max_queued: int | None = None) -> tuple[Job, bool]:
        """Record a job; returns (job, created). The same key with the same body returns the first job."""
        ...

    def get(self, job_id: str) -> Job | None: ...

    def list_jobs(self, status: str | None = None, owner: str | None = None, offset: int = 0,
                  limit: int = 50) -> tuple[list[Job], int]: ...

    def claim(self, worker: str, lease_s: float) -> Job | None:
        """The next queued (or lease-expired) job, now processing under ``worker``'s lease."""
        ...

    def heartbeat(self, job_id: str, worker: str, lease_s: float, progress: float | None = None) -> bool:
        """Extend the lease; False when the job is no longer this worker's (cancelled, reclaimed)."""
        ...

    def finish(self, job_id: str, worker: str, status: str, result: dict | None = None,
               error: str | None = None) -> bool: ...

    def cancel(self, job_id: str) -> Job | None: ...

    def stats(self) -> dict[str, Any]: ...

    def purge(self, older_than_s: float) -> list[Job]:
        """Delete finished jobs older than the retention; returns them so their images can go too."""
        ...

    # What every ingress replica must agree on (the ingress autoscales): A1111's options, and which client runs
    # which request, so that /progress, /interrupt and /skip work whichever replica answers them.
    def set_option(self, key: str, value: str) -> None: ...

    def options(self) -> dict[str, str]: ...

    def track(self, flight_id: str, client: str, record: dict, ttl_s: float) -> None:
        """Record (or refresh) a running request of ``client``; it expires by itself if its ingress dies."""
        ...

    def untrack(self, client: str, flight_id: str) -> None: ...

    def tracked(self, client: str) -> list[dict]:
        """The client's running requests, oldest first."""
        ...


def open_store(settings: Settings) -> JobStore:
    """``JOB_STORE_URL=redis://...`` selects the shared store; otherwise the SQLite file under the data dir."""
    url = settings.job_store_url
    if url and url.startswith(("redis://", "rediss://", "unix://")):
        from graphs.jobs.redis_store import RedisJobStore

        return RedisJobStore(url, settings.job_max_attempts)
    from graphs.jobs.sqlite_store import SQLiteJobStore

    return SQLiteJobStore(settings.jobs_data_dir / "jobs.sqlite3", settings.job_max_attempts)
