"""Durable job records behind one interface: SQLite by default (a file under the data dir), Redis when several
nodes share the queue (``JOB_STORE_URL=redis://...``; Ray's own fault tolerance keeps its state there too).

A job is written before its id is returned. Workers claim queued jobs with a lease (highest priority first,
FIFO within a priority); a job whose lease ran out (its worker died) is claimed again, up to ``max_attempts``,
then failed with the reason. Every state change is one transaction.
"""

from __future__ import annotations

import hashlib
import json
import sqlite3
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from deployments.errors import InvalidInput, QueueFull

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
"""


class SQLiteJobStore:
    def __init__(self, path: Path, max_attempts: int = 3) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path, self.max_attempts = path, max_attempts
        self._local = threading.local()
        self._db().executescript(_SCHEMA)

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
                   attempts=row["attempts"], owner=row["owner"], webhook_url=row["webhook_url"],
                   cancel_requested=bool(row["cancel_requested"]))

    def create(self, job: Job, idempotency_key: str | None = None, max_queued: int | None = None) -> tuple[Job, bool]:
        """Record a job; returns (job, created). The same key with the same body returns the first job."""
        digest = body_hash({"type": job.type, "request": job.request})
        with self._tx() as db:
            if idempotency_key is not None:
                row = db.execute("SELECT * FROM jobs WHERE idempotency_key = ?", (idempotency_key,)).fetchone()
                if row is not None:
                    if row["body_hash"] != digest:
                        raise InvalidInput("Idempotency-Key reused with a different body", field="Idempotency-Key")
                    return self._job(row), False
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
        if owner is not None:
            where.append("owner = ?")
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
                if row["attempts"] >= self.max_attempts:
                    db.execute("UPDATE jobs SET status = 'failed', completed_at = ?, lease_owner = NULL, error = ?"
                               " WHERE id = ?", (now, f"worker lost {row['attempts']} times (lease expired)",
                                                 row["id"]))
                else:
                    db.execute("UPDATE jobs SET status = 'queued', lease_owner = NULL WHERE id = ?", (row["id"],))
            row = db.execute("SELECT * FROM jobs WHERE status = 'queued' AND cancel_requested = 0"
                             " ORDER BY priority, seq LIMIT 1").fetchone()
            if row is None:
                return None
            db.execute("UPDATE jobs SET status = 'processing', started_at = COALESCE(started_at, ?), lease_owner = ?,"
                       " lease_expires = ?, attempts = attempts + 1 WHERE id = ?",
                       (now, worker, now + lease_s, row["id"]))
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

    def finish(self, job_id: str, worker: str, status: str, result: dict | None = None,
               error: str | None = None) -> bool:
        """Publish the outcome once: only the lease holder of a processing job may."""
        with self._tx() as db:
            cursor = db.execute(
                "UPDATE jobs SET status = ?, result = ?, error = ?, completed_at = ?, lease_owner = NULL,"
                " progress = CASE WHEN ? = 'completed' THEN 100 ELSE progress END"
                " WHERE id = ? AND lease_owner = ? AND status = 'processing'",
                (status, json.dumps(result) if result is not None else None, error, time.time(), status, job_id,
                 worker),
            )
            return cursor.rowcount == 1

    def cancel(self, job_id: str) -> Job | None:
        """Queued: cancelled at once. Processing: flagged; the worker stops within a step. Finished: unchanged."""
        with self._tx() as db:
            row = db.execute("SELECT * FROM jobs WHERE id = ?", (job_id,)).fetchone()
            if row is None:
                return None
            if row["status"] == "queued":
                db.execute("UPDATE jobs SET status = 'cancelled', completed_at = ?, cancel_requested = 1"
                           " WHERE id = ?", (time.time(), job_id))
            elif row["status"] == "processing":
                db.execute("UPDATE jobs SET cancel_requested = 1 WHERE id = ?", (job_id,))
            return self._job(db.execute("SELECT * FROM jobs WHERE id = ?", (job_id,)).fetchone())

    def stats(self) -> dict[str, Any]:
        db = self._db()
        counts = dict(db.execute("SELECT status, COUNT(*) FROM jobs GROUP BY status").fetchall())
        (average,) = db.execute("SELECT AVG(completed_at - started_at) FROM jobs WHERE status = 'completed'"
                                ).fetchone()
        return {"counts": counts, "average_seconds": average or 0.0}

    def purge(self, older_than_s: float) -> list[Job]:
        """Delete finished jobs older than the retention; returns them so their images can go too."""
        cutoff = time.time() - older_than_s
        with self._tx() as db:
            rows = db.execute("SELECT * FROM jobs WHERE status IN ('completed', 'failed', 'cancelled')"
                              " AND completed_at < ?", (cutoff,)).fetchall()
            db.execute("DELETE FROM jobs WHERE status IN ('completed', 'failed', 'cancelled') AND completed_at < ?",
                       (cutoff,))
        return [self._job(r) for r in rows]


# --- Redis: the store shared by several nodes -------------------------------------------------------------------

_LUA_CREATE = """
local p, id, idem, digest = ARGV[1], ARGV[2], ARGV[3], ARGV[4]
local maxq, prio = tonumber(ARGV[5]), tonumber(ARGV[6])
if idem ~= '' then
  local existing = redis.call('GET', p .. ':idem:' .. idem)
  if existing then
    if redis.call('HGET', p .. ':job:' .. existing, 'body_hash') ~= digest then return {'conflict', existing} end
    return {'existing', existing}
  end
end
local queued = redis.call('ZCARD', p .. ':queued')
if maxq >= 0 and queued >= maxq then return {'full', tostring(queued)} end
local seq = redis.call('INCR', p .. ':seq')
local key = p .. ':job:' .. id
local fields = cjson.decode(ARGV[7])
for k, v in pairs(fields) do redis.call('HSET', key, k, v) end
redis.call('HSET', key, 'seq', seq, 'status', 'queued', 'body_hash', digest, 'idem', idem)
redis.call('ZADD', p .. ':queued', prio * 1e13 + seq, id)
redis.call('ZADD', p .. ':all', seq, id)
redis.call('ZADD', p .. ':status:queued', seq, id)
if idem ~= '' then redis.call('SET', p .. ':idem:' .. idem, id) end
return {'created', id}
"""

_LUA_CLAIM = """
local p, worker, now, lease, maxa = ARGV[1], ARGV[2], tonumber(ARGV[3]), tonumber(ARGV[4]), tonumber(ARGV[5])
for _, id in ipairs(redis.call('ZRANGEBYSCORE', p .. ':leases', '-inf', now)) do
  local key = p .. ':job:' .. id
  local seq = tonumber(redis.call('HGET', key, 'seq'))
  local attempts = tonumber(redis.call('HGET', key, 'attempts'))
  redis.call('ZREM', p .. ':leases', id)
  redis.call('ZREM', p .. ':status:processing', id)
  if attempts >= maxa then
    redis.call('HSET', key, 'status', 'failed', 'completed_at', now, 'lease_owner', '',
               'error', 'worker lost ' .. attempts .. ' times (lease expired)')
    redis.call('ZADD', p .. ':status:failed', seq, id)
    redis.call('ZADD', p .. ':done', now, id)
  else
    redis.call('HSET', key, 'status', 'queued', 'lease_owner', '')
    redis.call('ZADD', p .. ':queued', tonumber(redis.call('HGET', key, 'priority')) * 1e13 + seq, id)
    redis.call('ZADD', p .. ':status:queued', seq, id)
  end
end
local head = redis.call('ZRANGE', p .. ':queued', 0, 0)
if #head == 0 then return false end
local id = head[1]
local key = p .. ':job:' .. id
redis.call('ZREM', p .. ':queued', id)
redis.call('ZREM', p .. ':status:queued', id)
if (redis.call('HGET', key, 'started_at') or '') == '' then redis.call('HSET', key, 'started_at', now) end
redis.call('HSET', key, 'status', 'processing', 'lease_owner', worker, 'lease_expires', now + lease)
redis.call('HINCRBY', key, 'attempts', 1)
redis.call('ZADD', p .. ':leases', now + lease, id)
redis.call('ZADD', p .. ':status:processing', tonumber(redis.call('HGET', key, 'seq')), id)
return id
"""

_LUA_HEARTBEAT = """
local p, id, worker, now, lease, progress = ARGV[1], ARGV[2], ARGV[3], tonumber(ARGV[4]), tonumber(ARGV[5]), ARGV[6]
local key = p .. ':job:' .. id
if redis.call('HGET', key, 'lease_owner') ~= worker or redis.call('HGET', key, 'status') ~= 'processing' then
  return 0
end
redis.call('HSET', key, 'lease_expires', now + lease)
redis.call('ZADD', p .. ':leases', now + lease, id)
if progress ~= '' then redis.call('HSET', key, 'progress', progress) end
if redis.call('HGET', key, 'cancel_requested') == '1' then return 0 end
return 1
"""

_LUA_FINISH = """
local p, id, worker, status, result, err, now = ARGV[1], ARGV[2], ARGV[3], ARGV[4], ARGV[5], ARGV[6], tonumber(ARGV[7])
local key = p .. ':job:' .. id
if redis.call('HGET', key, 'lease_owner') ~= worker or redis.call('HGET', key, 'status') ~= 'processing' then
  return 0
end
redis.call('HSET', key, 'status', status, 'result', result, 'error', err, 'completed_at', now, 'lease_owner', '')
if status == 'completed' then
  redis.call('HSET', key, 'progress', 100)
  redis.call('INCRBYFLOAT', p .. ':stats:seconds', now - tonumber(redis.call('HGET', key, 'started_at')))
  redis.call('INCR', p .. ':stats:completed')
end
local seq = tonumber(redis.call('HGET', key, 'seq'))
redis.call('ZREM', p .. ':leases', id)
redis.call('ZREM', p .. ':status:processing', id)
redis.call('ZADD', p .. ':status:' .. status, seq, id)
redis.call('ZADD', p .. ':done', now, id)
return 1
"""

_LUA_CANCEL = """
local p, id, now = ARGV[1], ARGV[2], tonumber(ARGV[3])
local key = p .. ':job:' .. id
local status = redis.call('HGET', key, 'status')
if not status then return 0 end
if status == 'queued' then
  local seq = tonumber(redis.call('HGET', key, 'seq'))
  redis.call('HSET', key, 'status', 'cancelled', 'completed_at', now, 'cancel_requested', '1')
  redis.call('ZREM', p .. ':queued', id)
  redis.call('ZREM', p .. ':status:queued', id)
  redis.call('ZADD', p .. ':status:cancelled', seq, id)
  redis.call('ZADD', p .. ':done', now, id)
elseif status == 'processing' then
  redis.call('HSET', key, 'cancel_requested', '1')
end
return 1
"""


class RedisJobStore:
    """The same contract as SQLiteJobStore on Redis, each state change one Lua script (atomic on the server)."""

    def __init__(self, url: str, max_attempts: int = 3, prefix: str = "imagegen") -> None:
        import redis

        self.redis = redis.Redis.from_url(url, decode_responses=True, socket_timeout=10)
        self.prefix, self.max_attempts = prefix, max_attempts
        self._create = self.redis.register_script(_LUA_CREATE)
        self._claim = self.redis.register_script(_LUA_CLAIM)
        self._heartbeat = self.redis.register_script(_LUA_HEARTBEAT)
        self._finish = self.redis.register_script(_LUA_FINISH)
        self._cancel = self.redis.register_script(_LUA_CANCEL)

    def _key(self, *parts: str) -> str:
        return ":".join([self.prefix, *parts])

    @staticmethod
    def _job(h: dict[str, str]) -> Job:
        def number(name: str) -> float | None:
            return float(h[name]) if h.get(name) else None

        priority = {v: k for k, v in PRIORITIES.items()}[int(h["priority"])]
        return Job(id=h["id"], type=h["type"], request=json.loads(h["request"]), status=h["status"], priority=priority,
                   progress=float(h.get("progress") or 0), created_at=float(h["created_at"]),
                   started_at=number("started_at"), completed_at=number("completed_at"),
                   result=json.loads(h["result"]) if h.get("result") else None, error=h.get("error") or None,
                   attempts=int(h.get("attempts") or 0), owner=h.get("owner") or None,
                   webhook_url=h.get("webhook_url") or None, cancel_requested=h.get("cancel_requested") == "1")

    def create(self, job: Job, idempotency_key: str | None = None, max_queued: int | None = None) -> tuple[Job, bool]:
        digest = body_hash({"type": job.type, "request": job.request})
        fields = {"id": job.id, "type": job.type, "priority": PRIORITIES[job.priority], "progress": 0,
                  "created_at": job.created_at, "request": json.dumps(job.request), "attempts": 0,
                  "owner": job.owner or "", "webhook_url": job.webhook_url or "", "cancel_requested": "0",
                  "started_at": "", "completed_at": "", "result": "", "error": "", "lease_owner": ""}
        outcome, value = self._create(args=[self.prefix, job.id, idempotency_key or "", digest,
                                            -1 if max_queued is None else max_queued, PRIORITIES[job.priority],
                                            json.dumps(fields)])
        if outcome == "conflict":
            raise InvalidInput("Idempotency-Key reused with a different body", field="Idempotency-Key")
        if outcome == "full":
            raise QueueFull(f"the queue holds {value} jobs (MAX_QUEUE_SIZE={max_queued})",
                            details={"queued": int(value), "limit": max_queued})
        if outcome == "existing":
            existing = self.get(value)
            assert existing is not None  # the script found it a moment ago and jobs are never half-written
            return existing, False
        return job, True

    def get(self, job_id: str) -> Job | None:
        h = self.redis.hgetall(self._key("job", job_id))
        return self._job(h) if h else None

    def list_jobs(self, status: str | None = None, owner: str | None = None, offset: int = 0,
                  limit: int = 50) -> tuple[list[Job], int]:
        index = self._key("status", status) if status else self._key("all")
        if owner is None:
            total = self.redis.zcard(index)
            ids = self.redis.zrevrange(index, offset, offset + limit - 1)
            return [j for j in (self.get(i) for i in ids) if j is not None], total
        mine = [j for j in (self.get(i) for i in self.redis.zrevrange(index, 0, -1)) if j and j.owner == owner]
        return mine[offset : offset + limit], len(mine)

    def claim(self, worker: str, lease_s: float) -> Job | None:
        job_id = self._claim(args=[self.prefix, worker, time.time(), lease_s, self.max_attempts])
        return self.get(job_id) if job_id else None

    def heartbeat(self, job_id: str, worker: str, lease_s: float, progress: float | None = None) -> bool:
        return bool(self._heartbeat(args=[self.prefix, job_id, worker, time.time(), lease_s,
                                          "" if progress is None else progress]))

    def finish(self, job_id: str, worker: str, status: str, result: dict | None = None,
               error: str | None = None) -> bool:
        return bool(self._finish(args=[self.prefix, job_id, worker, status,
                                       json.dumps(result) if result is not None else "", error or "", time.time()]))

    def cancel(self, job_id: str) -> Job | None:
        if not self._cancel(args=[self.prefix, job_id, time.time()]):
            return None
        return self.get(job_id)

    def stats(self) -> dict[str, Any]:
        counts = {s: self.redis.zcard(self._key("status", s)) for s in STATUSES}
        completed = int(self.redis.get(self._key("stats", "completed")) or 0)
        seconds = float(self.redis.get(self._key("stats", "seconds")) or 0.0)
        average = seconds / completed if completed else 0.0
        return {"counts": {s: n for s, n in counts.items() if n}, "average_seconds": average}

    def purge(self, older_than_s: float) -> list[Job]:
        cutoff = time.time() - older_than_s
        purged = []
        for job_id in self.redis.zrangebyscore(self._key("done"), "-inf", cutoff):
            job = self.get(job_id)
            pipe = self.redis.pipeline()
            pipe.zrem(self._key("done"), job_id)
            pipe.zrem(self._key("all"), job_id)
            for status in STATUSES:
                pipe.zrem(self._key("status", status), job_id)
            idem = self.redis.hget(self._key("job", job_id), "idem")
            if idem:
                pipe.delete(self._key("idem", idem))
            pipe.delete(self._key("job", job_id))
            pipe.execute()
            if job is not None:
                purged.append(job)
        return purged


def open_store(url: str | None, sqlite_path: Path, max_attempts: int) -> SQLiteJobStore | RedisJobStore:
    """``JOB_STORE_URL=redis://...`` selects the shared store; otherwise the SQLite file under the data dir."""
    if url and url.startswith(("redis://", "rediss://", "unix://")):
        return RedisJobStore(url, max_attempts)
    return SQLiteJobStore(sqlite_path, max_attempts)
