"""GPU checks: half precision and the fast path on CUDA give finite images close to the CPU float32 ones."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from deployments.support.config import SDXLBaseConfig
from deployments.support.generation import GenerationRequest

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


def test_base_runs_in_half_precision_on_cuda(tiny):
    from deployments.sdxl_base import BaseGenerator

    gpu = BaseGenerator(SDXLBaseConfig(model={"source": str(tiny / "sdxl-base")}, device={"device": "auto"}))
    expected = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    assert gpu.device.type == "cuda" and gpu.dtype == expected
    request = GenerationRequest(prompt="a cat", width=256, height=256, steps=6, seed=5)
    a = np.asarray(gpu.generate(request).images[0], dtype=np.int16)
    b = np.asarray(gpu.generate(request).images[0], dtype=np.int16)
    assert a.shape == (256, 256, 3) and np.array_equal(a, b)
    cpu = BaseGenerator(SDXLBaseConfig(model={"source": str(tiny / "sdxl-base")}, device={"device": "cpu"}))
    c = np.asarray(cpu.generate(request).images[0], dtype=np.int16)
    # Same seed, CPU noise: fp16 on the GPU lands close to the fp32 CPU image.
    assert np.abs(a - c).mean() < 8.0


def test_upscaler_and_faces_on_cuda(tiny, astronaut):
    from deployments.face_restorer import FaceEnhancer
    from deployments.support.config import FaceRestorerConfig, UpscalerConfig
    from deployments.upscaler import ImageUpscaler

    x4 = str(tiny / "upscalers" / "tiny-esrgan-x4.safetensors")
    up = ImageUpscaler(UpscalerConfig(models=[{"name": "x4", "path": x4}]))
    assert up.upscale(astronaut, "x4", 2).image.size == (1024, 1024)
    faces = FaceEnhancer(FaceRestorerConfig(model=str(tiny / "faces" / "tiny-restoreformer.safetensors")))
    assert faces.restore(astronaut).info["face_restoration_applied"]


@pytest.mark.parametrize("fast", [
    {"compile": "regional"},
    {"compile": "full", "compile_vae": True},
    {"attention": "efficient"},
])
def test_fast_path_keeps_the_image(tiny, fast):
    from deployments.sdxl_base import BaseGenerator

    source = {"source": str(tiny / "sdxl-base")}
    request = GenerationRequest(prompt="a cat", width=256, height=256, steps=6, seed=5)
    eager = BaseGenerator(SDXLBaseConfig(model=source, device={"dtype": "float32"}))
    fast_gen = BaseGenerator(SDXLBaseConfig(model=source, device={"dtype": "float32", "channels_last": True},
                                            fast={**fast, "warmup_sizes": [(256, 256)]}))
    fast_gen.warm_up()
    a = np.asarray(eager.generate(request).images[0], dtype=np.int16)
    b = np.asarray(fast_gen.generate(request).images[0], dtype=np.int16)
    assert fast_gen.fast and np.abs(a - b).mean() < 2.0
