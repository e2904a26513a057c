"""The tile ControlNet's colour fix: A1111's extension's ``tile_colorfix`` and ``tile_colorfix+sharp`` units.

Their preprocessor passes the image through as it is (the tile ControlNet reads it like ``none``); what they add
happens in every UNet call of the sampling (the extension's ``UnetHook``, after the UNet's output): the clean latents
the output predicts have their low frequencies, a ``k`` x ``k`` box blur's (``threshold_a``, "Variation": 8 by
default, doubled in a hires fix's second pass), replaced by those of the control image's own latents (the image
framed at the generation size and encoded by the checkpoint's VAE), and the noise that would predict them takes the
output's place, mixed in by the unit's weight (clipped to 0..1). ``+sharp`` also blurs the clean latents of the
unconditional rows by ``threshold_b`` / 100 ("Sharpness", 1 by default), which classifier-free guidance turns into
sharper detail. The colours and tones of the result follow the control image, and the sampler keeps the detail.

The UNet's input at timestep ``t`` is ``sqrt(a) x0 + sqrt(1 - a) eps`` for every sampler here (the k-diffusion ones
scale their input to it, as A1111's denoiser scales its own), ``a`` being the schedule's cumulative alpha at ``t``
rounded, as the extension indexes it. The extension reads the output as noise whatever the checkpoint predicts, and
so does this. The extension applies the fix in every UNet call whatever the unit's guidance range (its residuals
follow the range), and so does this. Its control latents are a sample of the VAE's posterior; here its mean, so that
a request reproduces (the posterior's spread is a small fraction of a latent's, and the blur averages it away).

Applied to the rows of the pipeline's UNet call (``[uncond; cond]`` under guidance), after AND's subprompts were
combined into them (``composable``): the fix is affine in the output, so combining first or fixing first is one
result, except for ``+sharp``'s unconditional rows.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from PIL import Image

from deployments.support.control import ControlUnit, slider_value


def blur(x: torch.Tensor, k: int) -> torch.Tensor:
    """The extension's blur: a (2k + 1)² box average over the edge-replicated latents."""
    padded = torch.nn.functional.pad(x, (k, k, k, k), mode="replicate")
    return torch.nn.functional.avg_pool2d(padded, (2 * k + 1, 2 * k + 1), stride=(1, 1))


@dataclass(frozen=True)
class ColorFix:
    """One colour-fix unit of a call: its control image's latents (1, 4, h, w, float32), its blur's reach, its
    sharpness (None: plain ``tile_colorfix``) and its weight."""

    latents: torch.Tensor
    k: int
    sharpness: float | None
    weight: float

    def apply(self, eps: torch.Tensor, sample: torch.Tensor, alpha: torch.Tensor, uncond: torch.Tensor) -> torch.Tensor:
        """The UNet's output ``eps`` of the rows ``sample`` (their first 4 channels) at cumulative alpha ``alpha``
        (a scalar, or one per row), fixed; ``uncond`` marks the unconditional rows (+sharp's)."""
        out = eps.float()
        xt = sample[:, :4].float()
        a = alpha.to(out.device, torch.float32).reshape(-1, 1, 1, 1)
        x0 = (xt - (1 - a).sqrt() * out) / a.sqrt()
        fixed = x0 - blur(x0, self.k) + blur(self.latents.to(out.device), self.k)
        if self.sharpness is not None:
            detail = self.sharpness * 0.01
            soft = detail * blur(fixed, self.k) + (1 - detail) * fixed
            rows = uncond.to(out.device).reshape(-1, 1, 1, 1)
            fixed = torch.where(rows, soft, fixed)
        predicted = (xt - a.sqrt() * fixed) / (1 - a).sqrt()
        w = max(0.0, min(1.0, self.weight))
        return (predicted * w + out * (1 - w)).to(eps.dtype)


def fixes(pipe: Any, units: list[ControlUnit], maps: list[Image.Image]) -> list[ColorFix]:
    """The colour fixes of ``units`` (colour-fix units, each with its control image framed at the pass's size in
    ``maps``): each image encoded by ``pipe``'s VAE (its posterior's mean, scaled as the UNet reads latents)."""
    out = []
    for unit, image in zip(units, maps, strict=True):
        vae = pipe.vae
        pixels = torch.from_numpy(np.asarray(image.convert("RGB"), dtype=np.float32) / 127.5 - 1.0)
        pixels = pixels.permute(2, 0, 1)[None].to(vae.device, vae.dtype)
        with torch.no_grad():
            latents = vae.encode(pixels).latent_dist.mean.float() * vae.config.scaling_factor
        k = int(slider_value(unit.module, 1, unit.threshold_a)) * (2 if unit.hires_pass else 1)
        sharp = slider_value(unit.module, 2, unit.threshold_b) if unit.module.endswith("+sharp") else None
        out.append(ColorFix(latents.cpu(), k, sharp, unit.conditioning_scale))
    return out


@contextmanager
def fixing(pipe: Any, colour_fixes: list[ColorFix]) -> Iterator[None]:
    """For the calls inside, every output of ``pipe``'s UNet fixed by each of ``colour_fixes`` in turn (nothing
    without any). Undone on the way out."""
    if not colour_fixes:
        yield
        return
    unet = pipe.unet
    own = unet.__dict__.get("forward")
    forward = unet.forward

    def fixed(*args, **kwargs):
        out = forward(*args, **kwargs)
        sample = kwargs["sample"] if "sample" in kwargs else args[0]
        timestep = kwargs["timestep"] if "timestep" in kwargs else args[1]
        eps = out[0] if isinstance(out, tuple) else out.sample
        rows = sample.shape[0]
        uncond = torch.zeros(rows, dtype=torch.bool)
        if getattr(pipe, "do_classifier_free_guidance", False) and rows % 2 == 0:
            uncond[:rows // 2] = True
        alphas = pipe.scheduler.alphas_cumprod  # the running pass's schedule (a hires pass may have its own)
        t = torch.as_tensor(timestep).float().round().long().cpu().clamp(0, len(alphas) - 1)
        alpha = alphas[t]
        for fix in colour_fixes:
            eps = fix.apply(eps, sample, alpha, uncond)
        if isinstance(out, tuple):
            return (eps, *out[1:])
        out.sample = eps
        return out

    unet.forward = fixed
    try:
        yield
    finally:
        if own is None:
            unet.__dict__.pop("forward", None)
        else:
            unet.forward = own
