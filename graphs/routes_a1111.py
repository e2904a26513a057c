"""Automatic1111's ``/sdapi/v1/*`` (seed 004 and every A1111 client): compatible payloads, our own plumbing.

Images are plain base64 PNGs carrying A1111's ``parameters`` text chunk; ``info`` is a JSON string holding
``all_seeds``. ``/interrupt`` and ``/skip`` cancel only the calling client's in-flight requests (the client is
its bearer token, else its address), never another client's.
"""

import asyncio
import json
import time
import uuid
from dataclasses import dataclass, field

from fastapi import APIRouter, Request
from PIL import Image
from pydantic import BaseModel, ConfigDict, Field

from deployments.errors import InvalidInput, UnknownModel
from deployments.generation import GenerationRequest, GenerationResult
from deployments.samplers import SCHEDULES, sampler_names
from deployments.sdxl_refiner import RefineRequest
from graphs import plans
from graphs.http import b64_png, call, image_field, stop_on_cancel, token_owner
from graphs.jobstore import RedisJobStore, SQLiteJobStore

router = APIRouter(prefix="/sdapi/v1", tags=["automatic1111"])
MAX_IMAGES = 16


class _A1111(BaseModel):
    model_config = ConfigDict(extra="ignore")  # A1111 clients send many fields we do not use


class Txt2ImgRequest(_A1111):
    prompt: str = Field("", max_length=10_000)
    negative_prompt: str = Field("", max_length=10_000)
    seed: int = Field(-1, ge=-1, le=2**32 - 1)
    sampler_name: str | None = None
    scheduler: str | None = None
    batch_size: int = Field(1, ge=1, le=MAX_IMAGES)
    n_iter: int = Field(1, ge=1, le=MAX_IMAGES)
    steps: int = Field(20, ge=1, le=150)
    cfg_scale: float = Field(7.0, ge=0.0, le=30.0)
    width: int = Field(512, ge=64, le=2048, multiple_of=8)
    height: int = Field(512, ge=64, le=2048, multiple_of=8)
    restore_faces: bool = False
    denoising_strength: float = Field(0.7, ge=0.0, le=1.0)
    enable_hr: bool = False
    hr_scale: float = Field(2.0, ge=1.0, le=4.0)
    hr_upscaler: str = "Latent"
    hr_second_pass_steps: int = Field(0, ge=0, le=150)
    refiner_checkpoint: str | None = None
    refiner_switch_at: float = Field(0.8, gt=0.0, lt=1.0)
    override_settings: dict = {}


class Img2ImgRequest(Txt2ImgRequest):
    init_images: list[str] = Field(..., min_length=1, max_length=MAX_IMAGES)
    mask: str | None = None
    mask_blur: int = Field(4, ge=0, le=64)
    inpainting_fill: int = Field(1, ge=0, le=3, description="accepted; masked content always starts from the image")
    inpaint_full_res: bool = Field(True, description="accepted; the whole picture is processed")
    denoising_strength: float = Field(0.75, gt=0.0, le=1.0)


class ImagesResponse(BaseModel):
    images: list[str]
    parameters: dict
    info: str


class ExtrasRequest(_A1111):
    image: str
    resize_mode: int = Field(0, ge=0, le=1, description="0: scale by upscaling_resize; 1: to _w x _h")
    upscaling_resize: float = Field(2.0, gt=0.0, le=8.0)
    upscaling_resize_w: int = Field(512, ge=8, le=8192)
    upscaling_resize_h: int = Field(512, ge=8, le=8192)
    upscaler_1: str = "None"
    upscaler_2: str = "None"
    extras_upscaler_2_visibility: float = Field(0.0, ge=0.0, le=1.0)
    upscaler_2_visibility: float | None = Field(None, ge=0.0, le=1.0, description="seed 004's spelling")
    gfpgan_visibility: float = Field(0.0, ge=0.0, le=1.0)
    codeformer_visibility: float = Field(0.0, ge=0.0, le=1.0)
    codeformer_weight: float = Field(0.0, ge=0.0, le=1.0)


class ExtrasResponse(BaseModel):
    html_info: str
    image: str


class BatchImage(BaseModel):
    data: str
    name: str = ""


class ExtrasBatchRequest(ExtrasRequest):
    image: str = ""
    imageList: list[BatchImage] = Field(..., min_length=1, max_length=MAX_IMAGES)


class ExtrasBatchResponse(BaseModel):
    html_info: str
    images: list[str]


class PngInfoRequest(BaseModel):
    image: str


@dataclass
class InFlight:
    client: str
    started: float
    total_steps: int
    request_ids: list[str] = field(default_factory=list)


def _client(request: Request) -> str:
    token = request.headers.get("authorization")
    return f"token:{token}" if token else f"addr:{request.client.host if request.client else '?'}"


def infotext(r: Txt2ImgRequest, seed: int, model: str, extra: dict | None = None) -> str:
    """A1111's 'parameters' text: prompt, negative prompt, then comma-separated settings."""
    settings = {"Steps": r.steps, "Sampler": r.sampler_name or "Euler a", "Schedule type": r.scheduler or "Automatic",
                "CFG scale": r.cfg_scale, "Seed": seed, "Size": f"{r.width}x{r.height}", "Model": model}
    settings.update(extra or {})
    lines = [r.prompt]
    if r.negative_prompt:
        lines.append(f"Negative prompt: {r.negative_prompt}")
    lines.append(", ".join(f"{k}: {v}" for k, v in settings.items()))
    return "\n".join(lines)


class A1111Routes:
    handles: plans.Handles
    a1111_options: dict
    in_flight: dict[str, InFlight]
    jobs: SQLiteJobStore | RedisJobStore

    async def _checkpoint(self, r: Txt2ImgRequest) -> str:
        base = await call(self.handles.base.describe.remote())
        wanted = r.override_settings.get("sd_model_checkpoint") or self.a1111_options.get("sd_model_checkpoint")
        if wanted and wanted.split(" [")[0] != base["name"]:
            raise UnknownModel(f"checkpoint {wanted!r} is not loaded", field="override_settings.sd_model_checkpoint",
                               details={"choices": [base["name"]]})
        return base["name"]

    def _generation(self, r: Txt2ImgRequest, seed: int, **extra) -> GenerationRequest:
        schedule = None
        if r.scheduler:  # A1111 sends labels ("Karras") or names ("karras")
            schedule = {s.lower(): s for s in SCHEDULES}.get(r.scheduler.lower())
            if schedule is None:
                raise UnknownModel(f"unknown scheduler {r.scheduler!r}", field="scheduler",
                                   details={"choices": list(SCHEDULES)})
        return GenerationRequest(prompt=r.prompt, negative_prompt=r.negative_prompt, width=r.width, height=r.height,
                                 steps=r.steps, guidance_scale=r.cfg_scale, seed=seed, batch_size=r.batch_size,
                                 sampler=r.sampler_name, schedule=schedule, **extra)

    async def _run(self, http: Request, r: Txt2ImgRequest, **extra) -> ImagesResponse:
        if r.batch_size * r.n_iter > MAX_IMAGES:
            raise InvalidInput(f"batch_size x n_iter exceeds {MAX_IMAGES} images", field="batch_size")
        model = await self._checkpoint(r)
        job = InFlight(_client(http), time.monotonic(), r.steps * r.n_iter)
        key = uuid.uuid4().hex
        self.in_flight[key] = job
        images: list[Image.Image] = []
        seeds: list[int] = []
        extras: dict = {}
        try:
            seed = r.seed
            async with stop_on_cancel(lambda: self._cancel(job)):
                for _ in range(r.n_iter):
                    request_id = uuid.uuid4().hex
                    job.request_ids.append(request_id)
                    result = await self._one_batch(r, seed, request_id, extras, **extra)
                    images += result.images
                    seeds += result.seeds
                    seed = result.seeds[-1] + 1
        finally:
            self.in_flight.pop(key, None)
        if r.restore_faces:
            restored = []
            for image in images:
                report = await call(self.handles.faces.restore.remote(image, 0.6))
                restored.append(report.image)
            images = restored
            extras["Face restoration"] = "CodeFormer"
        texts = [infotext(r, s, model, extras) for s in seeds]
        info = {"prompt": r.prompt, "all_prompts": [r.prompt] * len(seeds), "negative_prompt": r.negative_prompt,
                "all_negative_prompts": [r.negative_prompt] * len(seeds), "seed": seeds[0], "all_seeds": seeds,
                "subseed": -1, "all_subseeds": [-1] * len(seeds), "width": images[0].width,
                "height": images[0].height, "sampler_name": r.sampler_name or "Euler a", "cfg_scale": r.cfg_scale,
                "steps": r.steps, "batch_size": r.batch_size, "restore_faces": r.restore_faces,
                "sd_model_name": model, "infotexts": texts, "styles": [],
                "job_timestamp": time.strftime("%Y%m%d%H%M%S"), "version": "imagegen-0.1"}
        encoded = [b64_png(image, {"parameters": text}) for image, text in zip(images, texts, strict=True)]
        parameters = r.model_dump(exclude={"init_images", "mask"})
        return ImagesResponse(images=encoded, parameters=parameters, info=json.dumps(info))

    async def _one_batch(self, r: Txt2ImgRequest, seed: int, request_id: str, extras: dict, **extra):
        request = self._generation(r, seed, **extra)
        if r.refiner_checkpoint and self.handles.refiner is not None and "init_image" not in extra:
            handoff = await call(self.handles.base.generate.remote(
                request.model_copy(update={"denoising_end": r.refiner_switch_at}), request_id))
            images = await call(self.handles.refiner.refine.remote(RefineRequest(
                prompt=r.prompt, negative_prompt=r.negative_prompt, seeds=handoff.seeds, steps=r.steps,
                guidance_scale=r.cfg_scale, latents=handoff.latents, denoising_start=r.refiner_switch_at)))
            extras.update({"Refiner": r.refiner_checkpoint, "Refiner switch at": r.refiner_switch_at})
            return GenerationResult(images=images, seeds=handoff.seeds)
        result = await call(self.handles.base.generate.remote(request, request_id))
        if r.enable_hr and "init_image" not in extra:
            upscaler = "Lanczos" if r.hr_upscaler.startswith("Latent") else r.hr_upscaler
            second = []
            for image, one_seed in zip(result.images, result.seeds, strict=True):
                up = await call(self.handles.upscaler.upscale.remote(image, upscaler, r.hr_scale))
                width, height = (d - d % 8 for d in up.image.size)
                hires = request.model_copy(update={
                    "init_image": up.image, "width": width, "height": height, "seed": one_seed, "batch_size": 1,
                    "strength": max(r.denoising_strength, 0.01), "steps": r.hr_second_pass_steps or r.steps})
                second += (await call(self.handles.base.generate.remote(hires, request_id))).images
            extras.update({"Denoising strength": r.denoising_strength, "Hires upscale": r.hr_scale,
                           "Hires upscaler": r.hr_upscaler})
            result.images = second
        return result

    @router.post("/txt2img", response_model=ImagesResponse)
    async def txt2img(self, body: Txt2ImgRequest, http: Request) -> ImagesResponse:
        """Text to image, with hires fix (enable_hr), refiner, LoRA tags and face restoration."""
        return await self._run(http, body)

    @router.post("/img2img", response_model=ImagesResponse)
    async def img2img(self, body: Img2ImgRequest, http: Request) -> ImagesResponse:
        """Image to image; with a mask, inpainting (white repaints)."""
        init = image_field(body.init_images[0], "init_images")
        mask = image_field(body.mask, "mask") if body.mask else None
        return await self._run(http, body, init_image=init, mask=mask, mask_blur=body.mask_blur,
                               strength=body.denoising_strength)

    async def _extras(self, body: ExtrasRequest, image: Image.Image) -> Image.Image:
        scale: float | None = body.upscaling_resize
        width: int | None = None
        height: int | None = None
        if body.resize_mode == 1:
            scale, width, height = None, body.upscaling_resize_w, body.upscaling_resize_h
        first = await call(self.handles.upscaler.upscale.remote(image, body.upscaler_1, scale, width, height))
        out = first.image
        visibility = body.upscaler_2_visibility or body.extras_upscaler_2_visibility
        if body.upscaler_2 != "None" and visibility > 0:
            second = await call(self.handles.upscaler.upscale.remote(image, body.upscaler_2, scale, width, height))
            out = Image.blend(out, second.image, visibility)
        face_visibility = max(body.codeformer_visibility, body.gfpgan_visibility)
        if face_visibility > 0:
            restored = await call(self.handles.faces.restore.remote(out, body.codeformer_weight, face_visibility))
            out = restored.image
        return out

    @router.post("/extra-single-image", response_model=ExtrasResponse)
    async def extra_single_image(self, body: ExtrasRequest) -> ExtrasResponse:
        """Upscale (two blended upscalers) and restore faces in one image."""
        out = await self._extras(body, image_field(body.image, "image"))
        return ExtrasResponse(html_info="", image=b64_png(out))

    @router.post("/extra-batch-images", response_model=ExtrasBatchResponse)
    async def extra_batch_images(self, body: ExtrasBatchRequest) -> ExtrasBatchResponse:
        """The same as extra-single-image for a list of images."""
        images = [image_field(item.data, f"imageList.{i}.data") for i, item in enumerate(body.imageList)]
        return ExtrasBatchResponse(html_info="", images=[b64_png(await self._extras(body, i)) for i in images])

    @router.get("/progress")
    async def progress(self, http: Request, skip_current_image: bool = False) -> dict:
        """Progress of the calling client's current generation or, failing that, its running job (0 when idle);
        ``current_image`` is a live latent preview unless ``skip_current_image``."""
        mine = [j for j in self.in_flight.values() if j.client == _client(http)]
        step, total, fraction, elapsed, running, job_name = 0, 0, 0.0, 0.0, None, ""
        if mine and mine[-1].request_ids:
            flight = mine[-1]
            per_batch = flight.total_steps // max(1, len(flight.request_ids))
            running = flight.request_ids[-1]
            current = await call(self.handles.base.progress.remote(running))
            step = (len(flight.request_ids) - 1) * per_batch + (current[0] if current else 0)
            total = flight.total_steps
            fraction = step / total if total else 0.0
            elapsed = time.monotonic() - flight.started
        else:
            owner = token_owner(http.headers.get("authorization"))
            jobs, _ = await asyncio.to_thread(self.jobs.list_jobs, "processing", owner, 0, 1)
            if jobs:
                running, job_name = jobs[0].id, jobs[0].id
                current = await call(self.handles.base.progress.remote(running))
                step, total = current or (0, 0)
                fraction = jobs[0].progress / 100
                elapsed = time.time() - (jobs[0].started_at or time.time())
        eta = elapsed / fraction - elapsed if fraction else 0.0
        image = None
        if running and not skip_current_image:
            preview = await call(self.handles.base.preview.remote(running))
            image = b64_png(preview) if preview is not None else None
        state = {"skipped": False, "interrupted": False, "job": job_name, "job_count": len(mine) + bool(job_name),
                 "job_timestamp": "", "job_no": 0, "sampling_step": step, "sampling_steps": total}
        return {"progress": round(fraction, 4), "eta_relative": round(eta, 2), "state": state,
                "current_image": image, "textinfo": None}

    async def _cancel(self, job: InFlight) -> None:
        for request_id in job.request_ids:
            await call(self.handles.base.cancel.remote(request_id))

    async def _cancel_mine(self, http: Request) -> dict:
        for job in [j for j in self.in_flight.values() if j.client == _client(http)]:
            await self._cancel(job)
        return {}

    @router.post("/interrupt")
    async def interrupt(self, http: Request) -> dict:
        """Stop the calling client's generation between two denoising steps."""
        return await self._cancel_mine(http)

    @router.post("/skip")
    async def skip(self, http: Request) -> dict:
        """As interrupt: the current batch of the calling client stops."""
        return await self._cancel_mine(http)

    @router.get("/sd-models")
    async def sd_models(self) -> list[dict]:
        """Loaded checkpoints, in A1111's shape."""
        base = await call(self.handles.base.describe.remote())
        out = [{"title": base["name"], "model_name": base["name"], "hash": None, "sha256": None,
                "filename": base["name"], "config": None}]
        if self.handles.refiner is not None:
            refiner = await call(self.handles.refiner.describe.remote())
            out.append({"title": refiner["name"], "model_name": refiner["name"], "hash": None, "sha256": None,
                        "filename": refiner["name"], "config": None})
        return out

    @router.get("/samplers")
    async def samplers(self) -> list[dict]:
        """Every sampler name accepted in sampler_name."""
        return [{"name": name, "aliases": [], "options": {}} for name in sampler_names()]

    @router.get("/schedulers")
    async def schedulers(self) -> list[dict]:
        """Sigma schedules accepted in scheduler."""
        return [{"name": s.lower(), "label": s, "aliases": None, "default_rho": -1, "need_inner_model": False}
                for s in SCHEDULES]

    @router.get("/upscalers")
    async def upscalers(self) -> list[dict]:
        """Built-in resamplers and loaded models."""
        loaded = await call(self.handles.upscaler.describe.remote())
        names = await call(self.handles.upscaler.names.remote())
        return [{"name": n, "model_name": loaded.get(n, {}).get("architecture"), "model_path": None,
                 "model_url": None, "scale": loaded.get(n, {}).get("scale", 4)} for n in names]

    @router.get("/face-restorers")
    async def face_restorers(self) -> list[dict]:
        """The loaded face restorer, if any."""
        described = await call(self.handles.faces.describe.remote())
        return [{"name": described["restorer"], "cmd_dir": None}] if described["restorer"] else []

    @router.get("/loras")
    async def loras(self) -> list[dict]:
        """LoRAs usable as <lora:name:weight>."""
        base = await call(self.handles.base.describe.remote())
        return [{"name": n, "alias": n, "path": None, "metadata": {}} for n in base["loras"]]

    @router.post("/refresh-checkpoints")
    async def refresh_checkpoints(self) -> dict:
        """Checkpoints are fixed per deployment (change them in serve_config.yaml); nothing to rescan."""
        return {}

    @router.post("/refresh-loras")
    async def refresh_loras(self) -> dict:
        """LoRAs are registered when a replica starts; a redeploy picks up new files."""
        return {}

    @router.get("/options")
    async def get_options(self) -> dict:
        """Current options (sd_model_checkpoint and output format)."""
        if "sd_model_checkpoint" not in self.a1111_options:
            base = await call(self.handles.base.describe.remote())
            self.a1111_options["sd_model_checkpoint"] = base["name"]
        return dict(self.a1111_options)

    @router.post("/options")
    async def set_options(self, body: dict) -> dict:
        """Set the default checkpoint for later requests; requests in flight keep theirs."""
        wanted = body.get("sd_model_checkpoint")
        if wanted is not None:
            base = await call(self.handles.base.describe.remote())
            if str(wanted).split(" [")[0] != base["name"]:
                raise UnknownModel(f"checkpoint {wanted!r} is not loaded", field="sd_model_checkpoint",
                                   details={"choices": [base["name"]]})
        self.a1111_options.update({k: v for k, v in body.items() if k in {"sd_model_checkpoint", "samples_format"}})
        return {}

    @router.post("/png-info")
    async def png_info(self, body: PngInfoRequest) -> dict:
        """Read back the generation parameters stored in a PNG."""
        image = image_field(body.image, "image")
        items = {k: v for k, v in image.info.items() if isinstance(v, str)}
        return {"info": items.pop("parameters", ""), "items": items, "parameters": {}}
