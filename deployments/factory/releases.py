"""Random-weight models in the exact on-disk layouts of the official ``.pth`` releases.

Users get Real-ESRGAN, CodeFormer, GFPGAN and RetinaFace weights as pickles, which the loader refuses;
``deployments.weights.convert`` turns them into safetensors. These files let the tests and the full-size runs exercise
that path without downloading anything: the official file names, wrapping dicts (``params_ema``, or the bare
DataParallel ``module.`` keys of RetinaFace), key names and, with ``full=True``, every shape and the file size.

    RealESRGAN_x4plus.pth              {"params_ema": basicsr RRDBNet, 23 blocks, x4}
    RealESRGAN_x2plus.pth              {"params_ema": the same, pixel-unshuffled input (12 channels), x2}
    codeformer.pth                     {"params_ema": CodeFormer v0.1.0}
    GFPGANv1.4.pth                     {"params_ema": GFPGANv1Clean, 512 px}
    detection_Resnet50_Final.pth       RetinaFace ResNet-50, every key prefixed "module."
    detection_mobilenet0.25_Final.pth  RetinaFace MobileNet-0.25, the same wrapping

``full=False`` shrinks what the loaders can still recognise (RRDB width and depth, CodeFormer's transformer and
codebook). spandrel rebuilds GFPGAN with fixed hyperparameters and facexlib builds RetinaFace from its network
name alone, so those two are written at full size either way. The weights are random: outputs are noise.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Collection
from dataclasses import dataclass
from pathlib import Path

import torch

logger = logging.getLogger(__name__)

SEED = 1000

StateDict = dict[str, torch.Tensor]


@dataclass(frozen=True)
class Sizes:
    rrdb_feat: int
    rrdb_blocks: int
    codeformer_dim: int
    codeformer_layers: int
    codebook: int


# The official releases' hyperparameters (Real-ESRGAN v0.1.0 / v0.2.1, CodeFormer v0.1.0).
FULL = Sizes(rrdb_feat=64, rrdb_blocks=23, codeformer_dim=512, codeformer_layers=9, codebook=1024)
# Toy sizes: a few seconds on two CPU cores. CodeFormer's dim stays a multiple of its 8 heads.
TOY = Sizes(rrdb_feat=8, rrdb_blocks=1, codeformer_dim=64, codeformer_layers=1, codebook=64)


def _basicsr_names(num_blocks: int) -> list[tuple[re.Pattern[str], str]]:
    """spandrel's ESRGAN is the old-arch RRDBNet: basicsr's layers under ``model.N`` names; map them back."""
    return [
        (re.compile(r"^model\.0\."), "conv_first."),
        (re.compile(r"^model\.1\.sub\.(\d+)\.RDB(\d)\.conv(\d)\.0\."), r"body.\1.rdb\2.conv\3."),
        (re.compile(rf"^model\.1\.sub\.{num_blocks}\."), "conv_body."),
        # Two nearest-neighbour x2 stages, then the HR conv and the output conv (LeakyReLUs hold no weights).
        (re.compile(r"^model\.3\."), "conv_up1."),
        (re.compile(r"^model\.6\."), "conv_up2."),
        (re.compile(r"^model\.8\."), "conv_hr."),
        (re.compile(r"^model\.10\."), "conv_last."),
    ]


def rrdbnet_state(scale: int, sizes: Sizes) -> StateDict:
    """basicsr's RRDBNet (num_grow_ch 32) as Real-ESRGAN saves it: conv_first, body.N.rdbM.convK, conv_up1, ..."""
    from spandrel.architectures.ESRGAN import ESRGAN

    # basicsr always upsamples x4; its x2 (and x1) models pixel-unshuffle the input first, so conv_first
    # sees 3 * (4 / scale)^2 channels. spandrel tells them apart by exactly that.
    unshuffle = 4 // scale
    model = ESRGAN(
        in_nc=3 * unshuffle**2,
        out_nc=3,
        num_filters=sizes.rrdb_feat,
        num_blocks=sizes.rrdb_blocks,
        scale=4,
        shuffle_factor=unshuffle if unshuffle > 1 else None,
    )
    renames = _basicsr_names(sizes.rrdb_blocks)
    state: StateDict = {}
    for old, tensor in model.state_dict().items():
        new = next((pattern.sub(repl, old) for pattern, repl in renames if pattern.match(old)), None)
        if new is None:  # a spandrel change we do not know: better to stop than write a wrong layout
            raise RuntimeError(f"no basicsr name for RRDBNet key {old!r}")
        state[new] = tensor
    return state


def codeformer_state(sizes: Sizes) -> StateDict:
    from spandrel_extra_arches.architectures.CodeFormer import CodeFormer

    model = CodeFormer(
        dim_embd=sizes.codeformer_dim,
        n_head=8,
        n_layers=sizes.codeformer_layers,
        codebook_size=sizes.codebook,
        connect_list=["32", "64", "128", "256"],
    )
    return model.state_dict()


def gfpgan_state() -> StateDict:
    from spandrel.architectures.GFPGAN import GFPGAN

    model = GFPGAN(
        out_size=512,
        num_style_feat=512,
        channel_multiplier=2,
        decoder_load_path=None,
        fix_decoder=False,
        num_mlp=8,
        input_is_latent=True,
        different_w=True,
        narrow=1,
        sft_half=True,
    )
    return model.state_dict()


def retinaface_state(network: str) -> StateDict:
    from facexlib.detection.retinaface import RetinaFace

    model = RetinaFace(network_name=network, half=False, device="cpu")
    # The releases were saved from nn.DataParallel: facexlib's own loader strips this "module." again.
    return {f"module.{key}": tensor for key, tensor in model.state_dict().items()}


def _releases(sizes: Sizes) -> dict[str, tuple[str, Callable[[], object]]]:
    """Release name -> (file name, builder of the object the official file pickles)."""
    return {
        "RealESRGAN_x4plus": ("RealESRGAN_x4plus.pth", lambda: {"params_ema": rrdbnet_state(4, sizes)}),
        "RealESRGAN_x2plus": ("RealESRGAN_x2plus.pth", lambda: {"params_ema": rrdbnet_state(2, sizes)}),
        "codeformer": ("codeformer.pth", lambda: {"params_ema": codeformer_state(sizes)}),
        "GFPGANv1.4": ("GFPGANv1.4.pth", lambda: {"params_ema": gfpgan_state()}),
        "detection_Resnet50_Final": ("detection_Resnet50_Final.pth", lambda: retinaface_state("resnet50")),
        "detection_mobilenet0.25_Final": (
            "detection_mobilenet0.25_Final.pth",
            lambda: retinaface_state("mobile0.25"),
        ),
    }


RELEASES = tuple(_releases(TOY))


def build_release_files(
    out: Path, *, full: bool = True, only: Collection[str] | None = None
) -> dict[str, Path]:
    """Write the release files into ``out``; return release name -> path. ``only`` picks a subset by name."""
    releases = _releases(FULL if full else TOY)
    unknown = set(only or ()) - set(releases)
    if unknown:
        raise ValueError(f"only: unknown release(s) {sorted(unknown)}; choose from {list(releases)}")
    out.mkdir(parents=True, exist_ok=True)
    written: dict[str, Path] = {}
    for index, (name, (filename, build)) in enumerate(releases.items()):
        if only and name not in only:
            continue
        torch.manual_seed(SEED + index)  # each file is reproducible on its own, whatever subset is built
        path = out / filename
        torch.save(build(), path)  # a pickle on purpose: this is what users download
        logger.info("%s: %.1f MB", path, path.stat().st_size / 1e6)
        written[name] = path
    return written
