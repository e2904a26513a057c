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
