"""Jobs: seed 003's ``/generate/{text2img,img2img,inpaint,style-transfer}``, ``/jobs``, ``/queue/status``, and
seed 002's ``/generate/async``, ``/jobs/{id}/result`` and ``/generate/batch-sizes``: one job resource for both.

``GET /jobs/{id}`` answers a superset: seed 003's job object (``id``, ``type``, ``status``, ``progress``,
``result``...) plus seed 002's ``jobId`` / ``job_id`` and, for a finished batch, ``images``, ``bases_generated``
and ``seed`` at the top level.

``GET /jobs/{id}/events`` streams the job's events (server-sent events, ``graphs.jobs.events``); every submit
sent with ``Accept: text/event-stream`` answers with that stream (200) instead of its JSON.

``GET /jobs/{id}/images/{name}`` serves one stored image as bytes; the view and the ``completed`` event link to it.
A view always shows its job's status: an image that cannot be read is null, with a warning that says which and why.
"""

import asyncio
import base64
import hashlib
import re
from datetime import UTC, datetime
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Header, Path, Query, Request, Response
from pydantic import BaseModel

from deployments.support import overlay
from deployments.support.control import offered
from deployments.support.errors import InvalidInput, JobConflict, NotFound, ResultExpired, StorageUnavailable
from deployments.support.settings import Settings
from graphs.api.body import JSONBodyRoute
from graphs.api.checkpoints import CheckpointChoice
from graphs.api.control_fields import control_units
from graphs.api.edge import listing_owner, token_owner
from graphs.api.errors import documented
from graphs.api.fields import image_field
from graphs.jobs import events
from graphs.jobs.models import (
    MAX_OFFSET,
    AsyncGenerate,
    BatchSizes,
    CancelResult,
    Img2ImgJob,
    InpaintJob,
    JobAccepted,
    JobEventData,
    JobId,
    JobList,
    JobResult,
    JobView,
    QueueStatus,
    SizeConfig,
    StyleTransferJob,
    Text2ImgJob,
)
from graphs.jobs.results import MIME, ResultStore, image_url, stored_keys
from graphs.jobs.runner import data_uri, image_info
from graphs.jobs.sizes import SizeTable
from graphs.jobs.store import Job, JobStore, new_job_id
from graphs.jobs.webhooks import check_url

IDEMPOTENCY_KEY = re.compile(r"[!-~]{1,255}")
router = APIRouter(tags=["jobs"], route_class=JSONBodyRoute, responses=documented(503))  # the store down
IMAGE_FIELDS = {
    "img2img": ("initImage",),
    "inpaint": ("image", "mask"),
    "style-transfer": ("contentImage", "styleImage"),
}
ImageName = Annotated[str, Path(max_length=80, pattern=r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}\.(png|webp)$",
                                description="the stored file's name, as the job's image URLs end")]
IMMUTABLE = "private, max-age=31536000, immutable"  # a key carries its attempt: its bytes never change
BYTES = {"schema": {"type": "string", "format": "binary"}}
IMAGE_RESPONSES: dict[int | str, dict[str, Any]] = {
    200: {"description": "the image", "content": {"image/png": BYTES, "image/webp": BYTES}},
    304: {"description": "If-None-Match matched: the client's copy is current"}}
STREAM_DOC: dict[str, Any] = {"model": JobEventData, "description": "server-sent events; data: JSON as this model"}
STREAMED: dict[int | str, dict[str, Any]] = {200: {
    "description": "with Accept: text/event-stream, the job's events instead (as GET /jobs/{id}/events)",
    "content": {"text/event-stream": {"schema": {"$ref": "#/components/schemas/JobEventData"}}}}}
SUBMIT = {**STREAMED, **documented(429)}
IMAGE_SUBMIT = {**SUBMIT, **documented(400)}


def _iso(ts: float | None) -> str | None:
    return datetime.fromtimestamp(ts, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z") if ts else None


class JobRoutes(CheckpointChoice):
    jobs: JobStore
    results: ResultStore
    settings: Settings
    sizes: SizeTable
    streams: events.Streams

    def _owner(self, request: Request) -> str | None:
        return token_owner(request.headers.get("authorization"))

    async def _submit(self, request: Request, kind: str, body: BaseModel) -> Job:
        # Decoded off the event loop (an upload can be 32 MB), and only to refuse a bad one now, not when it runs.
        for name in IMAGE_FIELDS.get(kind, ()):
            await asyncio.to_thread(image_field, getattr(body, name), name)
        units = getattr(body, "controlnets", [])
        if units:  # so are its ControlNet units: their images, and their names while the config is at hand
            await asyncio.to_thread(control_units, units, self.config.base.controlnets,
                                    edit=kind not in ("text2img", "generate"),
                                    modules=offered(self.config.base.preprocessors))
        mark = getattr(body, "overlay", None)
        if mark is not None:  # so is a bad overlay (/generate/async)
            await asyncio.to_thread(overlay.prepare, mark, self.settings.fonts_dir, "overlay")
        if isinstance(body, BatchSizes):
            self.sizes.resolve(body.sizes)
        webhook = getattr(body, "webhookUrl", None)
        if webhook:
            await asyncio.to_thread(check_url, webhook, self.settings)
        # No units: none kept, so that such a job's request (its view, its cache key) is what it always was.
        payload = body.model_dump(exclude={"priority", "webhookUrl", *(() if units else ("controlnets",))})
        payload["model"] = await self.checkpoint(payload.get("model"), "model")  # fixed now: queued jobs keep it
        job = Job(id=new_job_id(), type=kind, request=payload, priority=getattr(body, "priority", "normal"),
                  owner=self._owner(request), webhook_url=getattr(body, "webhookUrl", None))
        key = request.headers.get("idempotency-key")
        if key is not None and not IDEMPOTENCY_KEY.fullmatch(key):
            raise InvalidInput("Idempotency-Key: 1 to 255 visible ASCII characters", field="Idempotency-Key")
        stored, _created = await asyncio.to_thread(self.jobs.create, job, key, self.settings.max_queue_size)
        return stored

    def _events(self, job_id: str, after: int = 0, slot: events.Slot | None = None) -> events.EventStream:
        return events.response(self.jobs, job_id, after, self.settings.job_events_poll_seconds,
                               self.settings.job_events_heartbeat_seconds, self.streams, slot)

    def _answer(self, request: Request, job: Job, answer: Any) -> Any:
        """The submit's JSON answer, or the job's event stream when the client asked for it."""
        return self._events(job.id) if events.wants_stream(request.headers.get("accept")) else answer

    def _view(self, job: Job, with_images: bool = True, with_bytes: bool = True) -> dict:
        """The job as its clients read it; ``with_bytes`` False: its images by URL alone, nothing read from storage
        (a page that lists jobs fetches the images it shows, and its browser caches them)."""
        out = {"id": job.id, "jobId": job.id, "job_id": job.id, "type": job.type, "status": job.status,
               "request": _redact(job.request), "progress": round(job.progress), "priority": job.priority,
               "createdAt": _iso(job.created_at), "startedAt": _iso(job.started_at),
               "completedAt": _iso(job.completed_at), "error": job.error, "attempts": job.attempts}
        if job.status == "completed" and job.result is not None and with_images:
            result = dict(job.result)
            warnings = list(result.get("warnings") or [])
            if job.type == "batch-sizes":
                # seed 002's imageData is plain base64, as /generate's and /jobs/{id}/result's are
                images = {name: self._size_entry(name, e, warnings, with_bytes) for name, e in result["images"].items()}
                out.update(images=images, bases_generated=result["bases_generated"], seed=result["seed"])
                # the same entries without the bytes, which the top level already carries
                result["images"] = {name: {k: v for k, v in e.items() if k not in ("imageData", "derivatives")}
                                    for name, e in images.items()}
            else:
                keys = result.pop("images")
                if with_bytes:
                    result["images"] = [self._data_uri(k, f"image {i + 1} of {len(keys)}", warnings)
                                        for i, k in enumerate(keys)]
                result["urls"] = [image_url(k) for k in keys]
            if warnings:
                result["warnings"] = warnings
            out["result"] = result
        return out

    def _size_entry(self, name: str, e: dict, warnings: list[str], with_bytes: bool = True) -> dict:
        derivatives = e.get("derivatives", {})
        entry = {"format": "png", "width": e["width"], "height": e["height"], "aspect": e["aspect"], "box": e["box"],
                 "upscaled": e["upscaled"], "nsfw": e.get("nsfw"), "url": image_url(e["key"]),
                 "derivativeUrls": {w: image_url(k) for w, k in derivatives.items()}}
        if with_bytes:
            data = self._read(e["key"], f"size {name}", warnings)
            entry.update(imageData=None if data is None else base64.b64encode(data).decode(),
                         derivatives={w: self._data_uri(k, f"size {name} at {w} px", warnings, "image/webp")
                                      for w, k in derivatives.items()})
        return entry

    def _data_uri(self, key: str, what: str, warnings: list[str], mime: str = "image/png") -> str | None:
        data = self._read(key, what, warnings)
        return None if data is None else data_uri(data, mime)

    def _read(self, key: str, what: str, warnings: list[str]) -> bytes | None:
        """The image, or None and a warning: one image gone or a store down must not hide the job's status."""
        try:
            return self.results.load(key)
        except ResultExpired:
            warnings.append(f"{what} is unavailable (RESULT_EXPIRED): it expired or was removed")
        except StorageUnavailable:
            warnings.append(f"{what} is unavailable for now (STORAGE_UNAVAILABLE): result storage unavailable")
        return None

    async def _get(self, request: Request, job_id: str) -> Job:
        job = await asyncio.to_thread(self.jobs.get, job_id)
        if job is None or (self.settings.jobs_per_token and job.owner != self._owner(request)):
            raise NotFound("Job not found", field="id")
        return job

    async def _queue(self, request: Request, kind: str, body: BaseModel) -> Any:
        job = await self._submit(request, kind, body)
        return self._answer(request, job, self._view(job, with_images=False))

    async def _accept(self, request: Request, kind: str, body: BaseModel) -> Any:
        job = await self._submit(request, kind, body)
        return self._answer(request, job, JobAccepted(jobId=job.id, job_id=job.id, status=job.status))

    @router.post("/generate/text2img", status_code=202, response_model=JobView, response_model_exclude_unset=True,
                 responses=IMAGE_SUBMIT)  # its ControlNet units' images
    async def submit_text2img(self, body: Text2ImgJob, request: Request) -> Any:
        """Queue a text-to-image job (seed 003); 202 with the job."""
        return await self._queue(request, "text2img", body)

    @router.post("/generate/img2img", status_code=202, response_model=JobView, response_model_exclude_unset=True,
                 responses=IMAGE_SUBMIT)
    async def submit_img2img(self, body: Img2ImgJob, request: Request) -> Any:
        """Queue an image-to-image job."""
        return await self._queue(request, "img2img", body)

    @router.post("/generate/inpaint", status_code=202, response_model=JobView, response_model_exclude_unset=True,
                 responses=IMAGE_SUBMIT)
    async def submit_inpaint(self, body: InpaintJob, request: Request) -> Any:
        """Queue an inpainting job (white mask pixels are repainted)."""
        return await self._queue(request, "inpaint", body)

    @router.post("/generate/style-transfer", status_code=202, response_model=JobView,
                 response_model_exclude_unset=True, responses=IMAGE_SUBMIT)
    async def submit_style_transfer(self, body: StyleTransferJob, request: Request) -> Any:
        """Queue a style transfer: the style image through IP-Adapter applied to the content image."""
        return await self._queue(request, "style-transfer", body)

    @router.post("/generate/async", status_code=202, response_model=JobAccepted,
                 responses=IMAGE_SUBMIT)  # its overlay's logo, its ControlNet units' images
    async def submit_async(self, body: AsyncGenerate, request: Request) -> Any:
        """Seed 002: queue a /generate request; answers {jobId}."""
        return await self._accept(request, "generate", body)

    @router.post("/generate/batch-sizes", status_code=202, response_model=JobAccepted, responses=SUBMIT)
    async def submit_batch(self, body: BatchSizes, request: Request) -> Any:
        """Seed 002: every named size from the fewest bases (one per aspect class), one seed for all."""
        return await self._accept(request, "batch-sizes", body)

    @router.get("/jobs/{job_id}", response_model=JobView, response_model_exclude_unset=True, responses=documented(404))
    async def get_job(self, job_id: JobId, request: Request, images: bool = Query(
            True, description="false: the images by URL alone (result.urls, each size's url), no bytes")) -> dict:
        """The job, with its images as data URIs once completed."""
        return await asyncio.to_thread(self._view, await self._get(request, job_id), True, images)

    @router.get("/jobs/{job_id}/events", response_class=events.EventStream,
                responses={200: STREAM_DOC, **documented(404)})
    async def job_events(self, job_id: JobId, request: Request,
                         last_event_id: str | None = Header(None, alias="Last-Event-ID", description=(
                             "resume after this event id (EventSource sends it when it reconnects)"))
                         ) -> events.EventStream:
        """The job's events as server-sent events, until completed, failed or cancelled."""
        await self._get(request, job_id)
        # A submit's own stream is always served (its client has no job id to poll yet); a watcher's may not be.
        return self._events(job_id, _event_id(last_event_id), self.streams.admit())

    @router.get("/jobs/{job_id}/images/{name}", response_class=Response,
                responses={**IMAGE_RESPONSES, **documented(404, 410)})
    async def job_image(self, job_id: JobId, name: ImageName, request: Request) -> Response:
        """One image of a completed job as bytes (its URLs are in the job's view); cacheable for ever."""
        job = await self._get(request, job_id)
        key = f"{job.id}/{name}"
        if job.status != "completed" or key not in stored_keys(job.result):
            raise NotFound("the job has no image of that name", field="name")
        etag = f'"{hashlib.sha256(key.encode()).hexdigest()[:32]}"'
        headers = {"ETag": etag, "Cache-Control": IMMUTABLE}
        if _matches(request.headers.get("if-none-match"), etag):
            return Response(status_code=304, headers=headers)
        mime = MIME[name.rsplit(".", 1)[1]]
        if request.scope.get("head"):  # the edge answers HEAD with this GET's headers alone (``edge.Head``)
            size = await asyncio.to_thread(self.results.size, key)
            return Response(media_type=mime, headers={**headers, "Content-Length": str(size)})
        return Response(await asyncio.to_thread(self.results.load, key), media_type=mime, headers=headers)

    @router.get("/jobs/{job_id}/result", response_model=JobResult, response_model_exclude_none=True,
                responses=documented(404, 409, 410))
    async def get_result(self, job_id: JobId, request: Request) -> dict:
        """Seed 002: {imageData, format, width, height} of a completed job (and nsfw while the filter is on); 409
        before, 410 once its image is gone."""
        job = await self._get(request, job_id)
        if job.status != "completed" or job.result is None:
            raise JobConflict(f"job is {job.status}", field="id", details={"status": job.status})
        key = job.result["images"][0] if isinstance(job.result["images"], list) else \
            next(iter(job.result["images"].values()))["key"]
        data = await asyncio.to_thread(self.results.load, key)
        width, height = image_info(data)
        flags = job.result.get("nsfw")
        if isinstance(job.result["images"], dict):
            flags = [next(iter(job.result["images"].values())).get("nsfw")]
        return {"imageData": base64.b64encode(data).decode(), "format": "png", "width": width, "height": height,
                "nsfw": flags[0] if flags else None}

    @router.get("/jobs", response_model=JobList)
    async def list_jobs(self, request: Request, status: Literal["queued", "processing", "completed", "failed",
                                                                  "cancelled"] | None = None,
                        offset: int = Query(0, ge=0, le=MAX_OFFSET), limit: int = Query(50, ge=1, le=500)) -> dict:
        """Jobs, newest first, optionally by status (paginated)."""
        owner = listing_owner(request.headers.get("authorization"), self.settings)
        jobs, total = await asyncio.to_thread(self.jobs.list_jobs, status, owner, offset, limit)
        summaries = [{"id": j.id, "type": j.type, "status": j.status, "createdAt": _iso(j.created_at),
                      "progress": round(j.progress)} for j in jobs]
        return {"jobs": summaries, "total": total, "offset": offset, "limit": limit}

    @router.post("/jobs/{job_id}/cancel", response_model=CancelResult, responses=documented(404, 409))
    async def cancel_job(self, job_id: JobId, request: Request) -> dict:
        """Cancel a queued job (it never runs) or a running one (it stops within a step); 409 once finished."""
        await self._get(request, job_id)
        job = await asyncio.to_thread(self.jobs.cancel, job_id)
        if job is None:
            raise NotFound("Job not found", field="id")
        if job.status in ("completed", "failed"):
            raise JobConflict(f"job already {job.status}", field="id", details={"status": job.status})
        return {"success": True, "id": job.id, "status": job.status}

    @router.get("/generate/batch-sizes", response_model=SizeConfig)
    async def batch_size_config(self) -> dict:
        """The named sizes a batch accepts (configs/sizes.yaml), with each one's aspect class and the bases."""
        sizes = {name: {"width": w, "height": h, "aspect": self.sizes.aspect(w, h)}
                 for name, (w, h) in self.sizes.sizes.items()}
        return {"sizes": sizes, "bases": self.sizes.bases}

    @router.get("/queue/status", response_model=QueueStatus)
    async def queue_status(self) -> dict:
        """Counts by status and the mean processing time (ms)."""
        stats = await asyncio.to_thread(self.jobs.stats)
        counts = stats["counts"]
        return {"queuedJobs": counts.get("queued", 0), "processingJobs": counts.get("processing", 0),
                "completedJobs": counts.get("completed", 0), "failedJobs": counts.get("failed", 0),
                "cancelledJobs": counts.get("cancelled", 0),
                "averageProcessingTime": round(stats["average_seconds"] * 1000),
                "maxQueueSize": self.settings.max_queue_size}


def _matches(if_none_match: str | None, etag: str) -> bool:
    """Whether an If-None-Match header names ``etag`` (weakly compared, as RFC 9110 has it for GET)."""
    tags = [t.strip().removeprefix("W/") for t in (if_none_match or "").split(",")]
    return "*" in tags or etag in tags


def _event_id(value: str | None) -> int:
    text = (value or "").strip()
    if not text:
        return 0
    if not (text.isascii() and text.isdigit() and len(text) <= 18):
        raise InvalidInput("Last-Event-ID must be an event id (a whole number)", field="Last-Event-ID")
    return int(text)


def _redact(request: dict) -> dict:
    """Echo the request without multi-megabyte image strings (an overlay's logo, ControlNet units' images included)."""
    return {k: _redacted(v) for k, v in request.items()}


def _redacted(value: Any) -> Any:
    if isinstance(value, str) and len(value) > 256:
        return f"<{len(value)} chars>"
    if isinstance(value, dict):
        return _redact(value)
    if isinstance(value, list):
        return [_redacted(v) for v in value]
    return value
