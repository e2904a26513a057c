"""Safety checker: the NSFW filter, the last model stage of every plan while it is enabled.

Graph position: (SDXLBase | SDXLRefiner | Upscaler | FaceRestorer) -> **SafetyChecker** -> ingress / job runner.
Each image's CLIP embedding (vision tower, then the visual projection) is compared by cosine similarity with 17
concept embeddings and 3 "special care" ones, each against its own threshold, exactly as diffusers'
``StableDiffusionSafetyChecker`` scores them: an image is flagged when any concept scores above its threshold
(a special-care hit makes every concept 0.01 stricter for that image). A flagged image is replaced by a black or a
heavily blurred one; ``info["nsfw"]`` says which, and a warning names each. As the last stage it encodes, and so
marks (invisible watermark and content credentials, ``StageResult.encode``): the files still come straight from a
model replica, marked once, and what is marked is what was screened. A1111's images reach it as pixels, after
every batch and face restoration, in place of the Provenance deployment.
"""

from __future__ import annotations

import asyncio
import logging

import numpy as np
import torch
from PIL import Image, ImageFilter
from ray import serve

from deployments.support import device as devices
from deployments.support.config import SafetyCheckerConfig
from deployments.support.errors import InvalidInput
from deployments.support.generation import Encoding, StageResult, encoded
from deployments.support.imaging import to_rgb
from deployments.support.logs import replica_logging
from deployments.support.metrics import StageMetrics
from deployments.support.settings import Settings, current
from deployments.weights import loader

logger = logging.getLogger(__name__)

SPECIAL_CARE_BUMP = 0.01  # diffusers: a special-care concept found makes every other concept this much stricter


class ContentFilter:
    """The checker's weights and preprocessing; ``check`` screens a stage result's images."""

    def __init__(self, config: SafetyCheckerConfig, settings: Settings | None = None) -> None:
        self.config = config
        self.device, self.dtype = devices.resolve(config.device)
        self.model, self.processor, folder = loader.load_safety_checker(config.model, self.dtype, settings)
        self.model.to(self.device).eval()
        self.weights = loader.WeightFiles()
        self.weights.add("safety_checker", folder)
        self.oom = devices.OomGuard(self.device, "safety checker")
        logger.info("safety checker ready on %s (%s): %d concepts, replacement %s", self.device, self.dtype,
                    self.model.concept_embeds.shape[0], config.replacement)

    @torch.inference_mode()
    def scores(self, images: list[Image.Image]) -> np.ndarray:
        """Per image and concept, cosine similarity minus the concept's threshold (plus ``adjustment`` and the
        special-care bump): an image with any score above 0 is flagged. Shape (images, concepts)."""
        pixels = self.processor(images=[to_rgb(i) for i in images], return_tensors="pt").pixel_values
        with self.oom():
            pooled = self.model.vision_model(pixels.to(self.device, self.dtype)).pooler_output
            embeds = torch.nn.functional.normalize(self.model.visual_projection(pooled).float(), dim=-1)
        model = self.model

        def cosine(concepts: torch.Tensor) -> torch.Tensor:
            return embeds @ torch.nn.functional.normalize(concepts.float(), dim=-1).T

        adjustment = self.config.adjustment
        special = cosine(model.special_care_embeds) - model.special_care_embeds_weights.float() + adjustment
        bump = (special > 0).any(dim=1, keepdim=True).float() * SPECIAL_CARE_BUMP
        concept = cosine(model.concept_embeds) - model.concept_embeds_weights.float() + adjustment + bump
        return concept.cpu().numpy()

    def replace(self, image: Image.Image) -> Image.Image:
        """What a flagged image becomes: black, or blurred past recognition (its size and mode kept)."""
        if self.config.replacement == "black":
            return Image.new(image.mode, image.size)
        radius = self.config.blur_radius * max(image.size)
        return image.filter(ImageFilter.GaussianBlur(radius))

    def check(self, source: StageResult | Image.Image) -> StageResult:
        """Screen every image of ``source``; ``info["nsfw"]`` is one flag per image, in order."""
        result = StageResult.of(source).pasted()  # what is screened is what is delivered
        if not result.images:
            raise InvalidInput("the safety checker needs images, not latents", field="image")
        flagged = [bool(row.max() > 0) for row in self.scores(result.images)]
        how = "a black image" if self.config.replacement == "black" else "a blurred image"
        total = len(flagged)
        warnings = [f"image {i + 1} of {total} flagged by the safety checker: replaced by {how}"
                    for i, bad in enumerate(flagged) if bad]
        if warnings:
            logger.warning("safety checker: %d of %d images flagged", sum(flagged), total)
        images = [self.replace(image) if bad else image for image, bad in zip(result.images, flagged, strict=True)]
        return result.then(images, warnings=warnings, nsfw=flagged)

    def fingerprint(self) -> dict[str, str]:
        """What decides this stage's output: the checker's weights and how it replaces."""
        config = self.config
        return {**self.weights.digests(), "safety_replacement": f"{config.replacement}:{config.blur_radius}",
                "safety_adjustment": str(config.adjustment)}


@serve.deployment(ray_actor_options={"num_cpus": 0.25}, max_ongoing_requests=16, health_check_period_s=10)
class SafetyChecker:
    """Thin Serve shell: the checker loads once per replica and runs on its one inference thread."""

    def __init__(self, config: dict | SafetyCheckerConfig) -> None:
        replica_logging()  # before anything here logs
        self.thread = devices.InferenceThread("safety-checker")
        self.model = self.thread.call(ContentFilter, SafetyCheckerConfig.model_validate(config))
        self.metrics = StageMetrics("safety_checker")

    async def check(self, source: StageResult | Image.Image, encode: Encoding | None = None) -> StageResult:
        """``source``: the previous stage's result (or an image); ``encode``: the plan's last stage answers with
        files, not pixels."""
        if encode is not None and encode.overlay is not None:
            # What is delivered is what is screened: the request's overlay (a logo can be any picture) first.
            source = await asyncio.to_thread(StageResult.of(source).overlaid, encode.overlay)
            encode = encode.model_copy(update={"overlay": None})
        with self.metrics.track():
            result = await self.thread.run(self.model.check, source)
        self.metrics.produced(len(result.images))
        return await encoded(result, encode)

    async def fingerprint(self) -> dict[str, str]:
        """Hashes of the loaded weights (the result cache's key): hashed once, off the inference thread."""
        return await asyncio.to_thread(self.model.fingerprint)

    async def describe(self) -> dict:
        config = self.model.config
        return {"replacement": config.replacement, "adjustment": config.adjustment,
                "concepts": int(self.model.model.concept_embeds.shape[0]), "device": str(self.model.device),
                "dtype": str(self.model.dtype).removeprefix("torch."), **devices.memory(self.model.device)}

    async def check_health(self) -> None:
        devices.check_health(self.thread, self.model.oom, current().inference_stall_seconds)
