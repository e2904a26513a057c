"""What a model replica's health check sees without touching the device: a CUDA context that failed for good, out of
memory again and again, and an inference thread stuck in one call."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest
import torch

from deployments.support import device as devices


def guarded(guard: devices.OomGuard, error: BaseException) -> None:
    with pytest.raises(type(error)), guard():
        raise error


@pytest.mark.parametrize("message", [
    "CUDA error: an illegal memory access was encountered\nCUDA kernel errors might be asynchronously reported",
    "CUDA error: unspecified launch failure", "CUDA error: device-side assert triggered",
])
def test_a_sticky_cuda_error_fails_health_at_once(message):
    guard, thread = devices.OomGuard(torch.device("cpu"), "SDXL base"), devices.InferenceThread("t")
    guarded(guard, RuntimeError("expected m1 and m2 to have the same dtype"))  # a bug in one request: still healthy
    devices.check_health(thread, guard, 60)
    guarded(guard, RuntimeError(message))
    with pytest.raises(RuntimeError, match=r"SDXL base: the CUDA context failed \(CUDA error: "):
        devices.check_health(thread, guard, 60)
    with guard():
        pass  # a later success does not make a corrupt context usable again
    assert not guard.healthy()


def test_repeated_out_of_memory_fails_health_until_a_success():
    guard, thread = devices.OomGuard(torch.device("cpu"), "upscaler", limit=2), devices.InferenceThread("t")
    for _ in range(2):
        devices.check_health(thread, guard, 60)
        with pytest.raises(devices.GpuOutOfMemory), guard():
            raise torch.OutOfMemoryError("CUDA out of memory")
    with pytest.raises(RuntimeError, match="upscaler: repeated out-of-memory failures"):
        devices.check_health(thread, guard, 60)
    with guard():
        pass
    devices.check_health(thread, guard, 60)


def test_an_inference_thread_stuck_in_one_call_fails_health():
    guard, thread = devices.OomGuard(torch.device("cpu"), "SDXL refiner"), devices.InferenceThread("t")
    release = threading.Event()

    async def scenario() -> None:
        stuck = asyncio.ensure_future(thread.run(release.wait, 30))
        await asyncio.sleep(0.3)
        assert 0.2 < thread.busy_for() < 5
        with pytest.raises(RuntimeError, match=r"SDXL refiner: one call on the inference thread has run \d+ s"):
            devices.check_health(thread, guard, 0.2)
        devices.check_health(thread, guard, 60)  # within the bound: a long call is not a stuck one
        release.set()
        assert await stuck is True
        assert thread.busy_for() == 0.0
        devices.check_health(thread, guard, 0.2)

    asyncio.run(scenario())

    async def loading() -> None:  # a run-time checkpoint load (and its compile warm-up) may take longer
        release.clear()
        load = asyncio.ensure_future(thread.load(release.wait, 30))
        await asyncio.sleep(0.3)
        assert thread.patient
        devices.check_health(thread, guard, 0.1)  # within LOAD_PATIENCE (4) times the bound
        with pytest.raises(RuntimeError, match="has run"):
            devices.check_health(thread, guard, 0.05)
        release.set()
        await load
        assert not thread.patient

    asyncio.run(loading())
    started = time.monotonic()
    assert thread.call(lambda: thread.busy_for()) < time.monotonic() - started + 0.1  # timed on the thread too


def test_the_serve_shells_check_health_reads_the_guard(tiny):
    from deployments.safety_checker import SafetyChecker

    shell = SafetyChecker.func_or_class({"model": str(tiny / "safety-checker")})
    asyncio.run(shell.check_health())
    shell.model.oom.fatal = "CUDA error: an illegal memory access was encountered"
    with pytest.raises(RuntimeError, match="safety checker: the CUDA context failed"):
        asyncio.run(shell.check_health())


def test_a_health_problem_is_logged_once_when_first_seen(caplog):
    """Serve says only that the check failed; the replica's log says why, once, not at every check while it lasts."""
    guard, thread = devices.OomGuard(torch.device("cpu"), "SDXL base"), devices.InferenceThread("t")
    release = threading.Event()

    async def scenario() -> None:
        stuck = asyncio.ensure_future(thread.run(release.wait, 30))
        await asyncio.sleep(0.2)
        for _ in range(3):  # three checks, the stall longer at each
            with pytest.raises(RuntimeError, match="has run"):
                devices.check_health(thread, guard, 0.1)
            await asyncio.sleep(0.05)
        release.set()
        await stuck
        devices.check_health(thread, guard, 0.1)

    with caplog.at_level("INFO", logger="deployments.support.device"):
        asyncio.run(scenario())
        guarded(guard, RuntimeError("CUDA error: unspecified launch failure"))
        for _ in range(2):
            with pytest.raises(RuntimeError):
                devices.check_health(thread, guard, 60)
    errors = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    assert len(errors) == 2, errors
    assert errors[0].startswith("health check failed: SDXL base: one call on the inference thread has run")
    assert errors[1] == ("health check failed: SDXL base: the CUDA context failed (CUDA error: unspecified launch "
                         "failure); Serve replaces this replica")
