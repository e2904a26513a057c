"""Inpainting checkpoints (a 9-channel UNet) in every mode, as A1111 1.10 runs them.

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
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from PIL import Image

from deployments.weights.loader import INPAINTING_CHANNELS


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
