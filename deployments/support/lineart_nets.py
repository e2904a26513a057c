"""The networks of ControlNet's line-art preprocessors, with the state-dict names of their released weights.

``InformativeDrawings``: the generator of "Learning to generate line drawings that convey geometry and semantics"
(Chan, Durand, Isola 2022) as A1111's ControlNet extension runs it for ``lineart_realistic`` (lllyasviel/Annotators'
``sk_model.pth``) and ``lineart_coarse`` (``sk_model2.pth``): a 7x7 stem, two stride-2 convolutions, three
residual blocks at 256 channels, two transposed convolutions back, a 7x7 head and a sigmoid; instance norms without
affine parameters, reflection padding. Its input is RGB in 0..1, its output one channel in 0..1 (lines dark).

``AnimeUNet``: pix2pix's U-Net generator (eight levels, ``ngf`` 64 released) as the extension runs it for
``lineart_anime`` (``netG.pth``): 4x4 stride-2 convolutions down with leaky ReLUs, transposed ones up, every level's
input concatenated to its output, instance norms without affine parameters, a tanh. Its input is RGB in -1..1 at
multiples of 256, its output one channel in -1..1.

The layer indices inside each ``nn.Sequential`` are what names the weights (``model1.3.weight``), so the layers are
laid out exactly where the released files expect them. ``architecture`` tells the two layouts apart by their names
alone; ``from_state_dict`` builds the network a state dict fits, or says why none does.
"""

from __future__ import annotations

import torch
from torch import nn

LINEART = "lineart"  # InformativeDrawings: lineart_realistic, lineart_coarse
LINEART_ANIME = "lineart_anime"  # AnimeUNet: lineart_anime
RESIDUAL_BLOCKS = 3  # what the released generators hold (the paper's code defaults to 9)
ANIME_LEVELS, ANIME_WIDTH = 8, 64  # netG.pth: UnetGenerator(3, 1, 8, 64)
ANIME_STEM = "model.model.0.weight"  # the outermost convolution: its output channels are the U-Net's width


def _norm(channels: int) -> nn.InstanceNorm2d:
    return nn.InstanceNorm2d(channels)  # no affine parameters, no running statistics: nothing in the state dict


class _Residual(nn.Module):
    """Two reflection-padded 3x3 convolutions with instance norms, added to the input."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv_block = nn.Sequential(
            nn.ReflectionPad2d(1), nn.Conv2d(channels, channels, 3), _norm(channels), nn.ReLU(inplace=True),
            nn.ReflectionPad2d(1), nn.Conv2d(channels, channels, 3), _norm(channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv_block(x)


class InformativeDrawings(nn.Module):
    """The line-drawing generator of ``lineart_realistic`` and ``lineart_coarse``: (N, 3, H, W) RGB in 0..1 ->
    (N, 1, H, W) in 0..1, dark lines on white. H and W: multiples of 4 come back at their size."""

    def __init__(self, blocks: int = RESIDUAL_BLOCKS) -> None:
        super().__init__()
        self.model0 = nn.Sequential(nn.ReflectionPad2d(3), nn.Conv2d(3, 64, 7), _norm(64), nn.ReLU(inplace=True))
        self.model1 = nn.Sequential(*self._stage(nn.Conv2d(64, 128, 3, stride=2, padding=1), 128),
                                    *self._stage(nn.Conv2d(128, 256, 3, stride=2, padding=1), 256))
        self.model2 = nn.Sequential(*(_Residual(256) for _ in range(blocks)))
        self.model3 = nn.Sequential(
            *self._stage(nn.ConvTranspose2d(256, 128, 3, stride=2, padding=1, output_padding=1), 128),
            *self._stage(nn.ConvTranspose2d(128, 64, 3, stride=2, padding=1, output_padding=1), 64))
        self.model4 = nn.Sequential(nn.ReflectionPad2d(3), nn.Conv2d(64, 1, 7), nn.Sigmoid())

    @staticmethod
    def _stage(conv: nn.Module, channels: int) -> list[nn.Module]:
        return [conv, _norm(channels), nn.ReLU(inplace=True)]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for part in (self.model0, self.model1, self.model2, self.model3, self.model4):
            x = part(x)
        return x


class _Level(nn.Module):
    """One level of the U-Net: down (convolution), the inner levels, up (transposed convolution). Every level but
    the outermost returns its input concatenated with what it made of it."""

    def __init__(self, outer: int, inner: int, below: _Level | None = None, channels_in: int | None = None,
                 outermost: bool = False) -> None:
        super().__init__()
        self.outermost = outermost
        down = nn.Conv2d(channels_in or outer, inner, 4, stride=2, padding=1)
        # Below the innermost level nothing is concatenated: its up convolution reads ``inner`` channels, not twice.
        up = nn.ConvTranspose2d(inner if below is None else inner * 2, outer, 4, stride=2, padding=1)
        if outermost:
            layers = [down, below, nn.ReLU(True), up, nn.Tanh()]
        elif below is None:
            layers = [nn.LeakyReLU(0.2, True), down, nn.ReLU(True), up, _norm(outer)]
        else:
            layers = [nn.LeakyReLU(0.2, True), down, _norm(inner), below, nn.ReLU(True), up, _norm(outer)]
        self.model = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # The leaky ReLU works in place: its input is the level above's output, which the concatenation below reads,
        # as in the released network (the skip carries the activated features).
        if self.outermost:
            return self.model(x)
        return torch.cat([x, self.model(x)], 1)


class AnimeUNet(nn.Module):
    """The U-Net generator of ``lineart_anime``: (N, 3, H, W) RGB in -1..1, H and W multiples of 2**levels ->
    (N, 1, H, W) in -1..1, dark lines on white."""

    def __init__(self, width: int = ANIME_WIDTH, levels: int = ANIME_LEVELS) -> None:
        super().__init__()
        if levels < 5:
            raise ValueError(f"an anime U-Net has at least 5 levels, not {levels}")
        level = _Level(width * 8, width * 8)
        for _ in range(levels - 5):
            level = _Level(width * 8, width * 8, level)
        for factor in (4, 2, 1):  # the widths come down to ``width`` over the three outer inner levels
            level = _Level(width * factor, width * factor * 2, level)
        self.model = _Level(1, width, level, channels_in=3, outermost=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)


def _names(make) -> list[str]:
    with torch.device("meta"):  # no memory, no initialisation: the names alone
        return list(make().state_dict())


def architecture(state: dict[str, torch.Tensor]) -> str | None:
    """``lineart`` (InformativeDrawings) or ``lineart_anime`` (AnimeUNet) when the state dict's names are exactly
    that network's, else None. Names only: ``from_state_dict`` checks the shapes."""
    names = set(state)
    if names == set(_names(InformativeDrawings)):
        return LINEART
    if ANIME_STEM in names and names == set(_names(AnimeUNet)):
        return LINEART_ANIME
    return None


def from_state_dict(kind: str, state: dict[str, torch.Tensor]) -> nn.Module:
    """The network of ``kind`` (``lineart``, ``lineart_anime``) with ``state``'s weights, float32, in eval mode; a
    state dict of other names or shapes is a ValueError saying which. An anime U-Net takes its width from the file
    (64 released; the factory's tiny one is narrower)."""
    if kind == LINEART:
        net: nn.Module = InformativeDrawings()
    elif kind == LINEART_ANIME:
        stem = state.get(ANIME_STEM)
        if stem is None or stem.ndim != 4:
            raise ValueError(f"no {ANIME_STEM} (the anime U-Net's first convolution)")
        net = AnimeUNet(width=int(stem.shape[0]))
    else:
        raise ValueError(f"unknown line-art architecture {kind!r}")
    expected = set(net.state_dict())
    missing, unexpected = sorted(expected - set(state)), sorted(set(state) - expected)
    if missing or unexpected:
        raise ValueError(f"not the {kind} network's weights: missing {missing[:4]}, unexpected {unexpected[:4]} "
                         f"({len(missing)} and {len(unexpected)} in all)")
    try:
        net.load_state_dict(state, strict=True)
    except RuntimeError as e:  # the names fit, a shape does not
        raise ValueError(f"not the {kind} network's weights: {str(e).splitlines()[-1].strip()}") from e
    return net.float().eval()
