"""Automatic1111's variation seeds, seed resize and seamless tiling, on diffusers' SDXL pipelines.

Variation seeds follow A1111 1.10's ``modules/rng.py`` (``ImageRNG.first`` and ``slerp``): image i's initial noise
is ``slerp(subseed_strength, noise(seed_i), noise(subseed_i))``; with a seed-resize size, that noise is made at
the size given and pasted, centred, into the image's own noise. Here ``noise(seed)`` is what diffusers draws from
the image's CPU ``torch.Generator(seed)``, so an image without a variation gets exactly today's noise, and its
generator is left where the pipeline would have left it (ancestral samplers draw on from it, as A1111's do).

Tiling follows A1111's ``apply_circular``: every ``torch.nn.Conv2d`` of the UNet and the VAE pads circularly for
the run, so the image wraps around at its edges.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

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


def _draw(seed: int, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """A fresh generator's first noise of ``shape`` (C, H, W), as diffusers draws a latent image's, in float32."""
    generator = torch.Generator("cpu").manual_seed(seed)
    return torch.randn((1, *shape), generator=generator, dtype=dtype)[0].float()


def vary(noise: torch.Tensor, seed: int, variation: Variation | None) -> torch.Tensor:
    """One image's initial noise (1, C, H, W): ``noise``, drawn from its seed's generator, with ``variation``
    applied as A1111's ``ImageRNG.first`` applies it (the mixing done in float32, the result in ``noise``'s dtype)."""
    shape = tuple(noise.shape[1:])
    if variation is None or not variation.changes(shape):
        return noise
    own = noise[0].float()
    noise_shape = variation.noise_shape(shape)
    mixed = own if noise_shape == shape else _draw(seed, noise_shape, noise.dtype)
    if variation.strength != 0:
        mixed = slerp(variation.strength, mixed, _draw(variation.subseed, noise_shape, noise.dtype))
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


def vary_batch(noise: torch.Tensor, seeds: list[int], variations: list[Variation | None]) -> torch.Tensor:
    """A batch's noise (B, C, H, W) with each image's variation applied (on the CPU, where it was drawn)."""
    if not any(v is not None and v.changes(tuple(noise.shape[1:])) for v in variations):
        return noise
    device = noise.device
    cpu = noise.cpu()
    return torch.cat([vary(cpu[i:i + 1], seed, variation)
                      for i, (seed, variation) in enumerate(zip(seeds, variations, strict=True))]).to(device)


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
