"""Per-deployment metrics through Ray Serve's metrics API (Prometheus endpoint, Ray dashboard).

Every deployment records, per stage: a latency histogram, images produced, failures by error code and kind
(``client``: a 4xx code or a cancel, the request's own doing; ``server``: the rest), and the requests in flight on
the replica (its queue depth). The job runner records the jobs in the store by state.
``configs/grafana-dashboard.json`` charts them (Prometheus names carry Ray's ``ray_`` prefix).
"""

from __future__ import annotations

import asyncio
import contextvars
import time
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager, nullcontext

from ray.serve import metrics

from deployments.support.errors import ServiceError, kind_of

_BOUNDARIES = [0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 20, 40, 80, 160]
# Ray stops exporting a gauge value not set again for about 20 s: one SDXL request outlasts that, so the in-flight
# count is set again this often while the replica lives, changed or not (as JobMetrics' counts are).
REFRESH_S = 5.0


class StageMetrics:
    def __init__(self, stage: str, refresh_s: float = REFRESH_S) -> None:
        self.stage = stage
        tags = ("stage",)
        self.latency = metrics.Histogram("imagegen_stage_latency_seconds", description="time per stage call",
                                         boundaries=_BOUNDARIES, tag_keys=tags)
        self.images = metrics.Counter("imagegen_images_total", description="images produced", tag_keys=tags)
        self.failures = metrics.Counter("imagegen_failures_total",
                                        description="failed calls by error code and kind (client or server)",
                                        tag_keys=("stage", "code", "kind"))
        self.in_flight = metrics.Gauge("imagegen_in_flight", description="calls running or waiting on a replica",
                                       tag_keys=tags)
        for metric in (self.latency, self.images, self.failures, self.in_flight):
            metric.set_default_tags({"stage": stage})
        self._running = 0
        self._refresh: asyncio.Task | None = None
        try:  # a replica builds its metrics on its event loop; a unit test may build them with none running
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return
        # A context of its own, never the builder's (a request's would lend its id to whatever the loop logs).
        self._refresh = loop.create_task(self._keep_in_flight(refresh_s), context=contextvars.Context())

    async def _keep_in_flight(self, every_s: float) -> None:
        while True:
            self.in_flight.set(self._running)
            await asyncio.sleep(every_s)

    @contextmanager
    def track(self, *, requests: bool = True) -> Iterator[StageMetrics]:
        """Time one call and count its failure; with ``requests``, it is also one request in flight (a batched
        stage counts its requests with ``request`` instead, and times each batch here)."""
        started = time.perf_counter()
        try:
            with self.request() if requests else nullcontext():
                yield self
        except Exception as e:
            self.failed(e)
            raise
        finally:
            self.latency.observe(time.perf_counter() - started)

    @contextmanager
    def request(self) -> Iterator[None]:
        """One request running or waiting on this replica (in a batch queue, on a checkpoint load)."""
        self._running += 1
        self.in_flight.set(self._running)
        try:
            yield
        finally:
            self._running -= 1
            self.in_flight.set(self._running)

    def failed(self, error: BaseException) -> None:
        code = error.code if isinstance(error, ServiceError) else type(error).__name__
        self.failures.inc(tags={"code": code, "kind": kind_of(error)})

    def outcomes(self, outcomes: Iterable[object]) -> None:
        """A batch's per-request failures (a batched stage hands each request its own outcome, never raising)."""
        for outcome in outcomes:
            if isinstance(outcome, BaseException):
                self.failed(outcome)

    def produced(self, count: int) -> None:
        if count:
            self.images.inc(count)


class JobMetrics:
    """Jobs in the store by state. Every runner replica reads the same store and reports the same counts, so a
    dashboard takes the maximum over replicas, never the sum."""

    def __init__(self, statuses: Iterable[str]) -> None:
        self.statuses = tuple(statuses)
        self.jobs = metrics.Gauge("imagegen_jobs", description="jobs in the store by state", tag_keys=("status",))

    def record(self, counts: Mapping[str, int]) -> None:
        for status in self.statuses:  # a state with no jobs reads 0, not the last count it had
            self.jobs.set(counts.get(status, 0), tags={"status": status})
