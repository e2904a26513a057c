"""The progress board: where the replica that runs a request reports its progress, and learns of its cancel.

Any ingress or job-runner replica may be asked for a request's progress, preview or cancel, while only one model
replica runs it. Rather than asking a random replica, every diffusion replica reports the requests it runs here a
few times a second (step, total, a latent preview when one was asked for) and gets back the ones cancelled since,
so a cancel reaches the replica that runs the request and progress comes from it. One small replica: the state
is a few numbers per running request, kept until it finishes or for ``TTL_S``.

The base replicas also say here which checkpoints each one holds (on every load and every few seconds), so that
``GET /models`` can tell where each checkpoint is loaded; a replica not heard of for ``HOLDINGS_TTL_S`` is gone.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from PIL import Image
from ray import serve

from deployments.support.logs import replica_logging

TTL_S = 600.0
HOLDINGS_TTL_S = 10.0  # five missed announcements (SDXLBase repeats them every 2 s)
REPORT_INTERVAL_S = 0.2  # how often a model replica reports: the worst-case delay of a cancel or a preview


@dataclass
class Step:
    stage: str
    step: int
    total: int
    at: float


class Board:
    """The state; a plain class, so that it is tested without Ray."""

    def __init__(self, clock=time.monotonic) -> None:
        self.clock = clock
        self.steps: dict[str, Step] = {}
        self.previews: dict[str, Image.Image] = {}
        self.wanted: dict[str, float] = {}
        self.cancelled: dict[str, float] = {}
        self.stopped: dict[str, float] = {}
        self.holdings: dict[str, tuple[dict, float]] = {}

    def report(self, stage: str, progress: dict[str, tuple[int, int]], finished: list[str],
               previews: dict[str, Image.Image] | None = None) -> dict[str, list[str]]:
        """A model replica's report; answers which of its requests are cancelled, which are to stop with what
        they have made, and which want a preview."""
        now = self.clock()
        for request_id, (step, total) in progress.items():
            self.steps[request_id] = Step(stage, step, total, now)
        self.previews.update(previews or {})
        for request_id in finished:
            self.steps.pop(request_id, None)
            self.previews.pop(request_id, None)
        self._expire(now)
        return {"cancel": [r for r in progress if r in self.cancelled],
                "stop": [r for r in progress if r in self.stopped and r not in self.cancelled],
                "preview": [r for r in progress if r in self.wanted]}

    def progress(self, request_id: str) -> tuple[int, int] | None:
        step = self.steps.get(request_id)
        return (step.step, step.total) if step else None

    def preview(self, request_id: str) -> Image.Image | None:
        """The latest preview; asking also makes the replica send a fresh one with its next report."""
        self.wanted[request_id] = self.clock()
        return self.previews.get(request_id)

    def cancel(self, request_id: str) -> None:
        """Flag a request; its replica learns of it with its next report (or, not yet started, when it starts)."""
        self.cancelled[request_id] = self.clock()

    def stop(self, request_id: str) -> None:
        """A1111's /interrupt and /skip: the request ends after its replica's next step, answering with the images
        as they stand then."""
        self.stopped[request_id] = self.clock()

    def hold(self, replica: str, holdings: dict) -> None:
        """A base replica's checkpoints: ``held`` (most recently used last), ``loads`` per checkpoint, ..."""
        self.holdings[replica] = (holdings, self.clock())

    def held(self) -> dict[str, dict]:
        """What each live base replica holds, by replica id."""
        now = self.clock()
        for replica in [r for r, (_, at) in self.holdings.items() if now - at > HOLDINGS_TTL_S]:
            del self.holdings[replica]
        return {replica: holdings for replica, (holdings, _) in self.holdings.items()}

    def _expire(self, now: float) -> None:
        for table in (self.wanted, self.cancelled, self.stopped):
            for request_id in [r for r, at in table.items() if now - at > TTL_S]:
                del table[request_id]
        for request_id in [r for r, s in self.steps.items() if now - s.at > TTL_S]:
            self.steps.pop(request_id)
            self.previews.pop(request_id, None)


@serve.deployment(ray_actor_options={"num_cpus": 0}, max_ongoing_requests=1000)
class ProgressBoard(Board):
    """One replica (its state is the point): a few small calls per second per model replica."""

    def __init__(self) -> None:
        replica_logging()  # before anything here logs
        super().__init__()
