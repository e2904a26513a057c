"""Generation plans: each reads like the seed-000 flow diagram and only calls deployment handles.

standard:  base (-> refiner as expert ensemble) (-> faces)
hires fix: base at 768 -> upscaler x2 (Real-ESRGAN, Lanczos if unavailable) -> refiner img2img at 1536,
           strength 0.35 (-> faces)
Every degradation (no refiner, Lanczos instead of Real-ESRGAN, no face restorer, a failed post-process) is
recorded in the report, never silent.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

from PIL import Image
from ray.serve.handle import DeploymentHandle

from deployments.errors import ServiceError
from deployments.generation import GenerationRequest
from deployments.sdxl_refiner import RefineRequest
from graphs.http import call

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


@dataclass
class Report:
    image: Image.Image = field(default_factory=lambda: Image.new("RGB", (8, 8)))
    seed: int = 0
    refiner_applied: bool = False
    hires_fix_applied: bool = False
    upscaler: str | None = None
    face_restoration_applied: bool = False
    faces_found: int = 0
    warnings: list[str] = field(default_factory=list)


async def standard(h: Handles, request: GenerationRequest, opts: PlanOptions) -> Report:
    report = Report()
    if opts.use_refiner and h.refiner is not None:
        handoff = await call(h.base.generate.remote(request.model_copy(update={"denoising_end": ENSEMBLE_SPLIT})))
        images = await call(h.refiner.refine.remote(
            RefineRequest(prompt=request.prompt, negative_prompt=request.negative_prompt, seeds=handoff.seeds,
                          steps=request.steps, guidance_scale=request.guidance_scale, latents=handoff.latents,
                          denoising_start=ENSEMBLE_SPLIT)
        ))
        report.image, report.refiner_applied = images[0], True
        report.seed, report.warnings = handoff.seeds[0], list(handoff.warnings)
    else:
        if opts.use_refiner:
            report.warnings.append("refiner not deployed: base output returned")
        result = await call(h.base.generate.remote(request))
        report.image, report.seed, report.warnings = result.images[0], result.seeds[0], list(result.warnings)
    return await _faces(h, report, opts)


async def hires_fix(h: Handles, request: GenerationRequest, opts: PlanOptions) -> Report:
    target = (request.width, request.height)
    first = request.model_copy(update={"width": HIRES_BASE, "height": HIRES_BASE, "batch_size": 1})
    result = await call(h.base.generate.remote(first))
    report = Report(seed=result.seeds[0], warnings=list(result.warnings))
    upscaled = await call(h.upscaler.upscale.remote(result.images[0], opts.neural_upscaler or "Lanczos", 2.0))
    report.upscaler, report.image = upscaled.upscaler, upscaled.image
    report.warnings += upscaled.warnings
    if h.refiner is not None:
        images = await call(h.refiner.refine.remote(
            RefineRequest(prompt=request.prompt, negative_prompt=request.negative_prompt, seeds=result.seeds,
                          steps=request.steps, guidance_scale=request.guidance_scale, images=[upscaled.image],
                          strength=HIRES_STRENGTH)
        ))
        report.image, report.refiner_applied = images[0], True
    else:
        report.warnings.append("refiner not deployed: upscaled image not refined")
    report.hires_fix_applied = True
    if target != (HIRES_BASE, HIRES_BASE):
        logger.debug("hires fix ignores the requested %s and renders %s", target, report.image.size)
    return await _faces(h, report, opts)


async def _faces(h: Handles, report: Report, opts: PlanOptions) -> Report:
    if not opts.restore_faces:
        return report
    try:
        restored = await call(h.faces.restore.remote(report.image, opts.face_weight))
    except ServiceError as e:  # post-processing failure: keep the unprocessed image, say so
        report.warnings.append(f"face restoration failed ({e.code}): unprocessed image returned")
        return report
    report.image = restored.image
    report.face_restoration_applied = restored.restored
    report.faces_found = restored.faces_found
    report.warnings += restored.warnings
    return report
