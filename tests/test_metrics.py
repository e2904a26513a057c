"""What the stages count for the dashboard: a batched stage's failures per request (each request of a batch has its
own outcome, so nothing raises out of the batch), each failure's kind (the client's or the server's), its requests
in flight rather than its batches (set again while a long request runs), and the jobs by state, an emptied state
included."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

from deployments.support.errors import GenerationCancelled, GpuOutOfMemory
from deployments.support.generation import StageResult
from deployments.support.metrics import StageMetrics


class Recorded(StageMetrics):
    """StageMetrics with its failures and in-flight values recorded as they are reported."""

    def __init__(self, stage: str, **options) -> None:
        super().__init__(stage, **options)
        self.codes: list[str] = []
        self.kinds: list[str] = []
        self.levels: list[int] = []
        self.failures = SimpleNamespace(inc=lambda tags: (self.codes.append(tags["code"]),
                                                          self.kinds.append(tags["kind"])))
        self.in_flight = SimpleNamespace(set=self.levels.append)


class Thread:
    def __init__(self, outcomes) -> None:
        self.outcomes = outcomes

    async def run(self, fn, *args, **kwargs):
        return self.outcomes


def test_a_batched_stage_counts_each_requests_failure():
    from deployments.sdxl_base import SDXLBase
    from deployments.sdxl_refiner import SDXLRefiner

    outcomes = [StageResult(seeds=[1]), GpuOutOfMemory("out of memory"), GpuOutOfMemory("out of memory"),
                GenerationCancelled("cancelled")]
    for shell, call in ((SDXLBase, lambda s: SDXLBase.func_or_class._run_batch(s, [])),
                        (SDXLRefiner, lambda s: SDXLRefiner.func_or_class._run_batch(s, [], ensemble=True))):
        replica = SimpleNamespace(metrics=Recorded(shell.name), thread=Thread(outcomes),
                                  model=SimpleNamespace(generate_batch=None, refine_batch=None))
        assert asyncio.run(call(replica)) == outcomes
        assert replica.metrics.codes == ["GPU_OOM", "GPU_OOM", "CANCELLED"]
        assert replica.metrics.kinds == ["server", "server", "client"]  # a cancel is no failure of ours
        assert replica.metrics.levels == []  # a batch is no request: requests are counted where they wait


def test_requests_in_flight_count_requests_and_failures_raise_through_track():
    metrics = Recorded("upscaler")
    with metrics.request(), metrics.request():
        assert metrics._running == 2
    assert metrics.levels == [1, 2, 1, 0]
    try:
        with metrics.track():
            raise GpuOutOfMemory("out of memory")
    except GpuOutOfMemory:
        pass
    assert metrics.codes == ["GPU_OOM"] and metrics.levels[-2:] == [1, 0]


def test_failures_are_the_clients_or_the_servers_by_their_status():
    from deployments.support.errors import ContentFlagged, InvalidImage, ModelLoadError, UnknownModel, UnsafeWeights

    metrics = Recorded("upscaler")
    for error in (UnknownModel("no such"), InvalidImage("bad"), ContentFlagged("flagged"), UnsafeWeights("pickle"),
                  ModelLoadError("gone"), RuntimeError("a bug")):
        metrics.failed(error)
    assert list(zip(metrics.codes, metrics.kinds, strict=True)) == [
        ("UNKNOWN_MODEL", "client"), ("INVALID_IMAGE", "client"), ("CONTENT_FLAGGED", "client"),
        ("UNSAFE_WEIGHTS", "server"), ("MODEL_LOAD_FAILED", "server"), ("RuntimeError", "server")]


def test_in_flight_is_set_again_while_a_long_request_runs():
    """Ray drops a gauge value not set for about 20 s: a request that outlasts it must not vanish from the panel."""
    async def long_request() -> list[int]:
        metrics = Recorded("sdxl_base", refresh_s=0.05)
        with metrics.request():
            await asyncio.sleep(0.4)  # the count does not change meanwhile
        await asyncio.sleep(0.2)
        assert metrics._refresh is not None
        metrics._refresh.cancel()
        return metrics.levels

    levels = asyncio.run(long_request())
    assert levels.count(1) >= 5 and levels[-1] == 0, levels


def test_a_job_state_that_empties_reads_0_not_its_last_count():
    """The gauge keeps whatever was last set: a state missing from the next count (the store groups by state, so
    an empty one has no row) must be set to 0, or the dashboard shows a backlog long gone."""
    from deployments.support.metrics import JobMetrics

    metrics = JobMetrics(["queued", "processing", "completed"])
    readings: dict[str, int] = {}
    metrics.jobs = SimpleNamespace(set=lambda value, tags: readings.__setitem__(tags["status"], value))
    metrics.record({"queued": 3, "processing": 1})
    metrics.record({"completed": 4})
    assert readings == {"queued": 0, "processing": 0, "completed": 4}
