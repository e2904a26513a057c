"""Dynamic batching for the diffusion deployments, on Serve's own batch queues.

Requests are batched only with compatible ones: each compatibility key (mode, size, steps, sampler, guidance,
LoRAs, ...) gets its own ``serve.batch`` queue, so an incompatible request forms its own batch at once and never
waits behind one it cannot join. A batch function returns one outcome per item, a result or the exception that
item alone raised, so one failed or cancelled item never fails its batch mates.
"""

from __future__ import annotations

import asyncio
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Hashable, Sequence
from concurrent.futures import Future
from typing import Any, Generic, TypeVar

from ray import serve
from ray.serve.exceptions import RayServeException

from deployments.support.config import Batching
from deployments.support.errors import ServiceError

Item = TypeVar("Item")
Run = Callable[[list[Item]], Awaitable[list[Any]]]

MAX_QUEUES = 32  # idle queues beyond this many are dropped, oldest first (each holds one asyncio task)


def prepare(items: list[Item], check: Callable[[Item], Any]) -> tuple[list[Any], dict[int, Any]]:
    """Each item's own checks before its batch runs: one outcome slot per item (the ``ServiceError`` of an item
    that fails them, else None to fill later) and ``check``'s value for every item that passes, by index."""
    outcomes: list[Any] = [None] * len(items)
    passed: dict[int, Any] = {}
    for i, item in enumerate(items):
        try:
            passed[i] = check(item)
        except ServiceError as e:
            outcomes[i] = e
    return outcomes, passed


def outcome(value: Any) -> Any:
    """An item's outcome as its caller sees it: the result, or its own exception raised."""
    if isinstance(value, BaseException):
        raise value
    return value


async def gathered(awaitables: Sequence[Awaitable[Any]]) -> list[Any]:
    """Every result, in order, all run at once: the first failure is raised and the others still running are
    cancelled, their outcomes read (so none is left running for nothing, and no exception is left unread)."""
    tasks = [asyncio.ensure_future(a) for a in awaitables]
    try:
        return list(await asyncio.gather(*tasks))
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


async def first(batched: Awaitable[Any], handed: Future | None) -> Any:
    """An item's outcome from its batch, or the result its run handed over before the batch ended (an item that
    A1111's /interrupt stopped while its batch mates run on: ``BatchItem.handed``). Whichever comes first; the wait
    for the other is dropped (Serve then leaves the dropped item's place in the batch's answer unset)."""
    if handed is None:
        return await batched
    tasks = {asyncio.ensure_future(batched), asyncio.wrap_future(handed)}
    try:
        done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        return done.pop().result()
    finally:
        for task in tasks:
            task.cancel()


def _in_replica() -> bool:
    """Serve's batch queues need a replica context; Serve's local testing mode runs deployments without one,
    and there every request runs alone."""
    try:
        serve.get_replica_context()
    except RayServeException:
        return False
    return True


class Batcher(Generic[Item]):
    def __init__(self, run: Run, config: Batching, size: Callable[[Item], int] = lambda _item: 1) -> None:
        self._run, self._size, self.config = run, size, config
        self._queues: OrderedDict[Hashable, Callable[[Item], Awaitable[Any]]] = OrderedDict()
        self._waiting: dict[Hashable, int] = {}
        self.counts = {"batches": 0, "items": 0}  # calls of ``run`` and the items they carried

    def configure(self, config: Batching) -> None:
        """New sizes and waits, applied to the queues that exist and the ones to come (``user_config``)."""
        self.config = config
        for queue in list(self._queues.values()):
            queue.set_max_batch_size(config.max_batch_size)  # type: ignore[attr-defined]
            queue.set_batch_wait_timeout_s(config.batch_wait_timeout_s)  # type: ignore[attr-defined]

    async def submit(self, key: Hashable | None, item: Item) -> Any:
        """Run ``item`` in a batch of its key; ``None`` (or an item as large as a whole batch) runs alone."""
        if key is None or self._size(item) >= self.config.max_batch_size or not _in_replica():
            return outcome((await self._counted([item]))[0])
        queue = self._queue(key)
        self._waiting[key] = self._waiting.get(key, 0) + 1
        try:
            return outcome(await first(queue(item), getattr(item, "handed", None)))
        finally:
            self._waiting[key] -= 1

    async def submit_all(self, keyed: list[tuple[Hashable | None, Item]]) -> list[Any]:
        """Each item's result, in order, every item submitted at once (so those of one key can share a batch); the
        first failure cancels the rest (``gathered``)."""
        return await gathered([self.submit(key, item) for key, item in keyed])

    def _queue(self, key: Hashable) -> Callable[[Item], Awaitable[Any]]:
        if key in self._queues:
            self._queues.move_to_end(key)
            return self._queues[key]
        for old in [k for k in self._queues if not self._waiting.get(k)][: max(0, len(self._queues) - MAX_QUEUES)]:
            del self._queues[old], self._waiting[old]
        queue = serve.batch(max_batch_size=self.config.max_batch_size,
                            batch_wait_timeout_s=self.config.batch_wait_timeout_s,
                            batch_size_fn=lambda items: sum(self._size(i) for i in items))(self._counted)
        self._queues[key] = queue
        return queue

    async def _counted(self, items: list[Item]) -> list[Any]:
        self.counts["batches"] += 1
        self.counts["items"] += len(items)
        return await self._run(items)

    @property
    def queues(self) -> int:
        return len(self._queues)
