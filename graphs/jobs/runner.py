"""Asynchronous jobs: the runner deployment that executes queued jobs, and where their images are kept.

Graph position: ingress -> job store <- **JobRunner** -> (SDXLBase, SDXLRefiner, Upscaler, FaceRestorer,
FocalCropper). Each runner replica runs ``max_concurrent_jobs`` worker loops. A worker claims a job with a lease,
renews the lease (and records progress) while the job runs, writes every image completely before it marks the
job completed, and stops the generation within one denoising step when the job is cancelled. A runner that dies
simply stops renewing: another claims the job when the lease expires.
"""

from __future__ import annotations

import asyncio
import base64
import io
import logging
import time
import uuid

from PIL import Image
from ray import serve

from deployments.focal_cropper import CropSize
from deployments.support.errors import GenerationCancelled
from deployments.support.generation import GenerationRequest, image_of, resolve_seeds
from deployments.support.imaging import encode
from deployments.support.settings import current
from graphs import plans
from graphs.api.errors import call, unwrap
from graphs.api.fields import image_field
from graphs.jobs.results import open_results
from graphs.jobs.sizes import SizeTable
from graphs.jobs.store import Job, open_store
from graphs.jobs.webhooks import deliver

logger = logging.getLogger(__name__)


def png(image: Image.Image) -> bytes:
    return encode(image, "png")


def camel_request(job: Job) -> GenerationRequest:
    """Seed 003 camelCase fields -> one SDXLBase request."""
    r = job.request
    common = dict(prompt=r.get("prompt", ""), negative_prompt=r.get("negativePrompt", ""),
                  width=r.get("width", 512), height=r.get("height", 512), steps=r.get("steps", 30),
                  guidance_scale=r.get("guidanceScale", 7.5), seed=r.get("seed", -1),
                  sampler=r.get("sampler", "euler_a"))
    if job.type == "img2img":
        return GenerationRequest(**common, init_image=image_field(r["initImage"], "initImage"),
                                 strength=r.get("strength", 0.75))
    if job.type == "inpaint":
        return GenerationRequest(**common, init_image=image_field(r["image"], "image"),
                                 mask=image_field(r["mask"], "mask"), strength=r.get("inpaintingStrength", 0.9))
    if job.type == "style-transfer":
        content = image_field(r["contentImage"], "contentImage")
        common.update(width=r.get("width", content.width - content.width % 8),
                      height=r.get("height", content.height - content.height % 8))
        style = image_field(r["styleImage"], "styleImage")
        return GenerationRequest(**common, init_image=content, ip_adapter_image=style,
                                 ip_adapter_scale=r.get("styleStrength", 0.7),
                                 strength=min(1.0, max(0.05, 1.0 - r.get("contentStrength", 0.3))))
    return GenerationRequest(**common)


@serve.deployment(ray_actor_options={"num_cpus": 0.25}, max_ongoing_requests=8, health_check_period_s=10)
class JobRunner:
    def __init__(self, base, refiner, upscaler, faces, cropper, hires_upscaler: str = "R-ESRGAN 2x+") -> None:
        self.handles = plans.Handles(base, refiner, upscaler, faces)
        self.cropper = cropper
        self.hires_upscaler = hires_upscaler
        self.settings = current()
        self.store = open_store(self.settings)
        self.results = open_results(self.settings)
        self.sizes = SizeTable.load(self.settings.batch_sizes_file)
        self.worker = f"runner-{uuid.uuid4().hex[:8]}"
        self._background: set[asyncio.Task] = set()
        self._loops = [asyncio.get_event_loop().create_task(self._work(i))
                       for i in range(self.settings.max_concurrent_jobs)]
        self._loops.append(asyncio.get_event_loop().create_task(self._purge()))

    async def check_health(self) -> None:
        if any(loop.done() for loop in self._loops):
            raise RuntimeError("a job worker loop stopped")

    async def _work(self, index: int) -> None:
        name = f"{self.worker}/{index}"
        while True:
            try:
                job = await asyncio.to_thread(self.store.claim, name, self.settings.job_lease_seconds)
            except Exception:  # noqa: BLE001 - a store hiccup must not kill the loop
                logger.exception("claim failed")
                job = None
            if job is None:
                await asyncio.sleep(self.settings.job_poll_seconds)
                continue
            await self._execute(job, name)

    async def _execute(self, job: Job, worker: str) -> None:
        started = time.monotonic()
        task = asyncio.create_task(self._run(job))
        keeper = asyncio.create_task(self._keep_lease(job, worker, task))
        status, result, error = "failed", None, None
        try:
            result = await asyncio.wait_for(task, self.settings.job_timeout / 1000)
            result["timeTaken"] = int((time.monotonic() - started) * 1000)
            status = "completed"
        except TimeoutError:
            await call(self.handles.base.cancel.remote(job.id))
            error = f"job exceeded JOB_TIMEOUT ({self.settings.job_timeout} ms)"
        except asyncio.CancelledError:
            status, error = "cancelled", "cancelled"
        except Exception as e:  # noqa: BLE001 - any failure is recorded on the job, with its code
            cause = unwrap(e)
            if isinstance(cause, GenerationCancelled):
                status, error = "cancelled", "cancelled"
            else:
                error = f"{getattr(cause, 'code', type(cause).__name__)}: {cause}"
                logger.warning("job %s failed: %s", job.id, error)
        finally:
            keeper.cancel()
        if not await asyncio.to_thread(self.store.finish, job.id, worker, status, result, error):
            logger.warning("job %s: lease lost before publishing; the result was dropped", job.id)
        elif job.webhook_url:
            payload = {"id": job.id, "jobId": job.id, "type": job.type, "status": status, "error": error,
                       "seed": (result or {}).get("seed")}
            delivery = asyncio.create_task(deliver(job.webhook_url, payload, self.settings))
            self._background.add(delivery)  # keep a reference until it is done
            delivery.add_done_callback(self._background.discard)

    async def _keep_lease(self, job: Job, worker: str, task: asyncio.Task) -> None:
        interval = self.settings.job_lease_seconds / 3
        while not task.done():
            await asyncio.sleep(min(interval, 0.5))
            progress = await call(self.handles.base.progress.remote(job.id))
            percent = 100.0 * progress[0] / progress[1] if progress else None
            if percent is not None and job.type == "batch-sizes":
                percent = min(percent, 99.0)
            lease = self.settings.job_lease_seconds
            keep = await asyncio.to_thread(self.store.heartbeat, job.id, worker, lease, percent)
            if not keep:  # cancelled (or the lease was taken over): stop the denoising loops
                aspects = ("landscape", "square", "portrait") if job.type == "batch-sizes" else ()
                for request_id in [job.id, *(f"{job.id}/{aspect}" for aspect in aspects)]:
                    await call(self.handles.base.cancel.remote(request_id))
                return

    async def _run(self, job: Job) -> dict:
        if job.type == "batch-sizes":
            return await self._batch(job)
        if job.type == "generate":
            return await self._generate(job)
        request = camel_request(job)
        result = await call(self.handles.base.generate.remote(request, job.id))
        keys = [await self._save(job.id, f"image_{i}", png(image)) for i, image in enumerate(result.images)]
        r = job.request
        parameters = {"prompt": request.prompt, "width": request.width, "height": request.height,
                      "steps": request.steps, "guidanceScale": request.guidance_scale,
                      "sampler": r.get("sampler", "euler_a"), "model": r.get("model", result.info.get("model"))}
        return {"images": keys, "seed": result.seeds[0], "parameters": parameters}

    async def _generate(self, job: Job) -> dict:
        r = job.request
        request = GenerationRequest(prompt=r["prompt"], negative_prompt=r.get("negative_prompt", ""),
                                    seed=r.get("seed", -1), width=r.get("width", 1024), height=r.get("height", 1024),
                                    steps=r.get("num_inference_steps", 30), guidance_scale=r.get("guidance_scale", 7.0))
        opts = plans.PlanOptions(use_refiner=r.get("use_refiner", True), hires_fix=r.get("hires_fix", False),
                                 neural_upscaler=self.hires_upscaler if r.get("use_realesrgan", True) else None,
                                 restore_faces=r.get("use_face_restoration", False),
                                 face_weight=r.get("face_restoration_weight", 0.6), request_id=job.id)
        plan = plans.hires_fix if opts.hires_fix else plans.standard
        report = await plan(self.handles, request, opts)
        key = await self._save(job.id, "image_0", png(report.image))
        return {"images": [key], "seed": report.seed, "width": report.image.width, "height": report.image.height,
                "warnings": report.warnings}

    async def _batch(self, job: Job) -> dict:
        """Group sizes by aspect, render one base per group in parallel with one seed, cut every size."""
        r = job.request
        sizes = self.sizes.resolve(r["sizes"])
        seed = resolve_seeds(r.get("seed", -1), 1)[0]
        groups: dict[str, list[CropSize]] = {}
        for size in sizes:
            groups.setdefault(self.sizes.aspect(size.width, size.height), []).append(size)
        base_sizes = r.get("baseSizes") or {}
        requests = {}
        for aspect in groups:
            width, height = base_sizes.get(aspect) or self.sizes.bases[aspect]
            requests[aspect] = GenerationRequest(prompt=r["prompt"], negative_prompt=r.get("negativePrompt", ""),
                                                 width=width, height=height, steps=r.get("steps", 30), seed=seed,
                                                 guidance_scale=r.get("guidanceScale", 7.0))
        # One SDXLBase call per aspect class, all in flight at once: replicas render them in parallel.
        bases = {a: self.handles.base.generate.remote(req, job.id if i == 0 else f"{job.id}/{a}")
                 for i, (a, req) in enumerate(requests.items())}
        images: dict[str, dict] = {}
        widths = r.get("derivatives") or []
        crops_in_flight = {a: self.cropper.crop.remote(bases[a], groups[a]) for a in groups}  # type: ignore[attr-defined]
        for aspect, pending in crops_in_flight.items():
            base_image = image_of(await call(bases[aspect]))
            _focus, crops = await call(pending)
            for crop in crops:
                out = crop.image
                if crop.upscaled:  # the crop is smaller than its target: a neural upscale, not a plain resize
                    upscaled = await call(self.handles.upscaler.upscale.remote(
                        base_image.crop(crop.box), self.hires_upscaler, None, crop.image.width, crop.image.height))
                    out = upscaled.image
                entry = {"key": await self._save(job.id, crop.name, png(out)), "width": out.width,
                         "height": out.height, "aspect": aspect, "box": list(crop.box), "upscaled": crop.upscaled}
                if widths:
                    entry["derivatives"] = {
                        str(w): await self._save(job.id, f"{crop.name}_{w}w",
                                                 encode(out.resize((w, max(1, round(out.height * w / out.width)))),
                                                        "webp", 82), "webp")
                        for w in widths if 8 <= w <= out.width}
                images[crop.name] = entry
        return {"images": images, "bases_generated": len(groups), "seed": seed}

    async def _save(self, job_id: str, name: str, data: bytes, suffix: str = "png") -> str:
        return await asyncio.to_thread(self.results.save, job_id, name, data, suffix)

    async def _purge(self) -> None:
        while True:
            await asyncio.sleep(min(60.0, self.settings.job_retention_seconds / 4))
            try:
                for job in await asyncio.to_thread(self.store.purge, self.settings.job_retention_seconds):
                    await asyncio.to_thread(self.results.delete, job.id)
            except Exception:  # noqa: BLE001
                logger.exception("retention purge failed")


def data_uri(data: bytes, mime: str = "image/png") -> str:
    return f"data:{mime};base64,{base64.b64encode(data).decode()}"


def image_info(data: bytes) -> tuple[int, int]:
    with Image.open(io.BytesIO(data)) as image:
        return image.size
