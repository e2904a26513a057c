"""Random-weight SDXL inpainting checkpoints: a base whose UNet reads 9 channels (the 4 latent channels, the mask and
the masked image's 4 latent channels), as diffusers/stable-diffusion-xl-1.0-inpainting-0.1 ships it and as community
inpainting fine-tunes are shared (one SGM file whose ``model.diffusion_model.input_blocks.0.0.weight`` is
``[320, 9, 3, 3]``):

    OUT/sdxl-inpaint/                  diffusers folder, ``StableDiffusionXLInpaintPipeline`` in its model_index.json
    OUT/sdxl-inpaint.safetensors       the same weights as one original-layout (SGM) checkpoint

``build_sdxl_inpainting`` writes the tiny one (the tiny base's wiring, ``tiny.build_all`` calls it), ``build_full``
the full-size one in the release's layout (fp16 variant files; ``full.build_all`` with ``sdxl-inpaint``). The
release was trained from the base with its five extra input channels zero-initialised; here every weight is random,
so that the mask and the masked image visibly move the tiny model's pixels.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from types import SimpleNamespace

import torch
from safetensors.torch import save_file

from deployments.factory.sgm import sdxl_to_sgm

logger = logging.getLogger(__name__)

CHANNELS = 9  # latents (4) + mask (1) + masked-image latents (4)
SEED = 2000  # the tiny inpainting checkpoint: the tiny base's architecture, weights of its own
NAME = "sdxl-inpaint"


def build_sdxl_inpainting(out: Path, tokenizer_src: Path, vocab_size: int, seed: int = SEED) -> None:
    """The tiny inpainting checkpoint into ``out`` (``OUT/sdxl-inpaint/`` and ``OUT/sdxl-inpaint.safetensors``):
    the tiny base's text encoders, tokenizers, VAE and scheduler (from ``seed``) with a 9-channel UNet."""
    from diffusers import StableDiffusionXLInpaintPipeline, UNet2DConditionModel

    from deployments.factory import tiny  # here: tiny.build_all imports this module

    folder = out / NAME
    base = tiny.build_sdxl_base(folder, tokenizer_src, vocab_size, seed=seed)
    torch.manual_seed(seed + 5)
    unet = UNet2DConditionModel.from_config(base.unet.config, in_channels=CHANNELS)
    pipe = StableDiffusionXLInpaintPipeline(
        vae=base.vae, text_encoder=base.text_encoder, text_encoder_2=base.text_encoder_2, tokenizer=base.tokenizer,
        tokenizer_2=base.tokenizer_2, unet=unet, scheduler=base.scheduler, feature_extractor=base.feature_extractor,
        requires_aesthetics_score=False, force_zeros_for_empty_prompt=True,
    )
    # Written again whole: the release's model_index.json names the inpainting pipeline, and the UNet is this one.
    pipe.save_pretrained(folder, safe_serialization=True)  # type: ignore[attr-defined]
    save_file(sdxl_to_sgm(pipe), out / f"{NAME}.safetensors")
    logger.info("tiny SDXL inpainting checkpoint written to %s", folder)


def build_full(out: Path, tokenizer_src: Path, eos: int, *, device: str, shape: SimpleNamespace) -> None:
    """The full-size one in diffusers/stable-diffusion-xl-1.0-inpainting-0.1's layout (``fp16`` variant files, the
    base's configuration with a 9-channel UNet), and as one fp16 SGM file; ``shape``: ``full.shapes(shrink)``."""
    from deployments.factory import full  # here: full.build_all imports this module

    folder = out / NAME
    nine = SimpleNamespace(**{**vars(shape), "base": {**shape.base, "in_channels": CHANNELS}})
    parts = full.build_sdxl(folder, tokenizer_src, eos, refiner=False, device=device, shape=nine)
    index = json.loads((folder / "model_index.json").read_text())
    index.update(_class_name="StableDiffusionXLInpaintPipeline", requires_aesthetics_score=False)
    (folder / "model_index.json").write_text(json.dumps(index, indent=2))
    save_file(sdxl_to_sgm(parts), out / f"{NAME}.safetensors")
    logger.info("full-size SDXL inpainting checkpoint written to %s", folder)
