"""A tiny safety checker that flags one known generation, so that tests see both of the filter's outcomes.

The layout is CompVis/stable-diffusion-safety-checker's: ``config.json`` (a ``CLIPConfig``), ``model.safetensors``
(``vision_model.vision_model.*``, ``visual_projection.weight``, 17 ``concept_embeds`` and 3
``special_care_embeds`` with their thresholds) and ``preprocessor_config.json``. Only the sizes are toy.

A randomly initialised CLIP tower maps every noise-like tiny generation to nearly the same direction (cosines
above 0.99), so its weights are calibrated on tiny generations first: the final layer norm's bias removes their
mean and the visual projection whitens their principal directions. Distinct generations then land far apart
(cosine below 0.8) while the same generation, from any API, lands on itself. Concept 0 is the embedding of
``FLAGGED`` (the tiny SDXL base's image for that request) with threshold ``THRESHOLD``; the other concepts are
random directions with threshold 1, which no image exceeds.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from safetensors.torch import save_file

logger = logging.getLogger(__name__)

SEED = 60
FLAGGED = {"prompt": "forbidden fruit", "seed": 13, "width": 64, "height": 64, "steps": 2}  # guidance 7, Euler a
THRESHOLD = 0.9
VISION = dict(hidden_size=32, intermediate_size=37, num_attention_heads=4, num_hidden_layers=2, image_size=32,
              patch_size=4)
PROJECTION = 16
REFERENCES = [(64, 2, 16), (64, 4, 8), (128, 3, 8)]  # (side, steps, images) of the calibration generations


def _config():
    from transformers import CLIPConfig

    text = dict(hidden_size=32, intermediate_size=37, num_attention_heads=4, num_hidden_layers=2)
    return CLIPConfig(text_config=text, vision_config=VISION, projection_dim=PROJECTION)


def _generations(models: Path) -> tuple[list, object]:
    """Calibration images and the flagged one, from the tiny base exactly as configs/cpu.yaml loads it."""
    from deployments.sdxl_base import BaseGenerator
    from deployments.support.config import SDXLBaseConfig
    from deployments.support.generation import GenerationRequest

    base = BaseGenerator(SDXLBaseConfig(model={"source": str(models / "sdxl-base")},
                                        ip_adapter=str(models / "ip-adapter"), lora_dir=str(models / "loras")))
    references = []
    for i, (side, steps, count) in enumerate(REFERENCES):  # one batched call per setting
        request = GenerationRequest(prompt=f"reference {i}", seed=1000 + 100 * i, width=side, height=side,
                                    steps=steps, batch_size=count)
        references += base.generate(request).images
    return references, base.generate(GenerationRequest(**FLAGGED)).images[0]


def build_safety_checker(out: Path, models: Path) -> None:
    """Write the calibrated checker to ``out`` (``models``: the tiny models written so far)."""
    from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker
    from transformers import CLIPImageProcessor

    references, flagged = _generations(models)
    torch.manual_seed(SEED)
    checker = StableDiffusionSafetyChecker(_config()).eval()
    side = VISION["image_size"]
    processor = CLIPImageProcessor(size={"shortest_edge": side}, crop_size={"height": side, "width": side})

    def pooled(images) -> torch.Tensor:
        with torch.no_grad():
            return checker.vision_model(processor(images=images, return_tensors="pt").pixel_values).pooler_output

    found = pooled(references).double()
    mean = found.mean(0)
    _, spread, axes = torch.linalg.svd(found - mean, full_matrices=False)
    spread = (spread[:PROJECTION] + 1e-3 * spread[0]) / (len(references) - 1) ** 0.5  # no direction blown up
    with torch.no_grad():
        checker.vision_model.post_layernorm.bias -= mean.float()
        checker.visual_projection.weight.copy_((axes[:PROJECTION] / spread[:, None]).float())

    def embed(images) -> torch.Tensor:
        with torch.no_grad():
            return torch.nn.functional.normalize(checker.visual_projection(pooled(images)), dim=-1)

    target = embed([flagged])[0]
    generator = torch.Generator().manual_seed(SEED)
    concepts = torch.nn.functional.normalize(torch.randn(17, PROJECTION, generator=generator), dim=-1)
    concepts[0] = target
    with torch.no_grad():
        checker.concept_embeds.copy_(concepts)
        checker.concept_embeds_weights.copy_(torch.tensor([THRESHOLD] + [1.0] * 16))
        checker.special_care_embeds.copy_(torch.nn.functional.normalize(
            torch.randn(3, PROJECTION, generator=generator), dim=-1))
        checker.special_care_embeds_weights.fill_(1.0)
    nearest = float((embed(references) @ target).max())
    if nearest > THRESHOLD - 0.1:
        raise RuntimeError(f"tiny safety checker: a reference generation is {nearest:.3f} from the flagged one")
    logger.info("tiny safety checker: flagged image at cosine 1, nearest other generation at %.3f", nearest)

    out.mkdir(parents=True, exist_ok=True)
    # The released file's key layout: CLIPVisionModel nested in the checker as ``vision_model.vision_model``.
    state = {(f"vision_model.{k}" if k.startswith("vision_model.") else k): v.contiguous()
             for k, v in checker.state_dict().items()}
    save_file(state, out / "model.safetensors")
    checker.config.save_pretrained(out)
    processor.save_pretrained(out)
