"""Device and dtype resolution: CUDA with half precision when present, CPU float32 otherwise."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch

from deployments.config import DeviceConfig
from deployments.errors import GpuOutOfMemory

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


def free_cache(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()


class OomGuard:
    """Turns CUDA out-of-memory into a retryable ``GpuOutOfMemory`` after freeing the cache, and counts
    consecutive failures so that a health check can have Ray replace a replica that keeps failing."""

    def __init__(self, device: torch.device, what: str, limit: int = 3) -> None:
        self.device, self.what, self.limit = device, what, limit
        self.consecutive = 0

    def healthy(self) -> bool:
        return self.consecutive < self.limit

    @contextmanager
    def __call__(self) -> Iterator[None]:
        try:
            yield
        except torch.OutOfMemoryError as e:
            self.consecutive += 1
            free_cache(self.device)
            raise GpuOutOfMemory(f"{self.what} ran out of GPU memory; retry later") from e
        self.consecutive = 0
