"""The default job store: one SQLite file under the data directory (WAL, synchronous commits), one transaction per
state change. It serves one node; several nodes share ``redis_store`` instead. A job's event log is a table keyed
by (job id, event id), written in the transaction of the state change it reports."""

from __future__ import annotations

import json
import logging
import sqlite3
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from deployments.support.errors import InvalidInput, QueueFull
from graphs.jobs.store import (
    EVENTS_KEPT,
    PRIORITIES,
    TERMINAL_EVENTS,
    WORKER_LOST,
    Job,
    JobEvent,
    body_hash,
    event_data,
    idempotency_scope,
    retryable,
)

logger = logging.getLogger(__name__)

_SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    id TEXT PRIMARY KEY,
    type TEXT NOT NULL,
    status TEXT NOT NULL,
    priority INTEGER NOT NULL,
    seq INTEGER NOT NULL,
    progress REAL NOT NULL DEFAULT 0,
    created_at REAL NOT NULL,
    started_at REAL,
    completed_at REAL,
    request TEXT NOT NULL,
    result TEXT,
    error TEXT,
    attempts INTEGER NOT NULL DEFAULT 0,
    runs INTEGER NOT NULL DEFAULT 0,
    lease_owner TEXT,
    lease_expires REAL,
    idempotency_key TEXT UNIQUE,
    body_hash TEXT,
    owner TEXT,
    webhook_url TEXT,
    cancel_requested INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS jobs_claim ON jobs (status, priority, seq);
CREATE INDEX IF NOT EXISTS jobs_done ON jobs (status, completed_at);
CREATE TABLE IF NOT EXISTS options (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS flights (id TEXT PRIMARY KEY, client TEXT NOT NULL, record TEXT NOT NULL,
                                    expires REAL NOT NULL);
CREATE INDEX IF NOT EXISTS flights_client ON flights (client, expires);
CREATE TABLE IF NOT EXISTS deliveries (job_id TEXT PRIMARY KEY, due REAL NOT NULL,
                                       attempts INTEGER NOT NULL DEFAULT 0);
CREATE INDEX IF NOT EXISTS deliveries_due ON deliveries (due);
CREATE TABLE IF NOT EXISTS job_events (job_id TEXT NOT NULL, id INTEGER NOT NULL, event TEXT NOT NULL,
                                       data TEXT NOT NULL, PRIMARY KEY (job_id, id)) WITHOUT ROWID;
"""


class SQLiteJobStore:
    def __init__(self, path: Path, max_attempts: int = 3, events_kept: int = EVENTS_KEPT) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path, self.max_attempts, self.events_kept = path, max_attempts, events_kept
        self._local = threading.local()
        self._db().executescript(_SCHEMA)
        if "runs" not in {row["name"] for row in self._db().execute("PRAGMA table_info(jobs)")}:
            # A file from before releases: claim numbers a run past its attempts either way (MAX below).
            self._db().execute("ALTER TABLE jobs ADD COLUMN runs INTEGER NOT NULL DEFAULT 0")

    def _db(self) -> sqlite3.Connection:
        db = getattr(self._local, "db", None)
        if db is None:
            db = sqlite3.connect(self.path, timeout=30, isolation_level=None)
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=FULL")  # a returned job id survives a power cut
            db.row_factory = sqlite3.Row
            self._local.db = db
        return db

    class _Tx:
        def __init__(self, db: sqlite3.Connection) -> None:
            self.db = db

        def __enter__(self) -> sqlite3.Connection:
            self.db.execute("BEGIN IMMEDIATE")
            return self.db

        def __exit__(self, kind, *_):
            self.db.execute("COMMIT" if kind is None else "ROLLBACK")

    def _tx(self) -> _Tx:
        return self._Tx(self._db())

    @staticmethod
    def _job(row: sqlite3.Row) -> Job:
        priority = {v: k for k, v in PRIORITIES.items()}[row["priority"]]
        return Job(id=row["id"], type=row["type"], request=json.loads(row["request"]), status=row["status"],
                   priority=priority, progress=row["progress"], created_at=row["created_at"],
                   started_at=row["started_at"], completed_at=row["completed_at"],
                   result=json.loads(row["result"]) if row["result"] else None, error=row["error"],
                   attempts=row["attempts"], runs=row["runs"], owner=row["owner"], webhook_url=row["webhook_url"],
                   cancel_requested=bool(row["cancel_requested"]))

    @staticmethod
    def _owe(db: sqlite3.Connection, job_id: str, now: float) -> None:
        """Inside a terminal change's transaction: its webhook is owed, whoever delivers it and whenever."""
        db.execute("INSERT OR IGNORE INTO deliveries (job_id, due) SELECT id, ? FROM jobs"
                   " WHERE id = ? AND COALESCE(webhook_url, '') != ''", (now, job_id))

    def _emit(self, db: sqlite3.Connection, job_id: str, event: str, data: str) -> int:
        """Append an event inside the caller's transaction and trim the job's log to its newest events."""
        (last,) = db.execute("SELECT COALESCE(MAX(id), 0) FROM job_events WHERE job_id = ?", (job_id,)).fetchone()
        db.execute("INSERT INTO job_events (job_id, id, event, data) VALUES (?, ?, ?, ?)",
                   (job_id, last + 1, event, data))
        db.execute("DELETE FROM job_events WHERE job_id = ? AND id <= ?", (job_id, last + 1 - self.events_kept))
        return int(last + 1)

    @staticmethod
    def _position(db: sqlite3.Connection, job_id: str) -> int:
        """1 for the job the next free worker takes, then counting back through the queue."""
        (ahead,) = db.execute(
            "SELECT COUNT(*) FROM jobs AS other, jobs AS mine WHERE mine.id = ? AND other.status = 'queued'"
            " AND (other.priority < mine.priority OR (other.priority = mine.priority AND other.seq < mine.seq))",
            (job_id,)).fetchone()
        return int(ahead) + 1

    def create(self, job: Job, idempotency_key: str | None = None, max_queued: int | None = None) -> tuple[Job, bool]:
        """Record a job; returns (job, created). The same key with the same body returns the first job, unless that
        one failed with a retryable code: the key then moves to the new job."""
        digest = body_hash({"type": job.type, "request": job.request})
        if idempotency_key is not None:
            idempotency_key = idempotency_scope(job.owner, idempotency_key)
        with self._tx() as db:
            if idempotency_key is not None:
                row = db.execute("SELECT * FROM jobs WHERE idempotency_key = ?", (idempotency_key,)).fetchone()
                if row is not None:
                    if row["body_hash"] != digest:
                        raise InvalidInput("Idempotency-Key reused with a different body", field="Idempotency-Key")
                    if not retryable(row["status"], row["error"]):
                        return self._job(row), False
                    db.execute("UPDATE jobs SET idempotency_key = NULL WHERE id = ?", (row["id"],))
            if max_queued is not None:
                (queued,) = db.execute("SELECT COUNT(*) FROM jobs WHERE status = 'queued'").fetchone()
                if queued >= max_queued:
                    raise QueueFull(f"the queue holds {queued} jobs (MAX_QUEUE_SIZE={max_queued})",
                                    details={"queued": queued, "limit": max_queued})
            (seq,) = db.execute("SELECT COALESCE(MAX(seq), 0) + 1 FROM jobs").fetchone()
            db.execute(
                "INSERT INTO jobs (id, type, status, priority, seq, created_at, request, idempotency_key, body_hash,"
                " owner, webhook_url) VALUES (?, ?, 'queued', ?, ?, ?, ?, ?, ?, ?, ?)",
                (job.id, job.type, PRIORITIES[job.priority], seq, job.created_at, json.dumps(job.request),
                 idempotency_key, digest, job.owner, job.webhook_url),
            )
            self._emit(db, job.id, "queued", event_data(job.id, "queued", position=self._position(db, job.id)))
        return job, True

    def get(self, job_id: str) -> Job | None:
        row = self._db().execute("SELECT * FROM jobs WHERE id = ?", (job_id,)).fetchone()
        return self._job(row) if row else None

    def list_jobs(self, status: str | None = None, owner: str | None = None, offset: int = 0,
             limit: int = 50) -> tuple[list[Job], int]:
        where, args = [], []
        if status:
            where.append("status = ?")
            args.append(status)
        if owner is not None:  # ANONYMOUS ("") is the jobs without an owner
            where.append("COALESCE(owner, '') = ?")
            args.append(owner)
        clause = f"WHERE {' AND '.join(where)}" if where else ""
        db = self._db()
        (total,) = db.execute(f"SELECT COUNT(*) FROM jobs {clause}", args).fetchone()  # noqa: S608 - fixed text
        rows = db.execute(f"SELECT * FROM jobs {clause} ORDER BY seq DESC LIMIT ? OFFSET ?",  # noqa: S608
                          [*args, limit, offset]).fetchall()
        return [self._job(r) for r in rows], total

    def claim(self, worker: str, lease_s: float) -> Job | None:
        """Take the next job: queued ones by priority then age; expired leases count as queued again."""
        now = time.time()
        with self._tx() as db:
            for row in db.execute(
                "SELECT * FROM jobs WHERE status = 'processing' AND lease_expires < ?", (now,)
            ).fetchall():
                if row["cancel_requested"]:  # its cancel came while it ran: that is its outcome, not a new try
                    db.execute("UPDATE jobs SET status = 'cancelled', completed_at = ?, lease_owner = NULL"
                               " WHERE id = ?", (now, row["id"]))
                    self._emit(db, row["id"], "cancelled", event_data(row["id"], "cancelled"))
                    self._owe(db, row["id"], now)
                elif row["attempts"] >= self.max_attempts:
                    message = WORKER_LOST % row["attempts"]
                    db.execute("UPDATE jobs SET status = 'failed', completed_at = ?, lease_owner = NULL, error = ?"
                               " WHERE id = ?", (now, message, row["id"]))
                    self._emit(db, row["id"], "failed",
                               event_data(row["id"], "failed", code="WORKER_LOST", message=message))
                    self._owe(db, row["id"], now)
                else:
                    db.execute("UPDATE jobs SET status = 'queued', lease_owner = NULL WHERE id = ?", (row["id"],))
                    self._emit(db, row["id"], "queued", event_data(row["id"], "queued", requeued=True,
                                                                   position=self._position(db, row["id"])))
            row = db.execute("SELECT * FROM jobs WHERE status = 'queued' AND cancel_requested = 0"
                             " ORDER BY priority, seq LIMIT 1").fetchone()
            if row is None:
                return None
            db.execute("UPDATE jobs SET status = 'processing', started_at = COALESCE(started_at, ?), lease_owner = ?,"
                       " lease_expires = ?, attempts = attempts + 1, runs = MAX(runs, attempts) + 1 WHERE id = ?",
                       (now, worker, now + lease_s, row["id"]))
            self._emit(db, row["id"], "started", event_data(row["id"], "processing", attempt=row["attempts"] + 1))
            return self._job(db.execute("SELECT * FROM jobs WHERE id = ?", (row["id"],)).fetchone())

    def heartbeat(self, job_id: str, worker: str, lease_s: float, progress: float | None = None) -> bool:
        """Extend the lease (and record progress); False when the job is no longer this worker's or is cancelled."""
        with self._tx() as db:
            row = db.execute("SELECT lease_owner, status, cancel_requested FROM jobs WHERE id = ?",
                             (job_id,)).fetchone()
            if row is None or row["lease_owner"] != worker or row["status"] != "processing":
                return False
            db.execute("UPDATE jobs SET lease_expires = ?, progress = COALESCE(?, progress) WHERE id = ?",
                       (time.time() + lease_s, progress, job_id))
            return not row["cancel_requested"]

    def release(self, job_id: str, worker: str) -> bool:
        """Back to the queue with its attempt given back (the next claim counts the same attempt again); its
        ``seq`` is kept, so it is taken before the jobs queued after it, as a requeued job is."""
        with self._tx() as db:
            cursor = db.execute(
                "UPDATE jobs SET status = 'queued', lease_owner = NULL, lease_expires = NULL,"
                " attempts = MAX(attempts - 1, 0) WHERE id = ? AND lease_owner = ? AND status = 'processing'"
                " AND cancel_requested = 0", (job_id, worker))
            if cursor.rowcount != 1:
                return False
            self._emit(db, job_id, "queued", event_data(job_id, "queued", requeued=True,
                                                        position=self._position(db, job_id)))
            return True

    def finish(self, job_id: str, worker: str, status: str, result: dict | None = None,
               error: str | None = None, event: dict | None = None) -> bool:
        """Publish the outcome once, with its terminal event: only the lease holder of a processing job may."""
        with self._tx() as db:
            cursor = db.execute(
                "UPDATE jobs SET status = ?, result = ?, error = ?, completed_at = ?, lease_owner = NULL,"
                " progress = CASE WHEN ? = 'completed' THEN 100 ELSE progress END"
                " WHERE id = ? AND lease_owner = ? AND status = 'processing'",
                (status, json.dumps(result) if result is not None else None, error, time.time(), status, job_id,
                 worker),
            )
            if cursor.rowcount != 1:
                return False
            extra = event if event is not None else ({"message": error} if error else {})
            self._emit(db, job_id, status, event_data(job_id, status, **extra))
            self._owe(db, job_id, time.time())
            return True

    def cancel(self, job_id: str) -> Job | None:
        """Queued: cancelled at once. Processing: flagged; the worker stops within a step. Finished: unchanged."""
        with self._tx() as db:
            row = db.execute("SELECT * FROM jobs WHERE id = ?", (job_id,)).fetchone()
            if row is None:
                return None
            if row["status"] == "queued":
                db.execute("UPDATE jobs SET status = 'cancelled', completed_at = ?, cancel_requested = 1"
                           " WHERE id = ?", (time.time(), job_id))
                self._emit(db, job_id, "cancelled", event_data(job_id, "cancelled"))
                self._owe(db, job_id, time.time())
            elif row["status"] == "processing":
                db.execute("UPDATE jobs SET cancel_requested = 1 WHERE id = ?", (job_id,))
            return self._job(db.execute("SELECT * FROM jobs WHERE id = ?", (job_id,)).fetchone())

    def append_event(self, job_id: str, event: str, data: dict, worker: str | None = None) -> int | None:
        with self._tx() as db:
            row = db.execute("SELECT status, lease_owner FROM jobs WHERE id = ?", (job_id,)).fetchone()
            if row is None or row["status"] in TERMINAL_EVENTS:
                return None  # a late progress report must never follow the terminal event
            if worker is not None and row["lease_owner"] != worker:
                return None  # an attempt whose lease another runner took: its progress is not the job's
            return self._emit(db, job_id, event, event_data(job_id, row["status"], **data))

    def events(self, job_id: str, after: int = 0, limit: int = 100) -> list[JobEvent]:
        rows = self._db().execute("SELECT id, event, data FROM job_events WHERE job_id = ? AND id > ? ORDER BY id"
                                  " LIMIT ?", (job_id, after, limit)).fetchall()
        return [JobEvent(id=r["id"], event=r["event"], data=json.loads(r["data"])) for r in rows]

    def stats(self) -> dict[str, Any]:
        db = self._db()
        counts = dict(db.execute("SELECT status, COUNT(*) FROM jobs GROUP BY status").fetchall())
        (average,) = db.execute("SELECT AVG(completed_at - started_at) FROM jobs WHERE status = 'completed'"
                                ).fetchone()
        return {"counts": counts, "average_seconds": average or 0.0}

    def purge(self, older_than_s: float, forget: Callable[[Job], None] | None = None) -> list[Job]:
        """Delete the finished jobs older than the retention, each after ``forget`` (its images) succeeded: a job
        whose ``forget`` fails stays for the next purge, so nothing it stored is orphaned. The jobs deleted."""
        cutoff = time.time() - older_than_s
        rows = self._db().execute("SELECT * FROM jobs WHERE status IN ('completed', 'failed', 'cancelled')"
                                  " AND completed_at < ?", (cutoff,)).fetchall()
        purged = []
        for row in rows:
            job = self._job(row)
            if forget is not None:
                try:
                    forget(job)
                except Exception:  # noqa: BLE001 - kept, and tried again at the next purge
                    logger.warning("job %s: its files were not deleted; kept for the next purge", job.id,
                                   exc_info=True)
                    continue
            with self._tx() as db:
                db.execute("DELETE FROM jobs WHERE id = ?", (job.id,))
                db.execute("DELETE FROM job_events WHERE job_id = ?", (job.id,))
                db.execute("DELETE FROM deliveries WHERE job_id = ?", (job.id,))
            purged.append(job)
        return purged

    def take_delivery(self, lease_s: float) -> tuple[Job, int] | None:
        """A finished job whose webhook is due, with the number of this attempt (from 0); until ``lease_s`` has
        passed or it is settled, no other runner takes it."""
        now = time.time()
        # A read first: every runner asks this every poll, and nothing is due most of the time, which must not
        # cost a write lock each time.
        if self._db().execute("SELECT 1 FROM deliveries WHERE due <= ? LIMIT 1", (now,)).fetchone() is None:
            return None
        with self._tx() as db:
            row = db.execute("SELECT job_id, attempts FROM deliveries WHERE due <= ? ORDER BY due LIMIT 1",
                             (now,)).fetchone()
            if row is None:
                return None
            db.execute("UPDATE deliveries SET due = ?, attempts = attempts + 1 WHERE job_id = ?",
                       (now + lease_s, row["job_id"]))
            job = db.execute("SELECT * FROM jobs WHERE id = ?", (row["job_id"],)).fetchone()
            if job is None:
                db.execute("DELETE FROM deliveries WHERE job_id = ?", (row["job_id"],))
                return None
            return self._job(job), int(row["attempts"])

    def settle_delivery(self, job_id: str, retry_in: float | None) -> None:
        """Delivered or given up (``retry_in`` None), else due again in ``retry_in`` seconds."""
        with self._tx() as db:
            if retry_in is None:
                db.execute("DELETE FROM deliveries WHERE job_id = ?", (job_id,))
            else:
                db.execute("UPDATE deliveries SET due = ? WHERE job_id = ?", (time.time() + retry_in, job_id))

    # --- state every ingress replica must agree on ------------------------------------------------------------

    def set_option(self, key: str, value: str) -> None:
        with self._tx() as db:
            db.execute("INSERT INTO options (key, value) VALUES (?, ?) ON CONFLICT (key) DO UPDATE SET value = ?",
                       (key, value, value))

    def options(self) -> dict[str, str]:
        return {r["key"]: r["value"] for r in self._db().execute("SELECT key, value FROM options")}

    def track(self, flight_id: str, client: str, record: dict, ttl_s: float) -> None:
        with self._tx() as db:
            db.execute("DELETE FROM flights WHERE expires < ?", (time.time(),))
            db.execute("INSERT INTO flights (id, client, record, expires) VALUES (?, ?, ?, ?) ON CONFLICT (id) DO "
                       "UPDATE SET record = excluded.record, expires = excluded.expires",
                       (flight_id, client, json.dumps(record), time.time() + ttl_s))

    def untrack(self, client: str, flight_id: str) -> None:
        with self._tx() as db:
            db.execute("DELETE FROM flights WHERE id = ? AND client = ?", (flight_id, client))

    def tracked(self, client: str) -> list[dict]:
        rows = self._db().execute("SELECT record FROM flights WHERE client = ? AND expires >= ? ORDER BY rowid",
                                  (client, time.time())).fetchall()
        return [json.loads(r["record"]) for r in rows]
