"""Random-weight M-LSD large networks for the ControlNet ``mlsd`` preprocessor, in the layout lllyasviel/Annotators
ships ``mlsd_large_512_fp32.pth`` in: the state dict alone, float32, its keys named by module
(``backbone.features.0.0.weight`` ... ``block23.conv3.bias``, BatchNorm's running statistics and step counters
included: ``mlsd.official_shapes``).

``build_mlsd`` writes it as the service loads it, ``mlsd_large_512_fp32.safetensors`` (what the converter makes of the
release); ``build_mlsd_pth`` writes the release's pickle itself, for the converter's tests and the full-size set (the
service never opens it). There is no toy size: the release is small (1.5 M weights, 6 MB), so the tiny models hold
it at its real size. The weights are PyTorch's default initialisation, its BatchNorm statistics drawn at random (so
that a map depends on them), from a fixed seed: the maps are noise, a few lines or none.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from deployments.support.mlsd import WEIGHTS, mlsd_network

logger = logging.getLogger(__name__)

SEED = 74
RELEASE = "mlsd_large_512_fp32.pth"


def mlsd_state_dict(seed: int = SEED) -> dict[str, torch.Tensor]:
    """A random M-LSD large network's state dict, float32 on the CPU (step counters int64); the same for the same
    seed."""
    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = mlsd_network()
    for module in model.modules():
        if isinstance(module, torch.nn.BatchNorm2d):  # statistics as a trained network has them, not 0 and 1
            size = module.num_features
            module.running_mean.copy_(0.1 * torch.randn(size, generator=generator))
            module.running_var.copy_(0.5 + torch.rand(size, generator=generator))
            module.weight.data.copy_(0.5 + torch.rand(size, generator=generator))
            module.bias.data.copy_(0.1 * torch.randn(size, generator=generator))
    return {key: value.detach().contiguous() for key, value in model.state_dict().items()}


def build_mlsd(out: Path, seed: int = SEED) -> Path:
    """``out/mlsd_large_512_fp32.safetensors``: a random M-LSD large network in the release's keys."""
    from safetensors.torch import save_file

    out.mkdir(parents=True, exist_ok=True)
    path = out / WEIGHTS
    state = mlsd_state_dict(seed)
    save_file(state, str(path))
    logger.info("M-LSD large network written to %s (%d tensors)", path, len(state))
    return path


def build_mlsd_pth(out: Path, seed: int = SEED) -> Path:
    """``out/mlsd_large_512_fp32.pth``: the same network pickled as the release is (``torch.save`` of the state
    dict)."""
    out.mkdir(parents=True, exist_ok=True)
    path = out / RELEASE
    torch.save(mlsd_state_dict(seed), path)
    logger.info("M-LSD large network written to %s (the release's pickle)", path)
    return path
