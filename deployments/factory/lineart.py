"""Random-weight networks of ControlNet's line-art preprocessors, in the layouts lllyasviel/Annotators releases:

    sk_model.safetensors    lineart_realistic: the informative-drawings generator (three residual blocks), 4.3 M
    sk_model2.safetensors   lineart_coarse: the same network, other weights
    netG.safetensors        lineart_anime: pix2pix's eight-level U-Net

``build_lineart`` writes them as ``python -m deployments.weights.convert`` writes the releases (one float32
safetensors file each, the release's names), for the tests and the CPU demo: the generators at their real size (a
line-art map at the tests' 64² is a fraction of a second), the U-Net at a toy width (``TINY_ANIME_WIDTH``: its
names are the release's, its tensors narrower; the released width's 54 M weights would take seconds a map).
``write_release`` writes one as released: a pickled state dict (``torch.save``), the U-Net's names under
DataParallel's ``module.``, what the converter reads.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from safetensors.torch import save_file

from deployments.support import lineart_nets

logger = logging.getLogger(__name__)

SEED = 120
TINY_ANIME_WIDTH = 8  # the released U-Net's is 64 (lineart_nets.ANIME_WIDTH)
# Each module's released file, without its suffix, and the seed offset of its random weights.
RELEASES = {"lineart_realistic": ("sk_model", 0), "lineart_coarse": ("sk_model2", 1), "lineart_anime": ("netG", 2)}


def network(module: str, seed: int = SEED, anime_width: int = TINY_ANIME_WIDTH) -> torch.nn.Module:
    """``module``'s network with PyTorch's default initialisation from a fixed seed (its offset per module)."""
    torch.manual_seed(seed + RELEASES[module][1])
    if module == "lineart_anime":
        return lineart_nets.AnimeUNet(width=anime_width).eval()
    return lineart_nets.InformativeDrawings().eval()


def build_lineart(out: Path, anime_width: int = TINY_ANIME_WIDTH, seed: int = SEED) -> dict[str, Path]:
    """The three networks as converted safetensors in ``out``; returns each module's file."""
    out.mkdir(parents=True, exist_ok=True)
    files = {}
    for module, (name, _) in RELEASES.items():
        net = network(module, seed, anime_width)
        files[module] = out / f"{name}.safetensors"
        save_file({k: v.contiguous() for k, v in net.state_dict().items()}, files[module])
        weights = sum(p.numel() for p in net.parameters())
        logger.info("%s written to %s (%.1f M parameters)", module, files[module], weights / 1e6)
    return files


def write_release(path: Path, module: str, seed: int = SEED, anime_width: int = TINY_ANIME_WIDTH) -> Path:
    """``module``'s network as lllyasviel/Annotators ships it: a ``torch.save``'d state dict (a pickle), the anime
    U-Net's names prefixed with ``module.`` (it was saved from DataParallel; the extension strips the prefix)."""
    state = network(module, seed, anime_width).state_dict()
    if module == "lineart_anime":
        state = {f"module.{k}": v for k, v in state.items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(state, path)
    return path


def build_releases(out: Path, full: bool = True, seed: int = SEED) -> dict[str, Path]:
    """The three release files (``sk_model.pth``, ``sk_model2.pth``, ``netG.pth``) in ``out``; ``full``: the U-Net
    at its released width, else the tiny one's."""
    width = lineart_nets.ANIME_WIDTH if full else TINY_ANIME_WIDTH
    return {module: write_release(out / f"{name}.pth", module, seed, width) for module, (name, _) in RELEASES.items()}
