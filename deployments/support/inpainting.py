"""Inpainting as A1111 1.10 runs it: inpainting checkpoints (a 9-channel UNet) in every mode, masked content on any.

Such a UNet reads, besides the 4 latent channels, a mask and the VAE latents of a masked image. diffusers' inpainting
pipelines (``StableDiffusionXLInpaintPipeline`` and its ControlNet variant) make both from ``image`` and
``mask_image``: the masked image is ``image * (mask < 0.5)`` in [-1, 1], encoded with each image's generator after
its noise was drawn, and the two are concatenated to the latents at every step. A1111's ``modules/processing.py``
conditions such a model so:

- text-to-image (``txt2img_image_conditioning``): a masked image all 0.5 grey (0 in [-1, 1]) and a mask of ones. That
  is the inpainting pipeline with a white mask at strength 1, which starts from noise alone and never encodes the
  image it is given: any image reads as 0 wholly masked (``text_to_image``);
- image-to-image (``img2img_image_conditioning`` -> ``inpainting_image_conditioning`` without a mask): a mask of ones
  and the init image times (1 - mask), lerped by its ``inpainting_mask_weight`` option (1 by default: grey again),
  sampled from the init latents noised at the strength. That is the inpainting pipeline with a white mask at that
  strength (``image_to_image``);
- inpainting: the mask rounded, the masked image the init image where it is 0. That is diffusers' own;
- a latent hires fix's second pass (``sample_hr_pass``): text-to-image's conditioning at the hires size, on the
  resized latents (``latent_hires``); a pixel hires fix's second pass is an image-to-image one.

At strength 1 diffusers' inpainting pipeline starts from noise alone, where its image-to-image pipeline (and A1111's
image-to-image) still noises the image at the schedule's first timestep: ``from_the_image`` keeps the latter for
image-to-image and the hires fix, so that an edit at strength 1 keeps what it keeps on a 4-channel checkpoint.

Inpainting on any checkpoint also takes A1111's masked content (``inpainting_fill``; ``StableDiffusionProcessingImg2Img
.init``): "original" starts from the image as it is; "fill" first paints the area under the (blurred) mask with the
image's own colours blurred in from around it (``filled``); "latent noise" and "latent nothing" fill the same way,
and then, in the encoded image the start noises, replace the latents under A1111's latent-size mask (``latent_mask``)
by noise or by zeros. A1111 draws that noise from a fresh generator of each image's seed, which is the very noise its
sampler then adds (another fresh generator of the same seed), before any variation seed or noise multiplier; here it
is the noise diffusers draws from the image's generator for its start, as drawn, so the two stay one tensor as in
A1111, and no generator draws anything more. At strength 1 the inpainting pipeline starts from noise alone, so there
the two latent fills change nothing (A1111's start still holds the filled latents, beside noise times the largest
sigma, about 14.6). A 4-channel UNet's own blend (diffusers') reads diffusers' latent mask (the binarised mask,
nearest); where it keeps a cell A1111's mask repaints, it pastes the image back over the fill from the first step.

An inpainting checkpoint's kept area is blended back after every step (``Repaint.blend``), as diffusers blends a
4-channel UNet's and A1111's sampler blends every model's: the kept latents are the encoded image noised to the next
timestep with the start's noise (the clean image after the last step). A1111 blends the model's estimate of the clean
latents with the clean image at each evaluation instead (``CFGDenoiser``); for Euler the two agree step for step (the
kept area stays the image plus sigma times the start's noise), and diffusers' way works the same on every scheduler
from the pipeline's own step callback, where A1111's would need each scheduler's estimate of the clean latents.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageFilter, ImageOps

from deployments.support.generation import MaskedContent
from deployments.weights.loader import INPAINTING_CHANNELS

# A1111's fill: the unmasked image blurred at falling radii, each blur laid over the last (some more than once), so
# the masked area takes the colours of ever nearer surroundings; the last layer is the image itself.
FILL_LAYERS = ((256, 1), (64, 1), (16, 2), (4, 4), (2, 2), (0, 1))
LATENT_SCALE = 8  # pixels per latent, each way


def holds_inpainting(pipe: Any) -> bool:
    """Whether ``pipe`` (any pipeline of a checkpoint: they share its UNet) is an inpainting checkpoint's."""
    return pipe.unet.config.in_channels == INPAINTING_CHANNELS


def white(width: int, height: int) -> Image.Image:
    """A mask of ones: the whole image is generated (A1111's conditioning mask without an image mask)."""
    return Image.new("L", (width, height), 255)


def text_to_image(count: int, width: int, height: int) -> dict:
    """The inpainting pipeline's arguments for a text-to-image batch of ``count`` images: a grey image each (one per
    image, so that each masked image is encoded with its own image's generator, as alone), wholly masked, from noise
    alone."""
    grey = Image.new("RGB", (width, height), (128, 128, 128))
    return dict(image=[grey] * count, mask_image=white(width, height), strength=1.0, width=width, height=height)


def image_to_image(width: int, height: int) -> dict:
    """The inpainting pipeline's arguments, beside the image and the strength, for image-to-image: wholly masked."""
    return dict(mask_image=white(width, height), width=width, height=height)


def latent_hires(count: int, width: int, height: int) -> dict:
    """The inpainting pipeline's arguments, beside the resized latents (``image``), for a latent hires pass of
    ``count`` images at ``width`` x ``height``. Latents cannot be masked (diffusers masks pixels), so the masked
    image is given: 0 (grey) in pixels, which the pipeline encodes as it encodes one it made (``masked_image_latents``
    takes pixels too: only 4 channels are read as latents), with each image's generator after its noise."""
    return dict(mask_image=white(width, height), masked_image_latents=torch.zeros(count, 3, height, width),
                width=width, height=height)


@contextmanager
def from_the_image(pipe: Any, enabled: bool = True) -> Iterator[None]:
    """For the calls inside, ``pipe`` (an inpainting pipeline) at strength 1 starts from its image noised at the first
    timestep, as the image-to-image pipeline does, not from noise alone (below 1 nothing changes: it noises the image
    anyway). Undone on the way out."""
    if not enabled:
        yield
        return
    prepare = pipe.prepare_latents

    def prepared(*args, **kwargs):
        # diffusers passes it by name; false, the image is encoded and noised (an image-to-image start).
        return prepare(*args, **{**kwargs, "is_strength_max": False})

    pipe.prepare_latents = prepared
    try:
        yield
    finally:
        pipe.__dict__.pop("prepare_latents", None)


def filled(image: Image.Image, mask: Image.Image) -> Image.Image:
    """``image`` with the area under ``mask`` (white repaints; blurred edges blend) painted with the image's own
    colours, blurred in from around it: A1111's ``masking.fill``, its "fill" masked content."""
    visible = image.convert("RGBA")
    visible.putalpha(ImageOps.invert(mask.convert("L")))
    # Blurred premultiplied, so the colours under the mask weigh nothing; each blur laid over the last unpremultiplied.
    premultiplied = visible.convert("RGBa")
    out = Image.new("RGBA", image.size)
    for radius, times in FILL_LAYERS:
        layer = premultiplied.filter(ImageFilter.GaussianBlur(radius)).convert("RGBA")
        for _ in range(times):
            out.alpha_composite(layer)
    return out.convert("RGB")


def latent_mask(mask: Image.Image, width: int, height: int) -> torch.Tensor:
    """The (1, 1, height / 8, width / 8) mask of the latents A1111 repaints (1) and keeps (0): ``mask`` (at the
    image's size, blurred) shrunk bicubic to the latents' size, rounded."""
    small = mask.convert("L").resize((width // LATENT_SCALE, height // LATENT_SCALE), Image.Resampling.BICUBIC)
    return torch.from_numpy(np.round(np.asarray(small, dtype=np.float32) / 255.0))[None, None]


class Repaint:
    """What an inpainting call does under its mask beside diffusers' own: A1111's masked content in the latents it
    starts from (``fill``), and on an inpainting checkpoint the kept area blended back after each step (``blend``).
    ``repainting`` puts it on a pipeline for a call; the call's start fills in what the blend reads."""

    def __init__(self, content: MaskedContent, mask: Image.Image, width: int, height: int, keep: bool) -> None:
        self.content, self.keep = content, keep
        self.repainted = latent_mask(mask, width, height)
        self.image_latents: torch.Tensor | None = None  # the encoded images, as the start noised them
        self.noise: torch.Tensor | None = None  # the start's noise, as drawn
        self.timesteps: torch.Tensor | None = None  # the call's, from its first

    @classmethod
    def of(cls, content: MaskedContent, mask: Image.Image, width: int, height: int, nine: bool) -> Repaint | None:
        """None where diffusers' own call is A1111's already: the image's own latents on a 4-channel UNet, which the
        pipeline blends back itself."""
        if content in ("original", "fill") and not nine:
            return None
        return cls(content, mask, width, height, keep=nine)

    def fill(self, image_latents: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """The latents the start noises: ``image_latents`` with the repainted area's replaced as the content says."""
        if self.content not in ("latent noise", "latent nothing"):
            return image_latents
        repainted = self.repainted.to(image_latents.device, image_latents.dtype)
        kept = image_latents * (1 - repainted)
        return kept + noise * repainted if self.content == "latent noise" else kept

    def blend(self, pipe: Any, step: int, latents: torch.Tensor) -> torch.Tensor:
        """``latents`` after loop step ``step`` with the kept area the encoded image noised to the next timestep, as
        diffusers blends a 4-channel UNet's (the clean image after the last step); unchanged without the blend."""
        if not self.keep or self.image_latents is None or self.noise is None or self.timesteps is None:
            return latents
        kept = self.image_latents
        if step < pipe.num_timesteps - 1:  # the scheduler's add_noise, which an edit's noise may stand behind
            kept = pipe.scheduler.add_noise(kept, self.noise, self.timesteps[step + 1:step + 2])
        repainted = self.repainted.to(latents.device, latents.dtype)
        return (1 - repainted) * kept.to(latents.dtype) + repainted * latents


@contextmanager
def repainting(pipe: Any, repaint: Repaint | None) -> Iterator[None]:
    """For the calls inside, ``pipe`` (an inpainting pipeline) starts from ``repaint``'s latents and keeps what its
    blend needs: the encoded images (asked of the start on any UNet: a 9-channel one at strength 1 then encodes its
    image too, its posterior drawn first as at any other strength), the start's noise and the call's timesteps.
    Undone on the way out."""
    if repaint is None:
        yield
        return
    prepare, timesteps_of = pipe.prepare_latents, pipe.get_timesteps
    before = {name: pipe.__dict__[name] for name in ("prepare_latents", "get_timesteps") if name in pipe.__dict__}

    def prepared(*args, **kwargs):
        scheduler = pipe.scheduler
        add_noise, own = scheduler.add_noise, scheduler.__dict__.get("add_noise")

        def filled_add_noise(original, noise, timesteps):
            return add_noise(repaint.fill(original, noise), noise, timesteps)

        scheduler.add_noise = filled_add_noise  # the start's one call, where it noises the image (below strength 1)
        try:
            out = prepare(*args, **{**kwargs, "return_image_latents": True})
        finally:
            if own is None:
                scheduler.__dict__.pop("add_noise", None)
            else:
                scheduler.add_noise = own
        if kwargs.get("return_noise"):
            repaint.noise = out[1]
        repaint.image_latents = out[-1]
        return out if kwargs.get("return_image_latents") else out[:-1]

    def timed(*args, **kwargs):
        timesteps, count = timesteps_of(*args, **kwargs)
        repaint.timesteps = timesteps
        return timesteps, count

    pipe.prepare_latents, pipe.get_timesteps = prepared, timed
    try:
        yield
    finally:
        for name in ("prepare_latents", "get_timesteps"):
            if name in before:
                setattr(pipe, name, before[name])
            else:
                pipe.__dict__.pop(name, None)
