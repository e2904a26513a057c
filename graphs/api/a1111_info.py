"""Automatic1111's listing and settings routes: checkpoints, samplers, schedulers, upscalers, face restorers,
LoRAs, options and PNG info."""

from __future__ import annotations

import asyncio

from fastapi import APIRouter

from deployments.support.errors import UnknownModel
from deployments.support.samplers import SCHEDULES, sampler_names
from graphs import plans
from graphs.api.a1111_models import (
    Empty,
    FaceRestorerItem,
    LoraItem,
    Options,
    OptionsRequest,
    PngInfo,
    PngInfoRequest,
    SamplerItem,
    SchedulerItem,
    SdModel,
    UpscalerItem,
)
from graphs.api.body import JSONBodyRoute
from graphs.api.errors import call
from graphs.api.fields import image_field
from graphs.jobs.store import JobStore

router = APIRouter(prefix="/sdapi/v1", tags=["automatic1111"], route_class=JSONBodyRoute)


class A1111InfoRoutes:
    handles: plans.Handles
    jobs: JobStore

    @router.get("/sd-models", response_model=list[SdModel])
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

    @router.get("/samplers", response_model=list[SamplerItem])
    async def samplers(self) -> list[dict]:
        """Every sampler name accepted in sampler_name."""
        return [{"name": name, "aliases": [], "options": {}} for name in sampler_names()]

    @router.get("/schedulers", response_model=list[SchedulerItem])
    async def schedulers(self) -> list[dict]:
        """Sigma schedules accepted in scheduler."""
        return [{"name": s.lower(), "label": s, "aliases": None, "default_rho": -1, "need_inner_model": False}
                for s in SCHEDULES]

    @router.get("/upscalers", response_model=list[UpscalerItem])
    async def upscalers(self) -> list[dict]:
        """Built-in resamplers and loaded models."""
        loaded = await call(self.handles.upscaler.describe.remote())
        names = await call(self.handles.upscaler.names.remote())
        return [{"name": n, "model_name": loaded.get(n, {}).get("architecture"), "model_path": None,
                 "model_url": None, "scale": loaded.get(n, {}).get("scale", 4)} for n in names]

    @router.get("/face-restorers", response_model=list[FaceRestorerItem])
    async def face_restorers(self) -> list[dict]:
        """The loaded face restorer, if any."""
        described = await call(self.handles.faces.describe.remote())
        return [{"name": described["restorer"], "cmd_dir": None}] if described["restorer"] else []

    @router.get("/loras", response_model=list[LoraItem])
    async def loras(self) -> list[dict]:
        """LoRAs usable as <lora:name:weight>."""
        base = await call(self.handles.base.describe.remote())
        return [{"name": n, "alias": n, "path": None, "metadata": {}} for n in base["loras"]]

    @router.post("/refresh-checkpoints", response_model=Empty)
    async def refresh_checkpoints(self) -> dict:
        """Checkpoints are fixed per deployment (change them in serve_config.yaml); nothing to rescan."""
        return {}

    @router.post("/refresh-loras", response_model=Empty)
    async def refresh_loras(self) -> dict:
        """LoRAs are registered when a replica starts; a redeploy picks up new files."""
        return {}

    @router.get("/options", response_model=Options)
    async def get_options(self) -> dict:
        """Current options (sd_model_checkpoint and output format)."""
        options = {"samples_format": "png", **await asyncio.to_thread(self.jobs.options)}
        if "sd_model_checkpoint" not in options:
            options["sd_model_checkpoint"] = (await call(self.handles.base.describe.remote()))["name"]
        return options

    @router.post("/options", response_model=Empty)
    async def set_options(self, body: OptionsRequest) -> dict:
        """Set the default checkpoint for later requests; requests in flight keep theirs."""
        wanted = body.sd_model_checkpoint
        if wanted is not None:
            base = await call(self.handles.base.describe.remote())
            if str(wanted).split(" [")[0] != base["name"]:
                raise UnknownModel(f"checkpoint {wanted!r} is not loaded", field="sd_model_checkpoint",
                                   details={"choices": [base["name"]]})
        for key, value in body.model_dump(include={"sd_model_checkpoint", "samples_format"}, exclude_none=True).items():
            await asyncio.to_thread(self.jobs.set_option, key, str(value))
        return {}

    @router.post("/png-info", response_model=PngInfo)
    async def png_info(self, body: PngInfoRequest) -> dict:
        """Read back the generation parameters stored in a PNG."""
        image = image_field(body.image, "image")
        items = {k: v for k, v in image.info.items() if isinstance(v, str)}
        return {"info": items.pop("parameters", ""), "items": items, "parameters": {}}
