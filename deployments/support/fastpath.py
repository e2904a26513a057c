"""The GPU fast path of the diffusion deployments: memory format, attention kernel, FP8 and
torch.compile, each a setting of ``FastPath`` / ``DeviceConfig``; and the one VAE decode they all use.

Everything here runs on the replica's single inference thread: compiled graphs (CUDA graphs above all) are bound
to the thread that captured them. Compile caches live under ``MODEL_CACHE_DIR/compile`` so that a restarted
replica loads its kernels instead of compiling them again.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import torch

from deployments.support.config import DeviceConfig, FastPath

logger = logging.getLogger(__name__)

_BACKENDS = {"flash": "FLASH_ATTENTION", "efficient": "EFFICIENT_ATTENTION", "cudnn": "CUDNN_ATTENTION",
             "math": "MATH"}
_FALLBACKS = ("FLASH_ATTENTION", "EFFICIENT_ATTENTION", "MATH")
_MEGA_CACHE = "artifacts.bin"


def use_compile_cache(cache_dir: Path) -> None:
    """Point Inductor and Triton at a persistent directory and load the portable artefacts saved there."""
    cache_dir.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(cache_dir / "inductor"))
    os.environ.setdefault("TRITON_CACHE_DIR", str(cache_dir / "triton"))
    saved = cache_dir / _MEGA_CACHE
    if saved.exists():
        try:
            torch.compiler.load_cache_artifacts(saved.read_bytes())
            logger.info("compile cache loaded from %s (%d bytes)", saved, saved.stat().st_size)
        except (RuntimeError, ValueError, OSError) as e:  # a cache from another torch build is only a miss
            logger.warning("compile cache %s not loaded: %s", saved, e)


def save_compile_cache(cache_dir: Path) -> None:
    artifacts = torch.compiler.save_cache_artifacts()
    if artifacts is None:
        return
    data, _info = artifacts
    tmp = cache_dir / f"{_MEGA_CACHE}.part-{os.getpid()}"
    tmp.write_bytes(data)
    os.replace(tmp, cache_dir / _MEGA_CACHE)
    logger.info("compile cache saved to %s (%d bytes)", cache_dir / _MEGA_CACHE, len(data))


def _quantize_fp8(unet) -> bool:
    if torch.cuda.get_device_capability() < (8, 9):
        logger.warning("fp8 asked for, but this GPU has no FP8 units: kept %s", unet.dtype)
        return False
    from torchao.quantization import Float8DynamicActivationFloat8WeightConfig, PerRow, quantize_

    def big_linear(module, _name):  # small projections lose more to the scaling than they gain
        return isinstance(module, torch.nn.Linear) and module.in_features >= 640 and module.out_features >= 640

    quantize_(unet, Float8DynamicActivationFloat8WeightConfig(granularity=PerRow()), filter_fn=big_linear)
    return True


def apply(pipe, device_config: DeviceConfig, fast: FastPath, device: torch.device, cache_dir: Path) -> list[str]:
    """Apply the configured optimisations to a loaded pipeline in place; return what was applied."""
    applied: list[str] = []
    if device.type != "cuda":
        return applied  # CPU inference gains nothing from these and compiles slowly
    if device_config.channels_last:
        pipe.unet.to(memory_format=torch.channels_last)
        pipe.vae.to(memory_format=torch.channels_last)
        applied.append("channels-last")
    if fast.fp8 and _quantize_fp8(pipe.unet):
        applied.append("fp8")
    if fast.compile != "none":
        use_compile_cache(cache_dir)
        torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)
        dynamic = {"static": False, "auto": None, "dynamic": True}[fast.compile_dynamic]
        # Not fullgraph: a graph break, or a UNet recompiled past the limit (each LoRA set or weight is a guard),
        # then runs eagerly, slower, instead of failing the request. TORCH_LOGS=graph_breaks,recompiles shows them.
        options = dict(mode=fast.compile_mode, fullgraph=False, dynamic=dynamic)
        if fast.compile == "regional":
            pipe.unet.compile_repeated_blocks(**options)
        else:
            pipe.unet.compile(**options)
        applied.append(f"compile-{fast.compile}-{fast.compile_mode}")
        if fast.compile_vae:
            pipe.vae.decoder.compile(**options)
            applied.append("compile-vae")
    if fast.attention != "auto":
        applied.append(f"attention-{fast.attention}")
    return applied


def warm_up(name: str, fast: FastPath, device: torch.device, cache_dir: Path,
            run: Callable[[int, int, int], object]) -> None:
    """Run each configured size at each configured batch size (``run(width, height, batch)``) once, so that
    compilation and autotuning happen before the first request, then save what was compiled for the next start."""
    for width, height in fast.warmup_sizes:
        for batch in fast.warmup_batch_sizes:
            started = time.perf_counter()
            run(width, height, batch)
            logger.info("%s warm-up %dx%d, batch %d: %.1fs", name, width, height, batch,
                        time.perf_counter() - started)
    if fast.warmup_sizes and fast.compile != "none" and device.type == "cuda":
        save_compile_cache(cache_dir)


@contextmanager
def attention(fast: FastPath) -> Iterator[None]:
    """Prefer the configured scaled-dot-product kernel for the calls inside, falling back in PyTorch's own order
    (flash, memory-efficient, math) for an attention it cannot run: the SDXL VAE's single 512-wide head, which an
    img2img pass encodes through, is beyond the flash and cuDNN kernels (head size 256 at most)."""
    if fast.attention == "auto":
        yield
        return
    from torch.nn.attention import SDPBackend, sdpa_kernel

    chosen = _BACKENDS[fast.attention]
    order = [chosen, *(name for name in _FALLBACKS if name != chosen)]
    with sdpa_kernel([getattr(SDPBackend, name) for name in order], set_priority=True):
        yield


def decode(pipe, latents: torch.Tensor) -> list:
    """Latents -> PIL images through the pipeline's VAE.

    A VAE whose config asks for float32 (the released SDXL VAE overflows in float16) is upcast only when it sits
    in float16; in bfloat16 or float32 it decodes as it is. Calls are serialised by the inference thread, so the
    temporary upcast cannot race another request.
    """
    vae = pipe.vae
    upcast = vae.dtype == torch.float16 and vae.config.force_upcast
    # torch's own ``to``: diffusers' logs a warning on every dtype cast, two lines a request.
    if upcast:
        torch.nn.Module.to(vae, torch.float32)
    try:
        with torch.inference_mode():
            scaled = latents.to(vae.device, vae.dtype) / vae.config.scaling_factor
            pixels = vae.decode(scaled, return_dict=False)[0]
    finally:
        if upcast:
            torch.nn.Module.to(vae, torch.float16)
    return pipe.image_processor.postprocess(pixels, output_type="pil")
