"""The application graph: a FastAPI ingress bound to the five model deployments.

``build_app(args)`` is the ``import_path`` target of ``serve_config.yaml``; its ``args`` validate into
``AppArgs``. Strings in args may use ``$VAR`` / ``~``, expanded once here, so one config file can point at model
folders per machine. Resources, replicas and autoscaling live in the config's ``deployments:`` section.
"""


import base64
import io
import logging
import os
import time
from typing import Annotated, Literal

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, model_validator
from ray import serve
from ray.serve import Application

from deployments.config import (
    FaceRestorerConfig,
    FocalCropperConfig,
    SDXLBaseConfig,
    SDXLRefinerConfig,
    UpscalerConfig,
)
from deployments.errors import ServiceError
from deployments.face_restorer import FaceRestorer
from deployments.focal_cropper import FocalCropper
from deployments.generation import GenerationRequest
from deployments.sdxl_base import SDXLBase
from deployments.sdxl_refiner import SDXLRefiner
from deployments.upscaler import Upscaler
from graphs import plans

logger = logging.getLogger(__name__)

STATUS = {
    "INVALID_INPUT": 422,
    "INVALID_IMAGE": 400,
    "UNKNOWN_MODEL": 422,
    "CANCELLED": 409,
    "GPU_OOM": 503,
    "MODEL_UNAVAILABLE": 503,
}


def _expand(value):
    if isinstance(value, str):
        return os.path.expanduser(os.path.expandvars(value))
    if isinstance(value, dict):
        return {k: _expand(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_expand(v) for v in value]
    return value


class AppArgs(BaseModel):
    model_config = ConfigDict(extra="forbid", protected_namespaces=())

    base: SDXLBaseConfig
    refiner: SDXLRefinerConfig | None = None
    upscaler: UpscalerConfig = UpscalerConfig()
    face_restorer: FaceRestorerConfig = FaceRestorerConfig()
    focal_cropper: FocalCropperConfig = FocalCropperConfig()
    hires_upscaler: str = Field("R-ESRGAN 2x+", description="upscaler name used by hires fix when neural is asked")

    @model_validator(mode="before")
    @classmethod
    def expand_env(cls, data):
        return _expand(data)


PRESETS = {
    "fast": {"num_inference_steps": 20, "width": 768, "height": 768, "use_refiner": False, "hires_fix": False},
    "balanced": {"num_inference_steps": 25, "hires_fix": True, "use_realesrgan": True, "use_face_restoration": False},
    "quality": {"num_inference_steps": 30, "hires_fix": True, "use_realesrgan": True, "use_face_restoration": True,
                "face_restoration_weight": 0.6},
}


class GenerateRequest(BaseModel):
    """Seed 000's request (seed 002's sync client sends a subset of it)."""

    prompt: str = Field(..., min_length=1, max_length=10_000)
    negative_prompt: str = Field("", max_length=10_000)
    seed: int = Field(-1, ge=-1, le=2**32 - 1)
    width: int = Field(1024, ge=64, le=2048, multiple_of=8)
    height: int = Field(1024, ge=64, le=2048, multiple_of=8)
    num_inference_steps: int = Field(30, ge=1, le=150)
    guidance_scale: float = Field(7.0, ge=0.0, le=30.0)
    use_refiner: bool = True
    hires_fix: bool = False
    use_realesrgan: bool = True
    use_face_restoration: bool = False
    face_restoration_weight: float = Field(0.6, ge=0.0, le=1.0)
    preset: Literal["fast", "balanced", "quality"] | None = None

    @model_validator(mode="before")
    @classmethod
    def apply_preset(cls, data):
        # A preset fills in what the client did not say; explicit fields win.
        if isinstance(data, dict) and data.get("preset") in PRESETS:
            return {**PRESETS[data["preset"]], **data}
        return data


class GenerateResponse(BaseModel):
    """Superset of seed 000's response and seed 002's sync client fields (imageData, format, width, height)."""

    success: bool
    image: str = Field(..., description="data:image/png;base64,...")
    prompt: str
    enhanced_prompt: str
    seed: int
    refiner_applied: bool
    hires_fix_applied: bool
    face_restoration_applied: bool
    upscaler: str | None
    final_resolution: str
    generation_time_seconds: float
    model: str
    warnings: list[str]
    imageData: str = Field(..., description="plain base64 PNG (seed 002)")
    format: str
    width: int
    height: int


class ErrorBody(BaseModel):
    error: str
    code: str
    details: dict


app = FastAPI(title="imagegen", description="SDXL generation on Ray Serve", version="0.1.0")


@app.exception_handler(ServiceError)
async def _service_error(_request: Request, exc: ServiceError) -> JSONResponse:
    headers = {"Retry-After": "5"} if STATUS.get(exc.code, 500) == 503 else None
    body = ErrorBody(error=exc.message, code=exc.code, details=exc.details)
    return JSONResponse(body.model_dump(), status_code=STATUS.get(exc.code, 500), headers=headers)


@app.exception_handler(RequestValidationError)
async def _validation_error(_request: Request, exc: RequestValidationError) -> JSONResponse:
    first = exc.errors()[0] if exc.errors() else {}
    field = ".".join(str(p) for p in first.get("loc", ()) if p != "body")
    body = ErrorBody(error=first.get("msg", "invalid request"), code="INVALID_INPUT",
                     details={"field": field, "errors": [{k: e.get(k) for k in ("loc", "msg", "type")}
                                                         for e in exc.errors()]})
    return JSONResponse(body.model_dump(), status_code=422)


def _unwrap(error: BaseException) -> BaseException:
    """Ray wraps a replica's exception; the original carries our code and field."""
    return getattr(error, "cause", None) or error


@serve.deployment(ray_actor_options={"num_cpus": 0.25}, max_ongoing_requests=64)
@serve.ingress(app)
class Ingress:
    def __init__(self, base, refiner, upscaler, faces, cropper, args: dict) -> None:
        self.handles = plans.Handles(base, refiner, upscaler, faces)
        self.cropper = cropper
        self.args = AppArgs.model_validate(args)

    @app.get("/health/")
    async def health(self) -> dict:
        """Liveness: always open, never authenticated (seed 001 shape)."""
        return {"status": "healthy"}

    @app.get("/models")
    async def models(self) -> dict:
        """What is loaded where (seed 003 shape plus per-deployment detail)."""
        base = await self.handles.base.describe.remote()
        out = {"models": [{"id": base["name"], "name": base["name"], "type": "sdxl-base", **base}]}
        if self.handles.refiner is not None:
            refiner = await self.handles.refiner.describe.remote()
            out["models"].append({"id": refiner["name"], "name": refiner["name"], "type": "sdxl-refiner", **refiner})
        out["upscalers"] = await self.handles.upscaler.describe.remote()
        out["face_restorer"] = await self.handles.faces.describe.remote()
        return out

    @app.post("/generate", response_model=GenerateResponse, responses={422: {"model": ErrorBody}})
    async def generate(self, body: GenerateRequest) -> GenerateResponse:
        """Synchronous generation: standard or hires fix, optional refiner and face restoration."""
        started = time.perf_counter()
        request = GenerationRequest(prompt=body.prompt, negative_prompt=body.negative_prompt, seed=body.seed,
                                    width=body.width, height=body.height, steps=body.num_inference_steps,
                                    guidance_scale=body.guidance_scale)
        opts = plans.PlanOptions(use_refiner=body.use_refiner, hires_fix=body.hires_fix,
                                 neural_upscaler=self.args.hires_upscaler if body.use_realesrgan else None,
                                 restore_faces=body.use_face_restoration, face_weight=body.face_restoration_weight)
        plan = plans.hires_fix if body.hires_fix else plans.standard
        try:
            report = await plan(self.handles, request, opts)
        except Exception as e:  # Ray wraps replica errors: re-raise ours unwrapped, anything else as it was
            cause = _unwrap(e)
            if isinstance(cause, ServiceError):
                raise cause from None
            raise
        buffer = io.BytesIO()
        report.image.save(buffer, format="PNG")
        encoded = base64.b64encode(buffer.getvalue()).decode()
        width, height = report.image.size
        return GenerateResponse(
            success=True, image=f"data:image/png;base64,{encoded}", prompt=body.prompt, enhanced_prompt=body.prompt,
            seed=report.seed, refiner_applied=report.refiner_applied, hires_fix_applied=report.hires_fix_applied,
            face_restoration_applied=report.face_restoration_applied, upscaler=report.upscaler,
            final_resolution=f"{width}x{height}", generation_time_seconds=round(time.perf_counter() - started, 3),
            model="SDXL", warnings=report.warnings, imageData=encoded, format="png", width=width, height=height,
        )


def build_app(args: Annotated[dict, "AppArgs"]) -> Application:
    """Bind the ingress to one handle per model deployment."""
    config = AppArgs.model_validate(args)
    # Ray's decorator turns each class into a Deployment, which mypy cannot see: hence the ignores.
    refiner = SDXLRefiner.bind(config.refiner.model_dump()) if config.refiner else None  # type: ignore[attr-defined]
    return Ingress.bind(  # type: ignore[attr-defined]
        SDXLBase.bind(config.base.model_dump()),  # type: ignore[attr-defined]
        refiner,
        Upscaler.bind(config.upscaler.model_dump()),  # type: ignore[attr-defined]
        FaceRestorer.bind(config.face_restorer.model_dump()),  # type: ignore[attr-defined]
        FocalCropper.bind(config.focal_cropper.model_dump()),  # type: ignore[attr-defined]
        config.model_dump(),
    )
