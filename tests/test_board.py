"""The progress board and a replica's reports to it: progress from the replica running a request, cancels
delivered to it, previews sent only when asked for."""

from __future__ import annotations

import numpy as np
import pytest

from deployments.support.generation import BatchItem, Cancellation, GenerationRequest
from deployments.support.reporting import Reporter
from graphs.board import HOLDINGS_TTL_S, TTL_S, Board


class Clock:
    now = 0.0

    def __call__(self) -> float:
        return self.now


def test_progress_cancel_and_preview_requests_flow_through_reports():
    clock = Clock()
    board = Board(clock)
    assert board.report("sdxl_base", {"a": (3, 10), "b": (1, 10)}, []) == {"cancel": [], "stop": [], "preview": []}
    assert board.progress("a") == (3, 10) and board.progress("nobody") is None
    board.cancel("b")
    assert board.preview("a") is None  # nothing yet; asking makes the replica send one
    assert board.report("sdxl_base", {"a": (4, 10), "b": (2, 10)}, []) == {"cancel": ["b"], "stop": [],
                                                                            "preview": ["a"]}
    board.stop("a")
    board.stop("b")  # a cancel wins over a stop
    assert board.report("sdxl_base", {"a": (5, 10), "b": (3, 10)}, []) == {"cancel": ["b"], "stop": ["a"],
                                                                            "preview": ["a"]}
    board.report("sdxl_base", {}, ["a", "b"])
    assert board.progress("a") is None  # finished: gone
    clock.now = TTL_S + 1
    board.report("sdxl_refiner", {"c": (1, 2)}, [])
    assert not board.cancelled and not board.wanted and not board.stopped  # old flags expire


def test_base_replicas_say_which_checkpoints_they_hold_until_they_fall_silent():
    clock = Clock()
    board = Board(clock)
    board.hold("r1", {"held": ["tiny-a"], "loads": {"tiny-a": 1}})
    board.hold("r2", {"held": ["tiny-b"], "loads": {"tiny-a": 1, "tiny-b": 1}})
    clock.now = HOLDINGS_TTL_S / 2
    board.hold("r2", {"held": ["tiny-b"], "loads": {"tiny-a": 1, "tiny-b": 1}})
    assert {r: h["held"] for r, h in board.held().items()} == {"r1": ["tiny-a"], "r2": ["tiny-b"]}
    clock.now = HOLDINGS_TTL_S + 1  # r1 stopped announcing (its replica is gone); r2 spoke since
    assert list(board.held()) == ["r2"]


class FakeHandle:
    """What a Serve handle to the board looks like to a replica: ``board.report.remote(...)`` is awaitable."""

    def __init__(self, board: Board) -> None:
        self.board = board
        self.report = self

    def remote(self, *args):
        async def answer():
            return self.board.report(*args)

        return answer()


@pytest.mark.anyio
async def test_a_replica_learns_of_a_cancel_and_sends_a_preview_only_when_asked():
    board = Board()
    cancellation = Cancellation()
    reporter = Reporter(FakeHandle(board), "sdxl_base", cancellation)
    items = [BatchItem(GenerationRequest(), "x"), BatchItem(GenerationRequest(), "y")]
    cancellation.advance(items, 2, 8)
    cancellation.keep_latents("x", np.zeros((4, 8, 8), np.float32))
    await reporter.report()
    assert board.progress("x") == (2, 8) and board.previews == {}
    board.preview("x")
    board.cancel("y")
    board.stop("x")
    await reporter.report()  # learns that x is watched and stopped, and y cancelled
    assert cancellation.advance(items, 3, 8) == [False, True]  # y's denoising loop sees its flag
    assert cancellation.stops(items) == [True, False]  # and x's, which ends it with what it has made
    assert "x" not in board.previews
    await reporter.report()  # sends x's preview, and only x's
    assert board.previews["x"].size == (8, 8) and list(board.previews) == ["x"]
    cancellation.finish("x")
    cancellation.finish("y")
    await reporter.report()
    assert board.progress("x") is None and board.progress("y") is None


@pytest.mark.anyio
async def test_a_report_that_fails_says_its_finished_requests_next_time():
    """Otherwise the board would show them running (A1111's /progress too) until its entries expire."""
    board = Board()
    cancellation = Cancellation()
    handle = FakeHandle(board)
    reporter = Reporter(handle, "sdxl_base", cancellation)
    item = BatchItem(GenerationRequest(), "x")
    cancellation.advance([item], 2, 8)
    await reporter.report()
    assert board.progress("x") == (2, 8)
    cancellation.finish("x")
    handle.report = None  # the board unreachable: report.remote raises
    with pytest.raises(AttributeError):
        await reporter.report()
    handle.report = handle
    await reporter.report()
    assert board.progress("x") is None


@pytest.mark.anyio
async def test_the_report_loop_carries_no_requests_context():
    """Started by a replica's first request, the loop must not run in its context: Serve reads the request id from
    there, and every report call (and every line the loop logs) would carry that one request's id for ever."""
    import asyncio

    from ray.serve.context import _get_serve_request_context, _RequestContext, _serve_request_context

    seen: list[str] = []
    board = Board()
    handle = FakeHandle(board)

    def remote(*args):
        seen.append(_get_serve_request_context().request_id)
        return FakeHandle.remote(handle, *args)

    handle.report = type("Report", (), {"remote": staticmethod(remote)})()
    cancellation = Cancellation()
    reporter = Reporter(handle, "sdxl_base", cancellation, interval=0.01)
    token = _serve_request_context.set(_RequestContext(request_id="first-request"))
    try:
        reporter.start()  # as the first request's generate does
    finally:
        _serve_request_context.reset(token)
    cancellation.advance([BatchItem(GenerationRequest(), "x")], 1, 8)
    for _ in range(100):
        if seen:
            break
        await asyncio.sleep(0.01)
    assert reporter._task is not None
    reporter._task.cancel()
    assert seen and "first-request" not in seen
