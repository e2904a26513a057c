"""A1111's variation seeds, seed resize and seamless tiling on the tiny SDXL base: pixels, seeds and restoration."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from deployments.sdxl_base import batch_key
from deployments.support.errors import GenerationCancelled
from deployments.support.generation import BatchItem, GenerationRequest, variation_seeds
from deployments.support.samplers import build_scheduler
from deployments.support.variations import Variation, circular, conv_layers, slerp, vary
from tests.helpers import pixels

# Euler, not the default Euler a: an ancestral sampler draws later noise from the seed's own generator, so only
# the initial noise (what a variation seed changes) is the variation seed's.
SMALL = dict(prompt="a photo of a cat", width=128, height=128, steps=4, guidance_scale=5.0, sampler="Euler")


def gen(base, **kw):
    return base.generate(GenerationRequest(**{**SMALL, **kw}))


def image(base, **kw) -> np.ndarray:
    return pixels(gen(base, **kw).images[0])


# --- the noise itself ---------------------------------------------------------------------------------------------

def test_slerp_ends_are_its_inputs_exactly():
    low, high = torch.randn(4, 16, 16), torch.randn(4, 16, 16)
    assert torch.equal(slerp(1.0, low, high), high)
    assert torch.allclose(slerp(0.0, low, high), low, atol=1e-6)
    # A1111 normalises along dimension 1: each column of each channel is a vector of unit length in between.
    middle = slerp(0.5, low, high)
    assert not torch.allclose(middle, low) and not torch.allclose(middle, high)


def test_seed_resize_pastes_the_seeds_noise_centred():
    generator = torch.Generator("cpu").manual_seed(5)
    own = torch.randn((1, 4, 16, 24), generator=generator)
    small = torch.randn((1, 4, 8, 8), generator=torch.Generator("cpu").manual_seed(5))[0]
    out = vary(own, 5, Variation(subseed=0, resize_from=(64, 64)))[0]
    assert torch.equal(out[:, 4:12, 8:16], small)  # (16-8)//2 rows and (24-8)//2 columns in
    assert torch.equal(out[:, :4], own[0, :, :4]) and torch.equal(out[:, :, :8], own[0, :, :, :8])
    large = torch.randn((1, 4, 32, 32), generator=torch.Generator("cpu").manual_seed(5))[0]
    cropped = vary(own, 5, Variation(subseed=0, resize_from=(256, 256)))[0]
    assert torch.equal(cropped, large[:, 8:24, 4:28])  # the larger noise's centre
    assert vary(own, 5, Variation(subseed=0, resize_from=(192, 128))) is own  # its own size: untouched


def test_variation_seeds_number_as_a1111():
    assert variation_seeds(10, 20, 0.0, 3) == ([10, 11, 12], [20, 21, 22])
    assert variation_seeds(10, 20, 0.3, 3) == ([10, 10, 10], [20, 21, 22])
    seeds, subseeds = variation_seeds(10, -1, 0.3, 2)
    assert seeds == [10, 10] and subseeds[1] == subseeds[0] + 1


# --- pixels -------------------------------------------------------------------------------------------------------

def test_strength_zero_is_todays_image(base):
    plain = pixels(base.generate(GenerationRequest(**{**SMALL, "sampler": None}, seed=7)).images[0])
    varied = base.generate(GenerationRequest(**{**SMALL, "sampler": None}, seed=7, subseed=9, subseed_strength=0.0))
    assert np.array_equal(plain, pixels(varied.images[0]))
    assert "subseeds" not in varied.info


def test_strength_one_is_the_variation_seeds_image(base):
    result = gen(base, seed=7, subseed=9, subseed_strength=1.0)
    assert np.array_equal(pixels(result.images[0]), image(base, seed=9))
    assert result.seeds == [7]
    assert result.info["subseeds"] == [9] and result.info["subseed_strength"] == 1.0


def test_half_strength_differs_from_both_and_reproduces(base):
    half = image(base, seed=7, subseed=9, subseed_strength=0.5)
    assert np.abs(half - image(base, seed=7)).mean() > 1.0
    assert np.abs(half - image(base, seed=9)).mean() > 1.0
    assert np.array_equal(half, image(base, seed=7, subseed=9, subseed_strength=0.5))


def test_a_batch_keeps_the_seed_and_counts_the_variation_seeds_up(base):
    batch = gen(base, seed=7, subseed=9, subseed_strength=1.0, batch_size=2)
    assert batch.seeds == [7, 7] and batch.info["subseeds"] == [9, 10]
    for got, subseed in zip(batch.images, (9, 10), strict=True):
        assert np.abs(pixels(got) - image(base, seed=subseed)).max() <= 2  # batched convolutions may round apart


def test_seed_resize_to_the_images_own_size_changes_nothing_and_another_does(base):
    plain = image(base, seed=7)
    assert np.array_equal(plain, image(base, seed=7, seed_resize_from_w=128, seed_resize_from_h=128))
    assert np.abs(plain - image(base, seed=7, seed_resize_from_w=64, seed_resize_from_h=96)).mean() > 1.0
    # One side alone is no resize, as in A1111.
    assert np.array_equal(plain, image(base, seed=7, seed_resize_from_w=64))


def test_requests_with_and_without_variations_share_a_batch_and_keep_their_pixels(base):
    plain = GenerationRequest(**SMALL, seed=7)
    varied = GenerationRequest(**SMALL, seed=7, subseed=9, subseed_strength=1.0)
    assert batch_key(plain) == batch_key(varied)
    out = base.generate_batch([BatchItem(plain, "a"), BatchItem(varied, "b")])
    assert np.abs(pixels(out[0].images[0]) - image(base, seed=7)).max() <= 2
    assert np.abs(pixels(out[1].images[0]) - image(base, seed=9)).max() <= 2


def test_the_latent_hires_pass_takes_the_variation_too(base):
    hires = {"width": 192, "height": 192, "steps": 2, "strength": 0.5}
    varied = gen(base, seed=7, subseed=9, subseed_strength=1.0, hires=hires)
    assert np.array_equal(pixels(varied.images[0]), image(base, seed=9, hires=hires))


# --- image-to-image and inpainting ----------------------------------------------------------------------------------

EDIT = dict(strength=0.6)


@pytest.fixture(scope="module")
def photo(astronaut) -> Image.Image:
    return astronaut.resize((128, 128))


def edit(base, photo, **kw) -> np.ndarray:
    return image(base, init_image=photo, **{**EDIT, **kw})


def test_image_to_image_at_strength_zero_is_todays_image(base, photo):
    plain = gen(base, seed=7, init_image=photo, **EDIT)
    varied = gen(base, seed=7, init_image=photo, subseed=9, subseed_strength=0.0, **EDIT)
    assert np.array_equal(pixels(plain.images[0]), pixels(varied.images[0]))
    assert "subseeds" not in varied.info and varied.warnings == plain.warnings == []


def test_image_to_image_at_strength_one_is_the_variation_seeds_image(base, photo):
    """diffusers draws the VAE's posterior sample before the noise from each generator: the variation seed's noise
    is drawn after one of the same size, so strength 1 is exactly what that seed's own request adds."""
    varied = gen(base, seed=7, init_image=photo, subseed=9, subseed_strength=1.0, **EDIT)
    assert np.array_equal(pixels(varied.images[0]), edit(base, photo, seed=9))
    assert not np.array_equal(pixels(varied.images[0]), edit(base, photo, seed=7))
    assert varied.seeds == [7] and varied.info["subseeds"] == [9] and varied.info["subseed_strength"] == 1.0
    assert varied.warnings == []


def test_image_to_image_at_half_strength_differs_from_both_and_reproduces(base, photo):
    half = edit(base, photo, seed=7, subseed=9, subseed_strength=0.5)
    assert np.abs(half - edit(base, photo, seed=7)).mean() > 1.0
    assert np.abs(half - edit(base, photo, seed=9)).mean() > 1.0
    assert np.array_equal(half, edit(base, photo, seed=7, subseed=9, subseed_strength=0.5))


def test_image_to_image_batch_counts_the_variation_seeds_up(base, photo):
    batch = gen(base, seed=7, init_image=photo, subseed=9, subseed_strength=1.0, batch_size=2, **EDIT)
    assert batch.seeds == [7, 7] and batch.info["subseeds"] == [9, 10]
    for got, subseed in zip(batch.images, (9, 10), strict=True):
        assert np.abs(pixels(got) - edit(base, photo, seed=subseed)).max() <= 2  # batched convolutions may round


def test_image_to_image_seed_resize(base, photo):
    plain = edit(base, photo, seed=7)
    assert np.array_equal(plain, edit(base, photo, seed=7, seed_resize_from_w=128, seed_resize_from_h=128))
    resized = edit(base, photo, seed=7, seed_resize_from_w=64, seed_resize_from_h=96)
    assert np.abs(plain - resized).mean() > 1.0
    assert np.array_equal(resized, edit(base, photo, seed=7, seed_resize_from_w=64, seed_resize_from_h=96))
    assert gen(base, seed=7, init_image=photo, seed_resize_from_w=64, seed_resize_from_h=96,
               **EDIT).info["seed_resize_from"] == [64, 96]


@pytest.mark.parametrize("strength", [0.6, 1.0])  # at 1 diffusers starts from the noise alone, without add_noise
def test_inpainting_takes_the_variation_and_keeps_the_unmasked_pixels(base, photo, strength):
    mask = Image.new("L", (128, 128), 0)
    mask.paste(255, (32, 32, 96, 96))
    inpaint = dict(init_image=photo, mask=mask, mask_blur=0, strength=strength)
    varied = gen(base, seed=2, subseed=5, subseed_strength=1.0, **inpaint)
    assert varied.info["mode"] == "inpaint" and varied.info["subseeds"] == [5]
    assert np.array_equal(pixels(varied.images[0]), image(base, seed=5, **inpaint))
    plain = image(base, seed=2, **inpaint)
    assert np.array_equal(image(base, seed=2, subseed=5, subseed_strength=0.0, **inpaint), plain)
    half = image(base, seed=2, subseed=5, subseed_strength=0.5, **inpaint)
    outside = np.asarray(mask) == 0
    assert np.abs(half[outside] - pixels(photo)[outside]).max() <= 1
    assert np.abs(half[~outside] - plain[~outside]).mean() > 1.0


def test_a_batch_mixing_plain_varied_and_scaled_edits_keeps_each_ones_pixels(base, photo):
    alone = [GenerationRequest(**SMALL, init_image=photo, **EDIT, seed=7),
             GenerationRequest(**SMALL, init_image=photo, **EDIT, seed=7, subseed=9, subseed_strength=0.5),
             GenerationRequest(**SMALL, init_image=photo, **EDIT, seed=8, noise_multiplier=1.3)]
    assert len({batch_key(r) for r in alone}) == 1  # noise is per image: none of these splits a batch
    out = base.generate_batch([BatchItem(r, str(i)) for i, r in enumerate(alone)])
    for got, request in zip(out, alone, strict=True):
        assert np.abs(pixels(got.images[0]) - pixels(base.generate(request).images[0])).max() <= 2


def test_an_edit_hands_the_pipelines_back_as_they_were_even_a_cancelled_one(base, photo):
    mask = Image.new("L", (128, 128), 0)
    mask.paste(255, (32, 32, 96, 96))
    inpaint = dict(init_image=photo, mask=mask, strength=1.0, subseed=5, subseed_strength=0.5, noise_multiplier=1.2)
    before = image(base, seed=2, init_image=photo, mask=mask, strength=1.0)
    base.cancellation.cancel("gone-edit")
    with pytest.raises(GenerationCancelled):
        base.generate(GenerationRequest(**SMALL, seed=2, **inpaint), request_id="gone-edit")
    pipes = base.checkpoint()
    assert "encode" not in pipes.inpaint.vae.__dict__ and "prepare_latents" not in pipes.inpaint.__dict__
    assert "add_noise" not in pipes.inpaint.scheduler.__dict__
    assert np.array_equal(before, image(base, seed=2, init_image=photo, mask=mask, strength=1.0))


# --- A1111's initial noise multiplier ------------------------------------------------------------------------------

def test_noise_multiplier_one_changes_nothing_and_others_scale_the_noise(base, photo):
    plain = gen(base, seed=7, init_image=photo, **EDIT)
    assert np.array_equal(pixels(plain.images[0]), edit(base, photo, seed=7, noise_multiplier=1.0))
    assert "noise_multiplier" not in plain.info
    low, high = (gen(base, seed=7, init_image=photo, noise_multiplier=m, **EDIT) for m in (0.5, 1.5))
    assert low.info["noise_multiplier"] == 0.5 and high.info["noise_multiplier"] == 1.5
    for scaled, m in ((low, 0.5), (high, 1.5)):
        assert np.abs(pixels(scaled.images[0]) - pixels(plain.images[0])).mean() > 1.0
        assert np.array_equal(pixels(scaled.images[0]), edit(base, photo, seed=7, noise_multiplier=m))
    # Less noise keeps more of the photo: the result lies nearer to it.
    source = pixels(photo)
    assert np.abs(pixels(low.images[0]) - source).mean() < np.abs(pixels(high.images[0]) - source).mean()


def test_noise_multiplier_scales_the_varied_noise(base, photo):
    """A1111 mixes the variation seed in first and scales the result: at strength 1 that is the variation seed's
    own image at the same multiplier."""
    assert np.array_equal(edit(base, photo, seed=7, subseed=9, subseed_strength=1.0, noise_multiplier=0.8),
                          edit(base, photo, seed=9, noise_multiplier=0.8))


def test_noise_multiplier_is_refused_for_text_to_image_and_bounded():
    from pydantic import ValidationError

    from deployments.sdxl_base import check_request
    from deployments.support.errors import InvalidInput

    with pytest.raises(InvalidInput) as refused:
        check_request(GenerationRequest(**SMALL, noise_multiplier=1.2), 4096 * 4096)
    assert refused.value.details["field"] == "noise_multiplier"
    with pytest.raises(ValidationError, match="noise_multiplier"):
        GenerationRequest(**SMALL, noise_multiplier=2.5)


# --- the pixel hires fix's second pass -----------------------------------------------------------------------------

def test_a_pixel_second_pass_takes_each_images_variation_seed(base, photo):
    from deployments.sdxl_base import passes_over
    from deployments.support.generation import StageResult

    request = GenerationRequest(**SMALL, seed=7, subseed=9, subseed_strength=1.0, strength=0.5)
    first = StageResult(images=[photo, photo], seeds=[7, 7], info={"subseeds": [9, 10]})
    passes = passes_over(request, first)
    assert [(p.seed, p.subseed) for p in passes] == [(7, 9), (7, 10)]
    # Without the first pass's list (an edit over several uploads), they count up from the request's.
    assert [p.subseed for p in passes_over(request, StageResult(images=[photo] * 3, seeds=[7] * 3))] == [9, 10, 11]
    second = base.generate_batch([BatchItem(p, "hires", source=first) for p in passes])
    for got, subseed in zip(second, (9, 10), strict=True):
        own = GenerationRequest(**SMALL, seed=subseed, strength=0.5, init_image=photo)
        assert np.abs(pixels(got.images[0]) - pixels(base.generate(own).images[0])).max() <= 2
    assert first.joined(second).info["subseeds"] == [9, 10]


# --- tiling -------------------------------------------------------------------------------------------------------

def _wrap_and_inner(pixels_: np.ndarray) -> tuple[float, float]:
    x = pixels_.astype(float)
    return float(np.abs(x[:, -1] - x[:, 0]).mean()), float(np.abs(np.diff(x, axis=1)).mean())


def test_a_tiled_image_wraps_across_its_edges(base):
    tiled = gen(base, seed=7, tiling=True)
    assert tiled.info["tiling"] is True
    wrap, inner = _wrap_and_inner(pixels(tiled.images[0]))
    assert wrap <= 1.1 * inner  # the wrap edge is no seam: like any interior edge
    plain = image(base, seed=7)
    assert np.abs(pixels(tiled.images[0]) - plain).mean() > 1.0


def test_tiling_makes_the_picture_a_torus(base):
    """The proof that no seam is left: with every convolution circular the model commutes with a circular shift,
    so noise rolled by one latent tile (4 latents: the tiny UNet halves twice) gives the image rolled by 32 pixels,
    across the wrap edge; untiled it does not."""
    pipes = base.checkpoint()
    pipe = pipes.txt2img
    noise = torch.randn((1, 4, 16, 16), generator=torch.Generator("cpu").manual_seed(3))

    def run(latents: torch.Tensor) -> np.ndarray:
        pipe.scheduler = build_scheduler("Euler", pipes.scheduler_config)
        pipe.set_ip_adapter_scale(0.0)  # the adapted UNet wants image embeddings: a blank image at scale 0
        return pipe(prompt="a cat", latents=latents, width=128, height=128, num_inference_steps=3,
                    guidance_scale=5.0, output_type="np", ip_adapter_image=Image.new("RGB", (64, 64))).images[0]

    with base._lock, circular(pipe.unet, pipe.vae):
        tiled, shifted = run(noise), run(torch.roll(noise, 4, dims=3))
    assert np.abs(np.roll(tiled, 32, axis=1) - shifted).max() < 1e-3
    with base._lock:
        plain, plain_shifted = run(noise), run(torch.roll(noise, 4, dims=3))
    assert np.abs(np.roll(plain, 32, axis=1) - plain_shifted).max() > 1e-2


def test_tiling_is_undone_after_a_tiled_request_even_a_failed_one(base):
    before = image(base, seed=11)
    gen(base, seed=11, tiling=True)
    assert np.array_equal(before, image(base, seed=11))
    pipes = base.checkpoint()
    base.cancellation.cancel("gone")
    with pytest.raises(GenerationCancelled):
        base.generate(GenerationRequest(**SMALL, seed=11, tiling=True), request_id="gone")
    layers = conv_layers(pipes.txt2img.unet, pipes.txt2img.vae, pipes.img2img.unet)
    assert layers and all(layer.padding_mode == "zeros" for layer in layers)
    assert np.array_equal(before, image(base, seed=11))


def test_circular_restores_the_padding_when_the_call_raises():
    model = torch.nn.Sequential(torch.nn.Conv2d(1, 1, 3, padding=1), torch.nn.Conv2d(1, 1, 3, padding=1,
                                                                                     padding_mode="reflect"))
    with pytest.raises(RuntimeError), circular(model):
        assert [m.padding_mode for m in model] == ["circular", "circular"]
        raise RuntimeError("boom")
    assert [m.padding_mode for m in model] == ["zeros", "reflect"]


def test_tiled_and_untiled_requests_never_share_a_batch():
    assert batch_key(GenerationRequest(**SMALL)) != batch_key(GenerationRequest(**SMALL, tiling=True))
