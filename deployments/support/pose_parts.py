"""OpenPose's hands and faces for the ControlNet extension's (Mikubill/sd-webui-controlnet) ``openpose_hand``,
``openpose_face``, ``openpose_faceonly`` and ``openpose_full`` modules: the body network's people (``pose``), each
one's hands and face found from its body keypoints, drawn as the extension's ``OpenposeDetector`` draws them.

The networks are CMU's hand (Simon et al., "Hand Keypoint Detection in Single Images using Multiview Bootstrapping",
2017) and face keypoint networks as lllyasviel/Annotators ships them, ``hand_pose_model.pth`` (21 keypoints and the
background: 22 heatmaps) and ``facenet.pth`` (70 and the background: 71). Both are one architecture (``part_network``):
VGG-19's first convolutions to 512 channels at 1/8 of the input and one down to 128 (``conv5_3_CPM``), a first stage
of two 1x1 convolutions to the heatmaps, then five stages of seven that read the previous heatmaps beside the
features; a ReLU after every convolution but each stage's last. The release's state-dict keys are the layers' names
(``conv1_1.weight`` ... ``Mconv7_stage6.bias``); converted to safetensors as they are (``python -m
deployments.weights.convert``: ``hand_pose_model.safetensors``, ``facenet.safetensors``) they load into it
(``from_state_dict``), and ``recognise`` tells each. CMU licenses these weights for non-commercial use only.

A module is configured as ``openpose`` is, by name in the base's ``preprocessors``, but to a folder: it reads
``body_pose_model.safetensors`` and, as it needs them, ``hand_pose_model.safetensors`` and ``facenet.safetensors``
there (``NETWORKS``); modules naming the same folder share its networks. The map (``WholePose``), as the extension
makes it:

1. the image at ``processor_res``, padded to multiples of 64 with its edge pixels, its people found by the body
   network as ``openpose`` finds them (``pose.PoseEstimator``), their keypoints in pixels;
2. ``hand_boxes`` (the extension's ``handDetect``, after OpenPose's hand detector): for each arm whose shoulder,
   elbow and wrist were found, a square centred a third of the forearm beyond the wrist, 1.5 times the longer of
   the forearm and 0.9 of the upper arm wide, clipped to the image, kept where at least 20 pixels wide;
3. ``HandEstimator`` (its ``Hand``): the box blurred (Gaussian, sigma 0.8) and at each of four scales resized to
   184, 368, 552 and 736 pixels square (area filter to shrink, Lanczos to enlarge), padded to multiples of 8 with
   grey 128, read as ``x / 256 - 0.5``; the heatmaps enlarged 8 times (Lanczos), the padding cut off, resized to
   128 x 128 and averaged over the scales; ``hand_peaks``: each keypoint's heatmap smoothed (Gaussian, sigma 3),
   the connected region (8-neighbours) above 0.05 whose unsmoothed heatmap sums highest kept, the unsmoothed
   maximum in it the keypoint, scaled to the box's pixels (truncated); (0, 0) where nothing is above 0.05;
4. ``face_box`` (its ``faceDetect``): around the nose, where an eye or an ear was found, a square 6 times the
   nose's larger distance to an eye or 3 times its distance to an ear (the largest of those), clipped to the image
   as the extension clips it, kept where at least 20 pixels wide;
5. ``FaceEstimator`` (its ``Face``): the box resized to 384 x 384 (area or Lanczos), read as ``x / 256 - 0.5``, the
   last stage's heatmaps resized to the box's size (bilinear, corners aligned); ``face_peaks``: for each of the 71
   heatmaps (the background's too), its first largest value above 0.05, in reading order; none where none is;
6. the keypoints as fractions of the image's size, in float32 (a coordinate of 0 in its box is ``-1``, never drawn),
   and ``draw``: for each person in turn its body (``pose.draw_body``, unless the module draws faces alone), its
   left then right hand (20 edges 2 pixels wide, coloured round the hue circle, then its keypoints as blue discs of
   radius 4) and its face (white discs of radius 3); a keypoint's pixel is its fraction times the size in float64,
   truncated, as numpy 1.x multiplies the extension's float32 fractions; the padding cropped off.

Light to import (the config and the ingress read its names): torch, OpenCV and SciPy are imported where used.
"""

from __future__ import annotations

import colorsys
import functools
import math
import threading
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any, NamedTuple

import numpy as np
from PIL import Image

from deployments.support import pose, releases

if TYPE_CHECKING:
    import torch

# What each pose module draws: (the body, the hands, the face), as the extension's modules set include_body,
# include_hand and include_face. A module runs the body network, and the hand and face networks where it draws them.
DRAWS = {"openpose": (True, False, False), "openpose_hand": (True, True, False), "openpose_face": (True, False, True),
         "openpose_faceonly": (False, False, True), "openpose_full": (True, True, True)}
PART_MODULES = tuple(m for m in DRAWS if m != "openpose")
WEIGHTS = {"body": pose.WEIGHTS, "hand": "hand_pose_model.safetensors", "face": "facenet.safetensors"}
RELEASES = {"body": "body_pose_model.pth", "hand": "hand_pose_model.pth", "face": "facenet.pth"}
TITLES = {"body": "OpenPose's body pose network", "hand": "OpenPose's hand pose network",
          "face": "OpenPose's face network"}
MAPS = {"hand": 22, "face": 71}  # each network's heatmaps: its keypoints and the background
HAND_KEYPOINTS = 21


def networks(module: str) -> tuple[str, ...]:
    """The networks a pose module runs: the body's, and the hand's and face's where it draws them."""
    _, hands, face = DRAWS[module]
    return ("body", *(("hand",) if hands else ()), *(("face",) if face else ()))


def needs(module: str) -> str:
    """What a pose module runs, in words: "OpenPose's body and hand networks"."""
    names = networks(module)
    listed = names[0] if len(names) == 1 else f"{', '.join(names[:-1])} and {names[-1]}"
    return f"OpenPose's {listed} network{'s' if len(names) > 1 else ''}"


# --- the network ----------------------------------------------------------------------------------------------------

FEATURES = 128
# VGG-19's first convolutions to 512 channels, max-pooled by 2 after conv1_2, conv2_2 and conv3_4, and one down to
# 128: (name, in, out, kernel).
BACKBONE = (("conv1_1", 3, 64, 3), ("conv1_2", 64, 64, 3), ("conv2_1", 64, 128, 3), ("conv2_2", 128, 128, 3),
            ("conv3_1", 128, 256, 3), ("conv3_2", 256, 256, 3), ("conv3_3", 256, 256, 3), ("conv3_4", 256, 256, 3),
            ("conv4_1", 256, 512, 3), ("conv4_2", 512, 512, 3), ("conv4_3", 512, 512, 3), ("conv4_4", 512, 512, 3),
            ("conv5_1", 512, 512, 3), ("conv5_2", 512, 512, 3), ("conv5_3_CPM", 512, FEATURES, 3))
POOLED = ("conv1_2", "conv2_2", "conv3_4")
STAGES = 6


def stage(number: int, maps: int) -> tuple[pose.Layer, ...]:
    """A stage's convolutions; a ReLU follows each but the last."""
    if number == 1:
        return (("conv6_1_CPM", FEATURES, 512, 1), ("conv6_2_CPM", 512, maps, 1))
    return ((f"Mconv1_stage{number}", FEATURES + maps, 128, 7),
            *((f"Mconv{i}_stage{number}", 128, 128, 7) for i in range(2, 6)),
            (f"Mconv6_stage{number}", 128, 128, 1), (f"Mconv7_stage{number}", 128, maps, 1))


def layers(kind: str) -> list[pose.Layer]:
    """Every convolution of the hand or face network: the backbone, then the six stages."""
    return [*BACKBONE, *(layer for n in range(1, STAGES + 1) for layer in stage(n, MAPS[kind]))]


def official_shapes(kind: str) -> dict[str, tuple[int, ...]]:
    """The release's state dict of the ``hand`` or ``face`` network: each key's shape."""
    return pose.conv_shapes(layers(kind))


@functools.cache
def _network_class() -> type:
    """The networks' module class, defined on first use so that importing this module imports no torch."""
    import torch
    import torch.nn.functional as F
    from torch import nn

    class PartNetwork(nn.Module):
        """CMU's hand or face keypoint network: ``(1, 3, H, W)`` (H and W multiples of 8) -> the last stage's
        heatmaps ``(1, maps, H/8, W/8)``."""

        def __init__(self, maps: int) -> None:
            super().__init__()
            self.maps = maps
            for name, inputs, outputs, kernel in [*BACKBONE, *(lr for n in range(1, STAGES + 1)
                                                               for lr in stage(n, maps))]:
                self.add_module(name, nn.Conv2d(inputs, outputs, kernel, padding=kernel // 2))

        def _stage(self, x: torch.Tensor, number: int) -> torch.Tensor:
            chain = stage(number, self.maps)
            for n, (name, *_) in enumerate(chain):
                x = getattr(self, name)(x)
                if n < len(chain) - 1:
                    x = F.relu(x)
            return x

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            for name, *_ in BACKBONE:
                x = F.relu(getattr(self, name)(x))
                if name in POOLED:
                    x = F.max_pool2d(x, kernel_size=2, stride=2)
            features = x
            maps = self._stage(features, 1)
            for number in range(2, STAGES + 1):
                maps = self._stage(torch.cat([maps, features], dim=1), number)
            return maps

    return PartNetwork


def part_network(kind: str) -> torch.nn.Module:
    """A new ``hand`` or ``face`` network (random weights, on the default device; under ``torch.device("meta")`` to
    load weights into it without initialising them)."""
    return _network_class()(MAPS[kind])


def mismatches(kind: str, state_dict: Mapping[str, Any]) -> dict[str, list[str]]:
    """How a state dict differs from the ``body``, ``hand`` or ``face`` release's: its ``missing``, ``unexpected``
    and ``wrong_shape`` keys, sorted (an empty dict: none)."""
    return pose.mismatches(state_dict) if kind == "body" else releases.mismatches(official_shapes(kind), state_dict)


def recognise(kind: str, state_dict: Mapping[str, Any]) -> bool:
    """Whether a state dict is the ``hand`` or ``face`` network's as the release ships it: its keys and shapes."""
    return not mismatches(kind, state_dict)


def from_state_dict(kind: str, state_dict: Mapping[str, torch.Tensor]) -> torch.nn.Module:
    """The ``body``, ``hand`` or ``face`` network holding ``state_dict``'s tensors themselves (no copy), which must be
    the release's exactly."""
    import torch

    if kind == "body":
        return pose.from_state_dict(state_dict)
    with torch.device("meta"):  # no random start for weights about to be replaced
        model = part_network(kind)
    model.load_state_dict(state_dict, strict=True, assign=True)
    return model.eval()


class _Network:
    """A hand or face network on a device and dtype; one model call at a time (a replica's threads share it)."""

    def __init__(self, model: torch.nn.Module, device: torch.device, dtype: torch.dtype) -> None:
        self.model = model.to(device=device, dtype=dtype).eval()
        self.device, self.dtype = device, dtype
        self._lock = threading.Lock()

    def _run(self, x: np.ndarray) -> torch.Tensor:
        """The network's heatmaps of a (1, 3, H, W) float32 array, on the device."""
        import torch

        pixels = torch.from_numpy(np.ascontiguousarray(x)).to(self.device, self.dtype)
        with self._lock, torch.inference_mode():
            return self.model(pixels).float()


# --- hands ----------------------------------------------------------------------------------------------------------

HAND_SCALES = (0.5, 1.0, 1.5, 2.0)  # of the box size: 184, 368, 552 and 736 pixels square
HAND_BLUR = 0.8  # the box's Gaussian blur before the search
HAND_GRID = 128  # the heatmaps' size, averaged over the scales
HAND_THRESHOLD = 0.05  # a keypoint's smoothed heatmap is above it
RATIO_WRIST_ELBOW = 0.33  # the box's centre: this much of the forearm beyond the wrist
MIN_BOX = 20  # a hand's or face's box is at least this wide
# The arms, as the extension takes them: (shoulder, elbow, wrist, is the left one), the left first.
ARMS = ((5, 6, 7, True), (2, 3, 4, False))

Box = tuple[int, int, int]  # x, y (the top left corner) and the side, in pixels
Pixels = Sequence[pose.Point | None]  # a body's 18 keypoints in pixels


class HandBox(NamedTuple):
    x: int
    y: int
    side: int
    left: bool


def hand_boxes(body: Pixels, height: int, width: int) -> list[HandBox]:
    """The boxes of a body's hands (its keypoints in pixels of a ``height`` x ``width`` image), the left one first,
    as the extension's ``handDetect`` places them."""
    boxes = []
    for shoulder, elbow, wrist, left in ARMS:
        if body[shoulder] is None or body[elbow] is None or body[wrist] is None:
            continue
        (x1, y1), (x2, y2), (x3, y3) = body[shoulder], body[elbow], body[wrist]  # type: ignore[misc]
        x = x3 + RATIO_WRIST_ELBOW * (x3 - x2)
        y = y3 + RATIO_WRIST_ELBOW * (y3 - y2)
        forearm = math.sqrt((x3 - x2) ** 2 + (y3 - y2) ** 2)
        upper_arm = math.sqrt((x2 - x1) ** 2 + (y2 - y1) ** 2)
        side = 1.5 * max(forearm, 0.9 * upper_arm)
        x, y = max(x - side / 2, 0), max(y - side / 2, 0)
        side = min(side if x + side <= width else width - x, side if y + side <= height else height - y)
        if side >= MIN_BOX:
            boxes.append(HandBox(int(x), int(y), int(side), left))
    return boxes


class HandEstimator(_Network):
    """The hand network and the extension's hand keypoints of a box by it (``Hand``)."""

    def __init__(self, model: torch.nn.Module, device: torch.device, dtype: torch.dtype,
                 scales: Sequence[float] = HAND_SCALES) -> None:
        super().__init__(model, device, dtype)
        self.scales = tuple(scales)

    def __call__(self, bgr: np.ndarray) -> np.ndarray:
        """A BGR box's 21 keypoints, (21, 2) integer x, y in its pixels; (0, 0) where not found."""
        return hand_peaks(self.maps(bgr), bgr.shape[0], bgr.shape[1])

    def maps(self, bgr: np.ndarray) -> np.ndarray:
        """The heatmaps (128, 128, 22) of a BGR box, float64, averaged over the scales."""
        import cv2

        blurred = cv2.GaussianBlur(bgr, (0, 0), HAND_BLUR)
        heatmaps = np.zeros((HAND_GRID, HAND_GRID, MAPS["hand"]))
        for scale in self.scales:
            size = scale * pose.BOX_SIZE
            scaled = pose._resized(blurred, size, size)
            inner = (scaled.shape[0], scaled.shape[1])
            padded = np.pad(scaled, ((0, -inner[0] % pose.STRIDE), (0, -inner[1] % pose.STRIDE), (0, 0)),
                            constant_values=pose.PAD_VALUE)
            small = self.infer(padded)
            heatmaps += pose._full_size(small, inner, (HAND_GRID, HAND_GRID)) / len(self.scales)
        return heatmaps

    def infer(self, bgr: np.ndarray) -> np.ndarray:
        """The network's heatmaps of a BGR array (its sides multiples of 8), float32, (H/8, W/8, 22)."""
        x = (bgr.astype(np.float32) / 256 - 0.5).transpose(2, 0, 1)[None]
        return self._run(x)[0].permute(1, 2, 0).cpu().numpy()


def hand_peaks(heatmaps: np.ndarray, height: int, width: int, threshold: float = HAND_THRESHOLD) -> np.ndarray:
    """Each hand keypoint of heatmaps (128, 128, 22 or more) in a box ``height`` x ``width``: (21, 2) integer x, y,
    (0, 0) where its smoothed heatmap is nowhere above ``threshold``."""
    from scipy.ndimage import gaussian_filter, label

    grid = heatmaps.shape[0]
    found = []
    for part in range(HAND_KEYPOINTS):
        raw = np.array(heatmaps[..., part], np.float64)
        above = gaussian_filter(raw, sigma=pose.SIGMA) > threshold
        if not above.any():
            found.append((0, 0))
            continue
        regions, count = label(above, structure=np.ones((3, 3)))  # numbered in reading order of their first pixel
        sums = [raw[regions == n].sum() for n in range(1, count + 1)]
        raw[regions != int(np.argmax(sums)) + 1] = 0  # the first of equal sums, as the original's argmax
        y, x = np.unravel_index(int(np.argmax(raw)), raw.shape)  # the first largest in reading order
        found.append((int(float(x) * float(width) / float(grid)), int(float(y) * float(height) / float(grid))))
    return np.array(found, dtype=np.int64)


# --- faces ----------------------------------------------------------------------------------------------------------

FACE_SIZE = 384  # the box is resized to this square for the network
FACE_THRESHOLD = 0.05
NOSE, EYES, EARS = 0, (14, 15), (16, 17)


def face_box(body: Pixels, height: int, width: int) -> Box | None:
    """The box of a body's face (its keypoints in pixels of a ``height`` x ``width`` image), as the extension's
    ``faceDetect`` places it; None without a nose, without an eye or an ear, or under 20 pixels wide. Its side may
    pass the image's edge (the extension clips it so): the box then reads what of it is inside."""
    nose = body[NOSE]
    if nose is None or all(body[k] is None for k in (*EYES, *EARS)):
        return None
    half = 0.0
    for keypoint, factor in ((EYES[0], 3.0), (EYES[1], 3.0), (EARS[0], 1.5), (EARS[1], 1.5)):
        point = body[keypoint]
        if point is not None:
            half = max(half, max(abs(nose[0] - point[0]), abs(nose[1] - point[1])) * factor)
    x, y = max(nose[0] - half, 0), max(nose[1] - half, 0)
    # The original compares the half side, not the side, with the room left.
    side = min(width - x if x + half > width else half * 2, height - y if y + half > height else half * 2)
    return (int(x), int(y), int(side)) if side >= MIN_BOX else None


class FaceEstimator(_Network):
    """The face network and the extension's face keypoints of a box by it (``Face``)."""

    def __call__(self, bgr: np.ndarray) -> np.ndarray:
        """A BGR box's face keypoints, (n, 2) integer x, y in its pixels, n at most 71 (``face_peaks``)."""
        return face_peaks(self.heatmaps(bgr))

    def heatmaps(self, bgr: np.ndarray) -> np.ndarray:
        """The last stage's heatmaps (71, H, W) of a BGR box at its size, float32."""
        import torch.nn.functional as F

        scaled = pose._resized(bgr, FACE_SIZE, FACE_SIZE)
        x = (scaled.astype(np.float32) / 256 - 0.5).transpose(2, 0, 1)[None]
        maps = self._run(x)
        return F.interpolate(maps, bgr.shape[:2], mode="bilinear", align_corners=True)[0].cpu().numpy()


def face_peaks(heatmaps: np.ndarray, threshold: float = FACE_THRESHOLD) -> np.ndarray:
    """Each heatmap's (maps, H, W) first largest value above ``threshold`` in reading order, as (n, 2) integer x, y:
    one row per heatmap that has one (a heatmap with none adds no row, so the rows after it move up)."""
    found = []
    for heatmap in heatmaps:
        above = np.where(heatmap > threshold, heatmap, -np.inf)
        if np.isfinite(above).any():
            y, x = np.unravel_index(int(np.argmax(above)), heatmap.shape)
            found.append((int(x), int(y)))
    return np.array(found, dtype=np.int64).reshape(-1, 2)


# --- the map --------------------------------------------------------------------------------------------------------

EPS = 0.01  # a keypoint is drawn where both its pixel coordinates are above it (0 and -1 are not)
# The hand's edges, from the wrist (0) along each finger.
HAND_EDGES = ((0, 1), (1, 2), (2, 3), (3, 4), (0, 5), (5, 6), (6, 7), (7, 8), (0, 9), (9, 10), (10, 11), (11, 12),
              (0, 13), (13, 14), (14, 15), (15, 16), (0, 17), (17, 18), (18, 19), (19, 20))
HAND_LINE = 2
HAND_DOT, HAND_DOT_COLOUR = 4, (0, 0, 255)
FACE_DOT, FACE_DOT_COLOUR = 3, (255, 255, 255)


def edge_colour(index: int) -> tuple[float, float, float]:
    """A hand edge's colour (RGB, 0..255 unrounded: OpenCV rounds it): its hue ``index / 20`` of the way round."""
    red, green, blue = colorsys.hsv_to_rgb(index / len(HAND_EDGES), 1.0, 1.0)
    return red * 255, green * 255, blue * 255


class Pose(NamedTuple):
    """A person as the extension draws one: the body's 18 keypoints as fractions (float64), and each hand's 21 and
    the face's keypoints as float32 fractions (n, 2), -1 where a box's coordinate was 0; None where not found."""

    body: pose.Body
    left: np.ndarray | None = None
    right: np.ndarray | None = None
    face: np.ndarray | None = None


def fractions(peaks: np.ndarray, box_x: int, box_y: int, height: int, width: int) -> np.ndarray:
    """A box's keypoints (n, 2) in its pixels as float32 fractions of the image's size, as the extension makes them:
    a coordinate of 0 becomes -1 (not found), the others move by the box's corner."""
    peaks = peaks.astype(np.float32)
    out = np.empty_like(peaks)
    out[:, 0] = np.where(peaks[:, 0] < 1e-6, -1, peaks[:, 0] + box_x) / float(width)
    out[:, 1] = np.where(peaks[:, 1] < 1e-6, -1, peaks[:, 1] + box_y) / float(height)
    return out


def _pixel(fraction: np.float32, size: int) -> int:
    # numpy 1.x, which the extension runs on, multiplies a float32 scalar by a Python int in float64.
    return int(float(fraction) * size)


def draw_hand(canvas: np.ndarray, keypoints: np.ndarray | None) -> np.ndarray:
    """``canvas`` (RGB) with a hand drawn on it in place, as the extension's ``draw_handpose``: each edge whose two
    keypoints are inside, then every keypoint inside."""
    import cv2

    if keypoints is None or not len(keypoints):
        return canvas
    height, width = canvas.shape[:2]
    points = [(_pixel(x, width), _pixel(y, height)) for x, y in keypoints]
    for index, (a, b) in enumerate(HAND_EDGES):
        (x1, y1), (x2, y2) = points[a], points[b]
        if x1 > EPS and y1 > EPS and x2 > EPS and y2 > EPS:
            cv2.line(canvas, (x1, y1), (x2, y2), edge_colour(index), thickness=HAND_LINE)
    for x, y in points:
        if x > EPS and y > EPS:
            cv2.circle(canvas, (x, y), HAND_DOT, HAND_DOT_COLOUR, thickness=-1)
    return canvas


def draw_face(canvas: np.ndarray, keypoints: np.ndarray | None) -> np.ndarray:
    """``canvas`` (RGB) with a face's keypoints drawn on it in place, as the extension's ``draw_facepose``."""
    import cv2

    if keypoints is None or not len(keypoints):
        return canvas
    height, width = canvas.shape[:2]
    for x, y in keypoints:
        px, py = _pixel(x, width), _pixel(y, height)
        if px > EPS and py > EPS:
            cv2.circle(canvas, (px, py), FACE_DOT, FACE_DOT_COLOUR, thickness=-1)
    return canvas


def draw(people: Sequence[Pose], height: int, width: int, body: bool = True, hands: bool = True,
         face: bool = True) -> np.ndarray:
    """The extension's pose map (its ``draw_poses``): each person in turn, their body (``pose.draw_body``), left and
    right hands and face as asked, on a black RGB canvas (height, width, 3)."""
    canvas = np.zeros((height, width, 3), np.uint8)
    for person in people:
        if body:
            canvas = pose.draw_body(canvas, person.body)
        if hands:
            canvas = draw_hand(draw_hand(canvas, person.left), person.right)
        if face:
            canvas = draw_face(canvas, person.face)
    return canvas


class WholePose:
    """A pose module's map (``openpose_hand``, ``openpose_face``, ``openpose_faceonly``, ``openpose_full``): the body
    network's people, their hands and faces by the hand and face networks given, drawn as the module draws them."""

    def __init__(self, module: str, body: pose.PoseEstimator, hand: HandEstimator | None = None,
                 face: FaceEstimator | None = None) -> None:
        self.module = module
        self.draws = DRAWS[module]
        if (hand is None) == self.draws[1] or (face is None) == self.draws[2]:
            raise ValueError(f"{module} runs the {' and '.join(networks(module))} networks")
        self.body, self.hand, self.face = body, hand, face

    def __call__(self, image: Image.Image) -> Image.Image:
        """The pose map of ``image`` (already at the processor resolution), RGB, black around."""
        rgb = np.asarray(image.convert("RGB"))
        height, width = rgb.shape[:2]
        padded = np.pad(rgb, ((0, -height % pose.PAD), (0, -width % pose.PAD), (0, 0)), mode="edge")
        canvas = draw(self.detect(padded), padded.shape[0], padded.shape[1], *self.draws)
        return Image.fromarray(np.ascontiguousarray(canvas[:height, :width]))

    def detect(self, rgb: np.ndarray) -> list[Pose]:
        """Each person in an RGB array: their body, and their hands and face where this module finds them."""
        bgr = np.ascontiguousarray(rgb[..., ::-1])
        height, width = rgb.shape[:2]
        people = []
        for body in self.body.keypoints(rgb):
            hands: dict[bool, np.ndarray] = {}
            if self.hand is not None:
                for x, y, side, left in hand_boxes(body, height, width):
                    hands[left] = fractions(self.hand(bgr[y:y + side, x:x + side]), x, y, height, width)
            face = None
            box = face_box(body, height, width) if self.face is not None else None
            if box is not None and self.face is not None:
                x, y, side = box
                peaks = self.face(bgr[y:y + side, x:x + side])
                face = fractions(peaks, x, y, height, width) if len(peaks) else None
            people.append(Pose(pose.fractions_of(body, height, width), hands.get(True), hands.get(False), face))
        return people
