"""Random-weight OpenPose networks for the ControlNet pose preprocessors, in the layouts lllyasviel/Annotators ships
``body_pose_model.pth``, ``hand_pose_model.pth`` and ``facenet.pth`` in: the state dict alone, float32, its keys named
by layer (``conv1_1.weight`` ... ``Mconv7_stage6_L2.bias`` for the body, ... ``Mconv7_stage6.bias`` for the hand and
the face; ``pose.official_shapes``, ``pose_parts.official_shapes``).

``build_pose`` writes them as the service loads them, ``body_pose_model.safetensors``, ``hand_pose_model.safetensors``
and ``facenet.safetensors`` in one folder (what the converter makes of the releases; every pose module reads it);
``build_pose_pth`` writes a release's pickle itself, for the converter's tests (the service never opens it). There is
no toy size: the keys and shapes are the releases', 52 M weights for the body (209 MB), 37 M for the hand (147 MB),
38 M for the face (154 MB), at PyTorch's default initialisation, so a random body network's heatmaps rarely reach a
peak and its maps are black (no one found: no hand or face searched for).
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from deployments.support.pose import body_pose_network
from deployments.support.pose_parts import RELEASES, WEIGHTS, part_network

logger = logging.getLogger(__name__)

SEED = 92
SEEDS = {"body": SEED, "hand": SEED + 1, "face": SEED + 2}
NETWORKS = tuple(SEEDS)


def pose_state_dict(seed: int = SEED, device: str = "cpu", network: str = "body") -> dict[str, torch.Tensor]:
    """A random ``body``, ``hand`` or ``face`` network's state dict, float32 on the CPU; the same for the same seed
    and device."""
    torch.manual_seed(seed)
    with torch.device(device):
        model = body_pose_network() if network == "body" else part_network(network)
    return {key: value.detach().to("cpu", torch.float32).contiguous() for key, value in model.state_dict().items()}


def build_pose(out: Path, seed: int = SEED, device: str = "cpu", networks: tuple[str, ...] = NETWORKS) -> Path:
    """``out/body_pose_model.safetensors`` (and ``hand_pose_model.safetensors``, ``facenet.safetensors`` among
    ``networks``): random networks in the releases' keys, the hand's and face's seeds after the body's. Returns the
    body's file."""
    from safetensors.torch import save_file

    out.mkdir(parents=True, exist_ok=True)
    for network in networks:
        path = out / WEIGHTS[network]
        state = pose_state_dict(seed + SEEDS[network] - SEED, device, network)
        save_file(state, str(path))
        logger.info("OpenPose %s network written to %s (%.1f M parameters)", network, path,
                    sum(v.numel() for v in state.values()) / 1e6)
    return out / WEIGHTS["body"]


def build_pose_pth(out: Path, seed: int = SEED, device: str = "cpu", network: str = "body") -> Path:
    """``out/body_pose_model.pth`` (``hand_pose_model.pth``, ``facenet.pth``): the same network ``build_pose`` writes,
    pickled as the release is (``torch.save`` of the state dict)."""
    out.mkdir(parents=True, exist_ok=True)
    path = out / RELEASES[network]
    torch.save(pose_state_dict(seed + SEEDS[network] - SEED, device, network), path)
    logger.info("OpenPose %s network written to %s (the release's pickle)", network, path)
    return path
