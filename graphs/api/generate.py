"""Seed 000 (and seed 002's sync client): ``POST /generate``; ``GET /health/`` and ``GET /models``."""

import asyncio
import time
import uuid
from typing import Literal

from fastapi import APIRouter, Response
from pydantic import BaseModel, Field, model_validator

from deployments.support import overlay
from deployments.support.control import offered
from deployments.support.overlay import Overlay
from deployments.support.settings import Settings
from graphs import flights, plans
from graphs.api.body import JSONBodyRoute, blobs, json_answer
from graphs.api.checkpoints import CheckpointChoice
from graphs.api.control_fields import ControlNets, control_units
from graphs.api.errors import call, documented
from graphs.jobs.cache import RequestCache

router = APIRouter(tags=["generate"], route_class=JSONBodyRoute, responses=documented(503))
open_router = APIRouter(tags=["health"], route_class=JSONBodyRoute)

PRESETS = {
    "fast": {"num_inference_steps": 20, "width": 768, "height": 768, "use_refiner": False, "hires_fix": False},
    "balanced": {"num_inference_steps": 25, "hires_fix": True, "use_realesrgan": True, "use_face_restoration": False},
    "quality": {"num_inference_steps": 30, "hires_fix": True, "use_realesrgan": True, "use_face_restoration": True,
                "face_restoration_weight": 0.6},
}


class GenerateRequest(BaseModel):
    """Seed 000's request; seed 002's sync client sends a subset (camelCase negativePrompt accepted)."""

    prompt: str = Field(..., min_length=1, max_length=10_000)
    negative_prompt: str = Field("", max_length=10_000)
    seed: int = Field(-1, ge=-1, le=2**32 - 1, description="-1 draws a random seed")
    width: int = Field(1024, ge=64, le=2048, multiple_of=8)
    height: int = Field(1024, ge=64, le=2048, multiple_of=8)
    num_inference_steps: int = Field(30, ge=1, le=150)
    guidance_scale: float = Field(7.0, ge=0.0, le=30.0)
    use_refiner: bool = True
    hires_fix: bool = Field(False, description="768 base -> x2 upscale -> refiner img2img at 1536, strength 0.35")
    use_realesrgan: bool = Field(True, description="hires fix upscaler: Real-ESRGAN when loaded, else Lanczos")
    use_face_restoration: bool = Field(False, description="opt-in, as in seed 000's feature matrix")
    face_restoration_weight: float = Field(0.6, ge=0.0, le=1.0)
    preset: Literal["fast", "balanced", "quality"] | None = None
    overlay: Overlay | None = Field(None, description="a caption or logo drawn on the final image")
    model: str | None = Field(None, max_length=256, description=(
        "the base checkpoint: a name from GET /models or an alias (seed 002's 'photorealistic', 'anime'); "
        "none: the default"))
    controlnets: ControlNets = []

    @model_validator(mode="before")
    @classmethod
    def apply_preset(cls, data):
        # A preset fills in what the client did not say; explicit fields win. camelCase from seed 002 is mapped.
        if isinstance(data, dict):
            if "negativePrompt" in data and "negative_prompt" not in data:
                data = {**data, "negative_prompt": data["negativePrompt"]}
            if isinstance(data.get("preset"), str) and data["preset"] in PRESETS:
                data = {**PRESETS[data["preset"]], **data}
        return data


class GenerateResponse(BaseModel):
    """Seed 000's response plus seed 002's ``imageData`` (plain base64), ``format``, ``width``, ``height``."""

    success: bool
    image: str = Field(..., description="data:image/png;base64,...")
    prompt: str
    enhanced_prompt: str
    seed: int
    refiner_applied: bool
    hires_fix_applied: bool
    face_restoration_applied: bool
    overlay_applied: bool = False
    nsfw: bool | None = Field(None, description="the safety checker flagged the image and replaced it; null: the "
                              "filter is off")
    cached: bool = Field(False, description="answered from the result cache (an identical fixed-seed request)")
    upscaler: str | None
    final_resolution: str
    generation_time_seconds: float
    model: str
    checkpoint: str = Field(..., description="the base checkpoint that made the image")
    warnings: list[str]
    imageData: str = Field(..., description="plain base64 PNG (seed 002)")
    format: str
    width: int
    height: int


class ModelsResponse(BaseModel):
    """Seed 003's /models: every selectable base checkpoint (``loaded``: some replica holds it; ``replicas``:
    which), the refiner, and what the other deployments have loaded, as each describes itself."""

    models: list[dict]
    default: str = Field(..., description="the checkpoint a request that names none gets")
    base: dict = Field(..., description="the base replica that answered, as it describes itself")
    base_replicas: dict[str, dict] = Field(..., description="per base replica: checkpoints held, loads, evictions")
    upscalers: dict
    face_restorer: dict
    controlnets: list[str] = Field([], description="the ControlNets a request's controlnets[].model may name")
    preprocessors: list[str] = Field([], description="the preprocessors a request's controlnets[].preprocessor may "
                                     "name (a depth, line-art, pose, soft-edge or M-LSD one where the base has its "
                                     "model)")


class Health(BaseModel):
    status: str
    message: str


class GenerateRoutes(CheckpointChoice):
    handles: plans.Handles
    hires_upscaler: str
    settings: Settings
    cache: RequestCache

    @open_router.get("/health/", response_model=Health)
    @open_router.get("/health", response_model=Health, include_in_schema=False)
    async def health(self) -> Health:
        """Liveness: always open, never authenticated (seed 001 shape)."""
        return Health(status="healthy", message="Image generation service is ready")

    @router.get("/models", response_model=ModelsResponse)
    async def models(self) -> dict:
        """Every selectable checkpoint and where it is loaded (seed 003 shape, plus per-deployment detail)."""
        base = await call(self.handles.base.describe.remote())
        replicas = await self.holdings() or {base["replica"] or "local": base["checkpoints"]}
        entries = await asyncio.to_thread(self.catalog.entries)
        aliases = self.catalog.config.checkpoint_aliases
        out = []
        for name, entry in entries.items():
            holding = sorted(r for r, held in replicas.items() if name in held["held"])
            out.append({"id": name, "name": name, "description": entry.checkpoint.description or "SDXL base",
                        "type": "base", "loaded": bool(holding), "version": "xl", "kind": entry.checkpoint.kind,
                        "origin": entry.origin, "filename": entry.filename, "replicas": holding,
                        "aliases": sorted(a for a, target in aliases.items() if target == name)})
        if self.handles.refiner is not None:
            refiner = await call(self.handles.refiner.describe.remote())
            out.append({"id": refiner["name"], "name": refiner["name"], "description": "SDXL refiner",
                        "type": "refiner", "loaded": True, "version": "xl", **refiner})
        return {
            "models": out,
            "default": await self.default_checkpoint(),
            "base": base,
            "base_replicas": replicas,
            "upscalers": await call(self.handles.upscaler.describe.remote()),
            "face_restorer": await call(self.handles.faces.describe.remote()),
            "controlnets": list(self.config.base.controlnets),
            "preprocessors": offered(self.config.base.preprocessors),
        }

    @router.post("/generate", response_model=GenerateResponse, responses=documented(400))
    async def generate(self, body: GenerateRequest) -> Response:
        """Synchronous generation: standard or hires fix, optional refiner, ControlNet units, face restoration and
        overlay; with a fixed seed, from the result cache when it is on and holds the same request on the same
        weights."""
        started = time.perf_counter()
        request_id = uuid.uuid4().hex
        # A bad overlay or unit is refused before the GPU is asked for anything; the last stage draws the overlay.
        if body.overlay:
            await asyncio.to_thread(overlay.prepare, body.overlay, self.settings.fonts_dir, "overlay")
        units = await asyncio.to_thread(control_units, body.controlnets, self.config.base.controlnets, edit=False,
                                        modules=offered(self.config.base.preprocessors))
        fields = {**body.model_dump(), "model": await self.checkpoint(body.model, "model")}
        key = await self.cache.key("generate", plans.seed000_fields(fields, self.hires_upscaler), fields["model"])
        hit = await self.cache.get(key)
        if hit is not None:
            report = plans.Report.from_facts(hit.files[0], hit.facts)
        else:
            async with flights.flight():
                report = await plans.seed000(self.handles, fields, self.hires_upscaler, request_id, units)
            await self.cache.put(key, report.facts(), [report.data])
        width, height = report.size
        (png,), payloads = blobs([report.data])
        return json_answer(GenerateResponse(
            success=True, image=f"data:image/png;base64,{png}", prompt=body.prompt, enhanced_prompt=body.prompt,
            seed=report.seed, refiner_applied=report.refiner_applied, hires_fix_applied=report.hires_fix_applied,
            face_restoration_applied=report.face_restoration_applied, overlay_applied=body.overlay is not None,
            nsfw=report.nsfw, cached=hit is not None, upscaler=report.upscaler, final_resolution=f"{width}x{height}",
            generation_time_seconds=round(time.perf_counter() - started, 3),
            model="SDXL", checkpoint=report.checkpoint or fields["model"], warnings=report.warnings,
            imageData=png, format="png", width=width, height=height,
        ), **payloads)
