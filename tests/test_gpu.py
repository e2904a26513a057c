"""GPU checks: half precision on CUDA gives finite images and matches the CPU result's structure."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from deployments.config import SDXLBaseConfig
from deployments.generation import GenerationRequest

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


def test_base_runs_in_half_precision_on_cuda(tiny):
    from deployments.sdxl_base import BaseGenerator

    gpu = BaseGenerator(SDXLBaseConfig(model={"source": str(tiny / "sdxl-base")}, device={"device": "auto"}))
    assert gpu.device.type == "cuda" and gpu.dtype == torch.float16
    request = GenerationRequest(prompt="a cat", width=256, height=256, steps=6, seed=5)
    a = np.asarray(gpu.generate(request).images[0], dtype=np.int16)
    b = np.asarray(gpu.generate(request).images[0], dtype=np.int16)
    assert a.shape == (256, 256, 3) and np.array_equal(a, b)
    cpu = BaseGenerator(SDXLBaseConfig(model={"source": str(tiny / "sdxl-base")}, device={"device": "cpu"}))
    c = np.asarray(cpu.generate(request).images[0], dtype=np.int16)
    # Same seed, CPU noise: fp16 on the GPU lands close to the fp32 CPU image.
    assert np.abs(a - c).mean() < 8.0


def test_upscaler_and_faces_on_cuda(tiny, astronaut):
    from deployments.config import FaceRestorerConfig, UpscalerConfig
    from deployments.face_restorer import FaceEnhancer
    from deployments.upscaler import ImageUpscaler

    x4 = str(tiny / "upscalers" / "tiny-esrgan-x4.safetensors")
    up = ImageUpscaler(UpscalerConfig(models=[{"name": "x4", "path": x4}]))
    assert up.upscale(astronaut, "x4", 2).image.size == (1024, 1024)
    faces = FaceEnhancer(FaceRestorerConfig(model=str(tiny / "faces" / "tiny-restoreformer.safetensors")))
    assert faces.restore(astronaut).restored
