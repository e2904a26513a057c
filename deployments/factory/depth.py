"""Random-weight depth estimators for the ControlNet depth preprocessors, in the layout transformers saves and the
releases ship (Intel/dpt-hybrid-midas, depth-anything/Depth-Anything-V2-*-hf):

    config.json                 DPTConfig (hybrid: a BiT backbone under a ViT) or DepthAnythingConfig (a DINOv2
                                backbone under a DPT neck)
    model.safetensors           the weights, float32 as released
    preprocessor_config.json    DPTImageProcessor: MiDaS's 384² input and 0.5 mean and std; Depth Anything's 518²
                                lower bound in multiples of 14 and ImageNet's mean and std

``MIDAS_TINY``, ``ANYTHING_TINY`` and ``ANYTHING_V2_TINY`` are the real wiring at toy widths for the tests and the
CPU demo (v1 reads the backbone's last four layers, v2 four spread over its depth, as the releases do), Depth
Anything's at a toy input size too (``TINY_SIDE``: its attention over 518² would take seconds on a CPU);
``ANYTHING_V2_LARGE`` is the release the extension's ``depth_anything_v2`` runs (ViT-L/14, 335 M weights).
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

logger = logging.getLogger(__name__)

SEED = 90
IMAGENET_MEAN, IMAGENET_STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]

MIDAS_TINY = dict(
    # DPT-Hybrid's wiring: a three-stage BiT (ResNet with weight-standardised convolutions, "same" padding) whose
    # first two stages feed the neck directly and whose last feeds a ViT at 1/16; the ViT's last two taps follow.
    backbone_config=dict(layer_type="bottleneck", depths=[1, 1, 1], hidden_sizes=[16, 32, 64], embedding_size=8,
                         num_groups=4, global_padding="same", embedding_dynamic_padding=True,
                         out_features=["stage1", "stage2", "stage3"]),
    is_hybrid=True, hidden_size=32, num_hidden_layers=4, num_attention_heads=4, intermediate_size=37, image_size=64,
    patch_size=16, backbone_out_indices=[0, 1, 2, 3], neck_hidden_sizes=[16, 32, 32, 32], fusion_hidden_size=16,
    reassemble_factors=[1, 1, 1, 0.5], backbone_featmap_shape=[1, 64, 4, 4], readout_type="project",
)
SIDE, TINY_SIDE = 518, 140  # Depth Anything's input: the releases', and the tiny ones' (10 patches of 14)
_DINO_TINY = dict(model_type="dinov2", hidden_size=32, num_hidden_layers=8, num_attention_heads=4, mlp_ratio=1,
                  image_size=TINY_SIDE, patch_size=14, reshape_hidden_states=False)
_NECK_TINY = dict(reassemble_hidden_size=32, neck_hidden_sizes=[8, 16, 32, 32], fusion_hidden_size=16,
                  head_hidden_size=8, patch_size=14)
ANYTHING_TINY = dict(backbone_config={**_DINO_TINY, "out_indices": [5, 6, 7, 8]}, **_NECK_TINY)
ANYTHING_V2_TINY = dict(backbone_config={**_DINO_TINY, "out_indices": [2, 4, 6, 8]}, **_NECK_TINY)
ANYTHING_V2_LARGE = dict(
    backbone_config=dict(model_type="dinov2", hidden_size=1024, num_hidden_layers=24, num_attention_heads=16,
                         mlp_ratio=4, image_size=518, patch_size=14, layerscale_value=1.0,
                         out_indices=[5, 12, 18, 24], reshape_hidden_states=False),
    reassemble_hidden_size=1024, neck_hidden_sizes=[256, 512, 1024, 1024], fusion_hidden_size=256,
    head_hidden_size=32, patch_size=14, depth_estimation_type="relative",
)
# Where the head's last convolution is: its output passes a ReLU (relative depth is never negative).
_LAST = {"dpt": lambda m: m.head.head[-2], "depth_anything": lambda m: m.head.conv3}
# That convolution's weights are scaled so that its output is about 1 ± 0.5 before the ReLU (see _visible).
_LAST_GAIN = {"dpt": 0.1, "depth_anything": 0.03}


def _visible(model, kind: str) -> None:
    """Make a random network's depth follow the image. At transformers' initialisation (normal, std 0.02) the neck
    and head shrink the signal layer by layer to about 1e-7, and the final ReLU zeroes most of what is left: a flat
    map. He's initialisation keeps the signal, and the last convolution, scaled down around a bias of 1, keeps
    nearly every pixel above zero."""
    for part in (model.neck, model.head):
        for conv in part.modules():
            if isinstance(conv, torch.nn.Conv2d | torch.nn.ConvTranspose2d):
                torch.nn.init.kaiming_normal_(conv.weight, nonlinearity="relu")
                if conv.bias is not None:
                    torch.nn.init.zeros_(conv.bias)
    last = _LAST[kind](model)
    with torch.no_grad():
        last.weight.mul_(_LAST_GAIN[kind])
        last.bias.fill_(1.0)


def build_midas(out: Path, sizes: dict, seed: int = SEED, device: str = "cpu") -> None:
    """A DPT-Hybrid MiDaS at ``sizes`` (``MIDAS_TINY``): DPTForDepthEstimation and MiDaS's preprocessor."""
    from transformers import DPTConfig, DPTForDepthEstimation, DPTImageProcessor

    _save(out, lambda: DPTForDepthEstimation(DPTConfig(**sizes)), "dpt", seed, device,
          DPTImageProcessor(size={"height": 384, "width": 384}, image_mean=[0.5] * 3, image_std=[0.5] * 3))


def build_depth_anything(out: Path, sizes: dict, seed: int = SEED + 1, device: str = "cpu", side: int = SIDE) -> None:
    """A Depth Anything at ``sizes`` (``ANYTHING_TINY``, ``ANYTHING_V2_TINY``, ``ANYTHING_V2_LARGE``) and its
    preprocessor, whose input is at least ``side`` square."""
    from transformers import DepthAnythingConfig, DepthAnythingForDepthEstimation, DPTImageProcessor

    processor = DPTImageProcessor(size={"height": side, "width": side}, ensure_multiple_of=14, keep_aspect_ratio=True,
                                  image_mean=IMAGENET_MEAN, image_std=IMAGENET_STD)
    _save(out, lambda: DepthAnythingForDepthEstimation(DepthAnythingConfig(**sizes)), "depth_anything", seed, device,
          processor)


def _save(out: Path, factory, kind: str, seed: int, device: str, processor) -> None:
    torch.manual_seed(seed)
    with torch.device(device):
        model = factory()
        _visible(model, kind)
    model = model.to("cpu", torch.float32).eval()
    model.save_pretrained(out, safe_serialization=True)
    processor.save_pretrained(out)
    weights = sum(p.numel() for p in model.parameters())
    logger.info("%s written to %s (%.1f M parameters)", type(model).__name__, out, weights / 1e6)
