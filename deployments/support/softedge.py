"""Soft-edge and scribble preprocessors of ControlNet units: an edge network's map of the control image, as A1111's
ControlNet extension (Mikubill/sd-webui-controlnet) makes it for its ``softedge_hed``, ``softedge_hedsafe``,
``softedge_pidinet``, ``softedge_pidisafe``, ``scribble_hed`` and ``scribble_pidinet`` modules (its labels; its keys
are ``hed``, ``hed_safe``, ``pidinet``, ``pidinet_safe``, ``scribble_hed`` and ``pidinet_scribble``, and its first
releases called scribble_hed ``fake_scribble``).

Two networks (``softedge_nets``) serve the six: HED (lllyasviel/Annotators' ``ControlNetHED.pth``, 14.7 M weights)
the three ``hed`` ones, PiDiNet (``table5_pidinet.pth``, 0.7 M) the three ``pidi`` ones. Each module is configured
by name in the base's ``preprocessors``: a ``.safetensors`` file converted from the release by ``python -m
deployments.weights.convert``, or a folder holding it by the converted name (``ControlNetHED.safetensors``,
``table5_pidinet.safetensors``); modules naming the same source share one network. A replica loads them once, at
start, on its device (``load``); a module whose network is not configured is not offered. They run in float32
whatever the replica's dtype, as the extension runs them: the maps are truncated to 8 bits and the scribbles
thresholded, so half precision would move their pixels.

Every map is made as the extension makes it: the image at ``processor_res`` (its shorter side,
``control.at_resolution``), padded on the right and bottom to multiples of 64 with its edge pixels, the network's
edge probability of the padded image, then

- HED: RGB 0..255 in; its five side outputs each resized to the padded size (OpenCV, bilinear), averaged, squashed
  by a sigmoid (in float64); PiDiNet: BGR / 255 in; its fused output (a sigmoid already);
- the ``safe`` modules: the probability quantised to halves, ``floor(3p) / 2`` (0, 0.5, 1 or 1.5), so that the map
  is 0, 127 or 255 and no faint texture survives;
- times 255, truncated to 8 bits, the padding cropped off;
- the scribbles: that map blurred (Gaussian, sigma 3), thinned to its ridges (a pixel kept where it is the largest
  of its three along some direction, ``control_maps.nms``), those above 127 set white, blurred again (sigma 3) and
  every pixel above 4 set white: bold white strokes on black;
- the one channel repeated to three.

This module is imported by the config and the ingress: torch and OpenCV are imported where used.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Mapping
from typing import TYPE_CHECKING, Literal

import numpy as np
from PIL import Image

from deployments.support.lineart import padded

if TYPE_CHECKING:
    import torch

    from deployments.support.settings import Settings

logger = logging.getLogger(__name__)

SOFTEDGE_MODULES = ("softedge_hed", "softedge_hedsafe", "softedge_pidinet", "softedge_pidisafe", "scribble_hed",
                    "scribble_pidinet")
SoftedgeModule = Literal["softedge_hed", "softedge_hedsafe", "softedge_pidinet", "softedge_pidisafe", "scribble_hed",
                         "scribble_pidinet"]
# The extension's keys where they are not our names (its labels are our names).
KEYS = {"softedge_hed": "hed", "softedge_hedsafe": "hed_safe", "softedge_pidinet": "pidinet",
        "softedge_pidisafe": "pidinet_safe", "scribble_pidinet": "pidinet_scribble"}
# The names the extension's clients send: its keys, its labels, and scribble_hed's first key.
ALIASES = {**{key: m for m, key in KEYS.items()}, "fake_scribble": "scribble_hed", **{m: m for m in SOFTEDGE_MODULES}}
# The network (softedge_nets.HED / PIDINET) each module runs; the SAFE ones quantise its map, the SCRIBBLE ones
# scribble it.
ARCHITECTURES = {"softedge_hed": "hed", "softedge_hedsafe": "hed", "scribble_hed": "hed",
                 "softedge_pidinet": "pidinet", "softedge_pidisafe": "pidinet", "scribble_pidinet": "pidinet"}
NETWORKS = {"hed": "HED", "pidinet": "PiDiNet"}  # as messages name them
SAFE = ("softedge_hedsafe", "softedge_pidisafe")
SCRIBBLE = ("scribble_hed", "scribble_pidinet")
# Each network's converted file: what a folder source is read by.
WEIGHTS = {"hed": "ControlNetHED.safetensors", "pidinet": "table5_pidinet.safetensors"}
# The extension's "Preprocessor Resolution" slider of every soft-edge module (default, min, max): the HED modules
# configure theirs (stepped by 8, as every configured slider); the PiDiNet ones have none and show its default one,
# with the same bounds (step 1). control.SLIDERS holds the steps.
SOFTEDGE_RES = (512, 64, 2048)
SAFE_STEPS = 2  # the extension's safe_step: the probability in steps of 1 / 2, after tripling
SCRIBBLE_SIGMA, SCRIBBLE_RIDGE, SCRIBBLE_FLOOR = 3.0, 127, 4  # the scribbles' blurs, ridge threshold, final threshold


def safe_step(probability: np.ndarray, steps: int = SAFE_STEPS) -> np.ndarray:
    """The extension's ``safe_step``: ``probability`` (float) tripled in float32 and truncated to an integer, over
    ``steps``: 0, 0.5, 1 or 1.5 for 0..1."""
    tripled = probability.astype(np.float32) * np.float32(steps + 1)
    return tripled.astype(np.int32).astype(np.float32) / np.float32(steps)


def scribble(edges: np.ndarray) -> np.ndarray:
    """The extension's scribble of an 8-bit soft-edge map: blurred (sigma 3, float32), its ridges above 127 white
    (``control_maps.nms``), blurred again (8-bit), every pixel above 4 white, the rest black."""
    import cv2

    from deployments.support.control_maps import nms

    ridges = nms(cv2.GaussianBlur(edges.astype(np.float32), (0, 0), SCRIBBLE_SIGMA))
    strokes = np.where(ridges > SCRIBBLE_RIDGE, 255, 0).astype(np.uint8)
    spread = cv2.GaussianBlur(strokes, (0, 0), SCRIBBLE_SIGMA)
    return np.where(spread > SCRIBBLE_FLOOR, 255, 0).astype(np.uint8)


class EdgeNetwork:
    """HED or PiDiNet on a replica's device (float32), giving an RGB array's edge probability at its size. Safe to
    call from several threads (the inference thread's units, ``/controlnet/detect``'s worker thread, the modules
    sharing it): one network call at a time."""

    def __init__(self, kind: str, net, device: torch.device) -> None:
        import torch

        self.kind = kind
        self.net = net.to(device=device, dtype=torch.float32).eval()
        self.device = device
        self._lock = threading.Lock()

    def probability(self, rgb: np.ndarray) -> np.ndarray:
        """The edge probability (H, W) of an (H, W, 3) uint8 RGB array whose sides are multiples of 16: HED's
        float64, PiDiNet's float32."""
        import cv2
        import torch

        hed = self.kind == "hed"
        x = rgb.astype(np.float32) if hed else rgb[..., ::-1].astype(np.float32) / np.float32(255.0)
        pixels = torch.from_numpy(np.ascontiguousarray(x.transpose(2, 0, 1)))[None].to(self.device)
        with self._lock, torch.inference_mode():
            out = self.net(pixels)
            maps = [side[0, 0].float().cpu().numpy() for side in (out if hed else [out])]
        if not hed:
            return maps[0]
        height, width = rgb.shape[:2]
        sides = np.stack([cv2.resize(m, (width, height), interpolation=cv2.INTER_LINEAR) for m in maps], axis=2)
        mean = np.mean(sides, axis=2).astype(np.float64)  # numpy's float32 mean, as the extension takes it
        return 1.0 / (1.0 + np.exp(-mean))


class SoftEdgeDetector:
    """One module's map by its network (shared with the other modules configured from the same source)."""

    def __init__(self, module: str, network: EdgeNetwork) -> None:
        self.module, self.network = module, network

    def __call__(self, image: Image.Image) -> Image.Image:
        """The map of ``image`` (already at the processor resolution): 8-bit, edges bright, RGB."""
        rgb = np.asarray(image.convert("RGB"))
        height, width = rgb.shape[:2]
        probability = self.network.probability(padded(rgb))
        if self.module in SAFE:
            probability = safe_step(probability)
        edges = (probability * 255.0).clip(0, 255).astype(np.uint8)[:height, :width]
        if self.module in SCRIBBLE:  # of the cropped map, as the extension scribbles the map it made
            edges = scribble(edges)
        return Image.fromarray(np.ascontiguousarray(edges)).convert("RGB")


def load(sources: Mapping[str, str], device: torch.device,
         settings: Settings | None = None) -> dict[str, SoftEdgeDetector]:
    """The configured soft-edge and scribble modules' detectors (``base.preprocessors``: module -> source), each
    network loaded once: modules of the same network naming the same source share it."""
    from deployments.weights import loader

    networks: dict[tuple[str, str], EdgeNetwork] = {}
    out = {}
    for module, source in sources.items():
        key = (ARCHITECTURES[module], source)
        if key not in networks:
            networks[key] = EdgeNetwork(key[0], loader.load_softedge(source, module, settings), device)
        out[module] = SoftEdgeDetector(module, networks[key])
    return out
