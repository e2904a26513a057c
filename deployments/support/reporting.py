"""A diffusion replica's reports to the progress board (``graphs/board.py``).

A few times a second, while it runs requests, the replica sends their step counts (and a latent preview for the
ones someone asked to see) and gets back the ones cancelled meanwhile, or stopped by A1111's /interrupt and /skip,
which it flags for its denoising loop. So progress, previews and cancels reach the replica that runs a request,
whichever ingress replica was asked.
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
from typing import Any

from deployments.support.generation import Cancellation

logger = logging.getLogger(__name__)

REPORT_INTERVAL_S = 0.2


class Reporter:
    def __init__(self, board: Any, stage: str, cancellation: Cancellation,
                 interval: float = REPORT_INTERVAL_S) -> None:
        self.board, self.stage, self.cancellation, self.interval = board, stage, cancellation, interval
        self._wanted: set[str] = set()
        self._task: asyncio.Task | None = None

    def start(self) -> None:
        """Begin reporting (from the replica's event loop, on its first request); idempotent, a no-op with no board."""
        if self.board is not None and self._task is None:
            # A context of its own: the first request's would lend its request id to every report call (the
            # board's access log) and every line the loop logs, for the replica's whole life.
            self._task = asyncio.get_running_loop().create_task(self._loop(), context=contextvars.Context())

    async def _loop(self) -> None:
        while True:
            await asyncio.sleep(self.interval)
            try:
                await self.report()
            except Exception as e:  # noqa: BLE001 - a missed report only delays progress; the next one catches up
                logger.debug("progress report failed: %s", e)

    async def report(self) -> None:
        progress, finished = self.cancellation.drain()
        if not progress and not finished:
            return
        wanted = self._wanted & progress.keys()
        # Off the event loop: a preview copies device latents to the host, which waits for the step running.
        previews = await asyncio.to_thread(lambda: {r: self.cancellation.preview(r) for r in wanted}) if wanted \
            else {}
        try:
            reply = await self.board.report.remote(self.stage, progress, finished,
                                                   {r: p for r, p in previews.items() if p is not None})
        except Exception:
            self.cancellation.undrain(finished)  # said next time: the board must not show them running for long
            raise
        for request_id in reply["cancel"]:
            self.cancellation.cancel(request_id)
        for request_id in reply.get("stop", ()):
            self.cancellation.stop(request_id)
        self._wanted = set(reply["preview"])
