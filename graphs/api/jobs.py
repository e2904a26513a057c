"""Jobs: seed 003's ``/generate/{text2img,img2img,inpaint,style-transfer}``, ``/jobs``, ``/queue/status``, and
seed 002's ``/generate/async``, ``/jobs/{id}/result`` and ``/generate/batch-sizes``: one job resource for both.

``GET /jobs/{id}`` answers a superset: seed 003's job object (``id``, ``type``, ``status``, ``progress``,
``result``...) plus seed 002's ``jobId`` / ``job_id`` and, for a finished batch, ``images``, ``bases_generated``
and ``seed`` at the top level.
"""

import asyncio
import base64
import json
from datetime import UTC, datetime
from typing import Annotated, Literal

from fastapi import APIRouter, Query, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field, ValidationError

from deployments.support.errors import InvalidInput, JobConflict, NotFound
from graphs.api.edge import token_owner
from graphs.api.fields import image_field
from graphs.api.generate import GenerateRequest
from graphs.jobs.results import ResultStore
from graphs.jobs.runner import JobSettings, data_uri, image_info
from graphs.jobs.sizes import SizeTable
from graphs.jobs.store import Job, JobStore, new_job_id
from graphs.jobs.webhooks import WebhookSettings, check_url

router = APIRouter(tags=["jobs"])
Priority = Literal["high", "normal", "low"]
Side = Annotated[int, Field(ge=64, le=2048, multiple_of=8)]


class _Submit(BaseModel):
    priority: Priority = "normal"
    webhookUrl: str | None = Field(None, max_length=2048)


class Text2ImgJob(_Submit):
    prompt: str = Field(..., min_length=1, max_length=10_000)
    negativePrompt: str = Field("", max_length=10_000)
    width: int = Field(512, ge=64, le=2048, multiple_of=8)
    height: int = Field(512, ge=64, le=2048, multiple_of=8)
    steps: int = Field(30, ge=1, le=150)
    guidanceScale: float = Field(7.5, ge=0.0, le=30.0)
    seed: int = Field(-1, ge=-1, le=2**32 - 1)
    sampler: str = Field("euler_a", max_length=64)
    model: str | None = Field(None, pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$",
                              description="echoed in the result; the deployed SDXL base serves every job")


class Img2ImgJob(Text2ImgJob):
    initImage: str
    strength: float = Field(0.75, gt=0.0, le=1.0)


class InpaintJob(Text2ImgJob):
    image: str
    mask: str
    inpaintingStrength: float = Field(0.9, gt=0.0, le=1.0)
    steps: int = Field(40, ge=1, le=150)


class StyleTransferJob(_Submit):
    contentImage: str
    styleImage: str
    styleStrength: float = Field(0.7, ge=0.0, le=2.0)
    contentStrength: float = Field(0.3, ge=0.0, le=1.0)
    prompt: str = Field("", max_length=10_000)
    steps: int = Field(30, ge=1, le=150)
    guidanceScale: float = Field(7.5, ge=0.0, le=30.0)
    seed: int = Field(-1, ge=-1, le=2**32 - 1)
    sampler: str = Field("euler_a", max_length=64)


class AsyncGenerate(GenerateRequest):
    priority: Priority = "normal"
    webhookUrl: str | None = Field(None, max_length=2048)


class BatchSizes(BaseModel):
    webhookUrl: str | None = Field(None, max_length=2048)
    prompt: str = Field(..., min_length=1, max_length=10_000)
    negativePrompt: str = Field("", max_length=10_000)
    sizes: list[str] = Field(..., min_length=1, max_length=16)
    seed: int = Field(-1, ge=-1, le=2**32 - 1)
    priority: Priority = "normal"
    steps: int = Field(30, ge=1, le=150)
    guidanceScale: float = Field(7.0, ge=0.0, le=30.0)
    derivatives: list[Annotated[int, Field(ge=8, le=4096)]] = Field(
        [], max_length=8, description="WebP widths cut from every size")
    baseSizes: dict[Literal["landscape", "square", "portrait"], tuple[Side, Side]] | None = Field(
        None, description="override the base rendered per aspect class (multiples of 8)")


IMAGE_FIELDS = {
    "img2img": ("initImage",),
    "inpaint": ("image", "mask"),
    "style-transfer": ("contentImage", "styleImage"),
}


def _iso(ts: float | None) -> str | None:
    return datetime.fromtimestamp(ts, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z") if ts else None


async def _json_body(request: Request, model: type[BaseModel]) -> BaseModel:
    """Seed 003's curl examples send JSON without a JSON content type: parse the body whatever it says."""
    raw = await request.body()
    try:
        data = json.loads(raw or b"{}")
        return model.model_validate(data)
    except json.JSONDecodeError as e:
        raise InvalidInput(f"body is not JSON: {e.msg}", field="body") from e
    except ValidationError as e:
        first = e.errors()[0]
        field = ".".join(str(p) for p in first["loc"])
        message = "Prompt is required" if field == "prompt" and first["type"] == "missing" else first["msg"]
        raise InvalidInput(message, field=field, details={"errors": json.loads(e.json())}) from e


class JobRoutes:
    jobs: JobStore
    results: ResultStore
    job_settings: JobSettings
    sizes: SizeTable
    webhooks: WebhookSettings

    def _owner(self, request: Request) -> str | None:
        return token_owner(request.headers.get("authorization"))

    async def _submit(self, request: Request, kind: str, body: BaseModel) -> Job:
        for name in IMAGE_FIELDS.get(kind, ()):
            image_field(getattr(body, name), name)  # a bad image is refused now, not when the job runs
        if isinstance(body, BatchSizes):
            self.sizes.resolve(body.sizes)
        webhook = getattr(body, "webhookUrl", None)
        if webhook:
            await asyncio.to_thread(check_url, webhook, self.webhooks)
        payload = body.model_dump(exclude={"priority", "webhookUrl"})
        job = Job(id=new_job_id(), type=kind, request=payload, priority=getattr(body, "priority", "normal"),
                  owner=self._owner(request), webhook_url=getattr(body, "webhookUrl", None))
        key = request.headers.get("idempotency-key")
        stored, _created = await asyncio.to_thread(self.jobs.create, job, key, self.job_settings.max_queue_size)
        return stored

    def _view(self, job: Job, with_images: bool = True) -> dict:
        out = {"id": job.id, "jobId": job.id, "job_id": job.id, "type": job.type, "status": job.status,
               "request": _redact(job.request), "progress": round(job.progress), "priority": job.priority,
               "createdAt": _iso(job.created_at), "startedAt": _iso(job.started_at),
               "completedAt": _iso(job.completed_at), "error": job.error, "attempts": job.attempts}
        if job.status == "completed" and job.result is not None and with_images:
            result = dict(job.result)
            if job.type == "batch-sizes":
                images = {name: {"imageData": data_uri(self.results.load(e["key"])), "format": "png",
                                 "width": e["width"], "height": e["height"], "aspect": e["aspect"],
                                 "box": e["box"], "upscaled": e["upscaled"],
                                 "derivatives": {w: data_uri(self.results.load(k), "image/webp")
                                                 for w, k in e.get("derivatives", {}).items()}}
                          for name, e in result["images"].items()}
                out.update(images=images, bases_generated=result["bases_generated"], seed=result["seed"])
                result["images"] = images
            else:
                result["images"] = [data_uri(self.results.load(k)) for k in result["images"]]
            out["result"] = result
        return out

    async def _get(self, request: Request, job_id: str) -> Job:
        job = await asyncio.to_thread(self.jobs.get, job_id)
        if job is None or (_env_flag("JOBS_PER_TOKEN") and job.owner != self._owner(request)):
            raise NotFound("Job not found", field="id")
        return job

    def _accepted(self, job: Job) -> JSONResponse:
        return JSONResponse(self._view(job, with_images=False), status_code=202)

    @router.post("/generate/text2img", status_code=202)
    async def submit_text2img(self, request: Request) -> JSONResponse:
        """Queue a text-to-image job (seed 003); 202 with the job."""
        return self._accepted(await self._submit(request, "text2img", await _json_body(request, Text2ImgJob)))

    @router.post("/generate/img2img", status_code=202)
    async def submit_img2img(self, request: Request) -> JSONResponse:
        """Queue an image-to-image job."""
        return self._accepted(await self._submit(request, "img2img", await _json_body(request, Img2ImgJob)))

    @router.post("/generate/inpaint", status_code=202)
    async def submit_inpaint(self, request: Request) -> JSONResponse:
        """Queue an inpainting job (white mask pixels are repainted)."""
        return self._accepted(await self._submit(request, "inpaint", await _json_body(request, InpaintJob)))

    @router.post("/generate/style-transfer", status_code=202)
    async def submit_style_transfer(self, request: Request) -> JSONResponse:
        """Queue a style transfer: the style image through IP-Adapter applied to the content image."""
        body = await _json_body(request, StyleTransferJob)
        return self._accepted(await self._submit(request, "style-transfer", body))

    @router.post("/generate/async", status_code=202)
    async def submit_async(self, request: Request) -> JSONResponse:
        """Seed 002: queue a /generate request; answers {jobId}."""
        job = await self._submit(request, "generate", await _json_body(request, AsyncGenerate))
        return JSONResponse({"jobId": job.id, "job_id": job.id, "status": job.status}, status_code=202)

    @router.post("/generate/batch-sizes", status_code=202)
    async def submit_batch(self, request: Request) -> JSONResponse:
        """Seed 002: every named size from the fewest bases (one per aspect class), one seed for all."""
        job = await self._submit(request, "batch-sizes", await _json_body(request, BatchSizes))
        return JSONResponse({"job_id": job.id, "jobId": job.id, "status": job.status}, status_code=202)

    @router.get("/jobs/{job_id}")
    async def get_job(self, job_id: str, request: Request) -> dict:
        """The job, with its images as data URIs once completed."""
        return await asyncio.to_thread(self._view, await self._get(request, job_id))

    @router.get("/jobs/{job_id}/result")
    async def get_result(self, job_id: str, request: Request) -> dict:
        """Seed 002: {imageData, format, width, height} of a completed job; 409 before."""
        job = await self._get(request, job_id)
        if job.status != "completed" or job.result is None:
            raise JobConflict(f"job is {job.status}", field="id", details={"status": job.status})
        key = job.result["images"][0] if isinstance(job.result["images"], list) else \
            next(iter(job.result["images"].values()))["key"]
        data = await asyncio.to_thread(self.results.load, key)
        width, height = image_info(data)
        return {"imageData": base64.b64encode(data).decode(), "format": "png", "width": width, "height": height}

    @router.get("/jobs")
    async def list_jobs(self, request: Request, status: Literal["queued", "processing", "completed", "failed",
                                                                  "cancelled"] | None = None,
                        offset: int = Query(0, ge=0), limit: int = Query(50, ge=1, le=500)) -> dict:
        """Jobs, newest first, optionally by status (paginated)."""
        owner = self._owner(request) if _env_flag("JOBS_PER_TOKEN") else None
        jobs, total = await asyncio.to_thread(self.jobs.list_jobs, status, owner, offset, limit)
        summaries = [{"id": j.id, "type": j.type, "status": j.status, "createdAt": _iso(j.created_at),
                      "progress": round(j.progress)} for j in jobs]
        return {"jobs": summaries, "total": total, "offset": offset, "limit": limit}

    @router.post("/jobs/{job_id}/cancel")
    async def cancel_job(self, job_id: str, request: Request) -> dict:
        """Cancel a queued job (it never runs) or a running one (it stops within a step); 409 once finished."""
        await self._get(request, job_id)
        job = await asyncio.to_thread(self.jobs.cancel, job_id)
        if job is None:
            raise NotFound("Job not found", field="id")
        if job.status in ("completed", "failed"):
            raise JobConflict(f"job already {job.status}", field="id", details={"status": job.status})
        return {"success": True, "id": job.id, "status": job.status}

    @router.get("/queue/status")
    async def queue_status(self) -> dict:
        """Counts by status and the mean processing time (ms)."""
        stats = await asyncio.to_thread(self.jobs.stats)
        counts = stats["counts"]
        return {"queuedJobs": counts.get("queued", 0), "processingJobs": counts.get("processing", 0),
                "completedJobs": counts.get("completed", 0), "failedJobs": counts.get("failed", 0),
                "cancelledJobs": counts.get("cancelled", 0),
                "averageProcessingTime": round(stats["average_seconds"] * 1000),
                "maxQueueSize": self.job_settings.max_queue_size}


def _redact(request: dict) -> dict:
    """Echo the request without multi-megabyte image strings."""
    return {k: (f"<{len(v)} chars>" if isinstance(v, str) and len(v) > 256 else v) for k, v in request.items()}


def _env_flag(name: str) -> bool:
    import os

    return os.environ.get(name, "").lower() in ("1", "true", "yes")
