"""Line-art preprocessors of ControlNet units: white lines on black, as A1111's ControlNet extension
(Mikubill/sd-webui-controlnet) makes them for its ``lineart_standard``, ``lineart`` (labelled ``lineart_realistic``),
``lineart_coarse`` and ``lineart_anime`` modules.

``lineart_standard`` ("from white bg & black line") needs no model: the image minus its Gaussian blur (sigma 6),
the smallest of the three channels, clipped to 0..255, divided by the median of its values above 8 (at least 16),
times 127, truncated to 8 bits. Dark strokes on a light ground come out bright; flat areas dark.

The others run a network each (``lineart_nets``), configured by module name in the base's ``preprocessors``: a
``.safetensors`` file (or a folder holding exactly one), converted from lllyasviel/Annotators' ``sk_model.pth``
(``lineart_realistic``), ``sk_model2.pth`` (``lineart_coarse``) or ``netG.pth`` (``lineart_anime``) by
``python -m deployments.weights.convert``. A replica loads them once, at start, on its device (``load``); a module
whose model is not configured is not offered. They run in float32 whatever the replica's dtype, as the extension
runs them: the map is truncated to 8 bits, so half precision would move its pixels, and the networks are small
(4.3 M weights; the anime U-Net 54 M).

Every map is made as the extension makes it: the image at ``processor_res`` (its shorter side,
``control.at_resolution``), padded on the right and bottom to multiples of 64 with its edge pixels, the map made of
the padded image (the standard one's median included), the padding cropped off, the one channel repeated to three.
The realistic and coarse generators see RGB / 255 and give lines dark in 0..1; the anime U-Net sees the padded image
resized (cubic) up to multiples of 256, RGB / 127.5 - 1, and its map is resized back (cubic); each is scaled to
0..255, truncated and inverted (255 - x), the extension's "auto inversion".

This module is imported by the config and the ingress: torch and OpenCV are imported where used.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Mapping
from typing import TYPE_CHECKING, Literal

import numpy as np
from PIL import Image

from deployments.support.depth import PAD

if TYPE_CHECKING:
    import torch

    from deployments.support.settings import Settings

logger = logging.getLogger(__name__)

LINEART_MODULES = ("lineart_standard", "lineart_realistic", "lineart_coarse", "lineart_anime")
MODEL_MODULES = ("lineart_realistic", "lineart_coarse", "lineart_anime")  # offered where a model is configured
LineartModule = Literal["lineart_realistic", "lineart_coarse", "lineart_anime"]
# The names the extension's clients send: its keys and its labels (the realistic one's key is "lineart").
ALIASES = {"lineart": "lineart_realistic", "lineart_standard (from white bg & black line)": "lineart_standard",
           **{m: m for m in LINEART_MODULES}}
KEYS = {"lineart_realistic": "lineart"}  # the extension's key where it is not our name
LABELS = {"lineart_standard": "lineart_standard (from white bg & black line)"}  # its label where it is not our name
# The network (lineart_nets.architecture) each module's weights must be.
ARCHITECTURES = {"lineart_realistic": "lineart", "lineart_coarse": "lineart", "lineart_anime": "lineart_anime"}
# The extension's "Preprocessor Resolution" slider of the line-art modules (its default one): default, min, max.
LINEART_RES = (512, 64, 2048)
SIGMA = 6.0  # lineart_standard's Gaussian blur
FLOOR, LEAST_MEDIAN, GAIN = 8, 16.0, 127.0  # its median reads values above FLOOR, is at least LEAST_MEDIAN
ANIME_MULTIPLE = 256  # the anime U-Net's input: eight halvings


def padded(rgb: np.ndarray) -> np.ndarray:
    """An image array padded on the right and bottom to multiples of 64 with its edge pixels, as the extension pads
    a preprocessor's input (its ``resize_image_with_pad``)."""
    height, width = rgb.shape[:2]
    return np.pad(rgb, ((0, -height % PAD), (0, -width % PAD), (0, 0)), mode="edge")


def standard(image: Image.Image) -> Image.Image:
    """``lineart_standard``'s map of ``image`` (already at the processor resolution): 8-bit, lines bright, RGB."""
    import cv2

    rgb = np.asarray(image.convert("RGB"))
    height, width = rgb.shape[:2]
    x = padded(rgb).astype(np.float32)
    intensity = np.min(cv2.GaussianBlur(x, (0, 0), SIGMA) - x, axis=2).clip(0, 255)
    strong = intensity[intensity > FLOOR]
    # The extension takes numpy's median as it comes (float32 here) and divides in place; an image with no value
    # above the floor (numpy's median of nothing is NaN, which max() passes over) divides by the least median.
    intensity /= max(LEAST_MEDIAN, np.median(strong)) if strong.size else LEAST_MEDIAN
    intensity *= GAIN
    lines = intensity.clip(0, 255).astype(np.uint8)[:height, :width]
    return Image.fromarray(lines).convert("RGB")


class LineartDetector:
    """One module's line-art network on a replica's device (float32), and the extension's map of an image by it.
    Safe to call from several threads (the inference thread's units, ``/controlnet/detect``'s worker thread): one
    network call at a time."""

    def __init__(self, module: str, net, device: torch.device) -> None:
        import torch

        self.module = module
        self.net = net.to(device=device, dtype=torch.float32).eval()
        self.device = device
        self.anime = ARCHITECTURES[module] == "lineart_anime"
        self._lock = threading.Lock()

    def __call__(self, image: Image.Image) -> Image.Image:
        """The map of ``image`` (already at the processor resolution): 8-bit, lines bright, RGB."""
        rgb = np.asarray(image.convert("RGB"))
        height, width = rgb.shape[:2]
        drawn = self.anime_drawing(padded(rgb)) if self.anime else self.drawing(padded(rgb))
        return Image.fromarray(255 - drawn[:height, :width]).convert("RGB")

    def drawing(self, rgb: np.ndarray) -> np.ndarray:
        """The realistic or coarse generator's drawing of an RGB array (dark lines on white), 8-bit at its size."""
        out = self._run(rgb.astype(np.float32) / 255.0)
        return (out * 255.0).clip(0, 255).astype(np.uint8)

    def anime_drawing(self, rgb: np.ndarray) -> np.ndarray:
        """The anime U-Net's drawing of an RGB array (dark lines on white): run at the next multiples of 256 (the
        array resized, cubic), resized back (cubic), 8-bit at the array's size."""
        import cv2

        height, width = rgb.shape[:2]
        size = (-(-width // ANIME_MULTIPLE) * ANIME_MULTIPLE, -(-height // ANIME_MULTIPLE) * ANIME_MULTIPLE)
        # OpenCV resizes the 8-bit image (its cubic values saturated to 0..255), then it is scaled to -1..1.
        x = cv2.resize(rgb, size, interpolation=cv2.INTER_CUBIC).astype(np.float32) / 127.5 - 1.0
        out = self._run(x) * 127.5 + 127.5
        return cv2.resize(out, (width, height), interpolation=cv2.INTER_CUBIC).clip(0, 255).astype(np.uint8)

    def _run(self, x: np.ndarray) -> np.ndarray:
        """The network's one channel (H, W) of an (H, W, 3) float array."""
        import torch

        pixels = torch.from_numpy(np.ascontiguousarray(x.transpose(2, 0, 1)))[None].to(self.device)
        with self._lock, torch.inference_mode():
            return self.net(pixels)[0, 0].float().cpu().numpy()


def load(sources: Mapping[str, str], device: torch.device,
         settings: Settings | None = None) -> dict[str, LineartDetector]:
    """The configured line-art modules' detectors (``base.preprocessors``: module -> source), each loaded once."""
    from deployments.weights import loader

    return {module: LineartDetector(module, loader.load_lineart(source, module, settings), device)
            for module, source in sources.items()}

