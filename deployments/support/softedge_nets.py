"""The networks of ControlNet's soft-edge and scribble preprocessors, with the state-dict names of their released
weights.

``HED``: lllyasviel's Apache-2 re-implementation of holistically-nested edge detection (the extension's
``ControlNetHED_Apache2``, lllyasviel/Annotators' ``ControlNetHED.pth``): a learnt per-channel offset subtracted from
the RGB input (0..255, not normalised), then VGG-16's five stages of 3x3 convolutions (2, 2, 3, 3, 3 of them, each
with a ReLU; a 2x2 max-pool before every stage but the first), each stage projected to one side output by a 1x1
convolution. It returns the five side outputs at their own resolutions (1, 1/2 ... 1/16), unactivated: the
preprocessor resizes, averages and squashes them.

``PiDiNet``: the pixel-difference network of Su et al. ("Pixel Difference Networks for Efficient Edge Detection",
2021) as the extension runs ``table5_pidinet.pth`` (``pidinet()``: 60 channels, the ``carv4`` layout, dilated
modules of 24 channels and spatial attention). Its stem and 15 blocks (depthwise 3x3, ReLU, pointwise 1x1, a
residual; the first block of stages 2-4 max-pools and widens its shortcut by a 1x1 convolution) were trained as
pixel-difference convolutions, in turn central (``cd``), angular (``ad``), radial (``rd``) and vanilla (``cv``).
Each of those is a plain convolution with rearranged weights, 3x3 (``cd``, ``ad``) or 5x5 (``rd``), so the network
here is built of plain convolutions, and ``from_state_dict`` rewrites the released 3x3 weights into theirs
(``plain_kernels``) as it loads them: the same function, without the per-call weight arithmetic. Each of the four
stages' features goes through a dilated module (1x1, then four 3x3 at dilations 5, 7, 9, 11, summed), a spatial
attention (ReLU, 1x1 to 4 channels, 3x3 to one, sigmoid, multiplied in) and a 1x1 reduction to one channel, is
resized to the input's size (bilinear) and the four are fused by a 1x1 convolution; ``PiDiNet`` returns the fused
map's sigmoid (the extension reads the last of its five outputs).

The submodules are named as the released files name their tensors (``block2_1.shortcut.weight``,
``dilations.0.conv2_1.weight``): ``architecture`` tells the two networks apart by their names alone, and
``release_shapes`` gives each release's names and shapes (the PiDiNet release's before the conversion).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import nn

from deployments.support import releases

HED = "hed"  # softedge_hed, softedge_hedsafe, scribble_hed
PIDINET = "pidinet"  # softedge_pidinet, softedge_pidisafe, scribble_pidinet

# HED: the VGG-16 stages' widths and how many convolutions each has.
HED_STAGES = ((64, 2), (128, 2), (256, 3), (512, 3), (512, 3))

# PiDiNet as released: the stem's width, the dilated modules' width, and the 16 convolutions' kinds in order (the
# stem, then blocks 1_1 ... 4_4): carv4 repeats central, angular, radial, vanilla.
PIDI_WIDTH, PIDI_DILATED = 60, 24
PIDI_KINDS = ("cd", "ad", "rd", "cv") * 4
PIDI_DILATIONS = (5, 7, 9, 11)
PIDI_ATTENTION = 4  # the spatial attention's hidden channels
# The blocks by stage: their names, the stage's width as a multiple of the stem's (the fourth keeps the third's).
PIDI_STAGES = ((1, 3), (2, 4), (4, 4), (4, 4))
# The angular difference: each tap minus its clockwise neighbour (the centre minus itself).
_CLOCKWISE = [3, 0, 1, 6, 4, 2, 7, 8, 5]
# The radial difference's 5x5 kernel: the eight outer taps get the 3x3 ring's weights, the inner ring their negatives.
_OUTER_RING = [0, 2, 4, 10, 14, 20, 22, 24]
_INNER_RING = [6, 7, 8, 11, 13, 16, 17, 18]


class _HEDStage(nn.Module):
    """One VGG stage: (max-pool), 3x3 convolutions with ReLUs, and its 1x1 side projection."""

    def __init__(self, channels_in: int, channels: int, layers: int) -> None:
        super().__init__()
        self.convs = nn.Sequential(*(nn.Conv2d(channels_in if i == 0 else channels, channels, 3, padding=1)
                                     for i in range(layers)))
        self.projection = nn.Conv2d(channels, 1, 1)

    def forward(self, x: torch.Tensor, pooled: bool) -> tuple[torch.Tensor, torch.Tensor]:
        if pooled:
            x = F.max_pool2d(x, kernel_size=2, stride=2)
        for conv in self.convs:
            x = F.relu(conv(x))
        return x, self.projection(x)


class HEDNetwork(nn.Module):
    """ControlNetHED_Apache2: (N, 3, H, W) RGB in 0..255 -> five (N, 1, H / 2**i, W / 2**i) side outputs, i = 0..4
    (sizes floored by each pooling)."""

    def __init__(self) -> None:
        super().__init__()
        self.norm = nn.Parameter(torch.zeros(1, 3, 1, 1))
        channels = 3
        for i, (width, layers) in enumerate(HED_STAGES, start=1):
            self.add_module(f"block{i}", _HEDStage(channels, width, layers))
            channels = width

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        x = x - self.norm
        sides = []
        for i in range(len(HED_STAGES)):
            x, side = getattr(self, f"block{i + 1}")(x, pooled=i > 0)
            sides.append(side)
        return sides


class _PidiBlock(nn.Module):
    """A PiDiNet block: depthwise convolution (3x3, or 5x5 for a radial one), ReLU, pointwise 1x1, added to its input
    (or, with ``stride`` 2, to its max-pooled input widened by a 1x1 shortcut)."""

    def __init__(self, kind: str, channels_in: int, channels: int, stride: int = 1) -> None:
        super().__init__()
        self.stride = stride
        if stride > 1:
            self.shortcut = nn.Conv2d(channels_in, channels, 1)
        kernel = 5 if kind == "rd" else 3
        self.conv1 = nn.Conv2d(channels_in, channels_in, kernel, padding=kernel // 2, groups=channels_in, bias=False)
        self.conv2 = nn.Conv2d(channels_in, channels, 1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.stride > 1:
            x = F.max_pool2d(x, kernel_size=2, stride=2)
        y = self.conv2(F.relu(self.conv1(x)))
        return y + (self.shortcut(x) if self.stride > 1 else x)


class _Dilated(nn.Module):
    """PiDiNet's dilated module (CDCM): ReLU, 1x1, then four dilated 3x3 convolutions summed."""

    def __init__(self, channels_in: int, channels: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(channels_in, channels, 1)
        for i, dilation in enumerate(PIDI_DILATIONS, start=1):
            self.add_module(f"conv2_{i}", nn.Conv2d(channels, channels, 3, dilation=dilation, padding=dilation,
                                                    bias=False))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv1(F.relu(x))
        out = self.conv2_1(x)
        for i in range(2, len(PIDI_DILATIONS) + 1):  # summed in order, as the original adds them
            out = out + getattr(self, f"conv2_{i}")(x)
        return out


class _Attention(nn.Module):
    """PiDiNet's compact spatial attention (CSAM): the input times a one-channel sigmoid mask made of it."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(channels, PIDI_ATTENTION, 1)
        self.conv2 = nn.Conv2d(PIDI_ATTENTION, 1, 3, padding=1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(self.conv2(self.conv1(F.relu(x))))


class _Reduce(nn.Module):
    """PiDiNet's 1x1 reduction of a stage's features to one edge channel (MapReduce)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


def _pidi_blocks(width: int = PIDI_WIDTH) -> list[tuple[str, str, int, int, int]]:
    """PiDiNet's blocks in order: (name, kind, in channels, channels, stride)."""
    out, channels, kinds = [], width, iter(PIDI_KINDS[1:])
    for stage, (factor, count) in enumerate(PIDI_STAGES, start=1):
        for i in range(1, count + 1):
            widened = i == 1 and stage > 1
            out.append((f"block{stage}_{i}", next(kinds), channels, width * factor, 2 if widened else 1))
            channels = width * factor
    return out


def _pidi_stage_widths(width: int = PIDI_WIDTH) -> list[int]:
    return [width * factor for factor, _ in PIDI_STAGES]


class PiDiNet(nn.Module):
    """table5_pidinet's network with plain convolutions: (N, 3, H, W) BGR in 0..1 -> (N, 1, H, W) edge probability."""

    def __init__(self, width: int = PIDI_WIDTH, dilated: int = PIDI_DILATED) -> None:
        super().__init__()
        self.init_block = nn.Conv2d(3, width, 3, padding=1, bias=False)  # a central difference: 3x3
        blocks = _pidi_blocks(width)
        for name, kind, channels_in, channels, stride in blocks:
            self.add_module(name, _PidiBlock(kind, channels_in, channels, stride))
        self._blocks = [name for name, *_ in blocks]
        # Registered in the release's order: the reductions, the attentions, the dilated modules.
        stages = _pidi_stage_widths(width)
        self.conv_reduces = nn.ModuleList(_Reduce(dilated) for _ in stages)
        self.attentions = nn.ModuleList(_Attention(dilated) for _ in stages)
        self.dilations = nn.ModuleList(_Dilated(channels, dilated) for channels in stages)
        self.classifier = nn.Conv2d(len(stages), 1, 1)
        self._stage_ends = [f"block{stage}_{count}" for stage, (_, count) in enumerate(PIDI_STAGES, start=1)]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        size = x.shape[2:]
        x = self.init_block(x)
        features = []
        for name in self._blocks:
            x = getattr(self, name)(x)
            if name in self._stage_ends:
                features.append(x)
        sides = [F.interpolate(reduce(attend(dilate(f))), size, mode="bilinear", align_corners=False)
                 for f, dilate, attend, reduce in zip(features, self.dilations, self.attentions, self.conv_reduces,
                                                      strict=True)]
        return torch.sigmoid(self.classifier(torch.cat(sides, dim=1)))


def pidi_kinds() -> dict[str, str]:
    """Each pixel-difference weight's name in the release -> its kind (cd, ad, rd, cv)."""
    names = ["init_block.weight", *(f"{name}.conv1.weight" for name, *_ in _pidi_blocks())]
    return dict(zip(names, PIDI_KINDS, strict=True))


def plain_kernels(kind: str, weight: torch.Tensor) -> torch.Tensor:
    """The plain convolution weight that computes the pixel-difference convolution ``kind`` of a released (O, I, 3,
    3) ``weight``: vanilla as it is; central: the centre tap less the sum of all (the convolution minus the sum's
    1x1); angular: each tap less its clockwise neighbour's; radial: a 5x5 kernel whose outer ring has the eight
    non-centre taps and whose inner ring their negatives (the centre tap unused)."""
    if weight.shape[2:] != (3, 3):
        raise ValueError(f"a pixel-difference weight is 3x3, not {tuple(weight.shape[2:])}")
    if kind == "cv":
        return weight
    flat = weight.reshape(weight.shape[0], weight.shape[1], 9)
    if kind == "cd":
        out = flat.clone()
        out[:, :, 4] -= flat.sum(dim=2)
        return out.reshape(weight.shape)
    if kind == "ad":
        return (flat - flat[:, :, _CLOCKWISE]).reshape(weight.shape)
    if kind == "rd":
        out = flat.new_zeros(weight.shape[0], weight.shape[1], 25)
        out[:, :, _OUTER_RING] = flat[:, :, 1:]
        out[:, :, _INNER_RING] = -flat[:, :, 1:]
        return out.reshape(weight.shape[0], weight.shape[1], 5, 5)
    raise ValueError(f"unknown pixel-difference convolution {kind!r}")


def release_shapes(kind: str) -> dict[str, tuple[int, ...]]:
    """The released state dict of ``kind`` (``hed``: ControlNetHED.pth; ``pidinet``: table5_pidinet.pth, after
    DataParallel's ``module.``): each name's shape, in the files' order."""
    with torch.device("meta"):  # no memory, no initialisation: the names and shapes alone
        net = HEDNetwork() if kind == HED else PiDiNet() if kind == PIDINET else None
        if net is None:
            raise ValueError(f"unknown soft-edge network {kind!r}")
        shapes = {name: tuple(value.shape) for name, value in net.state_dict().items()}
    if kind == PIDINET:  # released as 3x3 pixel differences, radial ones too
        shapes.update({name: (*shapes[name][:2], 3, 3) for name in pidi_kinds()})
    return shapes


def architecture(state: Mapping[str, object]) -> str | None:
    """``hed`` or ``pidinet`` when the state dict's names are exactly that release's, else None. Names only: the
    loader checks the shapes (``mismatches``)."""
    names = set(state)
    for kind in (HED, PIDINET):
        if names == set(release_shapes(kind)):
            return kind
    return None


def mismatches(kind: str, state: Mapping[str, object]) -> dict[str, list[str]]:
    """How a state dict differs from ``kind``'s release: its ``missing``, ``unexpected`` and ``wrong_shape`` names,
    sorted (an empty dict: none)."""
    return releases.mismatches(release_shapes(kind), state)


def from_state_dict(kind: str, state: Mapping[str, torch.Tensor]) -> nn.Module:
    """``kind``'s network holding a release's weights (``mismatches`` says none), float32, in eval mode: HED's
    tensors as they are (no copy), PiDiNet's pixel differences rewritten as plain kernels."""
    tensors = {name: value.float() for name, value in state.items()}
    if kind == PIDINET:
        tensors.update({name: plain_kernels(k, tensors[name]) for name, k in pidi_kinds().items()})
    with torch.device("meta"):  # no random start for weights about to be replaced
        net: nn.Module = HEDNetwork() if kind == HED else PiDiNet()
    net.load_state_dict(tensors, strict=True, assign=True)
    return net.eval()
