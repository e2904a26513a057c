"""Random-weight networks of ControlNet's soft-edge and scribble preprocessors, in the layouts lllyasviel/Annotators
releases:

    ControlNetHED.safetensors    softedge_hed, softedge_hedsafe, scribble_hed: HED (ControlNetHED_Apache2), 14.7 M
    table5_pidinet.safetensors   softedge_pidinet, softedge_pidisafe, scribble_pidinet: PiDiNet (carv4), 0.71 M

``build_softedge`` writes them as ``python -m deployments.weights.convert`` writes the releases (one float32
safetensors file each, the release's names and shapes: PiDiNet's pixel differences as 3x3 weights), for the tests
and the CPU demo, at their real size: neither has a width of its own to shrink, and a map at the tests' 64² is a
fraction of a second. ``write_release`` writes one as released: ``ControlNetHED.pth`` a pickled state dict,
``table5_pidinet.pth`` a training checkpoint (``epoch``, ``state_dict``) whose names carry DataParallel's
``module.``, what the converter reads.

The weights start as the original code starts them (PyTorch's defaults; PiDiNet's pixel differences by Kaiming's
uniform rule, its reductions' and attentions' biases at zero, its fusion an average), but for HED's input offset,
at the training images' mean colour, and PiDiNet's reductions, scaled up: a fresh PiDiNet's edge probability stays
within 0.01 of 0.5 (a flat grey map), where a trained one's spans 0 to 1. So the random maps are neither flat nor
saturated.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path

import torch
from safetensors.torch import save_file

from deployments.support import softedge_nets
from deployments.support.softedge import WEIGHTS

logger = logging.getLogger(__name__)

SEED = 140
HED_MEAN = (122.7, 116.7, 104.0)  # RGB: VGG's training mean, where a trained offset sits
PIDI_GAIN = 200.0  # the reductions' weights scaled up: the fused logits then spread over a few units, not 0.01
RELEASES = {"hed": "ControlNetHED.pth", "pidinet": "table5_pidinet.pth"}


def state_dict(kind: str, seed: int = SEED) -> dict[str, torch.Tensor]:
    """A random ``kind`` (``hed``, ``pidinet``) network's state dict in its release's names and shapes, float32."""
    torch.manual_seed(seed + (kind == "pidinet"))
    if kind == "hed":
        state = dict(softedge_nets.HEDNetwork().state_dict())
        state["norm"] = torch.tensor(HED_MEAN).reshape(1, 3, 1, 1)
    else:
        state = dict(softedge_nets.PiDiNet().state_dict())
        for name in softedge_nets.pidi_kinds():  # released as 3x3 pixel differences, initialised as the original's
            weight = torch.empty(*state[name].shape[:2], 3, 3)
            torch.nn.init.kaiming_uniform_(weight, a=math.sqrt(5))
            state[name] = weight
        for name in state:
            if name.endswith("bias") and name.startswith(("conv_reduces.", "attentions.", "dilations.", "classifier")):
                state[name] = torch.zeros_like(state[name])
        state["classifier.weight"] = torch.full_like(state["classifier.weight"], 0.25)
        for i in range(len(softedge_nets.PIDI_STAGES)):  # initial features are faint: louder reductions, varied maps
            state[f"conv_reduces.{i}.conv.weight"] *= PIDI_GAIN
    return {name: value.detach().float().contiguous() for name, value in state.items()}


def build_softedge(out: Path, seed: int = SEED) -> dict[str, Path]:
    """Both networks as converted safetensors in ``out``; returns each network's file."""
    out.mkdir(parents=True, exist_ok=True)
    files = {}
    for kind, name in WEIGHTS.items():
        state = state_dict(kind, seed)
        files[kind] = out / name
        save_file(state, files[kind])
        logger.info("%s written to %s (%.2f M parameters)", kind, files[kind],
                    sum(v.numel() for v in state.values()) / 1e6)
    return files


def write_release(path: Path, kind: str, seed: int = SEED) -> Path:
    """``kind``'s network as lllyasviel/Annotators ships it (a pickle): HED's state dict alone; PiDiNet's inside a
    training checkpoint, its names prefixed with ``module.`` (it was saved from DataParallel)."""
    state: dict = state_dict(kind, seed)
    if kind == "pidinet":
        state = {"epoch": 14, "state_dict": {f"module.{k}": v for k, v in state.items()}}
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(state, path)
    return path


def build_releases(out: Path, seed: int = SEED) -> dict[str, Path]:
    """Both release files (``ControlNetHED.pth``, ``table5_pidinet.pth``) in ``out``."""
    return {kind: write_release(out / name, kind, seed) for kind, name in RELEASES.items()}
