"""Random-weight OpenPose body networks for the ControlNet ``openpose`` preprocessor, in the layout
lllyasviel/Annotators ships ``body_pose_model.pth`` in: the state dict alone, float32, its keys named by layer
(``conv1_1.weight`` ... ``Mconv7_stage6_L2.bias``, ``pose.official_shapes``).

``build_pose`` writes it as the service loads it, ``body_pose_model.safetensors`` (what the converter makes of the
release); ``build_pose_pth`` writes the release's pickle itself, for the converter's tests (the service never opens
it). There is no toy size: the keys and shapes are the release's, 52 M weights (209 MB), at PyTorch's default
initialisation, so a random network's heatmaps rarely reach a peak and its maps are black.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from deployments.support.pose import WEIGHTS, body_pose_network

logger = logging.getLogger(__name__)

SEED = 92
RELEASE = "body_pose_model.pth"


def pose_state_dict(seed: int = SEED, device: str = "cpu") -> dict[str, torch.Tensor]:
    """A random body pose network's state dict, float32 on the CPU; the same for the same seed and device."""
    torch.manual_seed(seed)
    with torch.device(device):
        model = body_pose_network()
    return {key: value.detach().to("cpu", torch.float32).contiguous() for key, value in model.state_dict().items()}


def build_pose(out: Path, seed: int = SEED, device: str = "cpu") -> Path:
    """``out/body_pose_model.safetensors``: a random body pose network in the release's keys."""
    from safetensors.torch import save_file

    out.mkdir(parents=True, exist_ok=True)
    path = out / WEIGHTS
    state = pose_state_dict(seed, device)
    save_file(state, str(path))
    logger.info("OpenPose body network written to %s (%.1f M parameters)", path,
                sum(v.numel() for v in state.values()) / 1e6)
    return path


def build_pose_pth(out: Path, seed: int = SEED, device: str = "cpu") -> Path:
    """``out/body_pose_model.pth``: the same network pickled as the release is (``torch.save`` of the state dict)."""
    out.mkdir(parents=True, exist_ok=True)
    path = out / RELEASE
    torch.save(pose_state_dict(seed, device), path)
    logger.info("OpenPose body network written to %s (the release's pickle)", path)
    return path
