"""The fast-path settings on CPU (where they stay off), the warm-up and the single inference thread."""

from __future__ import annotations

import asyncio
import threading
import time

import numpy as np
import pytest
import torch

from deployments.support import device as devices
from deployments.support import fastpath
from deployments.support.config import DeviceConfig, FastPath, SDXLBaseConfig


def test_auto_dtype_is_float32_on_cpu():
    assert devices.resolve(DeviceConfig()) == (torch.device("cpu"), torch.float32)
    # half precision is never used on CPU, even when asked for
    assert devices.resolve(DeviceConfig(dtype="bfloat16", device="cpu"))[1] == torch.float32


def test_fast_settings_are_validated():
    with pytest.raises(ValueError):
        FastPath(compile="everything")
    with pytest.raises(ValueError):
        FastPath(warmup_sizes=[(1024, 1024)] * 17)
    assert FastPath(warmup_sizes=[[768, 1344]]).warmup_sizes == [(768, 1344)]


def test_cpu_replica_stays_eager_and_warms_up(tiny, tmp_path, monkeypatch):
    from deployments.sdxl_base import BaseGenerator

    monkeypatch.setenv("MODEL_CACHE_DIR", str(tmp_path))
    config = SDXLBaseConfig(model={"source": str(tiny / "sdxl-base")}, device={"channels_last": True},
                            fast={"compile": "full", "warmup_sizes": [(64, 64), (128, 64)], "warmup_steps": 1,
                                  "warmup_batch_sizes": [1, 3]})
    generator = BaseGenerator(config)
    assert generator.fast == []  # compilation on two CPU cores costs more than it saves
    steps = []
    generator.generate = lambda request, *a, **k: steps.append((request.width, request.height, request.steps,
                                                                request.batch_size))
    generator.warm_up()
    assert steps == [(64, 64, 1, 1), (64, 64, 1, 3), (128, 64, 1, 1), (128, 64, 1, 3)]
    assert not (tmp_path / "compile").exists()


def test_refiner_warms_up_both_modes_at_every_batch_size(tiny, tmp_path, monkeypatch):
    """Each size at each batch size, as images (the hires-fix pass) and as latents (the ensemble on a base's
    latents, which the standard plan sends): a shape met first by a request would compile inside it."""
    from deployments.sdxl_refiner import Refiner
    from deployments.support.config import SDXLRefinerConfig

    monkeypatch.setenv("MODEL_CACHE_DIR", str(tmp_path))
    refiner = Refiner(SDXLRefinerConfig(model={"source": str(tiny / "sdxl-refiner")},
                                        fast={"warmup_sizes": [(64, 64), (96, 64)], "warmup_batch_sizes": [1, 2]}))
    runs, batch = [], refiner.refine_batch

    def recorded(items, *, ensemble):
        results = batch(items, ensemble=ensemble)
        runs.append((ensemble, *(r.images[0].size + (len(r.images),) for r in results)))
        return results

    refiner.refine_batch = recorded
    refiner.warm_up()
    assert runs == [(ensemble, (w, h, n)) for w, h in [(64, 64), (96, 64)] for n in (1, 2)
                    for ensemble in (False, True)]


def test_decode_gives_one_image_per_latent(tiny):
    from deployments.sdxl_base import BaseGenerator

    generator = BaseGenerator(SDXLBaseConfig(model={"source": str(tiny / "sdxl-base")}))
    images = generator.decode(torch.randn(2, 4, 8, 12))
    assert [image.size for image in images] == [(96, 64), (96, 64)]


def test_a_float16_vae_decodes_upcast_and_stays_float16_without_a_warning_per_call(tiny, caplog):
    """The released SDXL VAE overflows in float16, so a float16 replica decodes in float32 and casts back, each
    call; diffusers warns on every cast through its own ``to``, which would be two log lines per request."""
    from deployments.sdxl_base import BaseGenerator

    generator = BaseGenerator(SDXLBaseConfig(model={"source": str(tiny / "sdxl-base")}))
    vae = generator.checkpoint().txt2img.vae
    latents = torch.randn(1, 4, 8, 8)
    expected = np.asarray(generator.decode(latents)[0], dtype=np.int16)
    vae.to(torch.float16)
    vae.register_to_config(force_upcast=True)
    caplog.clear()  # the cast just above warned
    with caplog.at_level("WARNING"):
        image = np.asarray(generator.decode(latents)[0], dtype=np.int16)
    assert vae.dtype == torch.float16
    assert not [r for r in caplog.records if "float32" in r.getMessage()]
    assert np.abs(image - expected).mean() < 2  # float16 weights, float32 arithmetic


def test_inference_thread_runs_everything_on_one_thread_and_keeps_the_loop_free():
    worker = devices.InferenceThread("test")
    idents = {worker.call(threading.get_ident) for _ in range(3)}

    async def scenario():
        slow = asyncio.ensure_future(worker.run(time.sleep, 0.5))
        started = time.perf_counter()
        await asyncio.sleep(0.05)  # the event loop is not blocked while the worker sleeps
        loop_delay = time.perf_counter() - started
        idents.add(await worker.run(threading.get_ident))
        await slow
        return loop_delay

    assert asyncio.run(scenario()) < 0.3
    assert len(idents) == 1 and threading.get_ident() not in idents


def test_previews_are_copied_only_when_asked():
    from deployments.support.generation import Cancellation

    cancellation = Cancellation()
    latents = torch.zeros(4, 8, 8)
    cancellation.keep_latents("r1", latents)
    before = np.asarray(cancellation.preview("r1"))
    latents += 1  # the stored reference follows the live tensor: nothing was copied per step
    after = np.asarray(cancellation.preview("r1"))
    assert before.shape == (8, 8, 3) and not np.array_equal(before, after)
    cancellation.finish("r1")
    assert cancellation.preview("r1") is None


@pytest.mark.parametrize("kernel", ["flash", "efficient", "cudnn", "math"])
def test_a_chosen_attention_kernel_falls_back_where_it_cannot_run(kernel):
    """The configured kernel is a preference: an attention it cannot run (the SDXL VAE's one 512-wide head is beyond
    flash and cuDNN on a GPU; a CPU has neither the memory-efficient nor the cuDNN kernel) runs on the next one in
    PyTorch's order, with the same result, rather than failing the request after its denoising steps."""
    import torch.nn.functional as F

    torch.manual_seed(0)
    q, k, v = (torch.randn(1, 1, 64, 512) for _ in range(3))
    expected = F.scaled_dot_product_attention(q, k, v)
    with fastpath.attention(FastPath(attention=kernel)):
        out = F.scaled_dot_product_attention(q, k, v)
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-4)
