"""Device and dtype resolution: CUDA with half precision when present, CPU float32 otherwise."""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from contextlib import contextmanager

import torch

from deployments.support.config import DeviceConfig
from deployments.support.errors import GpuOutOfMemory

logger = logging.getLogger(__name__)

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def resolve(config: DeviceConfig) -> tuple[torch.device, torch.dtype]:
    """Turn a config into a concrete device and dtype.

    A replica scheduled on a logical GPU of a CPU-only Ray cluster sees no CUDA, so ``auto`` falls back to CPU.
    Half precision is never used on CPU: most CPU kernels lack it and fp32 is what CPU inference wants. On CUDA
    ``auto`` prefers bfloat16: it has float32's range, so the SDXL VAE needs no float32 upcast per call.
    """
    if config.device == "auto":
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        device = torch.device(config.device)
        if device.type == "cuda" and not torch.cuda.is_available():
            device = torch.device("cpu")
    if config.dtype == "auto" or device.type == "cpu":
        dtype = torch.float32
        if device.type == "cuda":
            dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    else:
        dtype = _DTYPES[config.dtype]
    return device, dtype


def free_cache(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()


class OomGuard:
    """Turns CUDA out-of-memory into a retryable ``GpuOutOfMemory`` after freeing the cache, and counts
    consecutive failures so that a health check can have Ray replace a replica that keeps failing. A CUDA error
    that leaves the context unusable (every later call fails too) marks the replica for replacement at once:
    failing fast, it would otherwise look the least loaded and draw more traffic."""

    def __init__(self, device: torch.device, what: str, limit: int = 3) -> None:
        self.device, self.what, self.limit = device, what, limit
        self.consecutive = 0
        self.fatal: str | None = None
        self.reported: str | None = None  # the health problem last logged (check_health logs each once)

    def healthy(self) -> bool:
        return self.problem() is None

    def problem(self) -> str | None:
        if self.fatal is not None:
            return f"{self.what}: the CUDA context failed ({self.fatal})"
        if self.consecutive >= self.limit:
            return f"{self.what}: repeated out-of-memory failures"
        return None

    @contextmanager
    def __call__(self) -> Iterator[None]:
        try:
            yield
        except RuntimeError as e:  # torch.OutOfMemoryError is one
            if not out_of_memory(e):
                if any(m in str(e) for m in _FATAL_CUDA):
                    self.fatal = str(e).splitlines()[0][:200]
                raise
            self.consecutive += 1
            free_cache(self.device)
            raise GpuOutOfMemory(f"{self.what} ran out of GPU memory; retry later") from e
        self.consecutive = 0


# How CUDA libraries that allocate outside PyTorch's allocator (cuBLAS and cuDNN workspaces) say the same thing.
_OOM_MESSAGES = ("out of memory", "CUBLAS_STATUS_ALLOC_FAILED", "CUDNN_STATUS_ALLOC_FAILED")
# Sticky CUDA errors: the context is corrupt and only a new process recovers.
_FATAL_CUDA = ("illegal memory access", "unspecified launch failure", "device-side assert", "misaligned address",
               "illegal instruction", "uncorrectable ECC error", "CUDA error: unknown error")


def out_of_memory(error: BaseException) -> bool:
    return isinstance(error, torch.OutOfMemoryError) or any(m in str(error) for m in _OOM_MESSAGES)


LOAD_PATIENCE = 4  # a run-time model load may hold the inference thread this many times the stall bound


class InferenceThread:
    """The one thread that touches a replica's model.

    Compiled models and CUDA graphs belong to the thread that built them, and the pipelines are stateful
    (scheduler, adapters), so every call goes through a single worker; the replica's async methods await it and
    stay free to answer progress, cancel and health calls meanwhile.
    """

    def __init__(self, name: str) -> None:
        from concurrent.futures import ThreadPoolExecutor

        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=name)
        self._since: float | None = None  # when the call running now began (monotonic)
        self.patient = False  # the call running now loads a model: it may take LOAD_PATIENCE times as long

    def _timed(self, fn, /, *args, patient: bool = False, **kwargs):
        self._since, self.patient = time.monotonic(), patient
        try:
            return fn(*args, **kwargs)
        finally:
            self._since, self.patient = None, False

    def busy_for(self) -> float:
        """Seconds the call running now has run (0 when idle)."""
        since = self._since
        return 0.0 if since is None else time.monotonic() - since

    def call(self, fn, /, *args, **kwargs):
        """Run on the inference thread and wait (for start-up work such as loading and warm-up)."""
        return self._executor.submit(self._timed, fn, *args, **kwargs).result()

    async def run(self, fn, /, *args, **kwargs):
        import asyncio
        import functools

        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, functools.partial(self._timed, fn, *args, **kwargs))

    async def load(self, fn, /, *args, **kwargs):
        """``run`` for a model load at run time (a checkpoint read from disk, then its compile warm-up), which the
        health check allows ``LOAD_PATIENCE`` times the stall bound."""
        return await self.run(fn, *args, patient=True, **kwargs)


def check_health(thread: InferenceThread, guard: OomGuard, stall_seconds: float) -> None:
    """A replica's health check: its CUDA context usable, not failing out of memory again and again, and its
    inference thread not stuck in one call (a hung kernel or driver call that no cancel reaches). Runs on the
    event loop: it reads flags and never touches the device.

    Serve logs a failed check only as its own generic text, so the problem is logged here, at ERROR, when it is
    first seen (Serve checks every ``health_check_period_s``: once per check would repeat it while it lasts)."""
    problem = key = guard.problem()
    if problem is None and thread.busy_for() > stall_seconds * (LOAD_PATIENCE if thread.patient else 1):
        problem = f"{guard.what}: one call on the inference thread has run {thread.busy_for():.0f} s"
        key = "stalled"  # the same stall, however long it has run by this check
    if key != guard.reported:
        if problem is not None:
            logger.error("health check failed: %s; Serve replaces this replica", problem)
        else:
            logger.info("health check passes again: %s", guard.reported)
        guard.reported = key
    if problem is not None:
        raise RuntimeError(problem)


def memory(device: torch.device) -> dict:
    """Peak and current GPU memory of this process, for /models and the GPU benchmark."""
    if device.type != "cuda":
        return {}
    return {
        "gpu_memory_peak_gb": round(torch.cuda.max_memory_allocated(device) / 2**30, 2),
        "gpu_memory_reserved_gb": round(torch.cuda.memory_reserved(device) / 2**30, 2),
    }


def cuda_memory(device: torch.device) -> dict:
    """The device's memory and this process's allocator figures, in bytes, in the shape of A1111's
    ``/sdapi/v1/memory`` ``cuda``; off CUDA, A1111's own answer without a GPU."""
    if device.type != "cuda":
        return {"error": "unavailable"}
    free, total = torch.cuda.mem_get_info(device)
    stats = torch.cuda.memory_stats(device)  # empty until the first allocation

    def figure(name: str) -> dict:
        return {"current": stats.get(f"{name}.all.current", 0), "peak": stats.get(f"{name}.all.peak", 0)}

    return {
        "system": {"free": free, "used": total - free, "total": total},
        "active": figure("active_bytes"),
        "allocated": figure("allocated_bytes"),
        "reserved": figure("reserved_bytes"),
        "inactive": figure("inactive_split_bytes"),
        "events": {"retries": stats.get("num_alloc_retries", 0), "oom": stats.get("num_ooms", 0)},
    }


def supported_dtype(descriptor, wanted: torch.dtype) -> torch.dtype:
    """The precision a spandrel model runs in: the wanted one if its architecture supports it, else the nearest."""
    if wanted == torch.bfloat16 and not descriptor.supports_bfloat16:
        wanted = torch.float16
    if wanted == torch.float16 and not descriptor.supports_half:
        wanted = torch.float32
    return wanted
