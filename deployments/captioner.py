"""Captioner: BLIP image captioning, behind Automatic1111's ``/sdapi/v1/interrogate``.

Graph position: ingress -> **Captioner** -> ingress. Off the generation plans: the ingress decodes the client's
image and asks for its caption, nothing else calls it. A1111's "clip" interrogator starts from a BLIP caption
generated with its ``interrogate_clip_*`` settings (one beam, 24 to 48 tokens by default), which is what this
answers; A1111 goes on to append the CLIP-ranked artists, mediums and flavours of its word lists, which are not
deployed here.
"""

from __future__ import annotations

import logging

import torch
from PIL import Image
from ray import serve

from deployments.support import device as devices
from deployments.support.config import CaptionerConfig
from deployments.support.errors import ModelLoadError
from deployments.support.imaging import to_rgb
from deployments.support.logs import replica_logging
from deployments.support.metrics import StageMetrics
from deployments.support.settings import Settings, current
from deployments.weights import loader

logger = logging.getLogger(__name__)


class BlipCaptioner:
    """The captioning model and its processor; ``caption`` describes one image."""

    def __init__(self, config: CaptionerConfig, settings: Settings | None = None) -> None:
        self.config = config
        self.device, self.dtype = devices.resolve(config.device)
        self.model, self.processor, folder = loader.load_captioner(config.model, self.dtype, settings)
        self.model.to(self.device).eval()
        positions = self.model.config.text_config.max_position_embeddings
        if config.max_length > positions:
            # Past its position table the decoder fails mid-generation; say so at start instead.
            raise ModelLoadError(f"captioner.max_length {config.max_length} is above the decoder's {positions} "
                               "positions", field="captioner.max_length")
        self.oom = devices.OomGuard(self.device, "captioner")
        logger.info("captioner ready on %s (%s) from %s: %d beam(s), %d to %d tokens", self.device, self.dtype,
                    folder, config.num_beams, config.min_length, config.max_length)

    @torch.inference_mode()
    def tokens(self, image: Image.Image) -> list[int]:
        """The caption's token ids, the start token first: greedy (or beam) decoding is deterministic, and
        ``min_length`` / ``max_length`` bound their number, as in A1111's BLIP."""
        pixels = self.processor(images=to_rgb(image), return_tensors="pt").pixel_values
        config = self.config
        with self.oom():
            ids = self.model.generate(pixel_values=pixels.to(self.device, self.dtype), num_beams=config.num_beams,
                                      min_length=config.min_length, max_length=config.max_length, do_sample=False)
        return ids[0].tolist()

    def caption(self, image: Image.Image) -> str:
        """What the image shows, in words."""
        return self.processor.decode(self.tokens(image), skip_special_tokens=True).strip()


@serve.deployment(ray_actor_options={"num_cpus": 0.25}, max_ongoing_requests=8, health_check_period_s=10)
class Captioner:
    """Thin Serve shell: the captioner loads once per replica and runs on its one inference thread."""

    def __init__(self, config: dict | CaptionerConfig) -> None:
        replica_logging()  # before anything here logs
        self.thread = devices.InferenceThread("captioner")
        self.model = self.thread.call(BlipCaptioner, CaptionerConfig.model_validate(config))
        self.metrics = StageMetrics("captioner")

    async def caption(self, image: Image.Image) -> str:
        """The caption of one decoded image (the ingress decodes, and refuses what it cannot)."""
        with self.metrics.track():
            return await self.thread.run(self.model.caption, image)

    async def describe(self) -> dict:
        config = self.model.config
        return {"num_beams": config.num_beams, "min_length": config.min_length, "max_length": config.max_length,
                "device": str(self.model.device), "dtype": str(self.model.dtype).removeprefix("torch."),
                **devices.memory(self.model.device)}

    async def check_health(self) -> None:
        devices.check_health(self.thread, self.model.oom, current().inference_stall_seconds)
