"""Depth preprocessors of ControlNet units: a depth estimator's map of the control image, as A1111's ControlNet
extension (Mikubill/sd-webui-controlnet) makes it for its ``depth_midas``, ``depth_anything`` and
``depth_anything_v2`` modules.

Each module needs a model of its own, configured by module name in the base's ``preprocessors`` (transformers'
layout: config.json, model.safetensors, preprocessor_config.json): a DPT for ``depth_midas`` (the extension's is
MiDaS's DPT-Hybrid, Intel/dpt-hybrid-midas in transformers), Depth Anything for the other two (its v1 and v2
releases share transformers' architecture). A replica loads them once, at start, on its device and dtype
(``load``); a module whose model is not configured is not offered.

The map, as the extension makes it: the image at ``processor_res`` (its shorter side, ``control.at_resolution``),
padded on the right and bottom to multiples of 64 with its edge pixels; the model's relative inverse depth of
that (MiDaS at the padded size itself, Depth Anything at its own input size, then resized back bilinearly);
normalised over the padded map to 0 (farthest) .. 255 (nearest), truncated to 8 bits; the padding cropped off; the
one channel repeated to three. The unit's resize mode then frames it at the generation size, as any map.

This module is imported by the config and the ingress: torch, OpenCV and transformers are imported where used.
"""

from __future__ import annotations

import logging
import math
import threading
from collections.abc import Mapping
from typing import TYPE_CHECKING, Literal

import numpy as np
from PIL import Image

if TYPE_CHECKING:
    import torch

    from deployments.support.settings import Settings

logger = logging.getLogger(__name__)

DEPTH_MODULES = ("depth_midas", "depth_anything", "depth_anything_v2")
DepthModule = Literal["depth_midas", "depth_anything", "depth_anything_v2"]
# The names the extension's clients send: MiDaS's internal key is "depth" ("depth_midas" is its label).
ALIASES = {"depth": "depth_midas", **{m: m for m in DEPTH_MODULES}}
# The architecture (config.json's model_type) each module's model must have.
ARCHITECTURES = {"depth_midas": "dpt", "depth_anything": "depth_anything", "depth_anything_v2": "depth_anything"}
# The extension's "Preprocessor Resolution" slider of its depth modules: default, min, max.
DEPTH_RES = (512, 64, 2048)
PAD = 64  # the extension pads a preprocessor's input to multiples of 64 and crops its map back


class DepthEstimator:
    """One module's depth model on a replica's device and dtype, and the extension's map of an image by it. Safe to
    call from several threads (the inference thread's units, ``/controlnet/detect``'s worker thread): one model call
    at a time."""

    def __init__(self, module: str, model, processor, device: torch.device, dtype: torch.dtype) -> None:
        self.module = module
        self.model = model.to(device=device, dtype=dtype).eval()
        self.device, self.dtype = device, dtype
        self.scale = float(processor.rescale_factor)
        self.mean = np.asarray(processor.image_mean, np.float32)
        self.std = np.asarray(processor.image_std, np.float32)
        # Depth Anything sees the image resized to at least its processor's size (518²), in multiples of its patch;
        # MiDaS sees it as it is (the extension never resizes MiDaS's input to its 384² training size).
        self.resized = ARCHITECTURES[module] == "depth_anything"
        self.size = (int(processor.size["height"]), int(processor.size["width"]))
        self.multiple = int(getattr(processor, "ensure_multiple_of", 1) or 1)
        self._lock = threading.Lock()
        self.patch, self._grid = 1, (0, 0)  # a ViT DPT's patch and the grid of the running call (_any_size)
        config = model.config
        if config.model_type == "dpt" and (config.is_hybrid or config.backbone_config is None):
            self._any_size(config)

    def _any_size(self, config) -> None:
        """Let a ViT-based DPT run at any multiple of its patch size. transformers' DPT runs at its config's square
        size only: the hybrid's embeddings refuse another size (their position embeddings are resized for any), and
        the neck reads its tokens as a square grid. MiDaS's own code runs at any size, and the extension runs it at
        the padded processor resolution, so the grid is given to the neck here (as transformers does for DPTs on
        a backbone) and the hybrid's embeddings are told to resize."""
        self.patch = int(config.patch_size)
        if config.is_hybrid:
            self.model.dpt.embeddings.register_forward_pre_hook(
                lambda _module, args, kwargs: (args, {**kwargs, "interpolate_pos_encoding": True}), with_kwargs=True)
        self.model.neck.register_forward_pre_hook(
            lambda _module, args, kwargs: ((args[0], *self._grid), {}), with_kwargs=True)

    def __call__(self, image: Image.Image) -> Image.Image:
        """The depth map of ``image`` (already at the processor resolution): 8-bit, nearest brightest, RGB."""
        rgb = np.asarray(image.convert("RGB"))
        height, width = rgb.shape[:2]
        padded = np.pad(rgb, ((0, -height % PAD), (0, -width % PAD), (0, 0)), mode="edge")
        return Image.fromarray(normalised(self.predict(padded))[:height, :width]).convert("RGB")

    def predict(self, rgb: np.ndarray) -> np.ndarray:
        """The model's relative inverse depth (larger: nearer) of an RGB array, float32 at the array's size."""
        import torch
        import torch.nn.functional as F

        pixels = torch.from_numpy(self.inputs(rgb)).to(self.device, self.dtype)
        with self._lock, torch.inference_mode():
            self._grid = (pixels.shape[-2] // self.patch, pixels.shape[-1] // self.patch)
            depth = self.model(pixel_values=pixels).predicted_depth.float()
            if depth.shape[-2:] != rgb.shape[:2]:  # Depth Anything's, at its own input size
                depth = F.interpolate(depth[:, None], size=rgb.shape[:2], mode="bilinear", align_corners=False)[:, 0]
            return depth[0].cpu().numpy()

    def inputs(self, rgb: np.ndarray) -> np.ndarray:
        """The model's input (1, 3, H, W) of an RGB array: rescaled, resized (Depth Anything), normalised."""
        import cv2

        x = rgb.astype(np.float32) * self.scale
        if self.resized:
            height, width = input_size(rgb.shape[0], rgb.shape[1], self.size, self.multiple)
            x = cv2.resize(x, (width, height), interpolation=cv2.INTER_CUBIC)
        x = (x - self.mean) / self.std
        return np.ascontiguousarray(x.transpose(2, 0, 1))[None]


def input_size(height: int, width: int, target: tuple[int, int], multiple: int) -> tuple[int, int]:
    """Depth Anything's input size for an image (its "lower bound" resize): the aspect kept, each side at least the
    target's, both multiples of ``multiple`` (rounded, or rounded up where rounding falls short)."""
    scale = max(target[0] / height, target[1] / width)

    def fit(value: float, least: int) -> int:
        out = round(value / multiple) * multiple
        return out if out >= least else math.ceil(value / multiple) * multiple

    return fit(scale * height, target[0]), fit(scale * width, target[1])


def normalised(depth: np.ndarray) -> np.ndarray:
    """A depth prediction as the extension's 8-bit map: its minimum 0, its maximum 255, truncated (a flat one: 0)."""
    low, high = float(depth.min()), float(depth.max())
    if not high > low:
        return np.zeros(depth.shape, np.uint8)
    return ((depth - low) / (high - low) * 255.0).clip(0, 255).astype(np.uint8)


def load(sources: Mapping[str, str], device: torch.device, dtype: torch.dtype,
         settings: Settings | None = None) -> dict[str, DepthEstimator]:
    """The configured modules' estimators (``base.preprocessors``: module -> source), each loaded once."""
    from deployments.weights import loader

    out: dict[str, DepthEstimator] = {}
    for module, source in sources.items():
        model, processor = loader.load_depth(source, module, dtype, settings)
        out[module] = DepthEstimator(module, model, processor, device, dtype)
    return out

