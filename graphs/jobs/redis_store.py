"""The job store several nodes share: Redis, each state change one Lua script (atomic on the server), the same
contract as ``sqlite_store``. A job's event log is a stream (``<prefix>:events:<id>``) whose entry ids are
``<n>-0`` with n counting from 1, so the SSE ids are the same small integers as SQLite's; the scripts that change a
job's state append its event in the same script, capped with MAXLEN."""

from __future__ import annotations

import json
import logging
import time
import uuid
from collections.abc import Callable
from typing import Any

from deployments.support.errors import InvalidInput, QueueFull
from graphs.jobs.store import (
    ANONYMOUS,
    EVENTS_KEPT,
    PRIORITIES,
    RETRYABLE,
    STATUSES,
    WORKER_LOST,
    Job,
    JobEvent,
    body_hash,
    event_data,
    idempotency_scope,
)

logger = logging.getLogger(__name__)

# The server's clock, in seconds: every lease is set and read against one clock, whichever node's runner asks (a
# node whose clock ran ahead would otherwise take live jobs over). Redis 5+ replicates a script's effects, so a
# script may read TIME before it writes.
_LUA_NOW = """
local function server_now()
  local t = redis.call('TIME')
  return tonumber(t[1]) + tonumber(t[2]) / 1e6
end
"""

# Prepended to every script that appends an event: the next id follows the newest entry (MAXLEN trims the oldest).
_LUA_EMIT = _LUA_NOW + """
local function emit(p, id, kept, name, data)
  local key = p .. ':events:' .. id
  local last = redis.call('XREVRANGE', key, '+', '-', 'COUNT', 1)
  local n = 1
  if #last > 0 then n = tonumber(string.match(last[1][1], '^(%d+)')) + 1 end
  redis.call('XADD', key, 'MAXLEN', kept, n .. '-0', 'event', name, 'data', data)
  return n
end

-- a terminal change's webhook is owed, whoever delivers it and whenever
local function owe(p, id, now)
  if (redis.call('HGET', p .. ':job:' .. id, 'webhook_url') or '') ~= '' then
    redis.call('ZADD', p .. ':deliveries', 'NX', now, id)
  end
end
"""

_LUA_CREATE = _LUA_EMIT + """
local p, id, idem, digest = ARGV[1], ARGV[2], ARGV[3], ARGV[4]
local maxq, prio, kept = tonumber(ARGV[5]), tonumber(ARGV[6]), tonumber(ARGV[8])
-- a job that failed with a retryable code (its error starts '<code>:') frees its key
local function retryable(key)
  if redis.call('HGET', key, 'status') ~= 'failed' then return false end
  local err = redis.call('HGET', key, 'error') or ''
  for _, code in ipairs(cjson.decode(ARGV[10])) do
    if string.sub(err, 1, #code + 1) == code .. ':' then return true end
  end
  return false
end
local replaced = nil
if idem ~= '' then
  local existing = redis.call('GET', p .. ':idem:' .. idem)
  if existing and redis.call('EXISTS', p .. ':job:' .. existing) == 0 then
    existing = nil  -- its job is gone (purged, evicted): the key is free again
  end
  if existing then
    if redis.call('HGET', p .. ':job:' .. existing, 'body_hash') ~= digest then return {'conflict', existing} end
    if not retryable(p .. ':job:' .. existing) then return {'existing', existing} end
    replaced = p .. ':job:' .. existing
  end
end
local queued = redis.call('ZCARD', p .. ':queued')
if maxq >= 0 and queued >= maxq then return {'full', tostring(queued)} end
if replaced then redis.call('HSET', replaced, 'idem', '') end  -- its purge must leave the key to the new job
local seq = redis.call('INCR', p .. ':seq')
local key = p .. ':job:' .. id
local fields = cjson.decode(ARGV[7])
for k, v in pairs(fields) do redis.call('HSET', key, k, v) end
redis.call('HSET', key, 'seq', seq, 'status', 'queued', 'body_hash', digest, 'idem', idem)
redis.call('ZADD', p .. ':queued', prio * 1e13 + seq, id)
redis.call('ZADD', p .. ':all', seq, id)
redis.call('ZADD', p .. ':status:queued', seq, id)
redis.call('ZADD', p .. ':owner:' .. (fields['owner'] or ''), seq, id)  -- '': made without a token
if idem ~= '' then redis.call('SET', p .. ':idem:' .. idem, id) end
local queued_event = cjson.decode(ARGV[9])
queued_event['position'] = redis.call('ZRANK', p .. ':queued', id) + 1
emit(p, id, kept, 'queued', cjson.encode(queued_event))
return {'created', id}
"""

_LUA_CLAIM = _LUA_EMIT + """
local p, worker, lease, maxa = ARGV[1], ARGV[2], tonumber(ARGV[3]), tonumber(ARGV[4])
local kept, lost, now = tonumber(ARGV[5]), ARGV[6], server_now()
for _, id in ipairs(redis.call('ZRANGEBYSCORE', p .. ':leases', '-inf', now)) do
  local key = p .. ':job:' .. id
  local seq = tonumber(redis.call('HGET', key, 'seq'))
  local attempts = tonumber(redis.call('HGET', key, 'attempts'))
  redis.call('ZREM', p .. ':leases', id)
  redis.call('ZREM', p .. ':status:processing', id)
  if not seq then
    -- its record is gone (evicted, deleted by hand): nothing to run, and nothing must stop the claims behind it
  elseif redis.call('HGET', key, 'cancel_requested') == '1' then
    -- its cancel came while it ran: that is its outcome, not another try
    redis.call('HSET', key, 'status', 'cancelled', 'completed_at', now, 'lease_owner', '')
    redis.call('ZADD', p .. ':status:cancelled', seq, id)
    redis.call('ZADD', p .. ':done', now, id)
    emit(p, id, kept, 'cancelled', cjson.encode({job_id = id, status = 'cancelled', time = now}))
    owe(p, id, now)
  elseif attempts >= maxa then
    local message = string.format(lost, attempts)
    redis.call('HSET', key, 'status', 'failed', 'completed_at', now, 'lease_owner', '', 'error', message)
    redis.call('ZADD', p .. ':status:failed', seq, id)
    redis.call('ZADD', p .. ':done', now, id)
    emit(p, id, kept, 'failed', cjson.encode({job_id = id, status = 'failed', time = now, code = 'WORKER_LOST',
                                              message = message}))
    owe(p, id, now)
  else
    redis.call('HSET', key, 'status', 'queued', 'lease_owner', '')
    redis.call('ZADD', p .. ':queued', tonumber(redis.call('HGET', key, 'priority')) * 1e13 + seq, id)
    redis.call('ZADD', p .. ':status:queued', seq, id)
    emit(p, id, kept, 'queued', cjson.encode({job_id = id, status = 'queued', time = now, requeued = true,
                                              position = redis.call('ZRANK', p .. ':queued', id) + 1}))
  end
end
local id, key
repeat
  local head = redis.call('ZRANGE', p .. ':queued', 0, 0)
  if #head == 0 then return false end
  id = head[1]
  key = p .. ':job:' .. id
  redis.call('ZREM', p .. ':queued', id)
  redis.call('ZREM', p .. ':status:queued', id)
until redis.call('EXISTS', key) == 1
if (redis.call('HGET', key, 'started_at') or '') == '' then redis.call('HSET', key, 'started_at', now) end
redis.call('HSET', key, 'status', 'processing', 'lease_owner', worker, 'lease_expires', now + lease)
local attempt = redis.call('HINCRBY', key, 'attempts', 1)
-- a run past every earlier one, released ones too (a record from before releases has no runs yet)
redis.call('HSET', key, 'runs', math.max(tonumber(redis.call('HGET', key, 'runs') or '0'), attempt - 1) + 1)
redis.call('ZADD', p .. ':leases', now + lease, id)
redis.call('ZADD', p .. ':status:processing', tonumber(redis.call('HGET', key, 'seq')), id)
emit(p, id, kept, 'started', cjson.encode({job_id = id, status = 'processing', time = now, attempt = attempt}))
return id
"""

_LUA_HEARTBEAT = _LUA_NOW + """
local p, id, worker, lease, progress = ARGV[1], ARGV[2], ARGV[3], tonumber(ARGV[4]), ARGV[5]
local now = server_now()
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

# Back in its place in the queue (its score is its priority and seq, as at creation), the attempt given back.
_LUA_RELEASE = _LUA_EMIT + """
local p, id, worker, kept = ARGV[1], ARGV[2], ARGV[3], tonumber(ARGV[4])
local now = server_now()
local key = p .. ':job:' .. id
if redis.call('HGET', key, 'lease_owner') ~= worker or redis.call('HGET', key, 'status') ~= 'processing'
   or redis.call('HGET', key, 'cancel_requested') == '1' then
  return 0
end
local seq = tonumber(redis.call('HGET', key, 'seq'))
redis.call('HSET', key, 'status', 'queued', 'lease_owner', '', 'lease_expires', '',
           'attempts', math.max(tonumber(redis.call('HGET', key, 'attempts') or '0') - 1, 0))
redis.call('ZREM', p .. ':leases', id)
redis.call('ZREM', p .. ':status:processing', id)
redis.call('ZADD', p .. ':queued', tonumber(redis.call('HGET', key, 'priority')) * 1e13 + seq, id)
redis.call('ZADD', p .. ':status:queued', seq, id)
emit(p, id, kept, 'queued', cjson.encode({job_id = id, status = 'queued', time = now, requeued = true,
                                          position = redis.call('ZRANK', p .. ':queued', id) + 1}))
return 1
"""

_LUA_FINISH = _LUA_EMIT + """
local p, id, worker, status, result, err = ARGV[1], ARGV[2], ARGV[3], ARGV[4], ARGV[5], ARGV[6]
local kept, data, now = tonumber(ARGV[7]), ARGV[8], server_now()
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
emit(p, id, kept, status, data)
owe(p, id, now)
return 1
"""

_LUA_CANCEL = _LUA_EMIT + """
local p, id, kept, data = ARGV[1], ARGV[2], tonumber(ARGV[3]), ARGV[4]
local now = server_now()
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
  emit(p, id, kept, 'cancelled', data)
  owe(p, id, now)
elseif status == 'processing' then
  redis.call('HSET', key, 'cancel_requested', '1')
end
return 1
"""

_LUA_APPEND = _LUA_EMIT + """
local p, id, kept, name, worker = ARGV[1], ARGV[2], tonumber(ARGV[3]), ARGV[4], ARGV[6]
local status = redis.call('HGET', p .. ':job:' .. id, 'status')
if (not status) or status == 'completed' or status == 'failed' or status == 'cancelled' then return false end
if worker ~= '' and redis.call('HGET', p .. ':job:' .. id, 'lease_owner') ~= worker then return false end
local data = cjson.decode(ARGV[5])
data['status'] = status
return emit(p, id, kept, name, cjson.encode(data))
"""

_LUA_TAKE_DELIVERY = _LUA_NOW + """
local p, lease = ARGV[1], tonumber(ARGV[2])
local now = server_now()
local due = redis.call('ZRANGEBYSCORE', p .. ':deliveries', '-inf', now, 'LIMIT', 0, 1)
if #due == 0 then return false end
local id = due[1]
local key = p .. ':job:' .. id
if redis.call('EXISTS', key) == 0 then
  redis.call('ZREM', p .. ':deliveries', id)
  return false
end
redis.call('ZADD', p .. ':deliveries', now + lease, id)
return {id, redis.call('HINCRBY', key, 'webhook_attempts', 1) - 1}
"""

_LUA_SETTLE_DELIVERY = _LUA_NOW + """
local p, id, retry_in = ARGV[1], ARGV[2], ARGV[3]
if retry_in == '' then return redis.call('ZREM', p .. ':deliveries', id) end
return redis.call('ZADD', p .. ':deliveries', 'XX', server_now() + tonumber(retry_in), id)
"""

# Each owner's jobs by age (a token's, or ':owner:' those made without one, for JOBS_PER_TOKEN listings), built
# once from the jobs a store holds from before there was such an index (or before it held the tokenless jobs);
# later, the create script adds to it and the purge takes from it.
_LUA_INDEX_OWNERS = """
local p = ARGV[1]
if redis.call('EXISTS', p .. ':owners-indexed:2') == 1 then return 0 end
local all = redis.call('ZRANGE', p .. ':all', 0, -1, 'WITHSCORES')
for i = 1, #all, 2 do
  local owner = redis.call('HGET', p .. ':job:' .. all[i], 'owner')
  if owner then redis.call('ZADD', p .. ':owner:' .. owner, all[i + 1], all[i]) end
end
redis.call('SET', p .. ':owners-indexed:2', '1')
redis.call('DEL', p .. ':owners-indexed')
return 1
"""

# One owner's jobs in one state, newest first: the two indexes intersected where Redis keeps them.
_LUA_OWNED = """
local p, owner, status, first, last, scratch = ARGV[1], ARGV[2], ARGV[3], ARGV[4], ARGV[5], ARGV[6]
redis.call('ZINTERSTORE', scratch, 2, p .. ':owner:' .. owner, p .. ':status:' .. status, 'AGGREGATE', 'MAX')
local ids = redis.call('ZREVRANGE', scratch, first, last)
local total = redis.call('ZCARD', scratch)
redis.call('DEL', scratch)
return {total, ids}
"""


class RedisJobStore:
    """The same contract as SQLiteJobStore on Redis, each state change one Lua script (atomic on the server)."""

    def __init__(self, url: str, max_attempts: int = 3, prefix: str = "imagegen",
                 events_kept: int = EVENTS_KEPT) -> None:
        import redis

        self.redis = redis.Redis.from_url(url, decode_responses=True, socket_timeout=10)
        self.prefix, self.max_attempts, self.events_kept = prefix, max_attempts, events_kept
        self._create = self.redis.register_script(_LUA_CREATE)
        self._claim = self.redis.register_script(_LUA_CLAIM)
        self._heartbeat = self.redis.register_script(_LUA_HEARTBEAT)
        self._release = self.redis.register_script(_LUA_RELEASE)
        self._finish = self.redis.register_script(_LUA_FINISH)
        self._cancel = self.redis.register_script(_LUA_CANCEL)
        self._append = self.redis.register_script(_LUA_APPEND)
        self._take_delivery = self.redis.register_script(_LUA_TAKE_DELIVERY)
        self._settle_delivery = self.redis.register_script(_LUA_SETTLE_DELIVERY)
        self._index_owners = self.redis.register_script(_LUA_INDEX_OWNERS)
        self._owned = self.redis.register_script(_LUA_OWNED)
        self._owners_indexed = False  # known to be built (checked on the first listing by owner)

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
                   attempts=int(h.get("attempts") or 0), runs=int(h.get("runs") or 0), owner=h.get("owner") or None,
                   webhook_url=h.get("webhook_url") or None, cancel_requested=h.get("cancel_requested") == "1")

    def create(self, job: Job, idempotency_key: str | None = None, max_queued: int | None = None) -> tuple[Job, bool]:
        digest = body_hash({"type": job.type, "request": job.request})
        fields = {"id": job.id, "type": job.type, "priority": PRIORITIES[job.priority], "progress": 0,
                  "created_at": job.created_at, "request": json.dumps(job.request), "attempts": 0, "runs": 0,
                  "owner": job.owner or "", "webhook_url": job.webhook_url or "", "cancel_requested": "0",
                  "started_at": "", "completed_at": "", "result": "", "error": "", "lease_owner": ""}
        scoped = "" if idempotency_key is None else idempotency_scope(job.owner, idempotency_key)
        outcome, value = self._create(args=[self.prefix, job.id, scoped, digest,
                                            -1 if max_queued is None else max_queued, PRIORITIES[job.priority],
                                            json.dumps(fields), self.events_kept, event_data(job.id, "queued"),
                                            json.dumps(RETRYABLE)])
        if outcome == "conflict":
            raise InvalidInput("Idempotency-Key reused with a different body", field="Idempotency-Key")
        if outcome == "full":
            raise QueueFull(f"the queue holds {value} jobs (MAX_QUEUE_SIZE={max_queued})",
                            details={"queued": int(value), "limit": max_queued})
        if outcome == "existing":
            existing = self.get(value)
            if existing is None:  # purged since the script found it: the key is free again
                return self.create(job, idempotency_key, max_queued)
            return existing, False
        return job, True

    def get(self, job_id: str) -> Job | None:
        h = self.redis.hgetall(self._key("job", job_id))
        return self._job(h) if h else None

    def list_jobs(self, status: str | None = None, owner: str | None = None, offset: int = 0,
                  limit: int = 50) -> tuple[list[Job], int]:
        """A page of jobs, newest first, read through the index that holds just them (no job read twice, none
        read that is not shown)."""
        if owner is not None and not self._owners_indexed:
            self._index_owners(args=[self.prefix])
            self._owners_indexed = True
        if owner is not None and status:
            scratch = self._key("scratch", uuid.uuid4().hex)
            total, ids = self._owned(args=[self.prefix, owner, status, offset, offset + limit - 1, scratch])
        else:
            index = (self._key("owner", owner) if owner is not None
                     else self._key("status", status) if status else self._key("all"))
            total, ids = self.redis.zcard(index), self.redis.zrevrange(index, offset, offset + limit - 1)
        return [j for j in (self.get(i) for i in ids) if j is not None], int(total)

    def claim(self, worker: str, lease_s: float) -> Job | None:
        job_id = self._claim(args=[self.prefix, worker, lease_s, self.max_attempts, self.events_kept, WORKER_LOST])
        return self.get(job_id) if job_id else None

    def heartbeat(self, job_id: str, worker: str, lease_s: float, progress: float | None = None) -> bool:
        return bool(self._heartbeat(args=[self.prefix, job_id, worker, lease_s, "" if progress is None else progress]))

    def release(self, job_id: str, worker: str) -> bool:
        return bool(self._release(args=[self.prefix, job_id, worker, self.events_kept]))

    def finish(self, job_id: str, worker: str, status: str, result: dict | None = None,
               error: str | None = None, event: dict | None = None) -> bool:
        extra = event if event is not None else ({"message": error} if error else {})
        return bool(self._finish(args=[self.prefix, job_id, worker, status,
                                       json.dumps(result) if result is not None else "", error or "",
                                       self.events_kept, event_data(job_id, status, **extra)]))

    def cancel(self, job_id: str) -> Job | None:
        if not self._cancel(args=[self.prefix, job_id, self.events_kept, event_data(job_id, "cancelled")]):
            return None
        return self.get(job_id)

    def append_event(self, job_id: str, event: str, data: dict, worker: str | None = None) -> int | None:
        # The script fills in the job's status; "queued" only holds the place of the key here.
        number = self._append(args=[self.prefix, job_id, self.events_kept, event,
                                    event_data(job_id, "queued", **data), worker or ""])
        return int(number) if number else None

    def events(self, job_id: str, after: int = 0, limit: int = 100) -> list[JobEvent]:
        entries = self.redis.xrange(self._key("events", job_id), f"{after + 1}-0", "+", count=limit)
        return [JobEvent(id=int(entry_id.split("-")[0]), event=fields["event"], data=json.loads(fields["data"]))
                for entry_id, fields in entries]

    def stats(self) -> dict[str, Any]:
        counts = {s: self.redis.zcard(self._key("status", s)) for s in STATUSES}
        completed = int(self.redis.get(self._key("stats", "completed")) or 0)
        seconds = float(self.redis.get(self._key("stats", "seconds")) or 0.0)
        average = seconds / completed if completed else 0.0
        return {"counts": {s: n for s, n in counts.items() if n}, "average_seconds": average}

    def purge(self, older_than_s: float, forget: Callable[[Job], None] | None = None) -> list[Job]:
        seconds, micros = self.redis.time()  # the clock the scripts stamped completions with
        cutoff = seconds + micros / 1e6 - older_than_s
        purged = []
        for job_id in self.redis.zrangebyscore(self._key("done"), "-inf", cutoff):
            job = self.get(job_id)
            if job is not None and forget is not None:
                try:
                    forget(job)
                except Exception:  # noqa: BLE001 - kept, and tried again at the next purge
                    logger.warning("job %s: its files were not deleted; kept for the next purge", job_id,
                                   exc_info=True)
                    continue
            pipe = self.redis.pipeline()
            pipe.zrem(self._key("done"), job_id)
            pipe.zrem(self._key("deliveries"), job_id)
            if job is not None:
                pipe.zrem(self._key("owner", job.owner or ANONYMOUS), job_id)
            pipe.zrem(self._key("all"), job_id)
            for status in STATUSES:
                pipe.zrem(self._key("status", status), job_id)
            idem = self.redis.hget(self._key("job", job_id), "idem")
            if idem:
                pipe.delete(self._key("idem", idem))
            pipe.delete(self._key("job", job_id))
            pipe.delete(self._key("events", job_id))
            pipe.execute()
            if job is not None:
                purged.append(job)
        return purged

    def take_delivery(self, lease_s: float) -> tuple[Job, int] | None:
        taken = self._take_delivery(args=[self.prefix, lease_s])
        if not taken:
            return None
        job = self.get(taken[0])
        return (job, int(taken[1])) if job is not None else None

    def settle_delivery(self, job_id: str, retry_in: float | None) -> None:
        self._settle_delivery(args=[self.prefix, job_id, "" if retry_in is None else retry_in])

    # --- state every ingress replica must agree on ------------------------------------------------------------

    def set_option(self, key: str, value: str) -> None:
        self.redis.hset(self._key("options"), key, value)

    def options(self) -> dict[str, str]:
        return dict(self.redis.hgetall(self._key("options")))

    def track(self, flight_id: str, client: str, record: dict, ttl_s: float) -> None:
        key = self._key("flights", client)
        pipe = self.redis.pipeline()
        pipe.hset(key, flight_id, json.dumps({**record, "_expires": time.time() + ttl_s}))
        pipe.expire(key, int(ttl_s) + 1)
        pipe.execute()

    def untrack(self, client: str, flight_id: str) -> None:
        self.redis.hdel(self._key("flights", client), flight_id)

    def tracked(self, client: str) -> list[dict]:
        """The client's live records; those of an ingress that died (past their expiry) are deleted here, since
        the hash itself lives on while the client keeps sending."""
        now, out, stale = time.time(), [], []
        key = self._key("flights", client)
        for flight_id, raw in self.redis.hgetall(key).items():
            record = json.loads(raw)
            if record.pop("_expires", 0) >= now:
                out.append(record)
            else:
                stale.append(flight_id)
        if stale:
            self.redis.hdel(key, *stale)
        return sorted(out, key=lambda r: r.get("started", 0))
