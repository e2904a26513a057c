"""Both job stores (SQLite; Redis against a real redis-server): durability, leases, priorities, idempotency,
cancel, retention. The Redis cases skip, saying why, where no redis-server binary is installed."""

from __future__ import annotations

import sqlite3
import threading
import time
import uuid

import pytest

from deployments.support.errors import InvalidInput, QueueFull
from graphs.jobs.redis_store import RedisJobStore
from graphs.jobs.sqlite_store import SQLiteJobStore
from graphs.jobs.store import ANONYMOUS, Job, new_job_id


@pytest.fixture(params=["sqlite", "redis"])
def store(request, tmp_path):
    if request.param == "sqlite":
        return SQLiteJobStore(tmp_path / "jobs.sqlite3", max_attempts=2)
    url = request.getfixturevalue("redis_url")
    return RedisJobStore(url, max_attempts=2, prefix=f"t{uuid.uuid4().hex[:8]}")


def reopen(store, tmp_path):
    """A second process's view of the same store (a restart)."""
    if isinstance(store, SQLiteJobStore):
        return SQLiteJobStore(tmp_path / "jobs.sqlite3")
    return RedisJobStore(_url(store), prefix=store.prefix)


def _url(store) -> str:
    kwargs = store.redis.connection_pool.connection_kwargs
    return f"redis://{kwargs['host']}:{kwargs['port']}/{kwargs.get('db', 0)}"


def job(**kw) -> Job:
    return Job(id=new_job_id(), type="text2img", request={"prompt": "x", **kw.pop("request", {})}, **kw)


def test_a_job_is_durable_before_its_id_is_returned(store, tmp_path):
    created, fresh = store.create(job())
    assert fresh and created.id.startswith("job_")
    reopened = reopen(store, tmp_path)  # a restart: a new process opens the same store
    assert reopened.get(created.id).status == "queued"
    assert reopened.get("job_0_missing") is None


def test_priorities_then_fifo(store):
    ids = {}
    for name, priority in [("low1", "low"), ("normal1", "normal"), ("high1", "high"), ("normal2", "normal"),
                           ("high2", "high")]:
        ids[store.create(job(priority=priority))[0].id] = name
    order = [ids[store.claim("w", 30).id] for _ in range(5)]
    assert order == ["high1", "high2", "normal1", "normal2", "low1"]
    assert store.claim("w", 30) is None


def test_a_jobs_controlnet_units_come_back_as_they_went_in(store):
    units = [{"model": "tiny-canny", "image": "iVBORw0KGgo=", "preprocessor": "canny", "scale": 0.5,
              "guidance_start": 0.0, "guidance_end": 1.0, "resize_mode": "crop", "processor_res": 512,
              "low_threshold": 100.0, "high_threshold": 200.0}]
    created, _ = store.create(job(request={"controlnets": units}))
    assert store.get(created.id).request["controlnets"] == units
    assert store.claim("w", 30).request["controlnets"] == units


def test_queue_limit_refuses_and_creates_nothing(store):
    for _ in range(3):
        store.create(job(), max_queued=3)
    with pytest.raises(QueueFull):
        store.create(job(), max_queued=3)
    assert store.list_jobs()[1] == 3


def test_idempotency(store):
    first, created = store.create(job(request={"seed": 1}), idempotency_key="k1")
    again, created_again = store.create(job(request={"seed": 1}), idempotency_key="k1")
    assert created and not created_again and again.id == first.id
    with pytest.raises(InvalidInput) as e:
        store.create(job(request={"seed": 2}), idempotency_key="k1")
    assert e.value.field == "Idempotency-Key"
    assert store.list_jobs()[1] == 1


def test_an_idempotency_key_whose_job_failed_retryably_makes_a_new_job(store):
    """A job that failed because its images could not be stored frees its key; any other outcome keeps it."""
    first, _ = store.create(job(request={"seed": 1}), idempotency_key="k1")
    store.claim("w", 30)
    store.finish(first.id, "w", "failed", error="GPU_OOM: out of memory")
    assert store.create(job(request={"seed": 1}), idempotency_key="k1")[0].id == first.id  # not this code
    stored, _ = store.create(job(request={"seed": 2}), idempotency_key="k2")
    store.claim("w", 30)
    store.finish(stored.id, "w", "failed", error="STORAGE_UNAVAILABLE: result storage unavailable")
    with pytest.raises(InvalidInput):
        store.create(job(request={"seed": 3}), idempotency_key="k2")  # still the same request or none
    again, created = store.create(job(request={"seed": 2}), idempotency_key="k2")
    assert created and again.id != stored.id
    assert store.create(job(request={"seed": 2}), idempotency_key="k2")[0].id == again.id  # the key is the new job's
    assert store.get(stored.id).status == "failed"
    time.sleep(0.05)
    assert {j.id for j in store.purge(0.01)} == {first.id, stored.id}
    assert store.create(job(request={"seed": 2}), idempotency_key="k2")[0].id == again.id  # purging the old kept it


def test_an_idempotency_key_is_its_senders(store):
    """The same key and body from another token is another job: nobody reads another's job by guessing a key."""
    alice, _ = store.create(job(request={"seed": 1}, owner="alice"), idempotency_key="k1")
    bob, created = store.create(job(request={"seed": 1}, owner="bob"), idempotency_key="k1")
    assert created and bob.id != alice.id and store.get(bob.id).owner == "bob"
    anyone, created = store.create(job(request={"seed": 2}), idempotency_key="k1")  # nor is a different body refused
    assert created and anyone.id not in (alice.id, bob.id)
    assert store.create(job(request={"seed": 1}, owner="alice"), idempotency_key="k1")[0].id == alice.id


def test_a_cancelled_job_whose_worker_died_ends_cancelled(store):
    """A cancel that reached a running job whose worker then died (or gave the job back) is its outcome: the job
    is neither queued again nor run again."""
    created, _ = store.create(job())
    store.claim("dead-worker", lease_s=0.05)
    store.cancel(created.id)
    time.sleep(0.1)
    assert store.claim("other", lease_s=30) is None
    cancelled = store.get(created.id)
    assert cancelled.status == "cancelled" and cancelled.attempts == 1 and cancelled.completed_at is not None
    assert [e.event for e in store.events(created.id)] == ["queued", "started", "cancelled"]
    time.sleep(0.05)
    assert [j.id for j in store.purge(older_than_s=0.01)] == [created.id]  # and it is purged like any finished job


def test_progress_of_an_attempt_that_lost_its_lease_is_not_logged(store):
    created, _ = store.create(job())
    store.claim("cut-off", lease_s=0.05)
    assert store.append_event(created.id, "progress", {"step": 1}, "cut-off") is not None
    time.sleep(0.1)
    store.claim("successor", lease_s=30)
    assert store.append_event(created.id, "progress", {"step": 2}, "cut-off") is None
    assert store.append_event(created.id, "progress", {"step": 1}, "successor") is not None


def test_the_purge_keeps_a_job_whose_files_could_not_go(store):
    kept, _ = store.create(job())
    gone, _ = store.create(job())
    for _ in range(2):
        store.claim("w", 30)
    for finished in (kept, gone):
        store.finish(finished.id, "w", "completed", {"images": []})
    time.sleep(0.05)

    def forget(j):
        if j.id == kept.id:
            raise OSError("the result store is down")

    assert [j.id for j in store.purge(0.01, forget)] == [gone.id]
    assert store.get(kept.id) is not None and store.get(gone.id) is None
    assert [j.id for j in store.purge(0.01, lambda j: None)] == [kept.id]  # the next round
    assert store.get(kept.id) is None


def test_expired_lease_is_claimed_again_then_failed_after_max_attempts(store):
    created, _ = store.create(job())
    first = store.claim("dead-worker", lease_s=0.05)
    assert first.id == created.id and first.attempts == 1
    time.sleep(0.1)
    second = store.claim("other-worker", lease_s=0.05)
    assert second.id == created.id and second.attempts == 2
    assert not store.finish(created.id, "dead-worker", "completed", {"images": []})  # the old owner lost it
    time.sleep(0.1)
    assert store.claim("third", lease_s=30) is None
    failed = store.get(created.id)
    assert failed.status == "failed" and "lease expired" in failed.error


def test_a_released_job_keeps_its_attempt_and_its_place(store):
    """A runner that stops gives its job back without spending an attempt: released as often as redeploys come
    (max_attempts is 2 here), it never fails, and it is taken again before the jobs queued after it."""
    created, _ = store.create(job())
    later, _ = store.create(job())
    for run in range(1, 5):
        taken = store.claim(f"stopping-{run}", 30)
        assert taken.id == created.id and taken.attempts == 1 and taken.runs == run
        assert store.release(created.id, f"stopping-{run}")
        assert store.get(created.id).status == "queued" and store.get(created.id).attempts == 0
    log = store.events(created.id)
    assert [e.event for e in log] == ["queued"] + ["started", "queued"] * 4
    assert [e.data["attempt"] for e in log if e.event == "started"] == [1, 1, 1, 1]
    assert all(e.data["requeued"] and e.data["position"] == 1 for e in log[2::2])
    last = store.claim("successor", 30)
    assert last.id == created.id and last.attempts == 1 and last.run_id == f"{created.id}.5"
    assert store.finish(created.id, "successor", "completed", {"images": []})
    assert store.claim("successor", 30).id == later.id


def test_only_the_lease_holder_releases_and_a_cancel_is_not_undone(store):
    created, _ = store.create(job())
    store.claim("holder", 30)
    assert not store.release(created.id, "someone-else")
    assert not store.release("job_0_missing", "holder")
    assert store.get(created.id).status == "processing"
    store.cancel(created.id)
    assert not store.release(created.id, "holder")  # its cancel came meanwhile: the runner publishes that
    assert store.finish(created.id, "holder", "cancelled", error="cancelled")
    assert not store.release(created.id, "holder")  # finished: nothing to give back
    assert [e.event for e in store.events(created.id)] == ["queued", "started", "cancelled"]


def test_a_lost_lease_after_releases_counts_only_the_attempts_spent(store):
    """Releases and lost leases mixed: only the lost ones count towards max_attempts (2 here)."""
    created, _ = store.create(job())
    store.claim("stopping", 30)
    assert store.release(created.id, "stopping")
    store.claim("dead", lease_s=0.05)
    time.sleep(0.1)
    again = store.claim("other", lease_s=0.05)
    assert again.id == created.id and again.attempts == 2 and again.runs == 3
    time.sleep(0.1)
    assert store.claim("third", 30) is None
    failed = store.get(created.id)
    assert failed.status == "failed" and failed.error.startswith("no result after 2 attempts")


# The jobs table as it was before releases: no runs column.
OLD_JOBS_TABLE = """
CREATE TABLE jobs (
    id TEXT PRIMARY KEY, type TEXT NOT NULL, status TEXT NOT NULL, priority INTEGER NOT NULL, seq INTEGER NOT NULL,
    progress REAL NOT NULL DEFAULT 0, created_at REAL NOT NULL, started_at REAL, completed_at REAL,
    request TEXT NOT NULL, result TEXT, error TEXT, attempts INTEGER NOT NULL DEFAULT 0, lease_owner TEXT,
    lease_expires REAL, idempotency_key TEXT UNIQUE, body_hash TEXT, owner TEXT, webhook_url TEXT,
    cancel_requested INTEGER NOT NULL DEFAULT 0
)
"""


def test_a_sqlite_file_from_before_releases_numbers_runs_past_its_attempts(tmp_path):
    """The runs column is added on open, and a requeued job's next run comes after the attempt it spent."""
    path = tmp_path / "jobs.sqlite3"
    with sqlite3.connect(path) as db:
        db.execute(OLD_JOBS_TABLE)
        db.execute("INSERT INTO jobs (id, type, status, priority, seq, created_at, request, attempts)"
                   " VALUES ('job_1_old', 'text2img', 'queued', 1, 1, ?, '{}', 1)", (time.time(),))
    db.close()
    taken = SQLiteJobStore(path, max_attempts=3).claim("w", 30)
    assert taken.id == "job_1_old" and taken.attempts == 2
    assert taken.runs == 2 and taken.run_id.endswith(".2")


def test_a_redis_record_from_before_releases_numbers_runs_past_its_attempts(redis_url):
    """A record without runs, requeued after a lost lease, runs as number 2, not 1 again."""
    store = RedisJobStore(redis_url, max_attempts=3, prefix=f"t{uuid.uuid4().hex[:8]}")
    created, _ = store.create(job())
    store.claim("dead", lease_s=0.05)
    store.redis.hdel(store._key("job", created.id), "runs")  # as an older version wrote it
    time.sleep(0.1)
    again = store.claim("other", 30)
    assert again.id == created.id and again.attempts == 2
    assert again.runs == 2 and again.run_id == f"{created.id}.2"


def test_a_released_job_goes_back_behind_higher_priorities(store):
    """Its place is its priority and age, as at creation: a normal job created meanwhile goes first."""
    low, _ = store.create(job(priority="low"))
    store.claim("stopping", 30)
    normal, _ = store.create(job(priority="normal"))
    assert store.release(low.id, "stopping")
    assert store.claim("w", 30).id == normal.id
    assert store.claim("w", 30).id == low.id


def test_a_released_job_is_no_longer_processing(store):
    created, _ = store.create(job())
    store.claim("stopping", 30)
    assert store.release(created.id, "stopping")
    assert store.list_jobs(status="processing") == ([], 0)
    assert [j.id for j in store.list_jobs(status="queued")[0]] == [created.id]
    assert store.stats()["counts"] == {"queued": 1}


def test_a_released_job_leaves_no_lease_to_expire(store):
    """Released under a short lease, then claimed after it would have run out: no second requeue."""
    created, _ = store.create(job())
    store.claim("stopping", lease_s=0.05)
    assert store.release(created.id, "stopping")
    if isinstance(store, RedisJobStore):
        assert store.redis.zcard(store._key("leases")) == 0
    time.sleep(0.1)
    again = store.claim("w", 30)
    assert again.id == created.id and again.attempts == 1
    assert names(store.events(created.id)) == ["queued", "started", "queued", "started"]


def test_result_is_published_once(store):
    created, _ = store.create(job())
    store.claim("w", 30)
    assert store.finish(created.id, "w", "completed", {"images": ["a.png"]})
    assert not store.finish(created.id, "w", "failed", error="late")
    done = store.get(created.id)
    assert done.status == "completed" and done.progress == 100 and done.result == {"images": ["a.png"]}


def test_cancel_queued_running_and_finished(store):
    queued, _ = store.create(job())
    assert store.cancel(queued.id).status == "cancelled"
    assert store.cancel(queued.id).status == "cancelled"  # twice is harmless
    running, _ = store.create(job())
    assert store.claim("w", 30).id == running.id
    assert store.heartbeat(running.id, "w", 30, progress=40.0)
    assert store.cancel(running.id).cancel_requested
    assert not store.heartbeat(running.id, "w", 30)  # the worker learns at its next heartbeat
    assert store.get(running.id).progress == 40.0
    assert store.claim("w", 30) is None  # the cancelled queued job never runs


def test_concurrent_claims_never_share_a_job(store):
    for _ in range(40):
        store.create(job())
    claimed, lock = [], threading.Lock()

    def worker(name):
        while (j := store.claim(name, 30)) is not None:
            with lock:
                claimed.append(j.id)

    threads = [threading.Thread(target=worker, args=(f"w{i}",)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(claimed) == len(set(claimed)) == 40


def test_stats_and_retention(store):
    a, _ = store.create(job())
    b, _ = store.create(job())
    store.claim("w", 30)
    store.finish(a.id, "w", "completed", {"images": []})
    stats = store.stats()
    assert stats["counts"] == {"completed": 1, "queued": 1}
    assert store.purge(older_than_s=3600) == []
    time.sleep(0.05)
    purged = store.purge(older_than_s=0.01)
    assert [j.id for j in purged] == [a.id]
    assert store.get(a.id) is None and store.get(b.id) is not None


def test_options_are_shared_by_every_view_of_the_store(store, tmp_path):
    other = reopen(store, tmp_path)  # a second ingress replica
    assert store.options() == {}
    store.set_option("sd_model_checkpoint", "sd_xl_base_1.0")
    other.set_option("samples_format", "webp")
    other.set_option("sd_model_checkpoint", "sd_xl_refiner_1.0")
    assert store.options() == other.options() == {"sd_model_checkpoint": "sd_xl_refiner_1.0",
                                                   "samples_format": "webp"}


def test_running_requests_are_seen_by_every_replica_and_expire(store, tmp_path):
    other = reopen(store, tmp_path)
    store.track("f1", "token:a", {"started": 1.0, "total_steps": 20, "request_ids": ["r1"]}, ttl_s=60)
    store.track("f2", "token:b", {"started": 2.0, "total_steps": 20, "request_ids": ["r2"]}, ttl_s=60)
    store.track("f1", "token:a", {"started": 1.0, "total_steps": 20, "request_ids": ["r1", "r3"]}, ttl_s=60)
    assert other.tracked("token:a") == [{"started": 1.0, "total_steps": 20, "request_ids": ["r1", "r3"]}]
    other.untrack("token:a", "f1")
    assert store.tracked("token:a") == [] and len(store.tracked("token:b")) == 1
    store.track("f3", "token:c", {"started": 3.0, "total_steps": 1, "request_ids": []}, ttl_s=0.05)
    time.sleep(0.1)
    assert other.tracked("token:c") == []  # an ingress that died leaves nothing behind for long
    if isinstance(store, RedisJobStore):  # not even in the client's hash, which lives on while the client sends
        store.track("f4", "token:c", {"started": 4.0, "total_steps": 1, "request_ids": []}, ttl_s=60)
        other.tracked("token:c")
        assert store.redis.hkeys(store._key("flights", "token:c")) == ["f4"]


# --- the per-job event log (GET /jobs/{id}/events reads it) ---------------------------------------------------


def names(events) -> list[str]:
    return [e.event for e in events]


def test_events_follow_a_job_and_every_replica_reads_them(store, tmp_path):
    first, _ = store.create(job())
    second, _ = store.create(job())
    urgent, _ = store.create(job(priority="high"))
    assert [store.events(j.id)[0].data["position"] for j in (first, second, urgent)] == [1, 2, 1]
    assert store.claim("w", 30).id == urgent.id
    assert store.append_event(urgent.id, "progress", {"step": 1, "total": 4, "eta_s": 0.3}) == 3
    assert store.append_event(urgent.id, "progress", {"step": 2, "total": 4, "eta_s": 0.2}) == 4
    assert store.finish(urgent.id, "w", "completed", {"images": ["k"]}, event={"images": ["image_0"], "seed": 9})
    events = reopen(store, tmp_path).events(urgent.id)  # another ingress replica
    assert names(events) == ["queued", "started", "progress", "progress", "completed"]
    assert [e.id for e in events] == [1, 2, 3, 4, 5]
    assert all(e.data["job_id"] == urgent.id for e in events)
    assert [e.data["status"] for e in events] == ["queued", "processing", "processing", "processing", "completed"]
    assert events[1].data["attempt"] == 1 and events[3].data["step"] == 2
    assert events[-1].terminal and events[-1].data["seed"] == 9 and events[-1].data["images"] == ["image_0"]
    assert [e.id for e in store.events(urgent.id, after=3)] == [4, 5]
    assert store.events(urgent.id, after=5) == [] and store.events("job_0_missing") == []
    # A late progress report (the worker's last heartbeat racing the finish) never follows the terminal event.
    assert store.append_event(urgent.id, "progress", {"step": 4, "total": 4}) is None
    assert store.append_event("job_0_missing", "progress", {"step": 1}) is None
    assert names(store.events(urgent.id)) == names(events)


def test_cancel_failure_and_a_lost_worker_end_the_log(store):
    queued, _ = store.create(job())
    store.cancel(queued.id)
    assert names(store.events(queued.id)) == ["queued", "cancelled"]
    store.cancel(queued.id)  # cancelling twice writes nothing more
    assert names(store.events(queued.id)) == ["queued", "cancelled"]

    failing, _ = store.create(job())
    store.claim("w", 30)
    store.finish(failing.id, "w", "failed", error="GPU_OOM: out of memory",
                 event={"code": "GPU_OOM", "message": "out of memory"})
    last = store.events(failing.id)[-1]
    assert last.event == "failed" and last.data["code"] == "GPU_OOM" and last.data["status"] == "failed"

    lost, _ = store.create(job())
    store.claim("dead", lease_s=0.05)
    time.sleep(0.1)
    store.claim("other", lease_s=0.05)  # requeued, then claimed again at once
    time.sleep(0.1)
    assert store.claim("third", 30) is None  # max_attempts=2: now failed
    events = store.events(lost.id)
    assert names(events) == ["queued", "started", "queued", "started", "failed"]
    assert events[2].data["requeued"] and events[3].data["attempt"] == 2
    assert events[4].data["code"] == "WORKER_LOST" and "lease expired" in events[4].data["message"]


def test_the_event_log_is_bounded_and_goes_with_the_job(store):
    store.events_kept = 8
    created, _ = store.create(job())
    store.claim("w", 30)
    for step in range(1, 21):
        store.append_event(created.id, "progress", {"step": step, "total": 20})
    store.finish(created.id, "w", "cancelled", error="cancelled", event={})
    events = store.events(created.id)
    assert [e.id for e in events] == list(range(16, 24))  # queued, started, 20 progress, cancelled: newest 8
    assert events[0].data["step"] == 14 and events[-1].event == "cancelled"
    assert [e.id for e in store.events(created.id, after=3, limit=3)] == [16, 17, 18]
    time.sleep(0.05)
    assert [j.id for j in store.purge(older_than_s=0.01)] == [created.id]
    assert store.events(created.id) == []


def test_redis_leases_run_on_the_servers_clock(redis_url, monkeypatch):
    """A node whose clock runs ahead neither takes a live job over nor ends its lease early."""
    store = RedisJobStore(redis_url, prefix=f"t{uuid.uuid4().hex[:8]}")
    created, _ = store.create(job())
    assert store.claim("a", lease_s=30).id == created.id
    real = time.time
    monkeypatch.setattr(time, "time", lambda: real() + 45)  # this node's clock, 45 s ahead of the server's
    assert store.claim("b", lease_s=30) is None
    assert store.heartbeat(created.id, "a", 30) and store.get(created.id).status == "processing"


def test_a_damaged_redis_record_blocks_no_claim(redis_url):
    """A job whose record vanished (memory eviction, a manual DEL) is dropped from the indexes; the claims behind it
    go on."""
    store = RedisJobStore(redis_url, prefix=f"t{uuid.uuid4().hex[:8]}")
    leased, _ = store.create(job())
    store.claim("dead", lease_s=0.05)
    queued, _ = store.create(job())
    behind, _ = store.create(job())
    store.redis.delete(store._key("job", leased.id), store._key("job", queued.id))
    time.sleep(0.1)
    assert store.claim("w", 30).id == behind.id
    assert store.claim("w", 30) is None
    assert store.redis.zcard(store._key("leases")) == 1  # only the job claimed just now


# --- the webhooks owed (the runner delivers them) -----------------------------------------------------------


def test_every_terminal_change_owes_its_webhook_once(store):
    """Published, cancelled while queued, or failed or cancelled when the worker was lost: each owes one delivery,
    written with the change; a job without a webhookUrl owes none."""
    hooked = {"webhook_url": "https://hooks.example/x"}
    published, _ = store.create(job(**hooked))
    store.claim("w", 30)
    store.finish(published.id, "w", "completed", {"images": [], "seed": 3})
    queued, _ = store.create(job(**hooked))
    store.cancel(queued.id)
    lost, _ = store.create(job(**hooked))
    quiet, _ = store.create(job())
    for _ in range(2):  # max_attempts=2: lost twice, then failed by the next claim
        store.claim("dead", lease_s=0.01)
        time.sleep(0.05)
    store.claim("w", 30)
    store.finish(quiet.id, "w", "completed", {"images": []})
    owed = {}
    while (taken := store.take_delivery(lease_s=30)) is not None:
        owed[taken[0].id] = (taken[0].status, taken[1])
    assert owed == {published.id: ("completed", 0), queued.id: ("cancelled", 0), lost.id: ("failed", 0)}


def test_a_delivery_is_leased_retried_and_settled(store):
    created, _ = store.create(job(webhook_url="https://hooks.example/x"))
    store.claim("w", 30)
    store.finish(created.id, "w", "failed", error="boom")
    taken, number = store.take_delivery(lease_s=0.05)
    assert taken.id == created.id and taken.error == "boom" and number == 0
    assert store.take_delivery(lease_s=30) is None  # leased to whoever took it
    time.sleep(0.1)
    taken, number = store.take_delivery(lease_s=30)  # that runner died mid-attempt: due again
    assert number == 1
    store.settle_delivery(created.id, retry_in=0.5)  # failed: due after its backoff
    assert store.take_delivery(lease_s=30) is None
    time.sleep(0.6)
    assert store.take_delivery(lease_s=30)[1] == 2
    store.settle_delivery(created.id, None)  # delivered
    time.sleep(0.05)
    assert store.take_delivery(lease_s=30) is None
    assert [j.id for j in store.purge(0.01)] == [created.id]


def test_an_idempotency_key_whose_job_vanished_is_free_again(redis_url):
    store = RedisJobStore(redis_url, prefix=f"t{uuid.uuid4().hex[:8]}")
    first, _ = store.create(job(request={"seed": 1}), idempotency_key="k")
    store.redis.delete(store._key("job", first.id))  # evicted, its key left behind
    again, created = store.create(job(request={"seed": 2}), idempotency_key="k")
    assert created and again.id != first.id  # not a 422 for a body that differs from a job nobody has


def ids(listing: tuple[list[Job], int]) -> tuple[list[str], int]:
    return [j.id for j in listing[0]], listing[1]


def test_listings_by_owner_page_through_that_owners_jobs_alone(store):
    mine = [store.create(job(owner="me"))[0] for _ in range(5)]
    theirs = store.create(job(owner="them"))[0]
    store.claim("w", 30)  # the oldest of mine
    page, total = store.list_jobs(owner="me", offset=1, limit=2)
    assert total == 5 and [j.id for j in page] == [mine[3].id, mine[2].id]  # newest first
    queued, total = store.list_jobs(status="queued", owner="me", limit=10)
    assert total == 4 and [j.id for j in queued] == [j.id for j in reversed(mine[1:])]
    assert [j.id for j in store.list_jobs(owner="them")[0]] == [theirs.id]
    assert store.list_jobs(status="processing", owner="them") == ([], 0)
    nobodys = store.create(job())[0]  # made without a token: listed to the tokenless alone
    assert ids(store.list_jobs(owner=ANONYMOUS)) == ([nobodys.id], 1)
    assert ids(store.list_jobs(status="queued", owner=ANONYMOUS)) == ([nobodys.id], 1)
    assert store.list_jobs()[1] == 7  # None: everyone's


@pytest.mark.parametrize("version", ["none", "tokens only"])
def test_a_redis_store_from_before_the_owner_index_is_indexed_once(redis_url, version):
    store = RedisJobStore(redis_url, prefix=f"t{uuid.uuid4().hex[:8]}")
    old = [store.create(job(owner="me"))[0] for _ in range(3)]
    nobodys = store.create(job())[0]
    # as an older version left them: no index at all, or one of the tokens' jobs alone
    store.redis.delete(store._key("owner", ANONYMOUS), store._key("owners-indexed:2"))
    if version == "none":
        store.redis.delete(store._key("owner", "me"))
    else:
        store.redis.set(store._key("owners-indexed"), "1")
    fresh = RedisJobStore(_url(store), prefix=store.prefix)
    page, total = fresh.list_jobs(owner="me")
    assert total == 3 and [j.id for j in page] == [j.id for j in reversed(old)]
    assert ids(fresh.list_jobs(owner=ANONYMOUS)) == ([nobodys.id], 1)
    assert not fresh.redis.exists(fresh._key("owners-indexed"))
    time.sleep(0.01)
    for created in [*old, nobodys]:
        fresh.cancel(created.id)
    time.sleep(0.05)
    fresh.purge(0.01)
    assert fresh.list_jobs(owner="me") == ([], 0) and not fresh.redis.exists(fresh._key("owner", "me"))
    assert not fresh.redis.exists(fresh._key("owner", ANONYMOUS))
