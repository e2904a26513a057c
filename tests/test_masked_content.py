"""A1111's masked content (``inpainting_fill``) and an inpainting checkpoint's kept latents, on the tiny base and the
tiny 9-channel inpainting checkpoint: the pixels the VAE encodes, the latents the sampler starts from and those it
keeps at every step, each checked against an independent reading of A1111's ``StableDiffusionProcessingImg2Img``
(``masking.fill``, its latent-size mask, its Euler blend)."""

from __future__ import annotations

import functools

import numpy as np
import pytest
import torch
from diffusers.pipelines.stable_diffusion_xl.pipeline_stable_diffusion_xl_inpaint import retrieve_latents
from PIL import Image, ImageFilter, ImageOps

from deployments.support import inpainting
from deployments.support.generation import GenerationRequest
from deployments.support.samplers import build_scheduler
from tests.helpers import centre_square, pixels

INPAINT, PLAIN = "tiny-inpaint", "tiny-plain"
# Euler at 4 steps and strength 0.75 runs 3 of them, from the second sigma: nothing is drawn after the start.
STEPS, STRENGTH, SEED = 4, 0.75, 5
SMALL = dict(prompt="a lighthouse", width=64, height=64, steps=STEPS, guidance_scale=5.0, seed=SEED, sampler="Euler")


@pytest.fixture(scope="module")
def generator(tiny):
    from deployments.sdxl_base import BaseGenerator
    from deployments.support.config import SDXLBaseConfig

    return BaseGenerator(SDXLBaseConfig.model_validate({
        "checkpoints": [{"name": INPAINT, "source": str(tiny / "sdxl-inpaint")},
                        {"name": PLAIN, "source": str(tiny / "sdxl-base")}], "max_loaded_checkpoints": 2}))


@pytest.fixture(scope="module")
def photo(astronaut) -> Image.Image:
    return astronaut.resize((64, 64))


@pytest.fixture(scope="module")
def square() -> Image.Image:
    return centre_square()


def request(**kw) -> GenerationRequest:
    return GenerationRequest(**{**SMALL, "strength": STRENGTH, **kw})


# --- A1111's arithmetic, written out independently ------------------------------------------------------------------

def a1111_fill(image: Image.Image, mask: Image.Image) -> Image.Image:
    """``masking.fill`` step by step as A1111 1.10 writes it: the image pasted through the inverted mask onto a
    transparent premultiplied canvas, then its blurs composited from the widest."""
    canvas = Image.new("RGBA", image.size)
    holed = Image.new("RGBa", image.size)
    holed.paste(image.convert("RGBA").convert("RGBa"), mask=ImageOps.invert(mask.convert("L")))
    for radius, repeats in [(256, 1), (64, 1), (16, 2), (4, 4), (2, 2), (0, 1)]:
        blurred = holed.filter(ImageFilter.GaussianBlur(radius)).convert("RGBA")
        for _ in range(repeats):
            canvas.alpha_composite(blurred)
    return canvas.convert("RGB")


def a1111_latmask(mask: Image.Image) -> np.ndarray:
    """``latmask``: the mask as RGB, resized to the latents (PIL's default filter, bicubic), its first band, rounded."""
    small = np.asarray(mask.convert("RGB").resize((mask.width // 8, mask.height // 8)), dtype=np.float32) / 255
    return np.around(np.moveaxis(small, 2, 0)[0])


def start(generator, checkpoint: str, image: Image.Image) -> tuple[torch.Tensor, torch.Tensor]:
    """What a pipeline draws for ``image`` from the seed's generator: the VAE's posterior sample (scaled), then the
    noise, each (4, 8, 8)."""
    vae = generator.checkpoint(checkpoint).txt2img.vae
    drawn = torch.Generator("cpu").manual_seed(SEED)
    x = torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0 * 2 - 1).permute(2, 0, 1)[None]
    with torch.no_grad():
        latents = retrieve_latents(vae.encode(x), generator=drawn) * vae.config.scaling_factor
    return latents[0], torch.randn((1, 4, 8, 8), generator=drawn)[0]


def sigmas(generator, checkpoint: str) -> list[float]:
    """Euler's sigmas of the steps that run (strength 0.75 of 4 starts at the second)."""
    scheduler = build_scheduler("Euler", generator.checkpoint(checkpoint).scheduler_config)
    scheduler.set_timesteps(STEPS)
    begin = STEPS - int(STEPS * STRENGTH)
    return [float(s) for s in scheduler.sigmas[begin:STEPS]]


class Watch:
    """Every UNet input's 4 latent channels (the first row: guidance runs the same latents twice), the images the
    VAE encodes (in [-1, 1]) and the latents decoded, while it watches."""

    def __init__(self, generator, checkpoint: str, monkeypatch) -> None:
        held = generator.checkpoint(checkpoint)
        self.unet, self.encoder = held.txt2img.unet, held.txt2img.vae.encoder
        self.inputs: list[torch.Tensor] = []
        self.encoded: list[torch.Tensor] = []
        self.decoded: list[torch.Tensor] = []
        decode = functools.partial(type(generator).decode, generator)  # the class's: watches never nest
        monkeypatch.setattr(generator, "decode", lambda latents, pipes=None: (
            self.decoded.append(latents[0].clone()), decode(latents, pipes))[1])

    def __enter__(self) -> Watch:
        self.hooks = [
            self.unet.register_forward_pre_hook(lambda _m, args: self.inputs.append(args[0][0, :4].clone())),
            self.encoder.register_forward_pre_hook(lambda _m, args: self.encoded.append(args[0][0].clone()))]
        return self

    def __exit__(self, *exc) -> None:
        for hook in self.hooks:
            hook.remove()


def as_pixels(x: torch.Tensor) -> np.ndarray:
    return ((x.permute(1, 2, 0).numpy() + 1) / 2 * 255).round().astype(np.int16)


# --- the pieces ---------------------------------------------------------------------------------------------------

def test_fill_paints_the_masked_area_exactly_as_a1111s_masking_fill(photo, square):
    rng = np.random.default_rng(3)
    noisy = Image.fromarray(rng.integers(0, 256, (48, 80, 3), dtype=np.uint8))
    soft = Image.new("L", (80, 48), 0)
    soft.paste(255, (20, 8, 56, 36))
    for image, mask in ((photo, square), (noisy, soft.filter(ImageFilter.GaussianBlur(4)))):
        made, kept = pixels(inpainting.filled(image, mask)), np.asarray(mask) == 0
        assert np.array_equal(made, pixels(a1111_fill(image, mask)))
        assert np.array_equal(made[kept], pixels(image)[kept])  # the unmasked pixels as they were
        assert np.abs(made[~kept] - pixels(image)[~kept]).mean() > 10  # the masked ones painted over


def test_the_latent_mask_is_a1111s_bicubic_rounded_one(square):
    blurred = square.filter(ImageFilter.GaussianBlur(6))
    for mask in (square, blurred, Image.new("L", (64, 64), 255)):
        made = inpainting.latent_mask(mask, 64, 64)
        assert made.shape == (1, 1, 8, 8) and np.array_equal(made[0, 0].numpy(), a1111_latmask(mask))
    # Rounded, not thresholded at any grey: the blur's edge cells fall on either side.
    assert 0 < int(inpainting.latent_mask(blurred, 64, 64).sum()) < 64


# --- through the base ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize(("checkpoint", "content"), [(PLAIN, "fill"), (PLAIN, "latent nothing"),
                                                     (INPAINT, "latent noise"), (INPAINT, "original")])
def test_the_vae_encodes_the_image_filled_under_the_mask(generator, photo, square, checkpoint, content, monkeypatch):
    """A1111 fills the pixels for the two latent fills too (``inpainting_fill != 1``); the blurred mask decides."""
    asked = request(checkpoint=checkpoint, init_image=photo, mask=square, mask_blur=4, masked_content=content)
    with Watch(generator, checkpoint, monkeypatch) as watch:
        generator.generate(asked)
    blurred = generator._prepare_mask(square, asked)
    expected = photo if content == "original" else a1111_fill(photo, blurred)
    assert np.abs(as_pixels(watch.encoded[0]) - pixels(expected)).max() == 0
    if checkpoint == INPAINT:  # its masked image, encoded after it, is the same image where the mask is black
        kept = np.asarray(blurred) == 0
        assert np.array_equal(as_pixels(watch.encoded[1])[kept], pixels(expected)[kept])


@pytest.mark.parametrize("checkpoint", [PLAIN, INPAINT])
def test_the_latent_fills_start_from_the_seeds_noise_and_from_zeros_under_the_latent_mask(generator, photo, square,
                                                                                           checkpoint, monkeypatch):
    """The UNet's first input is the start scaled for Euler, (latents + sigma x noise) / sqrt(sigma² + 1): the filled
    image's latents everywhere with "fill"; under A1111's latent mask the seed's noise (the very noise the start
    adds, as in A1111) or zeros with the latent fills, the same latents as "fill" elsewhere."""
    first: dict[str, torch.Tensor] = {}
    for content in ("fill", "latent noise", "latent nothing"):
        with Watch(generator, checkpoint, monkeypatch) as watch:
            generator.generate(request(checkpoint=checkpoint, init_image=photo, mask=square, mask_blur=4,
                                       masked_content=content))
        first[content] = watch.inputs[0]
    blurred = generator._prepare_mask(square, request(mask_blur=4))
    image_latents, noise = start(generator, checkpoint, a1111_fill(photo, blurred))
    repainted = torch.from_numpy(a1111_latmask(blurred)).bool()
    assert 0 < int(repainted.sum()) < 64
    sigma = sigmas(generator, checkpoint)[0]
    scale = 1 / (sigma ** 2 + 1) ** 0.5
    under = {"fill": image_latents, "latent noise": noise, "latent nothing": torch.zeros_like(noise)}
    for content, latents in under.items():
        expected = torch.where(repainted, latents, image_latents)
        torch.testing.assert_close(first[content], (expected + sigma * noise) * scale, rtol=0, atol=1e-5)
    assert (first["latent noise"] - first["fill"])[:, repainted].abs().mean() > 0.3


@pytest.mark.parametrize("strength", [STRENGTH, 1.0])
def test_the_inpainting_checkpoint_keeps_the_unmasked_latents_at_every_step(generator, photo, square, strength,
                                                                            monkeypatch):
    """A1111's sampler keeps the unmasked latents the image plus sigma x the start's noise at every step (its Euler,
    blending its clean estimate), the clean image after the last; diffusers blends a 4-channel UNet's so and now an
    inpainting checkpoint's. Without the blend they drift, and the repainted area sees other surroundings."""
    runs = {}
    for blended in (True, False):
        if not blended:
            monkeypatch.setattr(inpainting.Repaint, "blend", lambda self, pipe, step, latents: latents)
        with Watch(generator, INPAINT, monkeypatch) as watch:
            made = generator.generate(request(checkpoint=INPAINT, init_image=photo, mask=square, mask_blur=0,
                                              strength=strength))
        runs[blended] = (watch, pixels(made.images[0]))
    image_latents, noise = start(generator, INPAINT, photo)
    kept = ~torch.from_numpy(a1111_latmask(square)).bool()
    (watch, made), (drifting, unblended) = runs[True], runs[False]
    torch.testing.assert_close(watch.decoded[0][:, kept], image_latents[:, kept], rtol=0, atol=1e-5)
    assert (drifting.decoded[0] - image_latents)[:, kept].abs().mean() > 0.5
    if strength < 1:  # at 1 the start is noise alone; from the second step on the same holds
        for i, sigma in enumerate(sigmas(generator, INPAINT)):
            expected = (image_latents + sigma * noise) / (sigma ** 2 + 1) ** 0.5
            torch.testing.assert_close(watch.inputs[i][:, kept], expected[:, kept], rtol=0, atol=1e-5)
            if i:
                assert not torch.allclose(drifting.inputs[i][:, kept], expected[:, kept], atol=1e-3)
    repainted = np.asarray(square) > 0
    assert np.abs(made - unblended)[repainted].mean() > 5  # what the repainted area became
    assert np.array_equal(made[~repainted], pixels(photo)[~repainted])  # pasted back either way


def test_masked_content_changes_nothing_without_a_mask(generator, photo):
    """A1111 fills only under a mask: image-to-image reads none."""
    plain = pixels(generator.generate(request(checkpoint=PLAIN, init_image=photo)).images[0])
    assert np.array_equal(pixels(generator.generate(request(checkpoint=PLAIN, init_image=photo,
                                                            masked_content="latent nothing")).images[0]), plain)
