"""Automatic1111's listing and settings routes: checkpoints, samplers, schedulers, upscalers, face restorers,
LoRAs, textual-inversion embeddings (as a base replica holds them), options, PNG info, interrogation (an image's
caption, from the Captioner), and the rest of what A1111 front ends list when they connect, each with what this
service really has (an empty list for what it has none of: hypernetworks, scripts, extensions). File names
are given without their folders: the host's paths stay on the host.
"""

from __future__ import annotations

import asyncio
import functools
from typing import TYPE_CHECKING

import psutil
from fastapi import APIRouter

from deployments.support.errors import UnknownModel
from deployments.support.generation import LATENT_UPSCALE_MODES
from deployments.support.samplers import SCHEDULES, aliases_of, listed_samplers
from graphs import flights, plans
from graphs.api import a1111_infotext as infotext
from graphs.api import a1111_options as answer_options
from graphs.api.a1111_models import (
    IMAGE_SETTINGS,
    CmdFlags,
    Embeddings,
    Empty,
    Extension,
    FaceRestorerItem,
    Hypernetwork,
    InterrogateRequest,
    Interrogation,
    LatentUpscaleMode,
    LoraItem,
    Memory,
    NamedFile,
    Options,
    OptionsRequest,
    PngInfo,
    PngInfoRequest,
    PromptStyle,
    RealesrganItem,
    SamplerItem,
    SchedulerItem,
    ScriptInfo,
    ScriptsList,
    SdModel,
    UpscalerItem,
)
from graphs.api.a1111_styles import PromptStyles
from graphs.api.body import JSONBodyRoute
from graphs.api.checkpoints import CheckpointChoice
from graphs.api.errors import call, documented
from graphs.api.fields import image_field
from graphs.jobs.store import JobStore

if TYPE_CHECKING:
    from graphs.app import AppArgs

router = APIRouter(prefix="/sdapi/v1", tags=["automatic1111"], route_class=JSONBodyRoute)
internal = APIRouter(prefix="/internal", tags=["automatic1111"], route_class=JSONBodyRoute)

LATENT_MODES = tuple(LATENT_UPSCALE_MODES)  # A1111's latent hires-fix modes: each resizes the latents as A1111 does
REAL_ESRGAN_ARCHITECTURES = {"ESRGAN", "Compact"}  # spandrel's ids for RRDBNet and SRVGGNetCompact
CAPTIONING = "clip"  # A1111's interrogator that starts from a BLIP caption; its "deepdanbooru" is not deployed here


def _file_name(source: str) -> str:
    return source.rstrip("/").rsplit("/", 1)[-1]


def replacement_vaes(config: AppArgs) -> list[str]:
    """The file names of the replacement VAEs the checkpoints were configured with, each once."""
    stages = [config.base, config.refiner]
    return list(dict.fromkeys(_file_name(s.vae.source) for s in stages if s is not None and s.vae is not None))


@functools.cache
def _serve_http() -> tuple[str, int]:
    """The host and port Serve's proxies bind. Serve has no public getter: its controller client holds them."""
    from ray.serve.context import _get_global_client

    options = _get_global_client().http_config
    return options.host, options.port


class A1111InfoRoutes(CheckpointChoice):
    handles: plans.Handles
    jobs: JobStore
    config: AppArgs
    captioner: object | None  # the Captioner's handle; None where no captioner is configured
    styles: PromptStyles

    @router.get("/sd-models", response_model=list[SdModel])
    async def sd_models(self) -> list[dict]:
        """Every selectable checkpoint (sd_model_checkpoint), then the refiner (refiner_checkpoint)."""
        return await asyncio.to_thread(self._sd_models)

    def _sd_models(self) -> list[dict]:
        sources = [(name, entry.checkpoint.source) for name, entry in self.catalog.entries().items()]
        if self.config.refiner is not None:
            sources.append((self.config.refiner.name, self.config.refiner.model.source))
        out = []
        for name, source in sources:
            sha = self.catalog.sha256(source)
            short = sha[:10] if sha else None
            out.append({"title": f"{name} [{short}]" if short else name, "model_name": name, "hash": short,
                        "sha256": sha, "filename": _file_name(source), "config": None})
        return out

    @router.get("/samplers", response_model=list[SamplerItem])
    async def samplers(self) -> list[dict]:
        """Every sampler that runs as itself, with the aliases also accepted in sampler_name."""
        return [{"name": name, "aliases": aliases_of(name), "options": {}} for name in listed_samplers()]

    @router.get("/schedulers", response_model=list[SchedulerItem])
    async def schedulers(self) -> list[dict]:
        """A1111 1.10's schedulers, every one accepted in scheduler (those diffusers lacks run with a warning)."""
        return [{"name": s.name, "label": s.label, "aliases": list(s.aliases) or None, "default_rho": s.default_rho,
                 "need_inner_model": s.need_inner_model} for s in SCHEDULES.values()]

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
        """Read checkpoint_dir again: a checkpoint dropped there is selectable from now on (and hashed)."""
        await asyncio.to_thread(self.catalog.entries, True)
        await call(self.handles.base.refresh.remote())  # the other replicas see the folder change by themselves
        await asyncio.to_thread(self._sd_models)  # hashes new files now, not in the next listing
        return {}

    @router.post("/unload-checkpoint", response_model=Empty)
    async def unload_checkpoint(self) -> dict:
        """Accepted, changes nothing: each base replica holds its checkpoints and evicts by its own policy."""
        return {}

    @router.post("/reload-checkpoint", response_model=Empty)
    async def reload_checkpoint(self) -> dict:
        """Accepted, changes nothing: a checkpoint a request names is loaded where it is not held."""
        return {}

    @router.post("/refresh-vae", response_model=Empty)
    async def refresh_vae(self) -> dict:
        """Accepted, changes nothing: the replacement VAEs are the config's, read when the replicas start."""
        return {}

    @router.post("/interrogate", response_model=Interrogation, responses=documented(400, 503))
    async def interrogate(self, body: InterrogateRequest) -> dict:
        """The image's caption: A1111's "clip" interrogator's BLIP caption, without the CLIP-ranked terms A1111
        appends; "deepdanbooru" (or any other name) is a 422 naming model."""
        if body.model != CAPTIONING or self.captioner is None:
            offered = f"{CAPTIONING!r} is" if self.captioner is not None else "none is (no captioner is deployed)"
            raise UnknownModel(f"interrogator {body.model!r} is not offered here: {offered}", field="model")
        image = await asyncio.to_thread(image_field, body.image, "image")
        # In a flight, as the plans' stages are: a deadline or a disconnect cancels it, and a captioner that failed
        # to deploy is a 503 at once.
        async with flights.flight():
            caption = await call(flights.Recorded(self.captioner).caption.remote(image))
        return {"caption": caption}

    @router.post("/refresh-loras", response_model=Empty)
    async def refresh_loras(self) -> dict:
        """Read lora_dir again: a LoRA dropped there is usable from now on."""
        await call(self.handles.base.refresh.remote())
        return {}

    @router.get("/options", response_model=Options)
    async def get_options(self) -> dict:
        """Current options: the default checkpoint (as A1111 titles it, with its hash), the answers' file format and
        quality, and A1111's settings that change an image as they run here (for clients that read them, or post
        them back)."""
        stored = await asyncio.to_thread(self.jobs.options)
        options = {**IMAGE_SETTINGS, "CLIP_stop_at_last_layers": 1, **stored, **answer_options.typed(stored)}
        name = await self.default_checkpoint()
        options["sd_model_checkpoint"] = await asyncio.to_thread(self.catalog.title, name)
        options["sd_checkpoint_hash"] = await asyncio.to_thread(self.catalog.sha256,
                                                                self.catalog.entry(name).checkpoint.source)
        return options

    @router.post("/options", response_model=Empty)
    async def set_options(self, body: OptionsRequest) -> dict:
        """Set the default checkpoint, the answers' file format and grid, img2img's noise multiplier, Euler's churn
        and the prompt / negative prompt padding of every ingress replica for later requests; requests in flight keep
        theirs."""
        if body.sd_model_checkpoint is not None:
            await self.set_default_checkpoint(body.sd_model_checkpoint, "sd_model_checkpoint")
        for key in answer_options.DEFAULTS:
            value = getattr(body, key)
            if value is not None:
                await asyncio.to_thread(self.jobs.set_option, key, answer_options.stored(value))
        return {}

    @router.post("/png-info", response_model=PngInfo)
    async def png_info(self, body: PngInfoRequest) -> dict:
        """Read back the generation parameters stored in an image, as A1111's reader finds them (a PNG's
        ``parameters`` text chunk; a JPEG's or WebP's EXIF UserComment, also given in ``items`` as "exif comment"):
        the infotext, and that text parsed as A1111 parses it (prompt, negative prompt, each setting by its key)."""
        image = await asyncio.to_thread(image_field, body.image, "image")
        # Off the event loop: the text is the client's (Pillow allows a megabyte of it).
        text, items = await asyncio.to_thread(infotext.read, image)
        return {"info": text, "items": items, "parameters": await asyncio.to_thread(infotext.parse, text)}

    @router.get("/sd-vae", response_model=list[NamedFile])
    async def sd_vae(self) -> list[dict]:
        """Replacement VAEs the checkpoints were configured with (none: each checkpoint's own VAE)."""
        return [{"model_name": n, "filename": n} for n in replacement_vaes(self.config)]

    @router.get("/sd-modules", response_model=list[NamedFile])
    async def sd_modules(self) -> list[dict]:
        """Separately loaded modules: the replacement VAEs; text encoders come with each checkpoint."""
        return await self.sd_vae()

    @router.get("/latent-upscale-modes", response_model=list[LatentUpscaleMode])
    async def latent_upscale_modes(self) -> list[dict]:
        """A1111's latent hires-fix modes, accepted in hr_upscaler."""
        return [{"name": name} for name in LATENT_MODES]

    @router.get("/prompt-styles", response_model=list[PromptStyle])
    async def prompt_styles(self) -> list[dict]:
        """The saved styles of the configured styles file (none without one), each applied by name in ``styles``."""
        return await asyncio.to_thread(self.styles.listing)

    @router.get("/embeddings", response_model=Embeddings)
    async def embeddings(self) -> dict:
        """Textual-inversion embeddings of embeddings_dir, usable by name in a prompt; skipped: those whose vectors
        do not fit the checkpoint's text encoders."""
        base = await call(self.handles.base.describe.remote())
        return base["embeddings"]

    @router.post("/refresh-embeddings", response_model=Empty)
    async def refresh_embeddings(self) -> dict:
        """Read embeddings_dir again: an embedding dropped there is usable from the next request on, a removed one
        no longer applies."""
        await call(self.handles.base.refresh.remote())  # the other replicas see the folder change by themselves
        return {}

    @router.get("/hypernetworks", response_model=list[Hypernetwork])
    async def hypernetworks(self) -> list[dict]:
        """No hypernetworks: LoRAs are the adapters served here."""
        return []

    @router.get("/realesrgan-models", response_model=list[RealesrganItem])
    async def realesrgan_models(self) -> list[dict]:
        """The loaded upscalers of the Real-ESRGAN family (RRDBNet and compact)."""
        loaded = await call(self.handles.upscaler.describe.remote())
        files = {m.name: _file_name(m.path) for m in self.config.upscaler.models}
        return [{"name": name, "path": files.get(name), "scale": model["scale"]} for name, model in loaded.items()
                if model["architecture"] in REAL_ESRGAN_ARCHITECTURES]

    @router.get("/scripts", response_model=ScriptsList)
    async def scripts(self) -> dict:
        """The always-on scripts of the extensions installed: ControlNet's, where the base has ControlNets."""
        installed = ["controlnet"] if self.config.base.controlnets else []
        return {"txt2img": installed, "img2img": installed}

    @router.get("/script-info", response_model=list[ScriptInfo])
    async def script_info(self) -> list[dict]:
        """No A1111 scripts run here."""
        return []

    @router.get("/extensions", response_model=list[Extension])
    async def extensions(self) -> list[dict]:
        """No A1111 extensions are installed."""
        return []

    @router.get("/cmd-flags", response_model=CmdFlags)
    async def cmd_flags(self) -> dict:
        """The A1111 flags that have a counterpart here, with this service's values."""
        host, port = await asyncio.to_thread(_serve_http)
        base = await call(self.handles.base.describe.remote())
        full = base["dtype"] == "float32"
        return {"api": True, "nowebui": True, "listen": host not in ("127.0.0.1", "localhost", "::1"), "port": port,
                "server_name": host, "no_half": full, "no_half_vae": full, "precision": "full" if full else "autocast",
                "lowvram": False, "medvram": False, "api_server_stop": False}

    @router.get("/memory", response_model=Memory)
    async def a1111_memory(self) -> dict:
        """RAM of the ingress host; GPU memory as the upscaler's replica sees its device (device-wide free, used
        and total; allocator figures of that replica)."""
        ram = psutil.virtual_memory()
        cuda = await call(self.handles.upscaler.memory.remote())
        return {"ram": {"free": ram.available, "used": ram.total - ram.available, "total": ram.total}, "cuda": cuda}

    @internal.get("/ping", response_model=Empty)
    async def ping(self) -> dict:
        """A1111's liveness ping."""
        return {}
