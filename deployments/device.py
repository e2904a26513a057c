"""Device and dtype resolution: CUDA with half precision when present, CPU float32 otherwise."""

from __future__ import annotations

import torch

from deployments.config import DeviceConfig

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def resolve(config: DeviceConfig) -> tuple[torch.device, torch.dtype]:
    """Turn a config into a concrete device and dtype.

    A replica scheduled on a logical GPU of a CPU-only Ray cluster sees no CUDA, so ``auto`` falls back to CPU.
    Half precision is never used on CPU: most CPU kernels lack it and fp32 is what CPU inference wants.
    """
    if config.device == "auto":
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        device = torch.device(config.device)
        if device.type == "cuda" and not torch.cuda.is_available():
            device = torch.device("cpu")
    if config.dtype == "auto" or device.type == "cpu":
        dtype = torch.float16 if device.type == "cuda" else torch.float32
    else:
        dtype = _DTYPES[config.dtype]
    return device, dtype


def is_oom(error: BaseException) -> bool:
    return isinstance(error, torch.OutOfMemoryError) or "out of memory" in str(error).lower()


def free_cache(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()
