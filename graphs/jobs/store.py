"""Durable job records behind one interface: SQLite by default (a file under the data dir), Redis when several
nodes share the queue (``JOB_STORE_URL=redis://...``; Ray's own fault tolerance keeps its state there too).

A job is written before its id is returned. Workers claim queued jobs with a lease (highest priority first,
FIFO within a priority); a job whose lease ran out (its worker died) is claimed again, up to ``max_attempts``,
then failed with the reason. A runner that stops (a redeploy, a scale-down) releases its jobs instead: back in
their place in the queue, the attempt not spent. Every state change is one transaction.

Each job also has an append-only event log (``queued``, ``started``, ``progress``, ``preview``, then one of
``completed`` / ``failed`` / ``cancelled``) with ids increasing from 1, so that any ingress replica can stream a
job's events and a client can resume after the last id it saw. The store writes the state-change events in the
same transaction as the change itself (a terminal status never lacks its terminal event); the runner appends
progress and previews. The log keeps a job's newest ``events_kept`` events and is deleted with the job.
"""

from __future__ import annotations

import hashlib
import json
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from deployments.support.settings import Settings

STATUSES = ("queued", "processing", "completed", "failed", "cancelled")
PRIORITIES = {"high": 0, "normal": 1, "low": 2}
EVENTS = ("queued", "started", "progress", "preview", "completed", "failed", "cancelled")
TERMINAL_EVENTS = ("completed", "failed", "cancelled")
EVENTS_KEPT = 256  # per job: a long batch with previews stays well inside it
# A job that failed with one of these codes (its error starts "<code>:") frees its Idempotency-Key: the same request
# sent again is a new job, since it may well succeed now.
RETRYABLE = ("STORAGE_UNAVAILABLE",)
# The error of a job whose last attempt's lease expired (code WORKER_LOST): what the store knows is that no attempt
# published, and that the last one's runner stopped renewing (it, or a stage it called, was lost). A runner that
# stops gracefully releases its jobs, spending no attempt, so a redeploy never leads here. Both stores format it.
WORKER_LOST = "no result after %d attempts; the last one's lease expired (its runner, or a stage it called, was lost)"


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
    attempts: int = 0  # the attempts spent: a release gives its attempt back
    runs: int = 0  # the claims so far, released ones too: each run has its own number (``run_id``)
    owner: str | None = None  # hash of the submitting token, for per-token isolation
    webhook_url: str | None = None
    cancel_requested: bool = False

    @property
    def finished(self) -> bool:
        return self.status in ("completed", "failed", "cancelled")

    @property
    def run_id(self) -> str:
        """The request id of this run's stage calls, read back on the progress board: a cancel flag a replica
        still keeps for an earlier run (cancelled while queued there) must not stop this one. A released run
        spends no attempt, so the attempt number alone would name two runs."""
        return f"{self.id}.{self.runs}"


@dataclass
class JobEvent:
    """One entry of a job's event log; ``data`` always holds ``job_id`` and ``status`` (the job's status then)."""

    id: int
    event: str
    data: dict

    @property
    def terminal(self) -> bool:
        return self.event in TERMINAL_EVENTS


def event_data(job_id: str, status: str, **fields: Any) -> str:
    """The JSON text of an event's data, as every store writes it."""
    return json.dumps({"job_id": job_id, "status": status, "time": round(time.time(), 3), **fields})


def new_job_id() -> str:
    """Seed 003's shape: ``job_<epoch ms>_<random>``."""
    return f"job_{int(time.time() * 1000)}_{uuid.uuid4().hex[:9]}"


ANONYMOUS = ""  # ``list_jobs``'s owner for the jobs made without a token (``Job.owner`` None)


def idempotency_scope(owner: str | None, key: str) -> str:
    """An Idempotency-Key belongs to whoever sent it: the same key from another token is another key (a key is
    visible ASCII, so the space keeps the two parts apart)."""
    return key if owner is None else f"{owner} {key}"


def retryable(status: str, error: str | None) -> bool:
    """Whether a job that ended so frees its Idempotency-Key (see ``RETRYABLE``)."""
    return status == "failed" and (error or "").startswith(tuple(f"{code}:" for code in RETRYABLE))


def body_hash(body: dict) -> str:
    return hashlib.sha256(json.dumps(body, sort_keys=True, default=str).encode()).hexdigest()


class JobStore(Protocol):
    """What the job runner and the routes need of a store; ``sqlite_store`` and ``redis_store`` implement it."""

    max_attempts: int

    def create(self, job: Job, idempotency_key: str | None = None, max_queued: int | None = None) -> tuple[Job, bool]:
        """Record a job; returns (job, created). The same key with the same body returns the first job, unless that
        one failed with a ``RETRYABLE`` code: the key then names the new job."""
        ...

    def get(self, job_id: str) -> Job | None: ...

    def list_jobs(self, status: str | None = None, owner: str | None = None, offset: int = 0,
                  limit: int = 50) -> tuple[list[Job], int]:
        """A page of jobs, newest first; ``owner`` None: everyone's, ``ANONYMOUS``: those made without a token."""
        ...

    def claim(self, worker: str, lease_s: float) -> Job | None:
        """The next queued (or lease-expired) job, now processing under ``worker``'s lease."""
        ...

    def heartbeat(self, job_id: str, worker: str, lease_s: float, progress: float | None = None) -> bool:
        """Extend the lease; False when the job is no longer this worker's (cancelled, reclaimed)."""
        ...

    def release(self, job_id: str, worker: str) -> bool:
        """Give a running job back to the queue, in its place, without spending its attempt: its runner is
        stopping, and neither the job nor any worker failed. A ``queued`` event as for a requeue. False (nothing
        changed) when the job is no longer this worker's, or its cancel came meanwhile."""
        ...

    def finish(self, job_id: str, worker: str, status: str, result: dict | None = None,
               error: str | None = None, event: dict | None = None) -> bool:
        """Publish the outcome once, with its terminal event (``status`` named, ``event`` its extra data)."""
        ...

    def cancel(self, job_id: str) -> Job | None: ...

    def append_event(self, job_id: str, event: str, data: dict, worker: str | None = None) -> int | None:
        """Add a running job's event (progress, preview); its id, or None when the job is gone or finished, or,
        with ``worker``, when that worker no longer holds its lease."""
        ...

    def events(self, job_id: str, after: int = 0, limit: int = 100) -> list[JobEvent]:
        """The job's events with ids above ``after``, oldest first (empty for an unknown job)."""
        ...

    def stats(self) -> dict[str, Any]: ...

    def purge(self, older_than_s: float, forget: Callable[[Job], None] | None = None) -> list[Job]:
        """Delete the finished jobs (and their event logs) older than the retention, each only after ``forget``
        (which deletes its images) returned: a job whose ``forget`` raised stays for the next purge. The jobs
        deleted."""
        ...

    # The webhooks owed: every terminal change of a job with a ``webhook_url`` (published, cancelled while queued,
    # failed or cancelled when its worker was lost) owes one, in the change's own transaction, so a delivery
    # outlives the runner that was to make it.
    def take_delivery(self, lease_s: float) -> tuple[Job, int] | None:
        """A finished job whose webhook is due, with the number of this attempt (from 0); no other runner takes
        it until ``lease_s`` has passed or it is settled."""
        ...

    def settle_delivery(self, job_id: str, retry_in: float | None) -> None:
        """Delivered or given up (``retry_in`` None), else due again in ``retry_in`` seconds."""
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

        return RedisJobStore(url, settings.job_max_attempts, events_kept=settings.job_events_kept)
    from graphs.jobs.sqlite_store import SQLiteJobStore

    return SQLiteJobStore(settings.jobs_data_dir / "jobs.sqlite3", settings.job_max_attempts,
                          events_kept=settings.job_events_kept)
