"""M-LSD straight-line preprocessor of ControlNet units: the image's straight line segments, white one-pixel lines on
black, as A1111's ControlNet extension (Mikubill/sd-webui-controlnet) makes them for its ``mlsd`` module.

The model is M-LSD's large network (Gu et al., "Towards Light-weight and Real-time Line Segment Detection", AAAI
2022; NAVER's weights, Apache 2.0) as the extension loads it from lllyasviel/Annotators' ``mlsd_large_512_fp32.pth``:
MobileNetV2's first fourteen blocks (to 96 channels at 1/16 of the input, TFLite's padding), read at five depths by a
U-shaped decoder back to 1/2 of the input, whose last 9 channels are the maps: a line-centre score (a logit) and each
centre's displacements to its segment's two ends. ``mlsd_network`` builds it with the release's state-dict keys
(``backbone.features.0.0.weight`` ... ``block23.conv3.bias``), so the released file, converted to safetensors as it is
(``python -m deployments.weights.convert``), loads into it (``from_state_dict``); ``recognise`` tells such a state
dict. The base's ``preprocessors.mlsd`` names that file (or a folder holding it as
``mlsd_large_512_fp32.safetensors``); a replica loads it once, at start (``load``, through ``loader.load_mlsd``), and
the module is offered only then. It runs in float32 whatever the replica's dtype, as the extension runs it (the
release's float32 weights moved to its device uncast, its input ``.float()``): the decoding thresholds the scores, so
half precision could add or drop a line.

The map, as the extension makes it (its ``mlsd`` with ``pred_lines``):

1. the image at ``processor_res`` (its shorter side, ``control.at_resolution``), padded on the right and bottom to
   multiples of 64 with its edge pixels;
2. the network reads the padded image at its own size, RGB and a fourth channel of ones, each as ``x / 127.5 - 1``;
3. ``segments``: the centre scores through a sigmoid; a centre is a score that is the largest of its 3 x 3
   neighbourhood, the 200 best taken; a centre makes a segment where its score is above the value threshold
   (``threshold_a``) and its two displacements are further apart than the distance threshold (``threshold_b``, in
   the map's pixels); the segment runs from the centre plus one displacement to the centre plus the other, doubled
   to the input's pixels;
4. ``draw``: each segment a white line one pixel wide (its ends truncated to whole pixels) on black; the padding
   cropped off, the one channel repeated to three.

Light to import (the config and the ingress read its names): torch and OpenCV are imported where used.
"""

from __future__ import annotations

import functools
import logging
import math
import threading
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
from PIL import Image

from deployments.support import releases
from deployments.support.lineart import padded

if TYPE_CHECKING:
    import torch

    from deployments.support.settings import Settings

logger = logging.getLogger(__name__)

MLSD_MODULES = ("mlsd",)
MlsdModule = Literal["mlsd"]
# The extension's sliders of its mlsd module (default, min, max): "Preprocessor Resolution", "MLSD Value Threshold"
# (threshold_a: a centre's least score) and "MLSD Distance Threshold" (threshold_b: a segment's least length, in the
# map's pixels, half the input's); the thresholds step by 0.01.
MLSD_RES = (512, 64, 2048)
VALUE_THRESHOLD = (0.1, 0.01, 2.0)
DISTANCE_THRESHOLD = (0.1, 0.01, 20.0)
FIELD = "preprocessors.mlsd"
WEIGHTS = "mlsd_large_512_fp32.safetensors"  # the release's mlsd_large_512_fp32.pth, converted

TOP_K = 200  # the centres the decoding reads, best first
PEAK_WINDOW = 3  # a centre is the largest score of its window
SCALE = 2  # the maps are at half the input's size
WHITE = 255

# MobileNetV2's stages as M-LSD keeps them (its last two dropped): expansion, channels, blocks, the first's stride;
# after a stem of 32 channels at stride 2 that reads the four input channels.
STEM = 32
STAGES = ((1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1))
TAPS = (1, 3, 6, 10, 13)  # the backbone's blocks whose outputs the decoder reads: 1/2, 1/4, 1/8, 1/16, 1/16
WIDTH = 64  # the decoder's channels
# The decoder's four steps, deepest first: (merge block, refine block, the channels of the tap it merges, whether the
# deeper features are doubled in size first). The first merges the last two taps, both at 1/16.
DECODER = (("block15", "block16", 64, False), ("block17", "block18", 32, True), ("block19", "block20", 24, True),
           ("block21", "block22", 16, True))
HEAD = "block23"  # 16 channels, of which the last 9 are the maps
HEAD_CHANNELS, DROPPED = 16, 7
# BatchNorm's step counter, which PyTorch writes in every state dict since 0.4.1 and which inference never reads:
# a file without it loads (each set to 0, as PyTorch's BatchNorm fills it in an older file).
COUNTER = "num_batches_tracked"


@functools.cache
def _network_class() -> type:
    """The network's module class, defined on first use so that importing this module imports no torch."""
    import torch
    import torch.nn.functional as F
    from torch import nn

    def unit(inputs: int, outputs: int, kernel: int, dilation: int = 1) -> nn.Sequential:
        """A convolution with a bias, BatchNorm and ReLU, the decoder's unit (keys ``0.*``, ``1.*``)."""
        return nn.Sequential(nn.Conv2d(inputs, outputs, kernel, padding=dilation * (kernel // 2), dilation=dilation),
                             nn.BatchNorm2d(outputs), nn.ReLU())

    class ConvBN6(nn.Sequential):
        """MobileNetV2's convolution without a bias, BatchNorm and ReLU6. At stride 2 the input takes one more pixel
        on its right and bottom and the convolution none around: TensorFlow's 'same' padding, which the weights were
        trained with."""

        def __init__(self, inputs: int, outputs: int, kernel: int = 3, stride: int = 1, groups: int = 1) -> None:
            padding = 0 if stride == 2 else kernel // 2
            super().__init__(nn.Conv2d(inputs, outputs, kernel, stride, padding, groups=groups, bias=False),
                             nn.BatchNorm2d(outputs), nn.ReLU6())
            self.stride = stride

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return super().forward(F.pad(x, (0, 1, 0, 1)) if self.stride == 2 else x)

    class InvertedResidual(nn.Module):
        """MobileNetV2's block: widened ``expansion`` times (1 x 1), depthwise 3 x 3, narrowed (1 x 1, no ReLU);
        added to its input where the shape allows."""

        def __init__(self, inputs: int, outputs: int, stride: int, expansion: int) -> None:
            super().__init__()
            hidden = inputs * expansion
            widen = [ConvBN6(inputs, hidden, kernel=1)] if expansion != 1 else []
            self.conv = nn.Sequential(*widen, ConvBN6(hidden, hidden, stride=stride, groups=hidden),
                                      nn.Conv2d(hidden, outputs, 1, bias=False), nn.BatchNorm2d(outputs))
            self.residual = stride == 1 and inputs == outputs

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x + self.conv(x) if self.residual else self.conv(x)

    class Backbone(nn.Module):
        """The stem and the kept stages (``features.0`` ... ``features.13``); the taps' outputs, shallowest first."""

        def __init__(self) -> None:
            super().__init__()
            blocks: list[nn.Module] = [ConvBN6(4, STEM, stride=2)]
            channels = STEM
            for expansion, outputs, count, stride in STAGES:
                for n in range(count):
                    blocks.append(InvertedResidual(channels, outputs, stride if n == 0 else 1, expansion))
                    channels = outputs
            self.features = nn.Sequential(*blocks)

        def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
            taps = []
            for n, block in enumerate(self.features):
                x = block(x)
                if n in TAPS:
                    taps.append(x)
            return taps

    class Merge(nn.Module):
        """A tap's features (``conv2``, 1 x 1) beside the deeper ones (``conv1``, 1 x 1, doubled in size
        bilinearly, corners aligned, where ``upscale``)."""

        def __init__(self, tap: int, deeper: int, upscale: bool) -> None:
            super().__init__()
            self.conv1, self.conv2 = unit(deeper, WIDTH, 1), unit(tap, WIDTH, 1)
            self.upscale = upscale

        def forward(self, tap: torch.Tensor, deeper: torch.Tensor) -> torch.Tensor:
            deeper = self.conv1(deeper)
            if self.upscale:
                deeper = F.interpolate(deeper, scale_factor=2.0, mode="bilinear", align_corners=True)
            return torch.cat((self.conv2(tap), deeper), dim=1)

    class Refine(nn.Module):
        """Two 3 x 3 units, the first added to its input."""

        def __init__(self) -> None:
            super().__init__()
            self.conv1, self.conv2 = unit(2 * WIDTH, 2 * WIDTH, 3), unit(2 * WIDTH, WIDTH, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.conv2(self.conv1(x) + x)

    class Head(nn.Module):
        """A 3 x 3 unit dilated 5 times, another undilated, and a 1 x 1 convolution to the output channels."""

        def __init__(self) -> None:
            super().__init__()
            self.conv1, self.conv2 = unit(WIDTH, WIDTH, 3, dilation=5), unit(WIDTH, WIDTH, 3)
            self.conv3 = nn.Conv2d(WIDTH, HEAD_CHANNELS, 1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.conv3(self.conv2(self.conv1(x)))

    class MLSDLarge(nn.Module):
        """M-LSD's large network: ``(1, 4, H, W)`` (H and W multiples of 16) -> its maps ``(1, 9, H/2, W/2)``."""

        def __init__(self) -> None:
            super().__init__()
            self.backbone = Backbone()
            for n, (merge, refine, tap, upscale) in enumerate(DECODER):
                self.add_module(merge, Merge(tap, STAGES[-1][1] if n == 0 else WIDTH, upscale))
                self.add_module(refine, Refine())
            self.add_module(HEAD, Head())

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            taps = self.backbone(x)
            x = taps[-1]
            for (merge, refine, _, _), tap in zip(DECODER, reversed(taps[:-1]), strict=True):
                x = getattr(self, refine)(getattr(self, merge)(tap, x))
            return getattr(self, HEAD)(x)[:, DROPPED:]

    return MLSDLarge


def mlsd_network() -> torch.nn.Module:
    """A new M-LSD large network (random weights, on the default device: build it under ``torch.device("meta")`` to
    load weights into it without initialising them)."""
    return _network_class()()


@functools.cache
def official_shapes() -> dict[str, tuple[int, ...]]:
    """The release's state dict: each key's shape (BatchNorm's step counters, ``()``, included)."""
    import torch

    with torch.device("meta"):
        return {key: tuple(value.shape) for key, value in mlsd_network().state_dict().items()}


def recognise(state_dict: Mapping[str, Any]) -> bool:
    """Whether a state dict is M-LSD's large network, as the release ships it: its keys, each of its shape."""
    return not mismatches(state_dict)


def mismatches(state_dict: Mapping[str, Any]) -> dict[str, list[str]]:
    """How a state dict differs from the release's: its ``missing``, ``unexpected`` and ``wrong_shape`` keys, sorted
    (an empty dict: none). BatchNorm's step counters may be missing."""
    return releases.mismatches(official_shapes(), state_dict, lambda name: name.endswith(COUNTER))


def from_state_dict(state_dict: Mapping[str, torch.Tensor]) -> torch.nn.Module:
    """The network holding ``state_dict``'s tensors themselves (no copy), which must be the release's (``recognise``;
    the loader says how one is not); a missing step counter is 0."""
    import torch

    counters = {k: torch.zeros((), dtype=torch.long) for k in official_shapes() if k.endswith(COUNTER)}
    with torch.device("meta"):  # no random start for weights about to be replaced
        model = mlsd_network()
    model.load_state_dict({**counters, **state_dict}, strict=True, assign=True)
    return model.eval()


def segments(maps: torch.Tensor, value_threshold: float, distance_threshold: float) -> np.ndarray:
    """The line segments of the network's maps ``(1, 9, h, w)`` or ``(9, h, w)``: an (n, 4) float64 array of x0, y0,
    x1, y1 in the input's pixels (twice the maps'), in the order of their centres' scores, best first.

    The torch steps are the extension's own, on the maps' device (the same ties win); its comparisons, which numpy
    1.x made in float64 (A1111 pins numpy 1.26), are made in float64."""
    import torch
    import torch.nn.functional as F

    maps = maps[0] if maps.ndim == 4 else maps
    width = maps.shape[-1]
    heat = torch.sigmoid(maps[:1].float())  # (1, h, w)
    peaks = heat * (F.max_pool2d(heat, PEAK_WINDOW, stride=1, padding=PEAK_WINDOW // 2) == heat).float()
    scores, indices = torch.topk(peaks.reshape(-1), min(TOP_K, peaks.numel()), dim=-1, largest=True)
    ys = torch.floor_divide(indices, width).cpu().numpy()
    xs = torch.fmod(indices, width).cpu().numpy()
    offsets = maps[1:5].float().permute(1, 2, 0).cpu().numpy()  # (h, w, 4): one end's x, y, the other's
    lengths = np.sqrt(np.sum((offsets[..., :2] - offsets[..., 2:]) ** 2, axis=-1))  # float32, as the original's
    kept = ((scores.cpu().numpy().astype(np.float64) > value_threshold)
            & (lengths[ys, xs].astype(np.float64) > distance_threshold))
    ys, xs = ys[kept], xs[kept]
    ends = offsets[ys, xs].astype(np.float64)
    lines = np.stack([xs + ends[:, 0], ys + ends[:, 1], xs + ends[:, 2], ys + ends[:, 3]], axis=1)
    return (SCALE * lines).reshape(-1, 4)


def draw(lines: np.ndarray, height: int, width: int) -> np.ndarray:
    """Each segment a white line one pixel wide (8-connected, ends truncated toward zero) on a black (height, width)
    uint8 canvas, in order. A segment with an end OpenCV cannot take (not finite, or past a 32-bit integer) ends the
    drawing there: the extension's OpenCV call fails on it, and the error it swallows skips the rest."""
    import cv2

    canvas = np.zeros((height, width), np.uint8)
    for line in np.asarray(lines, np.float64).reshape(-1, 4):
        if not all(math.isfinite(v) and -(2 ** 31) <= int(v) < 2 ** 31 for v in line):
            break
        x0, y0, x1, y1 = (int(v) for v in line)
        cv2.line(canvas, (x0, y0), (x1, y1), WHITE, 1)
    return canvas


class LineDetector:
    """M-LSD's network on a device (a replica's, float32: see ``load``), and the extension's ``mlsd`` map of an image
    by it. Safe to call from several threads (the inference thread's units, ``/controlnet/detect``'s worker thread):
    one model call at a time."""

    def __init__(self, model: torch.nn.Module, device: torch.device) -> None:
        import torch

        self.model = model.to(device=device, dtype=torch.float32).eval()
        self.device = device
        self._lock = threading.Lock()

    def __call__(self, image: Image.Image, value_threshold: float = VALUE_THRESHOLD[0],
                 distance_threshold: float = DISTANCE_THRESHOLD[0]) -> Image.Image:
        """The line map of ``image`` (already at the processor resolution): white lines on black, RGB, its size."""
        rgb = np.asarray(image.convert("RGB"))
        height, width = rgb.shape[:2]
        whole = padded(rgb)
        canvas = draw(self.lines(whole, value_threshold, distance_threshold), whole.shape[0], whole.shape[1])
        return Image.fromarray(np.ascontiguousarray(canvas[:height, :width])).convert("RGB")

    def lines(self, rgb: np.ndarray, value_threshold: float, distance_threshold: float) -> np.ndarray:
        """The segments (``segments``) of an RGB array whose sides are multiples of 16, in its pixels."""
        import torch

        x = np.concatenate([rgb.astype(np.float32), np.ones((*rgb.shape[:2], 1), np.float32)], axis=2)
        pixels = torch.from_numpy(np.ascontiguousarray((x / 127.5 - 1.0).transpose(2, 0, 1)))[None]
        with self._lock, torch.inference_mode():
            return segments(self.model(pixels.to(self.device)), value_threshold, distance_threshold)


def load(sources: Mapping[str, str], device: torch.device,
         settings: Settings | None = None) -> dict[str, LineDetector]:
    """The configured mlsd module's detector (``base.preprocessors``: module -> source), loaded once, float32 (the
    network is 1.5 M weights, 6 MB)."""
    from deployments.weights import loader

    return {module: LineDetector(loader.load_mlsd(source, settings), device) for module, source in sources.items()}
