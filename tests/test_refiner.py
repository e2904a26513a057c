"""SDXLRefiner: expert-ensemble latents from the base, and the hires-fix image pass at 1536x1536."""

from __future__ import annotations

import time

import numpy as np
import pytest
from PIL import Image

from deployments.support.errors import InvalidInput
from deployments.support.generation import GenerationRequest, RefineRequest, StageResult
from tests.helpers import pixels


def test_ensemble_latents_flow_base_to_refiner(base, refiner):
    handoff = base.generate(GenerationRequest(prompt="a red apple", width=128, height=128, steps=10, seed=3,
                                              batch_size=2, denoising_end=0.8))
    request = RefineRequest(prompt="a red apple", steps=10, denoising_start=0.8)
    result = refiner.refine_latents(request, handoff)
    images = result.images
    assert [i.size for i in images] == [(128, 128), (128, 128)]
    assert result.seeds == handoff.seeds and result.info["refiner_mode"] == "ensemble" and result.latents is None
    again = refiner.refine_latents(request, handoff).images
    assert np.array_equal(pixels(images[0]), pixels(again[0]))
    assert not np.array_equal(pixels(images[0]), pixels(images[1]))


def test_refiner_image_mode_changes_less_at_low_strength(refiner, astronaut):
    image = astronaut.resize((128, 128))
    low = pixels(refiner.refine_images(RefineRequest(seeds=[1], steps=10, strength=0.1), image).image)
    high = pixels(refiner.refine_images(RefineRequest(seeds=[1], steps=10, strength=0.9), image).image)
    same = pixels(refiner.refine_images(RefineRequest(seeds=[1], steps=10, strength=0.1), image).image)
    assert np.array_equal(low, same)
    assert not np.array_equal(low, high)


def test_each_mode_needs_its_input(refiner, base):
    image_only = StageResult(images=[Image.new("RGB", (64, 64))], seeds=[1])
    with pytest.raises(InvalidInput) as err:
        refiner.refine_latents(RefineRequest(), image_only)
    assert err.value.field == "latents"
    with pytest.raises(InvalidInput) as err:
        refiner.refine_images(RefineRequest(), StageResult(seeds=[1]))
    assert err.value.field == "seeds"


def test_warnings_travel_forward(refiner):
    earlier = StageResult(images=[Image.new("RGB", (64, 64))], seeds=[5], warnings=["LoRA 'x' not found, ignored"],
                          info={"model": "tiny"})
    result = refiner.refine_images(RefineRequest(steps=2, strength=0.5), earlier)
    assert result.warnings == ["LoRA 'x' not found, ignored"] and result.seeds == [5]
    assert result.info["model"] == "tiny" and result.info["refiner_mode"] == "image"


def test_hires_fix_yields_1536(base, upscaler, refiner):
    """The seed-000 plan on tiny models: 768 base -> x2 Real-ESRGAN -> refiner img2img at 1536, strength 0.35."""
    started = time.perf_counter()
    first = base.generate(GenerationRequest(prompt="landscape photo", width=768, height=768, steps=8, seed=42))
    upscaled = upscaler.upscale(first.images[0], "R-ESRGAN 2x+", 2)
    assert upscaled.image.size == (1536, 1536)
    final = refiner.refine_images(RefineRequest(prompt="landscape photo", steps=8, strength=0.35), upscaled).image
    elapsed = time.perf_counter() - started
    assert final.size == (1536, 1536)
    print(f"tiny hires fix 768 -> 1536: {elapsed:.1f}s")  # noqa: T201  (reported figure, read with -s)


def test_the_ensemble_runs_the_base_sampler_and_schedule(base, refiner):
    """Latents from a DPM++ 2M Karras base are variance-preserving, at a Karras noise level: the refiner must
    continue with the same sampler and schedule (it ran Euler, whatever the base ran)."""
    handoff = base.generate(GenerationRequest(prompt="a red apple", width=64, height=64, steps=10, seed=3,
                                              sampler="DPM++ 2M", schedule="Karras", denoising_end=0.8))
    assert handoff.info["sampler"] == "DPM++ 2M" and handoff.info["schedule"] == "Karras"
    refiner.refine_latents(RefineRequest(prompt="a red apple", steps=10, denoising_start=0.8), handoff)
    scheduler = refiner.pipe.scheduler
    assert type(scheduler).__name__ == "DPMSolverMultistepScheduler" and scheduler.config.use_karras_sigmas is True
    default = base.generate(GenerationRequest(prompt="a red apple", width=64, height=64, steps=10, seed=3,
                                              denoising_end=0.8))  # the base's default sampler, Euler a here
    refiner.refine_latents(RefineRequest(prompt="a red apple", steps=10, denoising_start=0.8), default)
    assert type(refiner.pipe.scheduler).__name__ == "EulerAncestralDiscreteScheduler"


def test_an_ensemble_with_another_sampler_than_the_base_is_refused(base, refiner):
    handoff = base.generate(GenerationRequest(prompt="p", width=64, height=64, steps=4, seed=3,
                                              sampler="DPM++ 2M Karras", denoising_end=0.8))
    with pytest.raises(InvalidInput) as e:
        refiner.refine_latents(RefineRequest(steps=4, sampler="Euler"), handoff)
    assert e.value.field == "sampler"
    with pytest.raises(InvalidInput) as e:
        refiner.refine_latents(RefineRequest(steps=4, schedule="Exponential"), handoff)
    assert e.value.field == "schedule"
    # The same sampler under another spelling, and the schedule its name implies, are the base's.
    assert refiner.refine_latents(RefineRequest(steps=4, sampler="dpm++_2m_karras", schedule="Automatic"),
                                  handoff).images


def test_the_ensemble_hand_off_continues_the_base_run(base, refiner, monkeypatch):
    """Both UNets replaced by the ideal denoiser of Gaussian latents x0 ~ N(0, 0.8²): with it, the base stopping at
    0.8 and the refiner finishing must land where the base alone lands. A DPM++ 2M Karras base finished by Euler
    was 17% off (its latents read too small by sqrt(1 + sigma²)); with the base's sampler it is within 1%."""
    import torch

    from deployments.support import fastpath

    spread = 0.8
    alphas = base.checkpoint().txt2img.scheduler.alphas_cumprod.double()

    def ideal(sample, timestep, *args, **kwargs):
        t = float(timestep.flatten()[0]) if torch.is_tensor(timestep) else float(timestep)
        lo, hi = int(np.floor(t)), min(int(np.ceil(t)), len(alphas) - 1)
        a = alphas[lo] + (alphas[hi] - alphas[lo]) * (t - lo)
        x = sample.double()
        x0 = a.sqrt() * spread**2 * x / (a * spread**2 + 1 - a)
        return (((x - a.sqrt() * x0) / (1 - a).sqrt()).to(sample.dtype),)

    captured = []

    def capture(_pipe, latents):
        captured.append(latents.float().clone())
        return [Image.new("RGB", (8, 8))] * len(latents)

    monkeypatch.setattr(base.checkpoint().txt2img.unet, "forward", ideal)
    monkeypatch.setattr(refiner.pipe.unet, "forward", ideal)
    monkeypatch.setattr(fastpath, "decode", capture)
    request = GenerationRequest(prompt="p", width=128, height=128, steps=30, seed=1, sampler="DPM++ 2M Karras")
    base.generate(request)
    handoff = base.generate(request.model_copy(update={"denoising_end": 0.8}))
    refiner.refine_latents(RefineRequest(prompt="p", steps=30, denoising_start=0.8), handoff)
    alone, ensemble = captured
    assert abs(float(alone.std()) - spread) < 0.05
    assert float((ensemble - alone).norm() / alone.norm()) < 0.01


def test_a_dpm_sde_refiner_follows_the_seeds(refiner, astronaut):
    """Its Brownian tree is seeded per image, as the base's is: image i of a batch is the one its seed gives alone."""
    images = [astronaut.resize((64, 64)), astronaut.resize((64, 64)).rotate(90)]
    request = RefineRequest(steps=6, strength=0.5, sampler="DPM++ SDE Karras")
    batch = refiner.refine_images(request, StageResult(images=images, seeds=[7, 8])).images
    for image, source, seed in zip(batch, images, [7, 8], strict=True):
        alone = refiner.refine_images(request, StageResult(images=[source], seeds=[seed])).images[0]
        assert np.abs(pixels(alone) - pixels(image)).max() <= 1
    again = refiner.refine_images(request, StageResult(images=images[:1], seeds=[7])).images[0]
    assert np.array_equal(pixels(again), pixels(refiner.refine_images(request, StageResult(
        images=images[:1], seeds=[7])).images[0]))


def test_a_schedule_warning_is_said_once_through_the_ensemble(base, refiner):
    handoff = base.generate(GenerationRequest(prompt="p", width=64, height=64, steps=4, seed=3, sampler="DDIM",
                                              schedule="Karras", denoising_end=0.8))
    result = refiner.refine_latents(RefineRequest(steps=4), handoff)
    assert result.warnings == ["scheduler 'Karras' does not apply to sampler 'DDIM': its own schedule ran"]


def test_ensembles_from_bases_of_different_samplers_never_share_a_batch():
    from deployments.sdxl_refiner import batch_key

    how = RefineRequest(steps=4)
    latents = np.zeros((1, 4, 8, 8), np.float32)
    handed = {name: StageResult(latents=latents, seeds=[1], info={"sampler": name, "schedule": schedule})
              for name, schedule in [("Euler", None), ("DPM++ 2M", "Karras")]}
    keys = {batch_key(how, source, ensemble=True) for source in handed.values()}
    assert len(keys) == 2
