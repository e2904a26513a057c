"""The job runner without Ray: its worker loops drive the real tiny SDXLBase through in-process handles.

Covers what the shared cluster's settings cannot: JOB_TIMEOUT (the job fails and the denoising stops) and
results on S3 (published whole before the job completes; an upload that fails fails the job, publishing nothing).
"""

from __future__ import annotations

import asyncio
import inspect
import os
import time

import pytest

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
    """The calls SDXLBase's Serve shell exposes, on the session's in-process generator."""

    def __init__(self, base) -> None:
        self.generate = base.generate
        self.cancel = base.cancellation.cancel
        self.progress = base.cancellation.progress


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


async def test_job_timeout_fails_the_job_and_stops_the_denoising(base, upscaler, runner_env):
    runner = start_runner(base, upscaler)
    try:
        job = Job(id=new_job_id(), type="text2img", request={"prompt": "slow", "width": 512, "height": 512,
                                                                "steps": 150})
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


@pytest.fixture
def s3_results(s3_server, runner_env):
    import boto3

    client = boto3.client("s3", endpoint_url=s3_server, region_name="us-east-1")
    bucket = f"jobs-{os.urandom(4).hex()}"
    client.create_bucket(Bucket=bucket)
    host, port = s3_server.removeprefix("http://").split(":")
    proxy = TruncatingProxy((host, int(port)))
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
        assert done.status == "failed" and (done.error or "").startswith("STORAGE_UNAVAILABLE")
        listing = client.list_objects_v2(Bucket=bucket, Prefix=f"results/{job.id}/")
        assert listing.get("KeyCount", 0) == 0
    finally:
        stop(runner)
