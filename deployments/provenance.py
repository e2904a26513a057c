"""Provenance: reads both marks of an uploaded image, and marks and encodes images whose plan ends in the ingress.

Graph position: ingress -> **Provenance** (``POST /provenance/verify``; A1111's extras when they blend two
upscalers) and JobRunner -> **Provenance** (the batch-sizes crops, every size at once). Every other plan's last
stage marks and encodes its own images (``StageResult.encode``). It runs here because reading the watermark needs
invisible-watermark (OpenCV, torch) and the credentials need c2pa, which the ingress and the job runner never
import. CPU only.
"""

from __future__ import annotations

import asyncio

from ray import serve

from deployments.support.generation import Encoding, StageResult, encoded
from deployments.support.logs import replica_logging
from deployments.support.metrics import StageMetrics
from deployments.support.provenance import Verification, marker


@serve.deployment(ray_actor_options={"num_cpus": 0.25}, max_ongoing_requests=8, health_check_period_s=10)
class Provenance:
    def __init__(self) -> None:
        replica_logging()  # before anything here logs
        marker()  # the certificate and key are read now: a bad one fails the replica, not a request
        self.metrics = StageMetrics("provenance")

    async def encode(self, result: StageResult, how: Encoding) -> StageResult:
        """The images of ``result`` watermarked, encoded and signed as ``how`` says."""
        with self.metrics.track():
            out = await encoded(result, how)
        self.metrics.produced(len(out.encoded))
        return out

    async def verify(self, data: bytes, field: str = "image") -> Verification:
        """The watermark and content credentials of one file (PNG, JPEG or WebP)."""
        with self.metrics.track():
            return await asyncio.to_thread(marker().verify, data, field)
