"""Flights: the stage calls a plan launched, so that they can be cancelled, and watched, together.

A plan runs inside ``flight()``; every call made through a ``Recorded`` handle joins it. When the plan is
cancelled (a deadline, a client gone, a job cancelled) every call it launched is cancelled through Serve, on the
replica that runs it; ``settled`` awaits a chained stage while watching the calls that feed it for a lost replica.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from contextvars import ContextVar
from typing import Any

from graphs import availability
from graphs.api.errors import call, lost

logger = logging.getLogger(__name__)

_flight: ContextVar[list | None] = ContextVar("imagegen_flight", default=None)


class Recorded:
    """A deployment handle whose calls join the plan's flight (see ``flight``)."""

    def __init__(self, handle: Any) -> None:
        self._handle = handle

    def options(self, **options) -> Recorded:
        return Recorded(self._handle.options(**options))

    def __getattr__(self, method: str) -> RecordedMethod:
        return RecordedMethod(getattr(self._handle, method))

    def __reduce__(self):
        return Recorded, (self._handle,)


class RecordedMethod:
    def __init__(self, method: Any) -> None:
        self._method = method

    def options(self, **options) -> RecordedMethod:
        return RecordedMethod(self._method.options(**options))

    def remote(self, *args, **kwargs):
        availability.check(self._method)  # a deployment that failed to deploy would hold the call until its deadline
        response = self._method.remote(*args, **kwargs)
        calls = _flight.get()
        if calls is not None:
            calls.append(response)
        return response


@contextlib.asynccontextmanager
async def flight() -> AsyncIterator[list]:
    """Run a plan so that, when it is cancelled (a deadline, a client gone, a job cancelled) or fails, every stage
    call it launched is cancelled through Serve: on the replica that runs it, base, refiner, upscaler and faces
    alike (a batch-sizes job whose first base failed no longer keeps the others running for nothing). The diffusion
    replicas turn that into their per-step cancel flag (one denoising step later, it stops); a call that has
    finished is not affected."""
    calls: list = []
    token = _flight.set(calls)
    try:
        yield calls
    except BaseException:
        for response in calls:
            response.cancel()
        raise
    finally:
        _flight.reset(token)


WATCH_EVERY_S = 0.5


async def settled(response):
    """Await a stage whose input is an earlier stage's response, watching the flight's other calls meanwhile: when
    one of them fails because its replica or node was lost, its error is raised here and the stage is cancelled.

    Without the watch the stage would never answer. When the earlier stage's replica becomes unreachable (a node
    dies: Ray reports ``ActorUnavailableError``), Serve's router takes the failed input for the next stage's own
    replica being unavailable and sends the call again, forever (Ray 2.60 handles only ``ActorDiedError`` so).
    The watch reads no large result: a result in the object store is a success (errors are small and stay with
    this process, which owns the calls it made); only a small one is read."""
    earlier = [c for c in (_flight.get() or []) if c is not response]
    if not earlier:
        return await call(response)
    stage = asyncio.ensure_future(call(response))
    watch: asyncio.Future | None = None
    try:
        # Most stages answer before the first look would come: they cost the watch nothing.
        await asyncio.wait({stage}, timeout=WATCH_EVERY_S)
        if stage.done():
            return stage.result()
        watch = asyncio.ensure_future(_first_lost(earlier))
        await asyncio.wait({stage, watch}, return_when=asyncio.FIRST_COMPLETED)
        gone = None
        if watch.done():
            if watch.exception() is not None:  # the watch's own failure is not the stage's: it answers alone
                logger.warning("flight watch failed: %r", watch.exception())
            else:
                gone = watch.result()
        if gone is None:
            return await stage
        response.cancel()
        raise gone
    finally:
        for task in (stage, watch):
            if task is not None:
                task.cancel()


async def _first_lost(calls: list) -> BaseException | None:
    """The first lost-replica error among ``calls`` once they have all finished (None if there is none)."""
    import ray
    from ray.experimental import get_object_locations

    # Shielded: a call's object ref comes once it is routed, and giving up the wait must not cancel the call.
    routing = {asyncio.shield(c._to_object_ref()) for c in calls}
    refs: list = []
    try:
        while routing or refs:
            for task in [t for t in routing if t.done()]:
                routing.discard(task)
                if task.exception() is None:  # none in Serve's local testing mode, or where routing failed
                    refs.append(task.result())
            ready, refs = ray.wait(refs, num_returns=len(refs), timeout=0, fetch_local=False) if refs else ([], [])
            for ref in ready:
                try:
                    where = await asyncio.to_thread(get_object_locations, [ref], 1000)  # a GCS call: off the loop
                except Exception:  # noqa: BLE001 - the GCS slow to answer (a node dying): look again next round
                    refs.append(ref)
                    continue
                if where.get(ref, {}).get("node_ids"):
                    continue  # in the object store: a result, never an error
                try:
                    await ref
                except Exception as e:  # noqa: BLE001 - only a lost replica matters here; the stage reports the rest
                    if (gone := lost(e)) is not None:
                        return gone
            if routing or refs:
                await asyncio.sleep(WATCH_EVERY_S)
        return None
    finally:
        for task in routing:
            task.cancel()
