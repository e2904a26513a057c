"""Live job events: what the runner adds to a job's event log while it runs, and the server-sent-event stream that
any ingress replica serves from the log (``GET /jobs/{id}/events``, or a job submit sent with
``Accept: text/event-stream``).

The stream is read from the job store, never from the runner, so whichever replica a client reaches (and
reaches again after a dropped connection, with ``Last-Event-ID``) sees the same events with the same ids.
Event names and data fields are a public contract (the web page and the CLI read them):

- ``queued``: ``position`` (1 = next to run; ``requeued`` when a lost worker's job went back to the queue)
- ``started``: ``attempt``
- ``progress``: ``step``, ``total``, ``eta_s``, ``progress`` (percent)
- ``preview``: ``step``, ``total``, ``image`` (a small JPEG data URI of the latents being denoised)
- ``completed``: ``images`` (their names, in the order GET /jobs/{id} gives them), ``seed``, ``links`` (``job``,
  ``result``, and ``images``: each image's URL by name), and ``nsfw``, ``cached`` where the result has them
- ``failed``: ``code``, ``message``
- ``cancelled``

Every event's data also holds ``job_id``, ``status`` (the job's status at the time) and ``time`` (epoch seconds).
"""

from __future__ import annotations

import asyncio
import base64
import json
import time
import weakref
from collections.abc import AsyncIterator

from PIL import Image
from starlette.responses import StreamingResponse

from deployments.support.errors import StreamsBusy
from deployments.support.imaging import encode
from graphs.jobs.results import image_url
from graphs.jobs.store import JobEvent, JobStore

PREVIEW_SIDE = 256  # latent previews are already 1/8 of the image; a larger one only costs bandwidth
PREVIEW_QUALITY = 70
RECONNECT_MS = 2000  # EventSource waits this long before it reconnects (with Last-Event-ID)


class EventStream(StreamingResponse):
    media_type = "text/event-stream"


def frame(event: JobEvent) -> str:
    return f"id: {event.id}\nevent: {event.event}\ndata: {json.dumps(event.data, separators=(',', ':'))}\n\n"


def wants_stream(accept: str | None) -> bool:
    """A submit asks for the event stream instead of the JSON answer (as Cog's clients do)."""
    return "text/event-stream" in (accept or "").lower()


async def stream(store: JobStore, job_id: str, after: int, poll_s: float, heartbeat_s: float) -> AsyncIterator[str]:
    """The job's events after ``after``, then each new one as it is logged, until the terminal event. An idle
    stream gets a ``: ping`` comment every ``heartbeat_s`` so that proxies keep it open."""
    yield f"retry: {RECONNECT_MS}\n\n"
    quiet_since = time.monotonic()
    while True:
        events = await asyncio.to_thread(store.events, job_id, after)
        if not events:
            job = await asyncio.to_thread(store.get, job_id)
            if job is None or job.finished:
                # The terminal event is written with the status, so this read sees it, unless the client already
                # has it (resumed after it) or the job was purged meanwhile: either way the stream is over.
                events = await asyncio.to_thread(store.events, job_id, after)
                if not events:
                    return
        for event in events:
            yield frame(event)
            after = event.id
            if event.terminal:
                return
        now = time.monotonic()
        if events:
            quiet_since = now
        elif now - quiet_since >= heartbeat_s:
            yield ": ping\n\n"
            quiet_since = now
        await asyncio.sleep(poll_s)


class Slot:
    """One stream's place among a replica's open streams, held by the stream (or its never-sent response)."""


class Streams:
    """The event streams one ingress replica serves now. Serve counts a stream as an ongoing request for its whole
    life, so watchers alone could hold every request slot of the replica and queue all other requests behind them;
    past ``limit`` (0: none) a new GET /jobs/{id}/events is refused and its client polls the job instead.

    A place is taken when the stream is admitted, so that a burst cannot pass the limit before the first frames go
    out, and given back when the stream ends, or when a response that was never sent is collected (weakly held)."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._open: weakref.WeakSet[Slot] = weakref.WeakSet()

    @property
    def open(self) -> int:
        return len(self._open)

    def admit(self, *, bounded: bool = True) -> Slot:
        """A place for one more stream; ``StreamsBusy`` past the limit unless not ``bounded`` (a submit's own)."""
        if bounded and self.limit and self.open >= self.limit:
            raise StreamsBusy(f"this replica serves {self.open} event streams, its limit; poll GET /jobs/{{id}} "
                              "or retry the stream shortly", details={"limit": self.limit})
        slot = Slot()
        self._open.add(slot)
        return slot

    async def counted(self, source: AsyncIterator[str], slot: Slot) -> AsyncIterator[str]:
        try:
            async for chunk in source:
                yield chunk
        finally:
            self._open.discard(slot)


def response(store: JobStore, job_id: str, after: int, poll_s: float, heartbeat_s: float,
             streams: Streams | None = None, slot: Slot | None = None) -> EventStream:
    """The job's event stream; with ``streams``, it holds ``slot`` (admitted by the caller; a new unbounded one when
    none) until it ends."""
    # no-transform and X-Accel-Buffering keep proxies (nginx, compressing ones) from holding events back.
    headers = {"Cache-Control": "no-cache, no-transform", "X-Accel-Buffering": "no", "X-Job-Id": job_id}
    source = stream(store, job_id, after, poll_s, heartbeat_s)
    if streams is not None:
        source = streams.counted(source, slot or streams.admit(bounded=False))
    return EventStream(source, headers=headers)


def completed_data(job_id: str, result: dict) -> dict:
    """The completed event: what the result holds, by name; the images themselves are behind the links."""
    images = result.get("images") or []
    keys = {name: e["key"] for name, e in images.items()} if isinstance(images, dict) else {
        f"image_{i}": key for i, key in enumerate(images)}
    links = {"job": f"/jobs/{job_id}", "result": f"/jobs/{job_id}/result",
             "images": {name: image_url(key) for name, key in keys.items()}}
    data = {"images": list(keys), "seed": result.get("seed"), "warnings": result.get("warnings", []), "links": links}
    facts = {**result.get("parameters", {}), **result}  # seed 003's results keep the size in their parameters
    for name in ("width", "height", "timeTaken", "bases_generated", "nsfw", "cached"):
        if name in facts:
            data[name] = facts[name]
    if isinstance(images, dict) and "nsfw" not in data and any(e.get("nsfw") is not None for e in images.values()):
        data["nsfw"] = [e.get("nsfw") for e in images.values()]  # a batch's flags, one per named size
    return data


class ProgressEvents:
    """Turns the runner's progress polls into events: one ``progress`` per new step, and a ``preview`` when at
    least ``preview_every`` steps passed since the last one (0: never)."""

    def __init__(self, preview_every: int) -> None:
        self.preview_every = preview_every
        self.started = time.monotonic()
        self.step = 0
        self.previewed = 0

    def progress(self, step: int, total: int) -> dict | None:
        """The next progress event's data, or None when the step has not moved."""
        if step == self.step or total <= 0:
            return None
        if step < self.step:  # the plan's next denoising pass (batch sizes render one base per aspect)
            self.started, self.previewed = time.monotonic(), 0
        self.step = step
        elapsed = time.monotonic() - self.started
        eta = elapsed / step * (total - step) if step > 0 else None
        return {"step": step, "total": total, "eta_s": None if eta is None else round(eta, 1),
                "progress": round(100.0 * step / total, 1)}

    def wants_preview(self, step: int) -> bool:
        if self.preview_every <= 0 or step - self.previewed < self.preview_every:
            return False
        self.previewed = step
        return True

    @staticmethod
    def preview(image: Image.Image, step: int, total: int) -> dict:
        small = image.copy()
        small.thumbnail((PREVIEW_SIDE, PREVIEW_SIDE))
        data = base64.b64encode(encode(small, "jpeg", PREVIEW_QUALITY)).decode()
        return {"step": step, "total": total, "image": f"data:image/jpeg;base64,{data}"}
