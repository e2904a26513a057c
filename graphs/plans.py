"""Generation plans: each reads like the seed-000 flow diagram and only calls deployment handles.

standard:  base (-> refiner as expert ensemble, on latents) (-> faces)
hires fix: base at 768 -> upscaler x2 (Real-ESRGAN, Lanczos if unavailable) -> refiner img2img at 1536,
           strength 0.35 (-> faces)

Each stage is handed the previous stage's ``DeploymentResponse``: Serve resolves it in the next replica, so
latents and images travel replica to replica through the object store, never through the ingress. The ingress
awaits the chain once, at the end. Every degradation (no refiner, Lanczos instead of Real-ESRGAN, no face
restorer, a failed post-process) is recorded in the report, never silent.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

from PIL import Image
from ray.serve.handle import DeploymentHandle

from deployments.sdxl_refiner import RefineRequest
from deployments.support.generation import GenerationRequest, image_of, resolve_seeds
from graphs.api.errors import call, unwrap

logger = logging.getLogger(__name__)

HIRES_BASE = 768
HIRES_STRENGTH = 0.35
ENSEMBLE_SPLIT = 0.8


@dataclass
class Handles:
    base: DeploymentHandle
    refiner: DeploymentHandle | None
    upscaler: DeploymentHandle
    faces: DeploymentHandle


@dataclass
class PlanOptions:
    use_refiner: bool = True
    hires_fix: bool = False
    neural_upscaler: str | None = "R-ESRGAN 2x+"  # None: Lanczos
    restore_faces: bool = False
    face_weight: float = 0.6
    request_id: str | None = None  # lets a job's progress be read and its generation cancelled


@dataclass
class Report:
    image: Image.Image
    seed: int
    refiner_applied: bool = False
    hires_fix_applied: bool = False
    upscaler: str | None = None
    face_restoration_applied: bool = False
    faces_found: int = 0
    warnings: list[str] = field(default_factory=list)


def _refine(request: GenerationRequest, seed: int, **mode) -> RefineRequest:
    return RefineRequest(prompt=request.prompt, negative_prompt=request.negative_prompt, seeds=[seed],
                         steps=request.steps, guidance_scale=request.guidance_scale, **mode)


async def standard(h: Handles, request: GenerationRequest, opts: PlanOptions) -> Report:
    seed = resolve_seeds(request.seed, 1)[0]  # fixed here so that every stage can be launched at once
    request = request.model_copy(update={"seed": seed, "batch_size": 1})
    warnings: list[str] = []
    if opts.use_refiner and h.refiner is not None:
        base = h.base.generate.remote(request.model_copy(update={"denoising_end": ENSEMBLE_SPLIT}), opts.request_id)
        last = h.refiner.refine.remote(_refine(request, seed, denoising_start=ENSEMBLE_SPLIT), None, base)
    else:
        if opts.use_refiner:
            warnings.append("refiner not deployed: base output returned")
        base = last = h.base.generate.remote(request, opts.request_id)
    report = await _finish(h, last, seed, opts)
    report.refiner_applied = last is not base
    report.warnings[:0] = warnings + (await call(base)).warnings
    return report


async def hires_fix(h: Handles, request: GenerationRequest, opts: PlanOptions) -> Report:
    seed = resolve_seeds(request.seed, 1)[0]
    first = request.model_copy(update={"width": HIRES_BASE, "height": HIRES_BASE, "batch_size": 1, "seed": seed})
    base = h.base.generate.remote(first, opts.request_id)
    upscaled = h.upscaler.upscale.remote(base, opts.neural_upscaler or "Lanczos", 2.0)
    last = upscaled
    if h.refiner is not None:
        last = h.refiner.refine.remote(_refine(request, seed, strength=HIRES_STRENGTH), None, upscaled)
    report = await _finish(h, last, seed, opts)
    up = await call(upscaled)
    report.upscaler, report.hires_fix_applied, report.refiner_applied = up.upscaler, True, last is not upscaled
    report.warnings[:0] = (await call(base)).warnings + up.warnings
    if h.refiner is None:
        report.warnings.append("refiner not deployed: upscaled image not refined")
    return report


async def _finish(h: Handles, last, seed: int, opts: PlanOptions) -> Report:
    """Optional face restoration on the chain's last stage; a failure there returns the unprocessed image."""
    if opts.restore_faces:
        try:
            restored = await call(h.faces.restore.remote(last, opts.face_weight))
        except Exception as e:  # noqa: BLE001 - seed 000: a post-processing failure returns the image unprocessed
            image = image_of(await call(last))  # an upstream failure re-raises here, as it should
            code = getattr(unwrap(e), "code", type(unwrap(e)).__name__)
            logger.warning("face restoration failed (%s); unprocessed image returned", code)
            return Report(image=image, seed=seed, warnings=[f"face restoration failed ({code}): unprocessed image"])
        report = Report(image=restored.image, seed=seed, face_restoration_applied=restored.restored,
                        faces_found=restored.faces_found, warnings=list(restored.warnings))
        return report
    return Report(image=image_of(await call(last)), seed=seed)
