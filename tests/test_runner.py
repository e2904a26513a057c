"""The job runner without Ray: its worker loops drive the real tiny SDXLBase through in-process handles.

Covers what the shared cluster's settings cannot: JOB_TIMEOUT (the job fails and the denoising stops), results
on S3 (published whole before the job completes; an upload that fails fails the job, publishing nothing), and the
event log the runner writes and the event stream reads (previews, heartbeats on an idle stream).
"""

from __future__ import annotations

import asyncio
import base64
import inspect
import io
import json
import logging
import os
import re
import time
import uuid

import pytest
from PIL import Image

from deployments.support.errors import StorageUnavailable
from deployments.support.generation import encoded
from deployments.support.reporting import Reporter
from graphs.board import Board
from graphs.jobs import events
from graphs.jobs.runner import JobRunner
from graphs.jobs.store import Job, new_job_id
from tests.netfaults import TruncatingProxy

pytestmark = pytest.mark.anyio


class LocalHandle:
    """``handle.method.remote(*args)`` on a plain object: awaits awaitable arguments (chained responses)."""

    def __init__(self, target) -> None:
        self.target = target

    def __getattr__(self, name: str):
        method = getattr(self.target, name)

        class Method:
            @staticmethod
            def remote(*args):
                async def run():
                    resolved = [await a if inspect.isawaitable(a) else a for a in args]
                    if inspect.iscoroutinefunction(method):
                        return await method(*resolved)
                    return await asyncio.to_thread(method, *resolved)

                return asyncio.ensure_future(run())

        return Method()


@pytest.fixture
def runner_env(monkeypatch, tmp_path):
    for name, value in {"JOBS_DATA_DIR": str(tmp_path), "MAX_CONCURRENT_JOBS": "1", "JOB_TIMEOUT": "1500",
                        "JOB_LEASE_SECONDS": "3", "JOB_POLL_SECONDS": "0.05"}.items():
        monkeypatch.setenv(name, value)
    return monkeypatch


class BaseShell:
    """The calls SDXLBase's Serve shell exposes, on the session's in-process generator. As the shell does,
    ``generate`` answers with files when given the plan's ``Encoding``, and turns its own cancellation (the
    plan's flight cancelling the call) into the generator's per-step cancel flag."""

    def __init__(self, base, board=None, on_progress=None) -> None:
        reporter = Reporter(board, "sdxl_base", base.cancellation)

        async def generate(request, request_id=None, encode=None):
            request_id = request_id or uuid.uuid4().hex
            reporter.start()
            try:
                result = await asyncio.to_thread(base.generate, request, request_id, on_progress)
            except asyncio.CancelledError:
                base.cancellation.cancel(request_id)
                raise
            return result if encode is None else result.encode(encode)

        self.generate = generate
        self.cancel = base.cancellation.cancel
        self.progress = base.cancellation.progress
        self.preview = base.cancellation.preview


def start_runner(base, upscaler):
    runner_class = JobRunner.func_or_class
    return runner_class(LocalHandle(BaseShell(base)), None, LocalHandle(upscaler), None, None)


async def finished(runner, job_id: str, timeout: float = 60) -> Job:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job = runner.store.get(job_id)
        if job is not None and job.finished:
            return job
        await asyncio.sleep(0.05)
    raise AssertionError(f"job {job_id} did not finish: {runner.store.get(job_id)}")


def stop(runner) -> None:
    for loop in runner._loops:
        loop.cancel()


async def run_once(runner) -> tuple[Job, list]:
    """One small text-to-image job through ``runner``, which is stopped after: the job as it ended, and its events."""
    try:
        job = Job(id=new_job_id(), type="text2img", request={"prompt": "x", "width": 64, "height": 64, "steps": 2})
        runner.store.create(job)
        return await finished(runner, job.id), runner.store.events(job.id)
    finally:
        stop(runner)


def job_log(caplog, job_id: str) -> list[tuple[str, str]]:
    """The runner's lines about one job: (level, message)."""
    return [(r.levelname, r.getMessage()) for r in caplog.records
            if r.name == "graphs.jobs.runner" and re.match(f"job {job_id}[ :]", r.getMessage())]


async def test_job_timeout_fails_the_job_and_stops_the_denoising(base, upscaler, runner_env, caplog):
    caplog.set_level(logging.INFO, logger="graphs.jobs.runner")
    runner = start_runner(base, upscaler)
    try:
        job = Job(id=new_job_id(), type="text2img", request={"prompt": "slow lighthouse", "width": 512,
                                                                "height": 512, "steps": 150})
        runner.store.create(job)
        done = await finished(runner, job.id)
        assert done.status == "failed" and "JOB_TIMEOUT (1500 ms)" in (done.error or "")
        assert done.started_at is not None and done.completed_at is not None
        assert 1.5 <= done.completed_at - done.started_at < 5
        await asyncio.sleep(0.5)
        assert base.cancellation.progress(job.id) is None  # the denoising loop has stopped, not just the waiting
        assert not (runner.settings.jobs_data_dir / "results" / job.id).exists()
    finally:
        stop(runner)
    # Followed by its id from claim to end; the timeout a warning of its own. Never its prompt.
    lines = job_log(caplog, job.id)
    assert len(lines) == 3, caplog.text
    claimed, timed_out, ended = lines
    assert claimed[0] == "INFO" and re.search(r"claimed by runner-\w+/0: text2img, run 1, attempt 1 of 3$", claimed[1])
    assert timed_out[0] == "WARNING" and f"job {job.id}: exceeded JOB_TIMEOUT (1500 ms) after 1." in timed_out[1]
    assert ended[0] == "WARNING" and re.search(r"failed in 1\.\d s \(run 1, attempt 1\): JOB_TIMEOUT$", ended[1])
    assert "lighthouse" not in caplog.text


@pytest.fixture
def s3_results(s3_server, runner_env):
    import boto3

    client = boto3.client("s3", endpoint_url=s3_server, region_name="us-east-1")
    bucket = f"jobs-{os.urandom(4).hex()}"
    client.create_bucket(Bucket=bucket)
    host, port = s3_server.removeprefix("http://").split(":")
    proxy = TruncatingProxy((host, int(port)))
    runner_env.setenv("JOB_TIMEOUT", "600000")  # a busy machine must not turn the upload checks into timeouts
    runner_env.setenv("JOB_SAVE_BACKOFF_SECONDS", "0.05")
    runner_env.setenv("JOB_RESULTS_URL", f"s3://{bucket}/results")
    runner_env.setenv("AWS_ENDPOINT_URL", proxy.url)
    yield client, bucket, proxy
    proxy.close()


async def test_results_on_s3_are_whole_before_completed_and_a_failed_upload_fails_the_job(base, upscaler,
                                                                                       s3_results):
    client, bucket, proxy = s3_results
    runner = start_runner(base, upscaler)
    small = {"prompt": "a lighthouse", "width": 64, "height": 64, "steps": 2, "seed": 5}
    try:
        job = Job(id=new_job_id(), type="text2img", request=small)
        runner.store.create(job)
        done = await finished(runner, job.id)
        assert done.status == "completed" and done.result is not None
        key = done.result["images"][0]
        stored = client.get_object(Bucket=bucket, Key=f"results/{key}")["Body"].read()
        assert stored.startswith(b"\x89PNG") and runner.results.load(key) == stored

        proxy.inject("cut_upload", upload_budget=2_000)
        job = Job(id=new_job_id(), type="text2img", request=small)
        runner.store.create(job)
        done = await finished(runner, job.id)
        assert done.status == "failed" and done.error == "STORAGE_UNAVAILABLE: result storage unavailable"
        assert done.attempts == 3  # each attempt retried its upload, then gave the job back
        listing = client.list_objects_v2(Bucket=bucket, Prefix=f"results/{job.id}/")
        assert listing.get("KeyCount", 0) == 0
    finally:
        stop(runner)


class RefusedSaves:
    """The runner's result store with its first ``refusals`` saves refused, as an unreachable store refuses them."""

    def __init__(self, store, refusals: int) -> None:
        self.store, self.refusals, self.saves = store, refusals, 0

    def save(self, *args):
        self.saves += 1
        if self.refusals > 0:
            self.refusals -= 1
            raise StorageUnavailable("result storage unavailable")
        return self.store.save(*args)

    def __getattr__(self, name: str):
        return getattr(self.store, name)


@pytest.mark.parametrize("refusals,outcome,attempts", [(3, "completed", 1), (4, "completed", 2), (99, "failed", 3)])
async def test_a_store_that_refuses_saves_costs_retries_then_attempts_not_the_job(base, upscaler, runner_env,
                                                                                  refusals, outcome, attempts):
    """JOB_SAVE_ATTEMPTS is 4 and JOB_MAX_ATTEMPTS 3: three refusals are retried in place, a fourth gives the job
    back to the queue, and a store down through every attempt fails the job with STORAGE_UNAVAILABLE."""
    runner_env.setenv("JOB_TIMEOUT", "600000")
    runner_env.setenv("JOB_SAVE_BACKOFF_SECONDS", "0.01")
    runner = start_runner(base, upscaler)
    runner.results = flaky = RefusedSaves(runner.results, refusals)
    done, log = await run_once(runner)
    assert done.status == outcome and done.attempts == attempts, done.error
    assert flaky.saves == min(refusals + 1, 4 * attempts)
    assert sum(1 for e in log if e.event == "queued" and e.data.get("requeued")) == attempts - 1
    if outcome == "failed":
        assert done.error == "STORAGE_UNAVAILABLE: result storage unavailable"
        assert log[-1].data["code"] == "STORAGE_UNAVAILABLE"
    else:
        assert runner.results.load(done.result["images"][0]).startswith(b"\x89PNG")


def saving_runner(monkeypatch, tmp_path, refusals: int, **settings) -> tuple[JobRunner, RefusedSaves, list[float]]:
    """A runner with no worker loops whose result store refuses its first ``refusals`` saves; the pauses between
    tries are recorded, not slept (on this test's event loop only: Serve's sleep as ever)."""
    from deployments.support.settings import Settings
    from graphs.jobs import runner as runner_module
    from graphs.jobs.results import open_results

    runner = JobRunner.func_or_class.__new__(JobRunner.func_or_class)
    runner.settings = Settings(JOBS_DATA_DIR=str(tmp_path), **settings)
    runner.results = flaky = RefusedSaves(open_results(runner.settings), refusals)
    pauses: list[float] = []
    real_sleep, mine = asyncio.sleep, asyncio.get_running_loop()

    async def sleep(seconds):
        if asyncio.get_running_loop() is not mine:
            return await real_sleep(seconds)
        pauses.append(seconds)
        return await real_sleep(0)

    monkeypatch.setattr(runner_module.asyncio, "sleep", sleep)
    return runner, flaky, pauses


async def test_save_retries_wait_longer_each_time(monkeypatch, tmp_path):
    """The waits double: a store back after a short outage is tried again soon, one down for longer is not
    hammered."""
    runner, flaky, pauses = saving_runner(monkeypatch, tmp_path, 3, JOB_LEASE_SECONDS=30, JOB_SAVE_ATTEMPTS=4,
                                          JOB_SAVE_BACKOFF_SECONDS=0.5)
    key = await runner._save(Job(id=new_job_id(), type="text2img", request={}), "image_0", b"png")
    assert flaky.saves == 4 and pauses == [0.5, 1, 2] and runner.results.load(key) == b"png"


async def test_save_retries_stop_at_the_lease(monkeypatch, tmp_path):
    """A retry that would start past the job's lease is not made: by then another runner may hold the job, so this
    one gives it back at once (StorageUnavailable) instead of waiting out JOB_SAVE_ATTEMPTS."""
    runner, flaky, pauses = saving_runner(monkeypatch, tmp_path, 99, JOB_LEASE_SECONDS=3, JOB_SAVE_ATTEMPTS=4,
                                          JOB_SAVE_BACKOFF_SECONDS=5)
    with pytest.raises(StorageUnavailable):
        await runner._save(Job(id=new_job_id(), type="text2img", request={}), "image_0", b"png")
    assert flaky.saves == 1 and pauses == []


class DyingBaseShell(BaseShell):
    """The first ``deaths`` generate calls fail as a call to a replica on a node that died does."""

    def __init__(self, base, deaths: int) -> None:
        super().__init__(base)
        self.deaths = deaths
        alive = self.generate

        async def generate(*args, **kwargs):
            from ray.exceptions import ActorDiedError

            if self.deaths > 0:
                self.deaths -= 1
                raise ActorDiedError()
            return await alive(*args, **kwargs)

        self.generate = generate


@pytest.mark.parametrize("deaths,outcome", [(1, "completed"), (3, "failed")])
async def test_a_job_whose_replica_died_goes_back_to_the_queue(base, upscaler, runner_env, deaths, outcome):
    """JOB_MAX_ATTEMPTS is 3: one lost replica costs an attempt, three fail the job as a lost worker's would."""
    runner_env.setenv("JOB_TIMEOUT", "600000")
    runner = JobRunner.func_or_class(LocalHandle(DyingBaseShell(base, deaths)), None, LocalHandle(upscaler), None,
                                     None)
    done, log = await run_once(runner)
    assert done.status == outcome, done.error
    started = [e.data["attempt"] for e in log if e.event == "started"]
    assert started == list(range(1, min(deaths + 1, 3) + 1))
    assert sum(1 for e in log if e.event == "queued" and e.data.get("requeued")) == min(deaths, 2)
    assert [e.event for e in log if e.terminal] == [outcome]
    if outcome == "failed":
        assert log[-1].data["code"] == "WORKER_LOST"


class PacedBaseShell(BaseShell):
    """At least 20 ms a step, so that the runner's progress polls (every 0.5 s) see several steps."""

    def __init__(self, base, board) -> None:
        super().__init__(base, board, on_progress=lambda step, total: time.sleep(0.02))


class SafetyShell:
    """SafetyChecker's Serve shell on the tiny checker: screen, then encode as the plan's last stage."""

    def __init__(self, checker) -> None:
        self.checker = checker

    async def check(self, source, encode=None):
        return await encoded(await asyncio.to_thread(self.checker.check, source), encode)

    async def fingerprint(self):
        return self.checker.fingerprint()


@pytest.mark.parametrize("nsfw_filter", [False, True], ids=["filter-off", "filter-on"])
async def test_the_runner_logs_progress_previews_and_the_outcome(base, upscaler, tiny, runner_env, nsfw_filter,
                                                                 caplog):
    caplog.set_level(logging.INFO, logger="graphs.jobs.runner")
    runner_env.setenv("JOB_TIMEOUT", "600000")
    board = LocalHandle(Board())  # the replica reports progress and previews there; the runner reads them there
    safety = None
    if nsfw_filter:
        from deployments.safety_checker import ContentFilter
        from deployments.support.config import SafetyCheckerConfig

        safety = LocalHandle(SafetyShell(ContentFilter(SafetyCheckerConfig(model=str(tiny / "safety-checker")))))
    runner = JobRunner.func_or_class(LocalHandle(PacedBaseShell(base, board)), None, LocalHandle(upscaler), None,
                                     None, board, safety=safety, safety_enabled=nsfw_filter)
    try:
        job = Job(id=new_job_id(), type="text2img", request={"prompt": "paced", "width": 64, "height": 64,
                                                                "steps": 100, "seed": 3, "preview_every": 10})
        runner.store.create(job)
        done = await finished(runner, job.id, timeout=600)
        assert done.status == "completed"
        log = runner.store.events(job.id, limit=1000)
    finally:
        stop(runner)
    names = [e.event for e in log]
    assert names[:2] == ["queued", "started"] and names[-1] == "completed" and "cancelled" not in names
    ended = [(level, re.sub(r"\d+\.\d s", "N s", line)) for level, line in job_log(caplog, job.id)][1:]
    assert ended == [("INFO", f"job {job.id} completed in N s (run 1, attempt 1)")]
    assert [e.id for e in log] == sorted({e.id for e in log})
    steps = [e.data["step"] for e in log if e.event == "progress"]
    assert len(steps) >= 2 and steps == sorted(steps) and all(0 < s <= 100 for s in steps)
    assert all(e.data["total"] == 100 and e.data["eta_s"] >= 0 for e in log if e.event == "progress")
    previews = [e for e in log if e.event == "preview"]
    if nsfw_filter:  # a preview is the unscreened generation: none while the filter is on, though the job asked
        assert previews == [] and done.result["nsfw"] == [False]
        return
    previewed = [p.data["step"] for p in previews]
    assert previewed and all(later - earlier >= 10 for earlier, later in zip(previewed, previewed[1:], strict=False))
    image = Image.open(io.BytesIO(base64.b64decode(previews[0].data["image"].split(",", 1)[1])))
    assert image.format == "JPEG" and image.size == (8, 8)  # the latents of a 64 x 64 image
    completed = log[-1].data
    assert completed["images"] == ["image_0"] and completed["seed"] == 3
    assert (completed["width"], completed["height"]) == (64, 64)
    assert completed["links"] == {"job": f"/jobs/{job.id}", "result": f"/jobs/{job.id}/result",
                                  "images": {"image_0": f"/jobs/{job.id}/images/1-image_0.png"}}


def frames(chunks: list[str]) -> list[dict]:
    """Parse server-sent-event frames (comments kept as {"comment": ...})."""
    out = []
    for chunk in chunks:
        fields: dict = {}
        for line in chunk.strip("\n").split("\n"):
            key, _, value = line.partition(": ")
            fields["comment" if key == "" else key] = value
        out.append(fields)
    return out


async def test_an_idle_stream_pings_then_ends_at_the_terminal_event(tmp_path):
    from graphs.jobs.sqlite_store import SQLiteJobStore

    store = SQLiteJobStore(tmp_path / "jobs.sqlite3")
    job = Job(id=new_job_id(), type="text2img", request={"prompt": "x"})
    store.create(job)
    chunks: list[str] = []

    async def read():
        async for chunk in events.stream(store, job.id, 0, poll_s=0.02, heartbeat_s=0.1):
            chunks.append(chunk)

    reader = asyncio.create_task(read())
    await asyncio.sleep(0.35)  # queued, nobody works: only pings
    store.claim("w", 30)
    await asyncio.to_thread(store.append_event, job.id, "progress", {"step": 1, "total": 2})
    store.finish(job.id, "w", "completed", {"images": []}, event={"images": []})
    await asyncio.wait_for(reader, 5)
    parsed = frames(chunks)
    assert parsed[0] == {"retry": str(events.RECONNECT_MS)}
    assert [f["event"] for f in parsed if "event" in f] == ["queued", "started", "progress", "completed"]
    assert [f["id"] for f in parsed if "id" in f] == ["1", "2", "3", "4"]
    assert sum(f == {"comment": "ping"} for f in parsed) >= 2
    assert json.loads(parsed[-1]["data"])["status"] == "completed"

    resumed = [c async for c in events.stream(store, job.id, 2, poll_s=0.02, heartbeat_s=10)]
    assert [f.get("id") for f in frames(resumed)[1:]] == ["3", "4"]  # after Last-Event-ID 2, nothing repeated
    assert frames([c async for c in events.stream(store, job.id, 4, 0.02, 10)]) == [{"retry": "2000"}]
    assert frames([c async for c in events.stream(store, "job_0_gone", 0, 0.02, 10)]) == [{"retry": "2000"}]


async def test_watchers_past_the_limit_are_refused_until_one_ends(tmp_path):
    """Each open stream holds one of the ingress replica's request slots: past the limit a watcher is refused (503,
    it polls) rather than queue every other request behind the streams. A place is taken on admission, so a burst
    cannot pass the limit before the first frames go out."""
    import gc

    from deployments.support.errors import StreamsBusy
    from graphs.jobs.sqlite_store import SQLiteJobStore

    store = SQLiteJobStore(tmp_path / "jobs.sqlite3")
    job = Job(id=new_job_id(), type="text2img", request={"prompt": "x"})
    store.create(job)
    streams = events.Streams(limit=2)
    bodies = [events.response(store, job.id, 0, 0.02, 10, streams, streams.admit()).body_iterator
              for _ in range(2)]  # admitted, not started yet
    with pytest.raises(StreamsBusy) as refused:
        streams.admit()
    assert refused.value.code == "STREAMS_BUSY" and refused.value.details == {"limit": 2}
    submitted = events.response(store, job.id, 0, 0.02, 10, streams)  # a submit's own stream: always served
    assert streams.open == 3
    del submitted  # a response never sent gives its place back when collected
    gc.collect()
    assert streams.open == 2
    await bodies[0].__anext__()  # the first frame: open
    await bodies.pop().aclose()  # its client went away before it started
    await bodies.pop().aclose()  # ... and after
    assert streams.open == 0
    streams.admit()
    events.Streams(limit=0).admit()  # 0: no limit


def test_a_batch_sizes_completed_event_carries_each_sizes_flag_and_link():
    result = {"images": {"avatar": {"key": "job_1/1-avatar.png", "nsfw": True},
                         "hero": {"key": "job_1/1-hero.png", "nsfw": False}}, "seed": 3, "bases_generated": 1}
    completed = events.completed_data("job_1", result)
    assert completed["nsfw"] == [True, False]
    assert completed["links"]["images"] == {"avatar": "/jobs/job_1/images/1-avatar.png",
                                            "hero": "/jobs/job_1/images/1-hero.png"}
    unfiltered = {"images": {"avatar": {"key": "job_1/1-avatar.png", "nsfw": None}}}
    assert "nsfw" not in events.completed_data("job_1", unfiltered)  # the filter is off
    assert events.completed_data("job_1", {"images": ["job_1/1-image_0.png"], "nsfw": [False]})["nsfw"] == [False]


class FlakyBoard(Board):
    """A progress board that fails its first reads, as one restarting (or on a lost node) does."""

    def __init__(self, failures: int) -> None:
        super().__init__()
        self.failures = failures

    def progress(self, request_id):
        if self.failures > 0:
            self.failures -= 1
            raise RuntimeError("board unavailable")
        return super().progress(request_id)


async def test_a_failing_board_or_store_costs_a_round_not_the_lease_nor_the_worker(base, upscaler, runner_env):
    """The lease keeper outlives a board that fails (its heartbeats go on, so no other runner claims the job while
    it runs), and a worker outlives a store that fails to publish (the job runs again once its lease is out)."""
    runner_env.setenv("JOB_TIMEOUT", "600000")
    board = FlakyBoard(failures=4)
    runner = JobRunner.func_or_class(LocalHandle(PacedBaseShell(base, LocalHandle(board))), None,
                                     LocalHandle(upscaler), None, None, LocalHandle(board))
    publish, failed_publishes = runner.store.finish, []

    def finish_failing_once(*args, **kwargs):
        if not failed_publishes:
            failed_publishes.append(args[0])
            raise OSError("disk full")
        return publish(*args, **kwargs)

    runner.store.finish = finish_failing_once
    try:
        job = Job(id=new_job_id(), type="text2img", request={"prompt": "paced", "width": 64, "height": 64,
                                                                "steps": 150, "seed": 5, "preview_every": 0})
        runner.store.create(job)
        done = await finished(runner, job.id, timeout=120)  # a worker that died would leave it unfinished
        await runner.check_health()  # every worker loop still runs
        log = runner.store.events(job.id, limit=1000)
    finally:
        stop(runner)
    assert board.failures == 0 and failed_publishes == [job.id]
    assert done.status == "completed" and done.attempts == 2  # the run whose result was not published, and one more
    assert [e.event for e in log].count("started") == 2
    assert any(e.event == "progress" for e in log)  # read once the board answered again


async def test_each_attempt_runs_under_its_own_request_id(base, upscaler, runner_env):
    """A replica keeps the cancel flag of a request cancelled while still queued there (for CANCEL_TTL_S). A job
    given back after a lost replica runs again at once, so its next attempt must not carry the same id, or that
    flag would cancel it at its first step."""
    runner_env.setenv("JOB_TIMEOUT", "600000")
    shell = BaseShell(base)
    seen: list[str] = []
    generate = shell.generate

    async def recording(request, request_id=None, encode=None):
        seen.append(request_id)
        return await generate(request, request_id, encode)

    shell.generate = recording
    runner = JobRunner.func_or_class(LocalHandle(shell), None, LocalHandle(upscaler), None, None)
    job = Job(id=new_job_id(), type="text2img", request={"prompt": "again", "width": 64, "height": 64, "steps": 2,
                                                         "seed": 9})
    for stale in (job.id, f"{job.id}.0"):  # flags an earlier attempt (or the old id scheme) left behind
        base.cancellation.cancel(stale)
    try:
        runner.store.create(job)
        done = await finished(runner, job.id, timeout=120)
    finally:
        stop(runner)
        for stale in (job.id, f"{job.id}.0"):
            base.cancellation.finish(stale)
    assert done.status == "completed" and seen == [f"{job.id}.1"]


async def test_a_runner_whose_renewals_fail_for_a_whole_lease_stops_and_does_not_publish(base, upscaler,
                                                                                          runner_env):
    """Cut off from the store for longer than the lease, a runner must assume another has the job: it stops its
    attempt and publishes nothing. The job runs again (here on the same runner, once the store answers), and the
    files of the attempt that published are its own."""
    runner_env.setenv("JOB_TIMEOUT", "600000")
    slow = BaseShell(base, on_progress=lambda step, total: time.sleep(0.05))  # 150 steps: longer than the lease
    runner = JobRunner.func_or_class(LocalHandle(slow), None, LocalHandle(upscaler), None, None)
    renew, refused = runner.store.heartbeat, []

    def heartbeat(job_id, worker, lease_s, progress=None):
        if runner.store.get(job_id).attempts == 1:  # the first attempt's renewals never arrive
            refused.append(job_id)
            raise OSError("store unreachable")
        return renew(job_id, worker, lease_s, progress)

    runner.store.heartbeat = heartbeat
    try:
        job = Job(id=new_job_id(), type="text2img", request={"prompt": "cut off", "width": 64, "height": 64,
                                                                "steps": 150, "seed": 4, "preview_every": 0})
        runner.store.create(job)
        done = await finished(runner, job.id, timeout=300)
        log = runner.store.events(job.id, limit=1000)
    finally:
        stop(runner)
    assert refused and done.status == "completed" and done.attempts == 2
    assert [e.event for e in log if e.event != "progress"] == ["queued", "started", "queued", "started", "completed"]
    assert all(key.startswith(f"{job.id}/2-") for key in done.result["images"])


async def test_cancelling_a_running_job_cancels_its_task(tmp_path):
    """The lease keeper turns a cancel into stopped work: at its next renewal the job's task is cancelled, and with
    it the flight, which stops every stage call the job launched (no models needed: the task stands in for them)."""
    from types import SimpleNamespace

    from deployments.support.settings import Settings
    from graphs.jobs.sqlite_store import SQLiteJobStore

    runner = JobRunner.func_or_class.__new__(JobRunner.func_or_class)  # no worker loops: the keeper alone
    runner.settings = Settings(JOB_LEASE_SECONDS=3)
    runner.handles = SimpleNamespace(safety=None, board=None)
    runner.store = SQLiteJobStore(tmp_path / "jobs.sqlite3")
    runner.store.create(Job(id=new_job_id(), type="text2img", request={"prompt": "p", "preview_every": 0}))
    job = runner.store.claim("w", 3)
    work = asyncio.create_task(asyncio.sleep(60))
    keeper = asyncio.create_task(runner._keep_lease(job, "w", work))
    await asyncio.sleep(0.7)  # a renewal or two: the job runs on
    assert not work.done()
    runner.store.cancel(job.id)
    assert await asyncio.wait_for(keeper, 5) is None
    with pytest.raises(asyncio.CancelledError):
        await asyncio.wait_for(work, 1)


async def processing(runner, job_id: str, timeout: float = 60) -> Job:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job = runner.store.get(job_id)
        if job.status == "processing":
            return job
        await asyncio.sleep(0.02)
    raise AssertionError(f"job {job_id} was not claimed: {runner.store.get(job_id)}")


async def test_a_stopping_runner_lets_its_running_job_finish_and_claims_nothing_more(base, upscaler, runner_env):
    """A replica stopping (a redeploy: Serve awaits its ``__del__``) claims no job from then on, and a job it is
    running that ends within JOB_DRAIN_SECONDS is published here, by this runner, on its first attempt."""
    runner_env.setenv("JOB_TIMEOUT", "600000")
    runner_env.setenv("JOB_DRAIN_SECONDS", "60")
    paced = BaseShell(base, on_progress=lambda step, total: time.sleep(0.05))  # 30 steps: about 1.5 s
    runner = JobRunner.func_or_class(LocalHandle(paced), None, LocalHandle(upscaler), None, None)
    request = {"prompt": "drained", "width": 64, "height": 64, "steps": 30, "seed": 6, "preview_every": 0}
    running = Job(id=new_job_id(), type="text2img", request=request)
    waiting = Job(id=new_job_id(), type="text2img", request=request)
    runner.store.create(running)
    try:
        await processing(runner, running.id)
        runner.store.create(waiting)  # queued behind it: the one worker would take it next
        began = time.monotonic()
        await asyncio.wait_for(runner.__del__(), 30)
    finally:
        stop(runner)
    done = runner.store.get(running.id)
    assert done.status == "completed" and done.attempts == 1, done.error
    assert time.monotonic() - began < 20  # it ended with its job, not at the end of the drain
    assert [e.event for e in runner.store.events(running.id)] == ["queued", "started", "completed"]
    left = runner.store.get(waiting.id)
    assert left.status == "queued" and left.attempts == 0 and left.runs == 0  # never claimed
    assert [e.event for e in runner.store.events(waiting.id)] == ["queued"]


async def test_a_stopping_runner_releases_a_long_job_without_spending_an_attempt(base, upscaler, runner_env):
    """A job still running at the end of JOB_DRAIN_SECONDS goes back to the queue, its attempt not spent: however
    many redeploys a job meets, it never fails WORKER_LOST for them (JOB_MAX_ATTEMPTS is 3; four are met here).
    Each run still has its own request id."""
    runner_env.setenv("JOB_TIMEOUT", "600000")
    runner_env.setenv("JOB_DRAIN_SECONDS", "0.5")
    slow = BaseShell(base, on_progress=lambda step, total: time.sleep(0.05))  # 150 steps: longer than the drain
    job = Job(id=new_job_id(), type="text2img", request={"prompt": "released", "width": 64, "height": 64,
                                                         "steps": 150, "seed": 6, "preview_every": 0})
    runners = []
    for redeploy in range(4):  # each redeploy: a new runner takes the job, then stops
        runner = JobRunner.func_or_class(LocalHandle(slow), None, LocalHandle(upscaler), None, None)
        runners.append(runner)
        if redeploy == 0:
            runner.store.create(job)
        taken = await processing(runner, job.id)
        assert taken.attempts == 1 and taken.runs == redeploy + 1
        began = time.monotonic()
        await asyncio.wait_for(runner.__del__(), 30)
        assert time.monotonic() - began < 10  # the drain, then the release: no lease to run out
        left = runner.store.get(job.id)
        assert left.status == "queued" and left.attempts == 0  # not cancelled, not finished, no attempt spent
    log = runners[-1].store.events(job.id)
    assert [e.event for e in log] == ["queued"] + ["started", "queued"] * 4
    assert [e.data["attempt"] for e in log if e.event == "started"] == [1, 1, 1, 1]
    assert all(e.data.get("requeued") for e in log[2::2])
    taken = await asyncio.to_thread(runners[-1].store.claim, "successor", 30)
    assert taken.id == job.id and taken.attempts == 1 and taken.run_id == f"{job.id}.5"


async def test_webhooks_are_owed_by_the_store_and_retried_by_any_runner(base, upscaler, runner_env):
    """A job cancelled while queued gets its webhook too (no runner ever ran it), and a receiver that fails at
    first is tried again after its backoff until it accepts."""
    from tests.helpers import Receiver

    runner_env.setenv("WEBHOOK_ALLOW_HOSTS", "127.0.0.1")
    runner_env.setenv("WEBHOOK_BACKOFF_SECONDS", "0.05")
    receiver = Receiver(failures=2)
    runner = JobRunner.func_or_class(LocalHandle(BaseShell(base)), None, LocalHandle(upscaler), None, None)
    try:
        stop(runner)  # no worker may take the job before it is cancelled: this runner only delivers
        runner._loops = [asyncio.get_event_loop().create_task(runner._deliver_webhooks())]
        job = Job(id=new_job_id(), type="text2img", request={"prompt": "never run"}, webhook_url=receiver.url)
        runner.store.create(job)
        runner.store.cancel(job.id)
        deadline = time.monotonic() + 30

        def owed() -> int:
            return runner.store._db().execute("SELECT COUNT(*) FROM deliveries").fetchone()[0]

        # The receiver has the third body before the runner reads its answer and settles the delivery.
        while (len(receiver.bodies) < 3 or owed()) and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
    finally:
        stop(runner)
        receiver.close()
    assert [b["status"] for b in receiver.bodies] == ["cancelled"] * 3 and receiver.bodies[0]["id"] == job.id
    assert owed() == 0  # settled once accepted, not merely leased


class IdleBase:
    """A stand-in base stage that only records that it was called (these runners must never call it)."""

    def __init__(self) -> None:
        self.calls: list[dict] = []

    async def generate(self, request, request_id=None, encode=None):
        self.calls.append(request)
        raise RuntimeError("the base stage was called")


def idle_runner(base: IdleBase | None = None):
    return JobRunner.func_or_class(LocalHandle(base or IdleBase()), None, None, None, None)


async def test_a_draining_runner_stays_healthy_once_its_workers_end(runner_env):
    """Its workers end as it stops: that is not a failed loop for the health check."""
    runner = idle_runner()
    try:
        runner._stopping.set()
        await asyncio.wait_for(asyncio.gather(*runner._workers), 5)
        await runner.check_health()
    finally:
        stop(runner)


async def test_a_job_claimed_as_the_runner_begins_to_stop_is_released_unstarted(runner_env, caplog):
    caplog.set_level(logging.INFO, logger="graphs.jobs.runner")
    base = IdleBase()
    runner = idle_runner(base)
    claim = runner.store.claim

    def claim_then_stop(worker, lease_s):
        job = claim(worker, lease_s)
        if job is not None:
            runner._stopping.set()  # the replica begins to stop while this claim is in flight
        return job

    runner.store.claim = claim_then_stop
    job = Job(id=new_job_id(), type="text2img", request={"prompt": "late", "width": 64, "height": 64, "steps": 2})
    try:
        runner.store.create(job)
        await asyncio.wait_for(asyncio.gather(*runner._workers), 10)
    finally:
        stop(runner)
    left = runner.store.get(job.id)
    assert left.status == "queued" and left.attempts == 0
    assert [e.event for e in runner.store.events(job.id)] == ["queued", "started", "queued"]
    assert base.calls == []
    assert [(level, line.split(":")[0]) for level, line in job_log(caplog, job.id)] == [
        ("INFO", f"job {job.id} claimed by {runner.worker}/0"),
        ("INFO", f"job {job.id} released to the queue (run 1, its attempt not spent)")]


async def test_releasing_a_job_cancelled_meanwhile_ends_it_cancelled(runner_env):
    runner = idle_runner()
    stop(runner)  # no worker of its own: the test holds the job
    runner.store.create(Job(id=new_job_id(), type="text2img", request={"prompt": "p"}))
    job = runner.store.claim("w", 30)
    runner.store.cancel(job.id)
    await runner._release(job, "w")
    assert runner.store.get(job.id).status == "cancelled"
    assert runner.store.events(job.id)[-1].event == "cancelled"


async def test_a_stopping_runner_cuts_its_idle_poll_short(runner_env):
    """An idle worker waiting out JOB_POLL_SECONDS stops at once, not at the end of the poll."""
    runner_env.setenv("JOB_POLL_SECONDS", "5")
    runner = idle_runner()
    try:
        await asyncio.sleep(0.2)  # the worker found the queue empty and polls
        began = time.monotonic()
        await asyncio.wait_for(runner.__del__(), 30)
        assert time.monotonic() - began < 1
    finally:
        stop(runner)


async def test_result_files_are_named_by_run_not_attempt(base, upscaler, runner_env, tmp_path):
    """A job released once runs again as run 2 on attempt 1: its files carry the run's number."""
    from graphs.jobs.sqlite_store import SQLiteJobStore

    runner_env.setenv("JOB_TIMEOUT", "600000")
    store = SQLiteJobStore(tmp_path / "jobs.sqlite3")
    job = Job(id=new_job_id(), type="text2img", request={"prompt": "run two", "width": 64, "height": 64,
                                                         "steps": 2, "seed": 5})
    store.create(job)
    store.claim("stopping", 30)
    assert store.release(job.id, "stopping")
    runner = start_runner(base, upscaler)
    try:
        done = await finished(runner, job.id, timeout=120)
    finally:
        stop(runner)
    assert done.status == "completed" and done.attempts == 1 and done.runs == 2, done.error
    assert done.result["images"] and all(key.startswith(f"{job.id}/2-") for key in done.result["images"])


async def test_a_runner_whose_process_is_exiting_ends_its_loops_quietly(base, upscaler, runner_env, caplog):
    """Once its threads take no more work (the interpreter exiting under a local-testing-mode runner), a worker and
    the job counter end, instead of logging the same failure at every poll."""
    runner = start_runner(base, upscaler)
    try:
        def refused(*_args, **_kwargs):
            raise RuntimeError("cannot schedule new futures after interpreter shutdown")

        runner.store.claim = refused
        runner.store.stats = refused
        with caplog.at_level(logging.ERROR, logger="graphs.jobs.runner"):
            await asyncio.wait_for(asyncio.gather(runner._workers[0], runner._loops[-1]), 10)
        assert not caplog.records
    finally:
        stop(runner)
