"""Automatic1111's variation seeds, seed resize and seamless tiling, on diffusers' SDXL pipelines.

Variation seeds follow A1111 1.10's ``modules/rng.py`` (``ImageRNG.first`` and ``slerp``): image i's initial noise
is ``slerp(subseed_strength, noise(seed_i), noise(subseed_i))``; with a seed-resize size, that noise is made at
the size given and pasted, centred, into the image's own noise. Here ``noise(seed)`` is what diffusers draws from
the image's CPU ``torch.Generator(seed)``, so an image without a variation gets exactly today's noise, and its
generator is left where the pipeline would have left it (ancestral samplers draw on from it, as A1111's do).

Image-to-image and inpainting take them too, as A1111's img2img does, with its initial noise multiplier after them
(``modules/processing.py``: ``x = self.rng.next()``, then ``x *= self.initial_noise_multiplier``): diffusers adds
the noise it drew to the encoded image through its scheduler's ``add_noise``, which ``noised`` replaces for a call.
There ``noise(seed)`` is the generator's second draw: diffusers samples the VAE's posterior from the same generator
first (``retrieve_latents(..., generator)``), so a variation seed's noise is drawn after a sample of that size too,
and the posterior sample moves with the noise (``EditNoise``): strength 1 is the variation seed's own image.

Tiling follows A1111's ``apply_circular``: every ``torch.nn.Conv2d`` of the UNet and the VAE pads circularly for
the run, so the image wraps around at its edges.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from diffusers.utils.torch_utils import randn_tensor


@dataclass(frozen=True)
class Variation:
    """One image's departure from its seed's noise: A1111's subseed, subseed_strength and seed_resize_from_w/h."""

    subseed: int
    strength: float = 0.0
    resize_from: tuple[int, int] | None = None  # (width, height) in pixels; None: the image's own size

    def noise_shape(self, shape: tuple[int, ...]) -> tuple[int, ...]:
        """The (channels, height, width) the seed's noise is made at, for latents of ``shape`` (C, H, W)."""
        if self.resize_from is None:
            return shape
        width, height = self.resize_from
        return (shape[0], height // 8, width // 8)

    def changes(self, shape: tuple[int, ...]) -> bool:
        """Whether it changes the noise of latents of ``shape``: A1111 mixes nothing at strength 0 and resizes
        only to a size other than the image's."""
        return self.strength != 0 or self.noise_shape(shape) != shape


def slerp(val: float, low: torch.Tensor, high: torch.Tensor) -> torch.Tensor:
    """A1111's spherical interpolation of two (C, H, W) noises, as it computes it: along dimension 1 (each column of
    each channel is one vector), falling back to a linear blend when the two are nearly parallel. At ``val`` 1 it is
    ``high`` exactly (the coefficient of ``low`` is sin 0)."""
    low_norm = low / torch.norm(low, dim=1, keepdim=True)
    high_norm = high / torch.norm(high, dim=1, keepdim=True)
    dot = (low_norm * high_norm).sum(1)
    if dot.mean() > 0.9995:
        return low * val + high * (1 - val)  # A1111's fallback, weights as it writes them
    omega = torch.acos(dot)
    so = torch.sin(omega)
    return (torch.sin((1.0 - val) * omega) / so).unsqueeze(1) * low + (torch.sin(val * omega) / so).unsqueeze(1) * high


Posterior = tuple[tuple[int, ...], torch.dtype]  # the (shape, dtype) of a VAE posterior sample diffusers drew


def _draw(seed: int, shape: tuple[int, ...], dtype: torch.dtype, posterior: Posterior | None = None) -> torch.Tensor:
    """A fresh generator's first noise of ``shape`` (C, H, W), as diffusers draws a latent image's, in float32;
    after a discarded draw of ``posterior``, where diffusers samples an encoded image's posterior from the generator
    before it draws the noise."""
    generator = torch.Generator("cpu").manual_seed(seed)
    if posterior is not None:
        torch.randn(posterior[0], generator=generator, dtype=posterior[1])
    return torch.randn((1, *shape), generator=generator, dtype=dtype)[0].float()


def vary(noise: torch.Tensor, seed: int, variation: Variation | None,
         posterior: Posterior | None = None) -> torch.Tensor:
    """One image's initial noise (1, C, H, W): ``noise``, drawn from its seed's generator, with ``variation``
    applied as A1111's ``ImageRNG.first`` applies it (the mixing done in float32, the result in ``noise``'s dtype).
    ``posterior``: the VAE posterior sample diffusers' image-to-image drew from each generator before this noise;
    None where it drew none (text-to-image, latents given)."""
    shape = tuple(noise.shape[1:])
    if variation is None or not variation.changes(shape):
        return noise
    own = noise[0].float()
    noise_shape = variation.noise_shape(shape)
    mixed = own if noise_shape == shape else _draw(seed, noise_shape, noise.dtype, posterior)
    if variation.strength != 0:
        mixed = slerp(variation.strength, mixed, _draw(variation.subseed, noise_shape, noise.dtype, posterior))
    if noise_shape != shape:
        # Centred, cropped where the seed's size is the larger, as A1111 pastes it.
        dx, dy = (shape[2] - noise_shape[2]) // 2, (shape[1] - noise_shape[1]) // 2
        w = noise_shape[2] if dx >= 0 else noise_shape[2] + 2 * dx
        h = noise_shape[1] if dy >= 0 else noise_shape[1] + 2 * dy
        tx, ty, dx, dy = max(dx, 0), max(dy, 0), max(-dx, 0), max(-dy, 0)
        pasted = own.clone()
        pasted[:, ty:ty + h, tx:tx + w] = mixed[:, dy:dy + h, dx:dx + w]
        mixed = pasted
    return mixed.to(noise.dtype)[None]


def vary_batch(noise: torch.Tensor, seeds: list[int], variations: list[Variation | None],
               posteriors: dict[int, Posterior] | None = None) -> torch.Tensor:
    """A batch's noise (B, C, H, W) with each image's variation applied (on the CPU, where it was drawn);
    ``posteriors``: image -> the posterior sample drawn before its noise."""
    if not any(v is not None and v.changes(tuple(noise.shape[1:])) for v in variations):
        return noise
    device, before = noise.device, posteriors or {}
    cpu = noise.cpu()
    return torch.cat([vary(cpu[i:i + 1], seed, variation, before.get(i))
                      for i, (seed, variation) in enumerate(zip(seeds, variations, strict=True))]).to(device)


@dataclass
class EditNoise:
    """The randomness of one image-to-image batch as A1111's img2img makes it, from what diffusers draws from each
    image's generator: the VAE's posterior sample of its encoded image first (pixel inputs), then the noise added to
    the image. Both move towards the variation seed's by its strength (so strength 1 is the variation seed's own
    image exactly: diffusers would have drawn both from its generator); the noise is then scaled by the image's
    initial noise multiplier. Seed resize applies to the noise alone (a composition; the posterior is the image's).
    The pipeline's generators are never touched: later draws (an ancestral sampler's) stay the seed's own."""

    seeds: list[int]
    variations: list[Variation | None]
    multipliers: list[float] | None = None  # None: 1 for each image
    generators: list[torch.Generator] | None = None  # the pipeline's, for pixel inputs the VAE samples from
    posteriors: dict[int, Posterior] = field(default_factory=dict)  # what the VAE drew for each image

    @classmethod
    def of(cls, seeds: list[int], variations: list[Variation | None], multipliers: list[float] | None = None,
           generators: list[torch.Generator] | None = None) -> EditNoise | None:
        """None where nothing changes (no variation, every multiplier 1): the batch runs diffusers' own draws."""
        scaled = multipliers is not None and any(m != 1.0 for m in multipliers)
        if not scaled and all(v is None for v in variations):
            return None
        return cls(seeds, variations, multipliers if scaled else None, generators)

    def noise(self, drawn: torch.Tensor) -> torch.Tensor:
        """The noise (B, C, H, W) added to the images in place of ``drawn``."""
        out = vary_batch(drawn, self.seeds, self.variations, self.posteriors)
        if self.multipliers is not None:
            # An image at 1 keeps its noise exactly (x * 1.0 is x); A1111 scales in the noise's own dtype.
            out = out * torch.tensor(self.multipliers, dtype=out.dtype, device=out.device).view(-1, 1, 1, 1)
        return out

    def sample(self, dist: Any, generator: Any, draw: Callable[[Any], torch.Tensor]) -> torch.Tensor:
        """The posterior sample of one encoded image: ``draw(generator)`` (diffusers' own, which advances the
        generator as always), moved towards the variation seed's first draw where the image has a variation."""
        drawn = draw(generator)
        index = next((i for i, g in enumerate(self.generators or []) if g is generator), None)
        if index is None or index in self.posteriors:
            # Not an image of this batch, or its second encode (inpainting's masked image, after the noise): the
            # variation seed's draws stand in for the first two alone.
            return drawn
        self.posteriors[index] = (tuple(drawn.shape), drawn.dtype)
        variation = self.variations[index]
        if variation is None or variation.strength == 0:
            return drawn
        own = _draw(self.seeds[index], tuple(drawn.shape[1:]), drawn.dtype)
        other = _draw(variation.subseed, tuple(drawn.shape[1:]), drawn.dtype)
        mixed = slerp(variation.strength, own, other).to(drawn.dtype)[None].to(drawn.device)
        return dist.mean + dist.std * mixed  # as diffusers' DiagonalGaussianDistribution.sample computes it


@contextmanager
def noised(pipe: Any, edit: EditNoise | None, *, pure: bool = False) -> Iterator[None]:
    """For the calls inside, ``pipe`` (an image-to-image or inpainting pipeline) runs on ``edit``'s randomness:
    its VAE's posterior samples (pixel inputs with a variation) and its scheduler's ``add_noise`` (this call's
    scheduler; inpainting also re-noises the kept area with it at every step, so both see the same noise). ``pure``:
    inpainting at strength 1, which starts from its noise alone (times the scheduler's initial sigma), without
    ``add_noise``: its ``prepare_latents`` answers that start from ``edit``'s noise. All undone on the way out."""
    if edit is None:
        yield
        return
    scheduler, vae = pipe.scheduler, pipe.vae
    add_noise = scheduler.add_noise

    def edited_add_noise(original, noise, timesteps):
        return add_noise(original, edit.noise(noise), timesteps)

    scheduler.add_noise = edited_add_noise
    if edit.generators is not None and any(v is not None for v in edit.variations):
        encode = vae.encode

        def encoded(*args, **kwargs):
            out = encode(*args, **kwargs)
            dist = getattr(out, "latent_dist", None)
            if dist is not None:  # a VAE that samples a posterior (a tiny autoencoder draws nothing)
                draw = dist.sample
                dist.sample = lambda generator=None: edit.sample(dist, generator, draw)
            return out

        vae.encode = encoded
    if pure:
        prepare = pipe.prepare_latents

        def prepared(*args, **kwargs):
            latents, noise, *rest = prepare(*args, **kwargs)  # the inpainting pipeline asks for its noise back
            return (edit.noise(noise) * pipe.scheduler.init_noise_sigma, noise, *rest)

        pipe.prepare_latents = prepared
    try:
        yield
    finally:
        scheduler.__dict__.pop("add_noise", None)
        vae.__dict__.pop("encode", None)
        pipe.__dict__.pop("prepare_latents", None)


def initial_latents(shape: tuple[int, int, int, int], generators: list[torch.Generator], seeds: list[int],
                    variations: list[Variation | None], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """The text-to-image pipeline's initial latents (before its scheduler's ``init_noise_sigma``), drawn from
    ``generators`` exactly as diffusers' ``prepare_latents`` draws them (which advances each one as it would),
    each image's variation applied."""
    drawn = randn_tensor(shape, generator=generators, device=torch.device("cpu"), dtype=dtype)
    return vary_batch(drawn, seeds, variations).to(device)


def conv_layers(*modules: torch.nn.Module | None) -> list[torch.nn.Conv2d]:
    """Every plain ``Conv2d`` of ``modules`` (A1111 matches the exact type; a LoRA-wrapped conv's base layer is one)."""
    return [layer for module in modules if module is not None for layer in module.modules()
            if type(layer) is torch.nn.Conv2d]


@contextmanager
def circular(*modules: torch.nn.Module | None, enabled: bool = True) -> Iterator[None]:
    """Seamless tiling for the calls inside: the convolutions of ``modules`` pad circularly, as A1111's tiling
    sets them, and get their own padding back afterwards, however the calls end."""
    if not enabled:
        yield
        return
    layers = conv_layers(*modules)
    before = [layer.padding_mode for layer in layers]
    try:
        for layer in layers:
            layer.padding_mode = "circular"
        yield
    finally:
        for layer, mode in zip(layers, before, strict=True):
            layer.padding_mode = mode
