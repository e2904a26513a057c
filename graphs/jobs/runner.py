"""Asynchronous jobs: the runner deployment that executes queued jobs, and where their images are kept.

Graph position: ingress -> job store <- **JobRunner** -> (SDXLBase, SDXLRefiner, Upscaler, FaceRestorer,
FocalCropper, SafetyChecker). Each runner replica runs ``max_concurrent_jobs`` worker loops. A worker claims a job
with a lease, renews the lease (and records progress) while the job runs, writes every image completely before it
marks the job completed (trying a failing result store again while the images are in memory, then giving the job
back to the queue rather than failing it), and stops the generation within one denoising step when the job is
cancelled. A runner that
dies simply stops renewing: another claims the job when the lease expires (an attempt spent). A runner that stops
(a redeploy, a scale-down) claims nothing more, lets its running jobs finish for ``JOB_DRAIN_SECONDS`` and releases
the rest (back in their place in the queue, no attempt spent). While it renews the lease it also adds the
job's ``progress`` and ``preview`` events to the store's event log (``graphs.jobs.events``); the store itself
logs the state changes. With the result cache on, every job but batch sizes (``generate``, and seed 003's
``text2img``, ``img2img``, ``inpaint`` and ``style-transfer``, their uploads part of the key) with a fixed seed is
first looked up there (the same entries ``POST /generate`` writes for ``generate``).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import io
import logging
import time
import uuid

from PIL import Image
from ray import serve

from deployments.support.batching import gathered
from deployments.support.errors import GenerationCancelled, StorageUnavailable, kind_of
from deployments.support.generation import Encoding, StageResult, encoded
from deployments.support.logs import replica_logging
from deployments.support.metrics import JobMetrics
from deployments.support.settings import current
from graphs import availability, flights, plans
from graphs.api.control_fields import control_units
from graphs.api.errors import call, lost, unwrap
from graphs.api.fields import image_bytes
from graphs.jobs import webhooks
from graphs.jobs.cache import RequestCache, open_cache
from graphs.jobs.events import ProgressEvents, completed_data
from graphs.jobs.results import open_results
from graphs.jobs.sizes import SizeTable
from graphs.jobs.store import STATUSES, Job, open_store

logger = logging.getLogger(__name__)

WEBHOOKS_AT_ONCE = 8  # deliveries in flight per runner replica: a slow receiver holds up no more than its own
ENCODES_AT_ONCE = 4  # sizes of one batch-sizes job encoding at once, so that one job leaves Provenance room
LEASE_UNKNOWN = object()  # a renewal that failed or hung: whether the lease still holds is not known
LEASE_LOST = object()  # the keeper's answer when no renewal reached the store for a whole lease
# The upload a seed-003 edit starts from: the parent ingredient of its images' content credentials.
PARENT_FIELD = {"img2img": "initImage", "inpaint": "image", "style-transfer": "contentImage"}


# As it stops, a runner lets its running jobs finish for JOB_DRAIN_SECONDS (60 s by default), then releases the rest:
# the grace period leaves room for both. Serve calls __del__, where the runner stops claiming, only after a
# graceful_shutdown_wait_loop_s with no request in flight; nothing calls a runner, so that wait is kept short (at
# Serve's 2 s, a stopping runner went on claiming jobs it would at once have to give back).
@serve.deployment(ray_actor_options={"num_cpus": 0.25}, max_ongoing_requests=8, health_check_period_s=10,
                  graceful_shutdown_wait_loop_s=0.1, graceful_shutdown_timeout_s=90)
class JobRunner:
    def __init__(self, base, refiner, upscaler, faces, cropper, board=None,
                 hires_upscaler: str = "R-ESRGAN 2x+", *, safety=None, safety_enabled: bool | None = None,
                 result_cache: bool | None = None, marks=None) -> None:
        replica_logging()  # before anything here logs
        self.settings = current()
        self.handles = plans.Handles(base, refiner, upscaler, faces, board,
                                     plans.safety_stage(safety, safety_enabled, self.settings))
        self.cropper = cropper
        self.marks = marks  # the Provenance deployment: marks and encodes the batch-sizes crops
        self.hires_upscaler = hires_upscaler
        self.store = open_store(self.settings)
        self.results = open_results(self.settings)
        self.cache = RequestCache(open_cache(self.settings, result_cache), self.handles, self.settings)
        self.sizes = SizeTable.load(self.settings.batch_sizes_file)
        self.worker = f"runner-{uuid.uuid4().hex[:8]}"
        self._background: set[asyncio.Task] = set()
        self._stopping = asyncio.Event()  # set as the replica begins to stop: no worker claims after it
        self._workers = [asyncio.get_event_loop().create_task(self._work(i))
                         for i in range(self.settings.max_concurrent_jobs)]
        self._loops = list(self._workers)
        self._loops.append(asyncio.get_event_loop().create_task(self._purge()))
        self._loops.append(asyncio.get_event_loop().create_task(self._deliver_webhooks()))
        self.job_metrics = JobMetrics(STATUSES)
        self._loops.append(asyncio.get_event_loop().create_task(self._count_jobs()))
        availability.start()  # a job's stage call to a deployment that failed to deploy fails it, not its timeout

    async def __del__(self) -> None:
        """Serve awaits this as the replica stops (a redeploy, a scale-down; it waits the deployment's
        ``graceful_shutdown_wait_loop_s`` first, kept short for this one). No worker claims a job from now on;
        the running jobs get ``JOB_DRAIN_SECONDS`` to finish and publish here, and each still running then is
        released (see ``_execute``): the job was not at fault and no worker was lost, so it spends no attempt,
        however many redeploys it meets, and another runner takes it at once rather than after its lease."""
        self._stopping.set()
        await asyncio.wait(self._workers, timeout=self.settings.job_drain_seconds)
        for loop in self._loops:
            loop.cancel()
        await asyncio.gather(*self._loops, return_exceptions=True)

    async def check_health(self) -> None:
        if not self._stopping.is_set() and any(loop.done() for loop in self._loops):
            raise RuntimeError("a job worker loop stopped")

    async def _work(self, index: int) -> None:
        name = f"{self.worker}/{index}"
        while not self._stopping.is_set():
            try:
                job = await asyncio.to_thread(self.store.claim, name, self.settings.job_lease_seconds)
            except Exception as e:  # noqa: BLE001 - a store hiccup must not kill the loop
                if exiting(e):
                    return
                logger.exception("claim failed")
                job = None
            if job is None:
                with contextlib.suppress(TimeoutError):  # the poll, cut short when the replica begins to stop
                    await asyncio.wait_for(self._stopping.wait(), self.settings.job_poll_seconds)
                continue
            # The job's id, never its request: prompts and webhook URLs stay out of the logs.
            logger.info("job %s claimed by %s: %s, run %d, attempt %d of %d", job.id, name, job.type, job.runs,
                        job.attempts, self.store.max_attempts)
            if self._stopping.is_set():  # claimed as the replica began to stop: straight back, unstarted
                await self._release(job, name)
                return
            try:
                await self._execute(job, name)
            except Exception:  # noqa: BLE001 - a store failing to publish: the lease runs out, the job runs again
                logger.exception("job %s: not published", job.id)

    async def _execute(self, job: Job, worker: str) -> None:
        started = time.monotonic()
        task = asyncio.create_task(self._run(job))
        keeper = asyncio.create_task(self._keep_lease(job, worker, task))
        status, result, error, event = "failed", None, None, {}
        code: str | None = None  # the outcome's error code, for the log
        why = ""  # what the log adds to the code: the server's own failure only (a client's may quote its request)
        gone: BaseException | None = None
        try:
            result = await asyncio.wait_for(task, self.settings.job_timeout / 1000)
            result["timeTaken"] = int((time.monotonic() - started) * 1000)
            status, event = "completed", completed_data(job.id, result)
        except asyncio.CancelledError:
            me = asyncio.current_task()
            if me is not None and me.cancelling():  # this worker loop is stopping (the replica shuts down), not the job
                keeper.cancel()
                await self._quietly(self._release(job, worker))  # back at once, its attempt not spent
                raise
            status, error, code = "cancelled", "cancelled", "CANCELLED"
        except Exception as e:  # noqa: BLE001 - any failure is recorded on the job, with its code
            cause = unwrap(e)
            if isinstance(e, TimeoutError) and task.cancelled():  # wait_for's: its flight cancelled every call
                error = f"job exceeded JOB_TIMEOUT ({self.settings.job_timeout} ms)"
                event, code = {"code": "JOB_TIMEOUT", "message": error}, "JOB_TIMEOUT"
                logger.warning("job %s: exceeded JOB_TIMEOUT (%d ms) after %.1f s; its stage calls are cancelled",
                               job.id, self.settings.job_timeout, time.monotonic() - started)
            elif isinstance(cause, GenerationCancelled):
                status, error, code = "cancelled", "cancelled", "CANCELLED"
            elif isinstance(cause, StorageUnavailable) and job.attempts < self.store.max_attempts:
                gone = cause  # the store stayed down through every save retry: the next attempt may find it up
            elif (gone := lost(e)) is None:
                code = getattr(cause, "code", type(cause).__name__)
                error, event = f"{code}: {cause}", {"code": code, "message": str(cause)}
                why = f" ({cause})" if kind_of(cause) == "server" else ""
        finally:
            keeper.cancel()
        if keeper.done() and not keeper.cancelled() and keeper.exception() is None and keeper.result() is LEASE_LOST:
            return  # not ours to publish: the next claim queues it again (or another runner has it already)
        if gone is not None:
            await self._give_back(job, worker, gone)
            return
        if not await asyncio.to_thread(self.store.finish, job.id, worker, status, result, error, event):
            logger.warning("job %s: lease lost before publishing; the result was dropped", job.id)
            return
        # A failure of the service's own (a timeout included) is a warning; a client's mistake or a cancel is not.
        level = logging.WARNING if status == "failed" and (code == "JOB_TIMEOUT" or why) else logging.INFO
        logger.log(level, "job %s %s in %.1f s (run %d, attempt %d)%s%s", job.id, status, time.monotonic() - started,
                   job.runs, job.attempts, f": {code}" if code else "", why)
        # (its webhook, if any, is owed in the store from now on: see _deliver_webhooks)

    async def _release(self, job: Job, worker: str) -> None:
        """This runner is stopping: the job goes back to its place in the queue, its attempt not spent."""
        logger.info("job %s released to the queue (run %d, its attempt not spent): the runner is stopping", job.id,
                    job.runs)
        if not await asyncio.to_thread(self.store.release, job.id, worker):
            # Cancelled meanwhile: that is its outcome (a no-op when the lease is no longer ours).
            await asyncio.to_thread(self.store.finish, job.id, worker, "cancelled", None, "cancelled", {})

    async def _give_back(self, job: Job, worker: str, gone: BaseException) -> None:
        """A stage's replica, or its node, went away mid-job, or the result store stayed unavailable. The job is not
        at fault, so it goes back to the queue rather than failing: its lease ends now, and the next claim (any
        runner's, on any node) queues it again and counts the attempt, as for a runner that died; past
        JOB_MAX_ATTEMPTS it fails as a lost worker's does (a store still down on the last attempt fails it with
        STORAGE_UNAVAILABLE)."""
        logger.warning("job %s: %s mid-job; back to the queue", job.id, type(gone).__name__)
        if not await asyncio.to_thread(self.store.heartbeat, job.id, worker, 0):
            # Cancelled meanwhile: that is its outcome (a no-op when the lease is no longer ours).
            await asyncio.to_thread(self.store.finish, job.id, worker, "cancelled", None, "cancelled", {})

    async def _keep_lease(self, job: Job, worker: str, task: asyncio.Task) -> object | None:
        """Renew the job's lease while ``task`` runs, logging its progress; stop ``task`` when the job is cancelled
        or the lease is another's. ``LEASE_LOST`` when it stopped ``task`` because no renewal reached the store
        for a whole lease (the job is then not this runner's to publish)."""
        interval = self.settings.job_lease_seconds / 3
        every = job.request.get("preview_every")
        if self.handles.safety is not None:
            # A preview is the unscreened generation (near the end, a recognisable thumbnail of what the checker
            # may then black out): while the filter is on, none is published.
            every = 0
        events = ProgressEvents(self.settings.job_preview_every if every is None else every)
        if events.preview_every:
            await self._quietly(self._board("preview", job.run_id))  # the replica sends previews from now on
        lease = self.settings.job_lease_seconds
        renewed = time.monotonic()
        while not task.done():
            await asyncio.sleep(min(interval, 0.5))
            # A board or store hiccup costs this round, never the lease: a keeper that stopped would let another
            # runner claim the job while it still runs here.
            progress = await self._quietly(self._board("progress", job.run_id))
            percent = min(100.0, 100.0 * progress[0] / progress[1]) if progress else None
            if percent is not None and job.type == "batch-sizes":
                percent = min(percent, 99.0)
            keep = await self._quietly(asyncio.to_thread(self.store.heartbeat, job.id, worker, lease, percent),
                                       default=LEASE_UNKNOWN)
            if keep is LEASE_UNKNOWN:
                if time.monotonic() - renewed > lease:  # the lease ran out unrenewed: another runner may hold it
                    logger.warning("job %s: no lease renewal for %.0f s; stopped here", job.id, lease)
                    task.cancel()
                    return LEASE_LOST
            elif not keep:  # cancelled (or the lease was taken over): the flight stops every stage call
                task.cancel()
                return None
            else:
                renewed = time.monotonic()
            if progress:  # bounded like the calls above: a hung board or store must not hold up the next renewal
                await self._quietly(self._report(job, worker, events, *progress))
        return None

    async def _report(self, job: Job, worker: str, events: ProgressEvents, step: int, total: int) -> None:
        """Log a progress event for a new step and, every few steps, a preview of the latents (only while this
        worker holds the lease)."""
        data = events.progress(step, total)
        if data is None:
            return
        await asyncio.to_thread(self.store.append_event, job.id, "progress", data, worker)
        if events.wants_preview(step):
            image = await self._board("preview", job.run_id)
            if image is not None:
                preview = await asyncio.to_thread(events.preview, image, step, total)
                await asyncio.to_thread(self.store.append_event, job.id, "preview", preview, worker)

    async def _quietly(self, work, default=None):
        """``work``'s result within a lease interval, or ``default`` (logged) when it fails or hangs."""
        try:
            return await asyncio.wait_for(work, self.settings.job_lease_seconds / 3)
        except Exception:  # noqa: BLE001 - see _keep_lease
            logger.warning("job lease keeper: %s failed; trying again", getattr(work, "__qualname__", work),
                           exc_info=True)
            return default

    async def _board(self, method: str, request_id: str):
        """Progress or preview as the replica running the request last reported it (``graphs/board.py``)."""
        if self.handles.board is None:
            return None
        return await call(getattr(self.handles.board, method).remote(request_id))

    async def _run(self, job: Job) -> dict:
        async with flights.flight():
            return await self._plan(job)

    async def _plan(self, job: Job) -> dict:
        if job.type == "batch-sizes":
            return await self._batch(job)
        if job.type == "generate":
            return await self._generate(job)
        key = await self.cache.key(job.type, cache_fields(job.request), job.request.get("model"))
        hit = await self.cache.get(key)
        if hit is not None:
            keys = [await self._save(job, f"image_{i}", data) for i, data in enumerate(hit.files)]
            return {**hit.facts, "images": keys, "cached": True}
        request = await asyncio.to_thread(plans.seed003, job.type, job.request)  # it decodes the uploads
        parent = image_bytes(job.request[PARENT_FIELD[job.type]], "image") if job.type in PARENT_FIELD else None
        result = await plans.seed003_job(self.handles, request, job.run_id, parent)
        keys = [await self._save(job, f"image_{i}", data) for i, data in enumerate(result.encoded)]
        r = job.request
        parameters = {"prompt": request.prompt, "width": request.width, "height": request.height,
                      "steps": request.steps, "guidanceScale": request.guidance_scale,
                      "sampler": r.get("sampler", "euler_a"), "model": result.info.get("model", r.get("model"))}
        facts = {"seed": result.seeds[0], "parameters": parameters, "warnings": result.warnings,
                 "nsfw": result.info.get("nsfw")}
        await self.cache.put(key, facts, result.encoded)
        return {"images": keys, **facts, "cached": False}

    async def _generate(self, job: Job) -> dict:
        """Seed 002's queued /generate: its plan, or the answer /generate stored for the same request."""
        key = await self.cache.key("generate", plans.seed000_fields(job.request, self.hires_upscaler),
                                   job.request.get("model"))
        hit = await self.cache.get(key)
        if hit is not None:
            report = plans.Report.from_facts(hit.files[0], hit.facts)
        else:
            units = await asyncio.to_thread(control_units, job.request.get("controlnets") or [], None, edit=False)
            report = await plans.seed000(self.handles, job.request, self.hires_upscaler, job.run_id, units)
            await self.cache.put(key, report.facts(), [report.data])
        saved = await self._save(job, "image_0", report.data)
        return {"images": [saved], "seed": report.seed, "width": report.size[0], "height": report.size[1],
                "warnings": report.warnings, "checkpoint": report.checkpoint,
                "nsfw": [report.nsfw] if report.nsfw is not None else None, "cached": hit is not None}

    async def _batch(self, job: Job) -> dict:
        """The batch-sizes plan, then every image (and its WebP derivatives) stored whole."""
        seed, bases, sized = await plans.batch_sizes(self.handles, self.cropper, job.request, self.sizes,
                                                     self.hires_upscaler, job.run_id)
        widths = job.request.get("derivatives") or []
        info = {"model": job.request.get("model")}  # the checkpoint, resolved when the job was accepted
        slots = asyncio.Semaphore(ENCODES_AT_ONCE)

        async def finish(item: plans.SizedImage) -> dict:
            """One size marked, encoded and stored, with its WebP derivatives."""
            out = item.image
            small = [w for w in widths if 8 <= w <= out.width]
            facts = {**info, "upscaler": self.hires_upscaler} if item.upscaled else info
            async with slots:
                resized = await asyncio.to_thread(
                    lambda: [out.resize((w, max(1, round(out.height * w / out.width)))) for w in small])
                encodings = [self._encode([out], facts, Encoding())]
                if small:
                    encodings.append(self._encode(resized, facts, Encoding(format="webp", quality=82)))
                png, *webp = await gathered(encodings)
            entry = {"key": await self._save(job, item.name, png.encoded[0]), "width": out.width,
                     "height": out.height, "aspect": item.aspect, "box": list(item.box), "upscaled": item.upscaled,
                     "nsfw": item.nsfw}
            if webp:
                entry["derivatives"] = {str(w): await self._save(job, f"{item.name}_{w}w", blob, "webp")
                                        for w, blob in zip(small, webp[0].encoded, strict=True)}
            return entry

        # Several sizes at once (the Provenance replica encodes on threads of its own); a failure stops the rest.
        entries = await gathered([finish(item) for item in sized])
        images = {item.name: entry for item, entry in zip(sized, entries, strict=True)}
        return {"images": images, "bases_generated": bases, "seed": seed}

    async def _encode(self, images: list[Image.Image], info: dict, how: Encoding) -> StageResult:
        """Watermarked, encoded and signed by the Provenance deployment (this process imports neither OpenCV nor
        c2pa); in-process where there is none (the tests that run the runner without Ray)."""
        result = StageResult(images=images, info=info)
        if self.marks is None:
            return await encoded(result, how)
        return await call(self.marks.encode.remote(result, how))

    async def _deliver_webhooks(self) -> None:
        """Deliver the webhooks the store says are owed, a few at once, one attempt each time one is taken: a
        failed attempt is due again after its backoff, from whichever runner takes it then (a runner that stops
        mid-attempt leaves it to the others once its lease on it is out)."""
        slots = asyncio.Semaphore(WEBHOOKS_AT_ONCE)
        lease = 2 * self.settings.webhook_timeout_seconds + 5
        while True:
            await slots.acquire()
            try:
                taken = await asyncio.to_thread(self.store.take_delivery, lease)
            except Exception as e:  # noqa: BLE001 - a store hiccup must not kill the loop
                if exiting(e):
                    return
                logger.exception("webhook deliveries unreadable")
                taken = None
            if taken is None:
                slots.release()
                await asyncio.sleep(self.settings.job_poll_seconds)
                continue
            delivery = asyncio.create_task(self._deliver(*taken))
            self._background.add(delivery)  # keep a reference until it is done
            delivery.add_done_callback(self._background.discard)
            delivery.add_done_callback(lambda _: slots.release())

    async def _deliver(self, job: Job, number: int) -> None:
        last = number + 1 >= self.settings.webhook_attempts
        try:
            outcome = await webhooks.attempt(job.webhook_url or "", webhooks.payload(job), self.settings, number)
        except Exception:  # noqa: BLE001 - an attempt that failed in a way of its own: settled like any other
            logger.warning("job %s: webhook attempt %d failed", job.id, number + 1, exc_info=True)
            outcome = self.settings.webhook_backoff_seconds * 2**number
        retry_in = outcome if not isinstance(outcome, bool) and not last else None
        if retry_in is None and outcome is not True:
            logger.warning("job %s: webhook not delivered after %d attempts; given up", job.id, number + 1)
        try:
            await asyncio.to_thread(self.store.settle_delivery, job.id, retry_in)
        except Exception:  # noqa: BLE001 - unsettled, it is due again when its lease is out
            logger.warning("job %s: webhook delivery not settled", job.id, exc_info=True)

    async def _count_jobs(self, every_s: float = 5.0) -> None:
        """Jobs by state, for the dashboards (queued is the backlog the runners have not claimed yet)."""
        while True:
            try:
                self.job_metrics.record((await asyncio.to_thread(self.store.stats))["counts"])
            except Exception as e:  # noqa: BLE001 - a store hiccup must not kill the loop
                if exiting(e):
                    return
                logger.exception("job metrics failed")
            await asyncio.sleep(every_s)

    async def _save(self, job: Job, name: str, data: bytes, suffix: str = "png") -> str:
        """Stored under the run's own number: a run that lost its lease and runs on (its runner cut off from the
        store) can never overwrite the files of the run that published. A store that is unavailable is
        tried again while the bytes are here, a few times within one lease: a brief outage must not cost the
        generation."""
        tries, delay = 1, self.settings.job_save_backoff_seconds
        deadline = time.monotonic() + self.settings.job_lease_seconds
        while True:
            try:
                return await asyncio.to_thread(self.results.save, job.id, f"{job.runs}-{name}", data, suffix)
            except StorageUnavailable:
                if tries >= self.settings.job_save_attempts or time.monotonic() + delay > deadline:
                    raise
            logger.warning("job %s: %s not stored (try %d); trying again in %.1f s", job.id, name, tries, delay)
            await asyncio.sleep(delay)
            tries, delay = tries + 1, delay * 2

    async def _purge(self) -> None:
        """Finished jobs past the retention go, each after its images: one whose images cannot be deleted now
        stays for the next round rather than leaving them behind for ever."""
        while True:
            await asyncio.sleep(min(60.0, self.settings.job_retention_seconds / 4))
            try:
                await asyncio.to_thread(self.store.purge, self.settings.job_retention_seconds,
                                        lambda job: self.results.delete(job.id))
            except Exception as e:  # noqa: BLE001
                if exiting(e):
                    return
                logger.exception("retention purge failed")


def exiting(error: BaseException) -> bool:
    """Whether ``error`` says this process's threads take no more work: the interpreter is exiting (a runner of
    Serve's local testing mode outlives its tests) or the loop's executor is shut down. A loop that met it can only
    meet it again, so it ends instead of logging it at every poll."""
    return isinstance(error, RuntimeError) and str(error).startswith("cannot schedule new futures after")


def cache_fields(request: dict) -> dict:
    """A job's request as the cache sees it: without what never changes its images."""
    return {k: v for k, v in request.items() if k not in ("priority", "webhookUrl", "preview_every")}


def data_uri(data: bytes, mime: str = "image/png") -> str:
    return f"data:{mime};base64,{base64.b64encode(data).decode()}"


def image_info(data: bytes) -> tuple[int, int]:
    with Image.open(io.BytesIO(data)) as image:
        return image.size
