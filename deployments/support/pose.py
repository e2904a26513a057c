"""OpenPose body preprocessor of ControlNet units: the body keypoints of every person in the control image, drawn as
A1111's ControlNet extension (Mikubill/sd-webui-controlnet) draws them for its ``openpose`` module.

The model is CMU's body pose network (Cao et al., "Realtime Multi-Person 2D Pose Estimation using Part Affinity
Fields", 2017) as the extension loads it from lllyasviel/Annotators' ``body_pose_model.pth``: VGG-19's first ten
convolutions and two more, to 128 channels at 1/8 of the input, then six stages of two branches, the part affinity
fields (PAFs: an x and a y channel for each of 19 limbs, 38) and the part heatmaps (18 keypoints and the background,
19); each stage after the first reads the previous stage's two outputs beside the features. ``body_pose_network``
builds it with the release's state-dict keys (``conv1_1.weight`` ... ``Mconv7_stage6_L2.bias``), so the released file,
converted to safetensors as it is (``python -m deployments.weights.convert``), loads into it (``from_state_dict``);
``recognise`` tells such a state dict. The base's ``preprocessors.openpose`` names that file (or a folder holding it
as ``body_pose_model.safetensors``); a replica loads it once, at start (``load``, through ``loader.load_pose``), and
the module is offered only then. CMU licenses these weights for non-commercial use only.

The extension's ``openpose_hand``, ``openpose_face``, ``openpose_faceonly`` and ``openpose_full`` modules add each
person's hands and face, by CMU's hand and face networks, to these bodies (``pose_parts``); each is configured by
name, to a folder holding the networks it runs. Its ``dw_openpose_full`` and ``animal_openpose`` need DWPose and
animal models that are not served here (``UNSERVED``): a unit naming one is refused.

The map, as the extension makes it (``PoseEstimator``):

1. the image at ``processor_res`` (its shorter side, ``control.at_resolution``), padded on the right and bottom to
   multiples of 64 with its edge pixels, read as BGR (the network's training order);
2. at each scale of the search (the extension searches one: 0.5), the image resized to ``scale`` x 368 pixels high
   (area filter to shrink, Lanczos to enlarge), padded right and bottom to multiples of 8 with grey 128, read as
   ``x / 256 - 0.5``; the network's maps enlarged 8 times (Lanczos), the padding cut off, resized to the image's size;
   the maps averaged over the scales (``PoseEstimator.maps``);
3. ``peaks``: each keypoint's heatmap smoothed (Gaussian, sigma 3); a peak is a pixel not below its four neighbours
   and above 0.1, scored by the unsmoothed heatmap;
4. ``connections``: each limb's candidate pairs of peaks scored along the limb's PAF at 10 points from one to the
   other (the field projected on the pair's direction, averaged, less a penalty for pairs longer than half the image's
   height); a pair is kept where more than 80% of the points score above 0.05 and the average is positive, best
   first, each peak in one pair at most;
5. ``people``: the kept pairs grouped into people limb by limb (a pair joins the person holding one of its peaks,
   joins two people who share no keypoint into one, or starts a person); people with fewer than 4 keypoints, or an
   average score below 0.4, are dropped; ``bodies`` gives each one's keypoints as fractions of the image's size;
6. ``draw``: each person in turn on a black canvas of the padded size: 17 limbs as filled ellipses 9 pixels wide in
   their colours, the whole canvas dimmed to 60% (so an earlier person's limbs dim again with each later one), then
   the 18 keypoints as discs of radius 4; the padding cropped off.

Light to import (the config and the ingress may read its names): torch, OpenCV, SciPy and safetensors are imported
where used.
"""

from __future__ import annotations

import functools
import logging
import math
import threading
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
from PIL import Image

from deployments.support import releases

if TYPE_CHECKING:
    import torch

    from deployments.support.settings import Settings

logger = logging.getLogger(__name__)

# The extension's OpenPose modules (its keys, which are its labels too): the body alone, and with the hands, the face,
# the face alone (the body unseen), or all three (``pose_parts``).
POSE_MODULES = ("openpose", "openpose_hand", "openpose_face", "openpose_faceonly", "openpose_full")
PoseModule = Literal["openpose", "openpose_hand", "openpose_face", "openpose_faceonly", "openpose_full"]
# Its other pose modules: their DWPose and animal models are not served here, so a unit naming one is refused, told
# which ones are.
UNSERVED = ("dw_openpose_full", "animal_openpose")
# The extension's "Preprocessor Resolution" slider of its openpose modules: default, min, max.
POSE_RES = (512, 64, 2048)
FIELD = "preprocessors.openpose"
WEIGHTS = "body_pose_model.safetensors"  # the release's body_pose_model.pth, converted
PAD = 64  # the extension pads a preprocessor's input to multiples of 64 and crops its map back

# The search: scales of the box (the extension's one; CMU's demo searched 0.5, 1, 1.5 and 2), its height in pixels,
# the network's stride and the grey its input is padded with.
SCALES = (0.5,)
BOX_SIZE = 368
STRIDE = 8
PAD_VALUE = 128
SIGMA = 3.0  # the heatmaps' smoothing before peaks are found
PEAK_THRESHOLD = 0.1  # the extension's thre1: a peak's smoothed heatmap is above it
PAF_THRESHOLD = 0.05  # its thre2: a point along a limb counts where the PAF's projection is above it
MID_POINTS = 10  # its mid_num: the points sampled along a candidate limb
MIN_KEYPOINTS, MIN_SCORE = 4, 0.4  # a person has at least 4 keypoints and an average score of at least 0.4

# COCO's 18 keypoints in OpenPose's order.
KEYPOINTS = ("nose", "neck", "right_shoulder", "right_elbow", "right_wrist", "left_shoulder", "left_elbow",
             "left_wrist", "right_hip", "right_knee", "right_ankle", "left_hip", "left_knee", "left_ankle",
             "right_eye", "left_eye", "right_ear", "left_ear")
# The limbs (keypoint pairs) in the order the assembly takes them, and each one's x and y PAF channels.
LIMBS = ((1, 2), (1, 5), (2, 3), (3, 4), (5, 6), (6, 7), (1, 8), (8, 9), (9, 10), (1, 11), (11, 12), (12, 13),
         (1, 0), (0, 14), (14, 16), (0, 15), (15, 17), (2, 16), (5, 17))
PAF_CHANNELS = ((12, 13), (20, 21), (14, 15), (16, 17), (22, 23), (24, 25), (0, 1), (2, 3), (4, 5), (6, 7), (8, 9),
                (10, 11), (28, 29), (30, 31), (34, 35), (32, 33), (36, 37), (18, 19), (26, 27))
# The first 17 limbs start people and are drawn; the two ear-to-shoulder ones only join keypoints already placed.
DRAWN_LIMBS = 17
# The extension's colours (RGB), a limb's by its index, a keypoint's by its own.
COLOURS = ((255, 0, 0), (255, 85, 0), (255, 170, 0), (255, 255, 0), (170, 255, 0), (85, 255, 0), (0, 255, 0),
           (0, 255, 85), (0, 255, 170), (0, 255, 255), (0, 170, 255), (0, 85, 255), (0, 0, 255), (85, 0, 255),
           (170, 0, 255), (255, 0, 255), (255, 0, 170), (255, 0, 85))
STICK_WIDTH = 4  # a limb ellipse's half width
DOT_RADIUS = 4
DIM = 0.6  # the canvas's brightness after a person's limbs, before its keypoints

# The network: (layer name, in channels, out channels, kernel); the release's keys are "<name>.weight", "<name>.bias".
FEATURES, PAFS, HEATMAPS = 128, 2 * len(LIMBS), len(KEYPOINTS) + 1
STAGES = 6
# VGG-19's first ten convolutions, max-pooled by 2 after conv1_2, conv2_2 and conv3_4, and two down to 128 channels;
# a ReLU after each.
BACKBONE = (("conv1_1", 3, 64, 3), ("conv1_2", 64, 64, 3), ("conv2_1", 64, 128, 3), ("conv2_2", 128, 128, 3),
            ("conv3_1", 128, 256, 3), ("conv3_2", 256, 256, 3), ("conv3_3", 256, 256, 3), ("conv3_4", 256, 256, 3),
            ("conv4_1", 256, 512, 3), ("conv4_2", 512, 512, 3), ("conv4_3_CPM", 512, 256, 3),
            ("conv4_4_CPM", 256, 128, 3))
POOLED = ("conv1_2", "conv2_2", "conv3_4")

Layer = tuple[str, int, int, int]
Point = tuple[float, float]
Body = Sequence[Point | None]  # 18 keypoints, each (x / width, y / height) or None where not found


def branch(stage: int, kind: int) -> tuple[Layer, ...]:
    """The layers of a stage's branch (``kind`` 1: PAFs, 2: heatmaps). A ReLU follows each but the last, and the
    last too in the sixth stage's heatmaps: the original's list of unrectified layers names its PAF layer twice and
    its heatmap layer never, so the released heatmaps pass a ReLU."""
    out = PAFS if kind == 1 else HEATMAPS
    if stage == 1:
        return ((f"conv5_1_CPM_L{kind}", FEATURES, 128, 3), (f"conv5_2_CPM_L{kind}", 128, 128, 3),
                (f"conv5_3_CPM_L{kind}", 128, 128, 3), (f"conv5_4_CPM_L{kind}", 128, 512, 1),
                (f"conv5_5_CPM_L{kind}", 512, out, 1))
    return ((f"Mconv1_stage{stage}_L{kind}", FEATURES + PAFS + HEATMAPS, 128, 7),
            *((f"Mconv{i}_stage{stage}_L{kind}", 128, 128, 7) for i in range(2, 6)),
            (f"Mconv6_stage{stage}_L{kind}", 128, 128, 1), (f"Mconv7_stage{stage}_L{kind}", 128, out, 1))


def layers() -> list[Layer]:
    """Every convolution of the network: the backbone, then each stage's PAF and heatmap branches."""
    return [*BACKBONE, *(layer for stage in range(1, STAGES + 1) for kind in (1, 2) for layer in branch(stage, kind))]


def conv_shapes(convolutions: Sequence[Layer]) -> dict[str, tuple[int, ...]]:
    """The state dict of square convolutions ``(name, inputs, outputs, kernel)``: each key's shape."""
    shapes: dict[str, tuple[int, ...]] = {}
    for name, inputs, outputs, kernel in convolutions:
        shapes[f"{name}.weight"] = (outputs, inputs, kernel, kernel)
        shapes[f"{name}.bias"] = (outputs,)
    return shapes


def official_shapes() -> dict[str, tuple[int, ...]]:
    """The release's state dict: each key's shape."""
    return conv_shapes(layers())


@functools.cache
def _network_class() -> type:
    """The network's module class, defined on first use so that importing this module imports no torch."""
    import torch
    import torch.nn.functional as F
    from torch import nn

    class BodyPoseNetwork(nn.Module):
        """CMU's body pose network: ``(1, 3, H, W)`` (H and W multiples of 8) -> PAFs ``(1, 38, H/8, W/8)`` and
        heatmaps ``(1, 19, H/8, W/8)``."""

        def __init__(self) -> None:
            super().__init__()
            # Each convolution a direct child, by its layer name: the release's keys are exactly these.
            for name, inputs, outputs, kernel in layers():
                self.add_module(name, nn.Conv2d(inputs, outputs, kernel, padding=kernel // 2))

        def _branch(self, x: torch.Tensor, stage: int, kind: int) -> torch.Tensor:
            chain = branch(stage, kind)
            for n, (name, *_) in enumerate(chain):
                x = getattr(self, name)(x)
                if n < len(chain) - 1 or (stage == STAGES and kind == 2):
                    x = F.relu(x)
            return x

        def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            for name, *_ in BACKBONE:
                x = F.relu(getattr(self, name)(x))
                if name in POOLED:
                    x = F.max_pool2d(x, kernel_size=2, stride=2)
            features = x
            pafs, heatmaps = self._branch(features, 1, 1), self._branch(features, 1, 2)
            for stage in range(2, STAGES + 1):
                x = torch.cat([pafs, heatmaps, features], dim=1)
                pafs, heatmaps = self._branch(x, stage, 1), self._branch(x, stage, 2)
            return pafs, heatmaps

    return BodyPoseNetwork


def body_pose_network() -> torch.nn.Module:
    """A new body pose network (random weights, on the default device: build it under ``torch.device("meta")`` to
    load weights into it without initialising them)."""
    return _network_class()()


class PoseEstimator:
    """The body pose network on a device and dtype (a replica's: its device, float32, see ``load``), and the
    extension's ``openpose`` map of an image by it.
    Safe to call from several threads (the inference thread's units, ``/controlnet/detect``'s worker thread): one
    model call at a time."""

    def __init__(self, model: torch.nn.Module, device: torch.device, dtype: torch.dtype,
                 scales: Sequence[float] = SCALES) -> None:
        self.model = model.to(device=device, dtype=dtype).eval()
        self.device, self.dtype = device, dtype
        self.scales = tuple(scales)
        self._lock = threading.Lock()

    def __call__(self, image: Image.Image) -> Image.Image:
        """The pose map of ``image`` (already at the processor resolution): every person's body, RGB, black around."""
        rgb = np.asarray(image.convert("RGB"))
        height, width = rgb.shape[:2]
        padded = np.pad(rgb, ((0, -height % PAD), (0, -width % PAD), (0, 0)), mode="edge")
        canvas = draw(self.detect(padded), padded.shape[0], padded.shape[1])
        return Image.fromarray(np.ascontiguousarray(canvas[:height, :width]))

    def detect(self, rgb: np.ndarray) -> list[Body]:
        """Each person's keypoints in an RGB array, as fractions of its size."""
        return [fractions_of(body, rgb.shape[0], rgb.shape[1]) for body in self.keypoints(rgb)]

    def keypoints(self, rgb: np.ndarray) -> list[Body]:
        """Each person's keypoints in an RGB array, in its pixels (what the hands and faces are found from)."""
        heatmaps, pafs = self.maps(np.ascontiguousarray(rgb[..., ::-1]))  # the network reads BGR
        parts = peaks(heatmaps)
        return pixels(parts, people(parts, connections(parts, pafs, rgb.shape[0])))

    def maps(self, bgr: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The heatmaps (H, W, 19) and PAFs (H, W, 38) of a BGR array at its size, float64, averaged over the
        scales. (The original's heatmap sum doubles what it holds at each further scale; over its one scale the two
        agree.)"""
        height, width = bgr.shape[:2]
        heatmaps, pafs = np.zeros((height, width, HEATMAPS)), np.zeros((height, width, PAFS))
        for scale in self.scales:
            factor = scale * BOX_SIZE / height  # the box's height, whatever the width
            scaled = _resized(bgr, height * factor, width * factor)
            inner = (scaled.shape[0], scaled.shape[1])
            padded = np.pad(scaled, ((0, -inner[0] % STRIDE), (0, -inner[1] % STRIDE), (0, 0)),
                            constant_values=PAD_VALUE)
            small_pafs, small_heatmaps = self.infer(padded)
            heatmaps += _full_size(small_heatmaps, inner, (height, width)) / len(self.scales)
            pafs += _full_size(small_pafs, inner, (height, width)) / len(self.scales)
        return heatmaps, pafs

    def infer(self, bgr: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The network's PAFs and heatmaps of a BGR array (its sides multiples of 8), float32, (H/8, W/8, C)."""
        import torch

        x = np.ascontiguousarray((bgr.astype(np.float32) / 256 - 0.5).transpose(2, 0, 1))[None]
        pixels = torch.from_numpy(x).to(self.device, self.dtype)
        with self._lock, torch.inference_mode():
            pafs, heatmaps = self.model(pixels)
            return (pafs[0].float().permute(1, 2, 0).cpu().numpy(),
                    heatmaps[0].float().permute(1, 2, 0).cpu().numpy())


def _resized(x: np.ndarray, height: float, width: float) -> np.ndarray:
    """``x`` (H, W) or (H, W, C) at ``int(width)`` x ``int(height)`` as the extension's ``smart_resize`` does it: by
    area to shrink, Lanczos to enlarge, judged on the unrounded size."""
    import cv2

    if x.ndim == 3 and x.shape[2] > 4:  # OpenCV's area filter takes at most 4 channels: one at a time, as the original
        return np.stack([_resized(x[..., c], height, width) for c in range(x.shape[2])], axis=2)
    grows = (height + width) / (x.shape[0] + x.shape[1]) >= 1
    # At least a pixel: the extension's OpenCV call fails on a strip over 184 times as tall as it is wide.
    size = (max(1, int(width)), max(1, int(height)))
    return cv2.resize(x, size, interpolation=cv2.INTER_LANCZOS4 if grows else cv2.INTER_AREA)


def _full_size(small: np.ndarray, inner: tuple[int, int], size: tuple[int, int]) -> np.ndarray:
    """Network maps at the image's size: enlarged by the stride, the grey padding cut off (``inner``: the scaled
    image's size), resized to ``size``."""
    enlarged = _resized(small, small.shape[0] * STRIDE, small.shape[1] * STRIDE)
    return _resized(enlarged[:inner[0], :inner[1]], *size)


def peaks(heatmaps: np.ndarray, threshold: float = PEAK_THRESHOLD) -> list[np.ndarray]:
    """Each keypoint's candidates in heatmaps (H, W, 18 or more): one (n, 4) array per keypoint of x, y, score (the
    unsmoothed heatmap there) and id, in reading order (by y, then x); the ids number every candidate of every
    keypoint in turn, so they index the candidates concatenated."""
    from scipy.ndimage import gaussian_filter

    raw = np.asarray(heatmaps, np.float64)[..., :len(KEYPOINTS)]
    smooth = gaussian_filter(raw, sigma=(SIGMA, SIGMA, 0))
    around = np.pad(smooth, ((1, 1), (1, 1), (0, 0)))  # the original compares border pixels with zeros
    found = ((smooth >= around[:-2, 1:-1]) & (smooth >= around[2:, 1:-1]) & (smooth >= around[1:-1, :-2])
             & (smooth >= around[1:-1, 2:]) & (smooth > threshold))
    parts, first = [], 0
    for part in range(len(KEYPOINTS)):
        ys, xs = np.nonzero(found[..., part])
        ids = np.arange(first, first + len(xs))
        parts.append(np.stack([xs, ys, raw[ys, xs, part], ids], axis=1).astype(np.float64).reshape(-1, 4))
        first += len(xs)
    return parts


def connections(parts: Sequence[np.ndarray], pafs: np.ndarray, height: int,
                threshold: float = PAF_THRESHOLD) -> list[np.ndarray | None]:
    """Each limb's pairs of candidates (``peaks``) along its PAF (H, W, 38): an (m, 5) array of the two candidates'
    ids, the pair's score and the two candidates' indices in their keypoint's array, best first; None where a
    keypoint of the limb has no candidate. ``height``: the image's (a limb longer than half of it is penalised)."""
    limbs: list[np.ndarray | None] = []
    for (a, b), channels in zip(LIMBS, PAF_CHANNELS, strict=True):
        starts, ends = parts[a], parts[b]
        if not len(starts) or not len(ends):
            limbs.append(None)
            continue
        scores, kept = _pair_scores(starts[:, :2], ends[:, :2], pafs[..., channels], height, threshold)
        # Best first; among equal scores the original's order (start by start, end by end): a stable sort.
        order = np.argsort(-scores.ravel(), kind="stable")
        chosen: list[tuple[float, float, float, int, int]] = []
        for flat in order[kept.ravel()[order]]:
            i, j = divmod(int(flat), len(ends))
            if any(i == c[3] or j == c[4] for c in chosen):
                continue
            chosen.append((starts[i, 3], ends[j, 3], float(scores[i, j]), i, j))
            if len(chosen) >= min(len(starts), len(ends)):
                break
        limbs.append(np.array(chosen, np.float64).reshape(-1, 5))
    return limbs


def _pair_scores(starts: np.ndarray, ends: np.ndarray, field: np.ndarray, height: int,
                 threshold: float) -> tuple[np.ndarray, np.ndarray]:
    """Every (start, end) pair's score along a limb's PAF ``field`` (H, W, 2), and whether it is kept: arrays
    (starts, ends). The arithmetic is the original's, in its order, so that the same pairs win."""
    delta = ends[None, :, :] - starts[:, None, :]  # (n_start, n_end, xy)
    norm = np.maximum(np.sqrt(delta[..., 0] * delta[..., 0] + delta[..., 1] * delta[..., 1]), 0.001)
    direction = delta / norm[..., None]
    # numpy's linspace per pair: start + i * (end - start) / 9, the last point the end itself.
    steps = np.arange(MID_POINTS)[:, None] * (delta[..., None, :] / (MID_POINTS - 1)) + starts[:, None, None, :]
    steps[:, :, -1, :] = np.broadcast_to(ends[None, :, :], steps[:, :, -1, :].shape)
    cols, rows = np.rint(steps[..., 0]).astype(int), np.rint(steps[..., 1]).astype(int)  # half to even, as round()
    along = field[rows, cols, 0] * direction[..., 0, None] + field[rows, cols, 1] * direction[..., 1, None]
    mean = np.cumsum(along, axis=-1)[..., -1] / MID_POINTS  # summed in order, as Python's sum()
    scores = mean + np.minimum(0.5 * height / norm - 1, 0)
    kept = (np.count_nonzero(along > threshold, axis=-1) > 0.8 * MID_POINTS) & (scores > 0)
    return scores, kept


def people(parts: Sequence[np.ndarray], limbs: Sequence[np.ndarray | None]) -> np.ndarray:
    """The people the limbs (``connections``) assemble: an (n, 20) array, each row 18 candidate ids (-1: none), the
    total score and the number of keypoints, in the order the people were started."""
    candidates = _candidates(parts)
    rows: list[np.ndarray] = []
    for k, ((a, b), pairs) in enumerate(zip(LIMBS, limbs, strict=True)):
        if pairs is None:
            continue
        for id_a, id_b, score, _, _ in pairs:
            # The original keeps two holders at most (a third would be out of its list's range).
            holders = [n for n, row in enumerate(rows) if row[a] == id_a or row[b] == id_b][:2]
            if len(holders) == 1:
                row = rows[holders[0]]
                if row[b] != id_b:
                    row[b] = id_b
                    row[-1] += 1
                    row[-2] += candidates[int(id_b), 2] + score
            elif len(holders) == 2:
                first, second = rows[holders[0]], rows[holders[1]]
                if not ((first[:-2] >= 0) & (second[:-2] >= 0)).any():  # no keypoint in common: one person
                    first[:-2] += second[:-2] + 1
                    first[-2:] += second[-2:]
                    first[-2] += score
                    del rows[holders[1]]
                else:  # as with one holder, but the end replaces the first person's own
                    first[b] = id_b
                    first[-1] += 1
                    first[-2] += candidates[int(id_b), 2] + score
            elif k < DRAWN_LIMBS:
                row = np.full(len(KEYPOINTS) + 2, -1.0)
                row[a], row[b], row[-1] = id_a, id_b, 2
                row[-2] = candidates[int(id_a), 2] + candidates[int(id_b), 2] + score
                rows.append(row)
    kept = [row for row in rows if row[-1] >= MIN_KEYPOINTS and row[-2] / row[-1] >= MIN_SCORE]
    return np.array(kept, np.float64).reshape(-1, len(KEYPOINTS) + 2)


def bodies(parts: Sequence[np.ndarray], assembled: np.ndarray, height: int, width: int) -> list[Body]:
    """Each person's (``people``) 18 keypoints as fractions of the image's size, None where not found."""
    return [fractions_of(body, height, width) for body in pixels(parts, assembled)]


def pixels(parts: Sequence[np.ndarray], assembled: np.ndarray) -> list[Body]:
    """Each person's (``people``) 18 keypoints in pixels, None where not found."""
    candidates = _candidates(parts)
    return [[(float(candidates[i, 0]), float(candidates[i, 1])) if i != -1 else None
             for i in row[:len(KEYPOINTS)].astype(int)] for row in assembled]


def fractions_of(body: Body, height: int, width: int) -> Body:
    """A body's keypoints in pixels as fractions of the image's size (in float64, as the extension divides them)."""
    return [(point[0] / float(width), point[1] / float(height)) if point is not None else None for point in body]


def _candidates(parts: Sequence[np.ndarray]) -> np.ndarray:
    return np.concatenate([np.asarray(p, np.float64).reshape(-1, 4) for p in parts]) if parts else np.zeros((0, 4))


def draw(people_keypoints: Sequence[Body], height: int, width: int) -> np.ndarray:
    """The extension's pose map: each body drawn in turn (``draw_body``) on a black RGB canvas (height, width, 3)."""
    canvas = np.zeros((height, width, 3), np.uint8)
    for body in people_keypoints:
        canvas = draw_body(canvas, body)
    return canvas


def draw_body(canvas: np.ndarray, body: Body) -> np.ndarray:
    """``canvas`` with one body drawn as the extension's ``draw_bodypose`` draws it: its 17 limbs as ellipses in
    their colours, the canvas dimmed to 60%, its keypoints as discs in theirs. Keypoints are fractions of the
    canvas's size (pixels are ``int(x * width)``, as the original truncates)."""
    import cv2

    height, width = canvas.shape[:2]
    canvas = canvas.copy()
    for (a, b), colour in zip(LIMBS[:DRAWN_LIMBS], COLOURS, strict=False):
        start, end = body[a], body[b]
        if start is None or end is None:
            continue
        xs = np.array([start[0], end[0]]) * float(width)
        ys = np.array([start[1], end[1]]) * float(height)
        length = ((ys[0] - ys[1]) ** 2 + (xs[0] - xs[1]) ** 2) ** 0.5
        angle = math.degrees(math.atan2(ys[0] - ys[1], xs[0] - xs[1]))
        polygon = cv2.ellipse2Poly((int(np.mean(xs)), int(np.mean(ys))), (int(length / 2), STICK_WIDTH), int(angle),
                                   0, 360, 1)
        cv2.fillConvexPoly(canvas, polygon, colour)
    canvas = (canvas * DIM).astype(np.uint8)
    for point, colour in zip(body, COLOURS, strict=False):
        if point is not None:
            cv2.circle(canvas, (int(point[0] * width), int(point[1] * height)), DOT_RADIUS, colour, thickness=-1)
    return canvas


def recognise(state_dict: Mapping[str, Any]) -> bool:
    """Whether a state dict is the body pose network's, as the release ships it: its keys, each of its shape."""
    return not mismatches(state_dict)


def mismatches(state_dict: Mapping[str, Any]) -> dict[str, list[str]]:
    """How a state dict differs from the release's: its ``missing``, ``unexpected`` and ``wrong_shape`` keys,
    sorted (an empty dict: none)."""
    return releases.mismatches(official_shapes(), state_dict)


def from_state_dict(state_dict: Mapping[str, torch.Tensor]) -> torch.nn.Module:
    """The body pose network holding ``state_dict``'s tensors themselves (no copy), which must be the release's
    exactly (``recognise``; the loader says how one is not)."""
    import torch

    with torch.device("meta"):  # no random start for weights about to be replaced
        model = body_pose_network()
    model.load_state_dict(state_dict, strict=True, assign=True)
    return model.eval()


def load(sources: Mapping[str, str], device: torch.device,
         settings: Settings | None = None) -> dict[str, Any]:
    """The configured pose modules' maps (``base.preprocessors``: module -> source), each network loaded once:
    ``openpose``'s estimator (a file, or a folder holding it), and the other modules' ``pose_parts.WholePose`` (a
    folder holding the networks each runs); modules naming the same source share its networks.

    The networks run in float32 whatever the replica's dtype, as the extension runs them: its ``Body``, ``Hand`` and
    ``Face`` load the releases' float32 weights, its ``OpenposeDetector`` moves them to the ControlNet device without
    a cast, and the input is ``.float()``. The decoding thresholds the heatmaps (0.1) and the PAFs (0.05) and keeps
    the first of equal scores, so half precision's rounding could add or drop a keypoint or a limb, and a replica's
    map would depend on its dtype; the body network is 52 M weights, 209 MB in float32."""
    import torch

    from deployments.support import pose_parts
    from deployments.weights import loader

    made: dict[tuple[str, str], Any] = {}

    def network(kind: str, module: str, source: str) -> Any:
        if (kind, source) not in made:
            model = loader.load_pose(source, settings, kind, module)
            estimator = {"body": PoseEstimator, "hand": pose_parts.HandEstimator, "face": pose_parts.FaceEstimator}
            made[kind, source] = estimator[kind](model, device, torch.float32)
        return made[kind, source]

    out: dict[str, Any] = {}
    for module, source in sources.items():
        found = {kind: network(kind, module, source) for kind in pose_parts.networks(module)}
        out[module] = found["body"] if module == "openpose" else pose_parts.WholePose(
            module, found["body"], found.get("hand"), found.get("face"))
    return out
