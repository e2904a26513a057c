"""OpenPose's hands and faces (``pose_parts``): the hand and face networks in the releases' keys and shapes, the
extension's boxes and keypoint decoding against step-by-step float64 rewrites of its ``handDetect``, ``faceDetect``,
``Hand`` and ``Face`` on synthetic heatmaps, its drawing, the four modules composed on stand-in networks, loading
and converting the releases, and each module as a ControlNet unit's preprocessor on the tiny base."""

from __future__ import annotations

import math
from collections import deque

import numpy as np
import pytest
import torch
from PIL import Image

from deployments.support import pose, pose_parts
from deployments.support.errors import ModelLoadError, UnknownModel, status_of
from deployments.weights import loader
from tests.test_pose import PEOPLE, Replay, synthetic_maps

# --- the releases' networks, as the original model definitions lay them out -----------------------------------------


def official(maps: int) -> dict[str, tuple[int, ...]]:
    """handpose_model (maps 22) and FaceNet (71): VGG to conv5_3_CPM, conv6_1/6_2_CPM, five 7-layer stages."""
    convs = [("conv1_1", 64, 3, 3), ("conv1_2", 64, 64, 3), ("conv2_1", 128, 64, 3), ("conv2_2", 128, 128, 3),
             ("conv3_1", 256, 128, 3), ("conv3_2", 256, 256, 3), ("conv3_3", 256, 256, 3), ("conv3_4", 256, 256, 3),
             ("conv4_1", 512, 256, 3), ("conv4_2", 512, 512, 3), ("conv4_3", 512, 512, 3), ("conv4_4", 512, 512, 3),
             ("conv5_1", 512, 512, 3), ("conv5_2", 512, 512, 3), ("conv5_3_CPM", 128, 512, 3),
             ("conv6_1_CPM", 512, 128, 1), ("conv6_2_CPM", maps, 512, 1)]
    for s in range(2, 7):
        convs += [(f"Mconv1_stage{s}", 128, 128 + maps, 7), *((f"Mconv{i}_stage{s}", 128, 128, 7) for i in range(2, 6)),
                  (f"Mconv6_stage{s}", 128, 128, 1), (f"Mconv7_stage{s}", maps, 128, 1)]
    return {k: v for name, o, i, k_ in convs for k, v in ((f"{name}.weight", (o, i, k_, k_)), (f"{name}.bias", (o,)))}


@pytest.mark.parametrize(("kind", "maps", "weights"), [("hand", 22, 36_832_324), ("face", 71, 38_425_706)])
def test_the_networks_have_the_releases_keys_and_shapes(kind, maps, weights):
    with torch.device("meta"):
        state = pose_parts.part_network(kind).state_dict()
    assert {k: tuple(v.shape) for k, v in state.items()} == official(maps) == pose_parts.official_shapes(kind)
    assert len(state) == 104 and sum(v.numel() for v in state.values()) == weights


def test_the_factorys_networks_load_recognised_and_map_at_an_eighth(tiny):
    from safetensors.torch import load_file

    for kind, maps in (("hand", 22), ("face", 71)):
        state = load_file(tiny / "openpose" / pose_parts.WEIGHTS[kind])
        assert pose_parts.recognise(kind, state) and not pose.recognise(state)
        assert not pose_parts.recognise("face" if kind == "hand" else "hand", state)
        assert not pose_parts.recognise(kind, {k: v for k, v in state.items() if k != "conv6_2_CPM.bias"})
        network = loader.load_pose(str(tiny / "openpose"), network=kind)
        with torch.inference_mode():
            out = network(torch.randn(1, 3, 24, 16))
        assert out.shape == (1, maps, 3, 2) and (out < 0).any()  # the last stage's last convolution: no ReLU


# --- step-by-step rewrites of the extension's steps ------------------------------------------------------------------

def smooth64(x: np.ndarray, sigma: float = 3.0) -> np.ndarray:
    """SciPy's gaussian_filter as the extension calls it, in float64: radius int(4 sigma + 0.5), borders mirrored
    with the edge pixel repeated."""
    radius = int(4 * sigma + 0.5)
    kernel = np.exp(-0.5 * (np.arange(-radius, radius + 1) / sigma) ** 2)
    kernel /= kernel.sum()
    out = x.astype(np.float64)
    for axis in (0, 1):
        wide = np.pad(out, [(radius, radius) if a == axis else (0, 0) for a in range(2)], mode="symmetric")
        out = sum(w * np.take(wide, np.arange(i, i + x.shape[axis]), axis=axis) for i, w in enumerate(kernel))
    return out


def regions8(mask: np.ndarray) -> list[list[tuple[int, int]]]:
    """The 8-connected regions of a mask, in reading order of their first pixel (skimage's label numbering)."""
    seen = np.zeros_like(mask, bool)
    found = []
    for y, x in zip(*np.nonzero(mask), strict=True):
        if seen[y, x]:
            continue
        region, queue = [], deque([(y, x)])
        seen[y, x] = True
        while queue:
            cy, cx = queue.popleft()
            region.append((cy, cx))
            for dy in (-1, 0, 1):
                for dx in (-1, 0, 1):
                    ny, nx = cy + dy, cx + dx
                    if 0 <= ny < mask.shape[0] and 0 <= nx < mask.shape[1] and mask[ny, nx] and not seen[ny, nx]:
                        seen[ny, nx] = True
                        queue.append((ny, nx))
        found.append(region)
    return found


def extension_hand_peaks(heatmaps: np.ndarray, height: int, width: int) -> list[tuple[int, int]]:
    """Hand.__call__'s peaks: smoothed above 0.05, the region whose raw sum is largest (first of equals), every
    other pixel zeroed, the first largest in reading order, scaled from the 128 grid to the box (truncated)."""
    out = []
    for part in range(21):
        raw = heatmaps[..., part].astype(np.float64).copy()
        mask = smooth64(raw) > 0.05
        if not mask.any():
            out.append((0, 0))
            continue
        regions = regions8(mask)
        sums = [sum(raw[p] for p in region) for region in regions]
        best = set(regions[max(range(len(sums)), key=lambda n: (sums[n], -n))])
        kept = np.array([[raw[y, x] if (y, x) in best else 0.0 for x in range(128)] for y in range(128)])
        top, where = -math.inf, (0, 0)
        for y in range(128):
            for x in range(128):
                if kept[y, x] > top:
                    top, where = kept[y, x], (y, x)
        out.append((int(float(where[1]) * width / 128.0), int(float(where[0]) * height / 128.0)))
    return out


def blob(shape: tuple[int, int], x: float, y: float, sigma: float, height: float) -> np.ndarray:
    ys, xs = np.mgrid[0:shape[0], 0:shape[1]].astype(np.float64)
    return height * np.exp(-((xs - x) ** 2 + (ys - y) ** 2) / (2 * sigma ** 2))


def test_hand_peaks_are_the_extensions():
    """On synthetic heatmaps: a tall narrow peak beside a lower wide one (the wide one's region sums more: its
    maximum wins, not the tallest), regions joined diagonally, nothing above the threshold, and low noise."""
    rng = np.random.default_rng(7)
    heatmaps = rng.uniform(-0.01, 0.01, (128, 128, 22))
    for part in range(21):
        x, y = 10 + 5 * part, 20 + 4 * (part % 7)
        heatmaps[..., part] += blob((128, 128), x, y, 1.0, 0.9) + blob((128, 128), 120 - x, 100 - y, 6.0, 0.3)
    heatmaps[..., 3] = rng.uniform(-0.01, 0.04, (128, 128))  # nothing: (0, 0)
    heatmaps[40:44, 40:44, 5] = 0.2  # two squares touching at a corner: one region
    heatmaps[44:48, 44:48, 5] = 0.25
    found = pose_parts.hand_peaks(heatmaps, 97, 61)
    assert found.shape == (21, 2) and found.dtype == np.int64
    assert [tuple(p) for p in found] == extension_hand_peaks(heatmaps, 97, 61)
    assert tuple(found[3]) == (0, 0)
    wide = 120 - 10 - 5 * 2, 100 - 20 - 4 * 2  # keypoint 2's wide blob, in the 128 grid
    assert tuple(found[2]) == (int(wide[0] * 61 / 128), int(wide[1] * 97 / 128))


def extension_face_peaks(heatmaps: np.ndarray) -> list[tuple[int, int]]:
    out = []
    for heatmap in heatmaps:
        positions = [(y, x) for y in range(heatmap.shape[0]) for x in range(heatmap.shape[1]) if heatmap[y, x] > 0.05]
        if positions:
            y, x = max(positions, key=lambda p: (heatmap[p], -positions.index(p)))
            out.append((x, y))
    return out


def test_face_peaks_are_the_extensions():
    rng = np.random.default_rng(8)
    heatmaps = rng.uniform(-0.5, 0.04, (71, 24, 30)).astype(np.float32)
    for n in range(0, 71, 3):
        heatmaps[n, rng.integers(24), rng.integers(30)] = rng.uniform(0.06, 1)
    heatmaps[4, 5, 7] = heatmaps[4, 2, 20] = 0.5  # equal: the first in reading order
    found = pose_parts.face_peaks(heatmaps)
    assert [tuple(p) for p in found] == extension_face_peaks(heatmaps) and len(found) == 25
    assert (20, 2) in [tuple(p) for p in found] and pose_parts.face_peaks(heatmaps[:0]).shape == (0, 2)


def extension_boxes(body, height: int, width: int) -> tuple[list, object]:
    """handDetect and faceDetect on a body's pixel keypoints."""
    hands = []
    for s, e, w, left in ((5, 6, 7, True), (2, 3, 4, False)):
        if None in (body[s], body[e], body[w]):
            continue
        (x1, y1), (x2, y2), (x3, y3) = body[s], body[e], body[w]
        x, y = x3 + 0.33 * (x3 - x2), y3 + 0.33 * (y3 - y2)
        side = 1.5 * max(math.hypot(x3 - x2, y3 - y2), 0.9 * math.hypot(x2 - x1, y2 - y1))
        x, y = max(0, x - side / 2), max(0, y - side / 2)
        side = min(width - x if x + side > width else side, height - y if y + side > height else side)
        if side >= 20:
            hands.append((int(x), int(y), int(side), left))
    face = None
    if body[0] is not None and any(body[k] is not None for k in (14, 15, 16, 17)):
        half = max([max(abs(body[0][0] - body[k][0]), abs(body[0][1] - body[k][1])) * f
                    for k, f in ((14, 3), (15, 3), (16, 1.5), (17, 1.5)) if body[k] is not None])
        x, y = max(0, body[0][0] - half), max(0, body[0][1] - half)
        side = min(width - x if x + half > width else 2 * half, height - y if y + half > height else 2 * half)
        face = (int(x), int(y), int(side)) if side >= 20 else None
    return hands, face


def test_hand_and_face_boxes_are_the_extensions():
    base = [(x + 3.0, y + 2.0) for x, y in PEOPLE[0]]
    bodies = [base, [(x * 2.5, y * 2.5) for x, y in base], [(x + 130.0, y + 100.0) for x, y in base],
              [None if k in (4, 14, 15) else p for k, p in enumerate(base)], [(x * 0.4, y * 0.4) for x, y in base],
              [(x - 25.0, y) for x, y in base], [(x + 150.0, y + 40.0) for x, y in base]]
    for body in bodies:
        hands, face = extension_boxes(body, 192, 200)
        assert [tuple(b) for b in pose_parts.hand_boxes(body, 192, 200)] == hands
        assert pose_parts.face_box(body, 192, 200) == face
    assert [b.left for b in pose_parts.hand_boxes(bodies[0], 192, 200)] == [True, False]
    assert pose_parts.hand_boxes(bodies[3], 192, 200)[0].left and len(pose_parts.hand_boxes(bodies[3], 192, 200)) == 1
    assert pose_parts.hand_boxes(bodies[4], 192, 200) == [] and pose_parts.face_box(bodies[4], 192, 200) is None
    # Near the right edge: the original clips the side where the half side passes the edge, so this box does not.
    assert pose_parts.face_box(bodies[2], 192, 200) == (180, 109, 30)
    assert pose_parts.hand_boxes(bodies[6], 192, 200) == [(179, 113, 20, False)]  # clipped to 20: kept


# --- the estimators' steps -------------------------------------------------------------------------------------------

class Constant(torch.nn.Module):
    """A stand-in network: records its inputs, answers ``maps`` heatmaps at an eighth of each: a ramp by channel."""

    def __init__(self, maps: int) -> None:
        super().__init__()
        self.maps, self.seen = maps, []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.seen.append(x.clone())
        h, w = x.shape[2] // 8, x.shape[3] // 8
        ys = torch.linspace(0, 1, h)[:, None].expand(h, w)
        return torch.stack([ys * (c + 1) / self.maps for c in range(self.maps)])[None]


def test_the_hand_search_reads_the_blurred_box_at_four_scales():
    """The box blurred (sigma 0.8), resized to 184, 368, 552, 736 square (area down, Lanczos up), read as
    x / 256 - 0.5; each answer enlarged 8 times (Lanczos), resized to 128 square, averaged."""
    import cv2

    rng = np.random.default_rng(4)
    box = rng.integers(0, 256, (300, 300, 3), dtype=np.uint8)
    network, answer = Constant(22), Constant(22)
    heatmaps = pose_parts.HandEstimator(network, torch.device("cpu"), torch.float32).maps(box)
    blurred = cv2.GaussianBlur(box, (0, 0), 0.8)
    expected = np.zeros((128, 128, 22))
    for seen, size in zip(network.seen, (184, 368, 552, 736), strict=True):
        filtered = cv2.INTER_AREA if 2 * size < 600 else cv2.INTER_LANCZOS4
        scaled = cv2.resize(blurred, (size, size), interpolation=filtered).astype(np.float32) / 256 - 0.5
        assert seen.shape == (1, 3, size, size) and torch.equal(seen[0], torch.from_numpy(scaled).permute(2, 0, 1))
        small = answer(seen)[0].permute(1, 2, 0).numpy()
        for c in range(22):
            big = cv2.resize(small[..., c], (size, size), interpolation=cv2.INTER_LANCZOS4)
            expected[..., c] += cv2.resize(big, (128, 128), interpolation=cv2.INTER_AREA) / 4
    assert np.array_equal(heatmaps, expected)


def test_the_face_network_reads_the_box_at_384_and_its_maps_come_back_at_the_boxs_size():
    """The box resized to 384 square (Lanczos up), read as x / 256 - 0.5; the last stage's 48 x 48 heatmaps resized
    to the box bilinearly with the corners aligned (written out in float64 here)."""
    box = np.random.default_rng(5).integers(0, 256, (40, 70, 3), dtype=np.uint8)
    network = Constant(71)
    heatmaps = pose_parts.FaceEstimator(network, torch.device("cpu"), torch.float32).heatmaps(box)
    (seen,) = network.seen
    assert seen.shape == (1, 3, 384, 384) and abs(float(seen.min()) + 0.5) < 0.02
    assert heatmaps.shape == (71, 40, 70) and heatmaps.dtype == np.float32
    ramp = np.linspace(0, 1, 48)  # each heatmap's rows, constant along them
    rows = np.arange(40) * 47 / 39
    low = np.floor(rows).astype(int)
    expected = ramp[low] + (ramp[np.minimum(low + 1, 47)] - ramp[low]) * (rows - low)
    for c in (0, 35, 70):
        assert np.allclose(heatmaps[c], (expected * (c + 1) / 71)[:, None], atol=1e-6)


# --- drawing ---------------------------------------------------------------------------------------------------------

# Each edge's colour as the extension's cv2.line draws it (matplotlib's hsv_to_rgb(i / 20, 1, 1) * 255, rounded by
# OpenCV to the nearest, halves to even).
EDGE_COLOURS = [(255, 0, 0), (255, 77, 0), (255, 153, 0), (255, 229, 0), (204, 255, 0), (128, 255, 0), (51, 255, 0),
                (0, 255, 25), (0, 255, 102), (0, 255, 179), (0, 255, 255), (0, 178, 255), (0, 102, 255),
                (0, 25, 255), (51, 0, 255), (128, 0, 255), (204, 0, 255), (255, 0, 230), (255, 0, 153), (255, 0, 77)]


def hand_at(points: dict[int, tuple[int, int]], height: int, width: int) -> np.ndarray:
    """A hand's keypoints (pixel x, y; the rest not found) as the extension's float32 fractions."""
    peaks = np.zeros((21, 2), np.int64)
    for k, xy in points.items():
        peaks[k] = xy
    return pose_parts.fractions(peaks, 0, 0, height, width)


def test_a_hands_edges_take_their_colours_and_its_keypoints_blue():
    for edge, colour in enumerate(EDGE_COLOURS):
        a, b = pose_parts.HAND_EDGES[edge]
        canvas = pose_parts.draw_hand(np.zeros((64, 64, 3), np.uint8), hand_at({a: (10, 32), b: (50, 32)}, 64, 64))
        assert tuple(canvas[31, 30]) == tuple(canvas[32, 30]) == tuple(canvas[33, 30]) == colour  # thickness 2
        assert not canvas[34, 30].any() and not canvas[30, 30].any()
        assert tuple(canvas[32, 10]) == tuple(canvas[32, 50]) == tuple(canvas[36, 10]) == (0, 0, 255)  # radius 4
        assert not canvas[27, 10].any() and tuple(canvas[28, 10]) == (0, 0, 255)
    unseen = pose_parts.draw_hand(np.zeros((64, 64, 3), np.uint8), hand_at({1: (0, 30), 2: (20, 30)}, 64, 64))
    assert not unseen[30, :16].any() and tuple(unseen[30, 20]) == (0, 0, 255)  # x 0: not found, no edge to it


def test_a_keypoint_lands_where_numpy_1_puts_the_extensions_float32_fraction():
    """On a 192 wide canvas, box pixel 5 is 5 / 192 in float32: 4.9999... pixels in float64, drawn at 4."""
    canvas = pose_parts.draw_face(np.zeros((192, 192, 3), np.uint8), hand_at({0: (5, 96)}, 192, 192)[:1])
    assert tuple(canvas[96, 4 - 3]) == (255, 255, 255) and not canvas[96, 5 + 3].any()
    canvas = pose_parts.draw_face(np.zeros((192, 192, 3), np.uint8), hand_at({0: (64, 96)}, 192, 192)[:1])
    assert tuple(canvas[96, 67]) == (255, 255, 255) and not canvas[96, 68].any()  # 64 / 192 * 192: 64 itself


# --- the modules on stand-in networks --------------------------------------------------------------------------------

class FakeHand:
    """A hand network's keypoints: the wrist at the box's centre, the thumb's first joint near its top."""

    def __init__(self) -> None:
        self.boxes: list[tuple[int, int]] = []

    def __call__(self, bgr: np.ndarray) -> np.ndarray:
        self.boxes.append(bgr.shape[:2])
        c = bgr.shape[0] // 2
        peaks = np.zeros((21, 2), np.int64)
        peaks[0], peaks[1] = (c, c), (c, 2)
        return peaks


class FakeFace:
    def __call__(self, bgr: np.ndarray) -> np.ndarray:
        c = bgr.shape[0] // 2
        return np.array([(0, 4), (c, c), (c + 8, c)])  # the first at x 0: not drawn


def whole(module: str) -> tuple[pose_parts.WholePose, list]:
    heatmaps, pafs = synthetic_maps([dict(enumerate(p)) for p in PEOPLE], 192, 192, sigma=5.0)
    body = pose.PoseEstimator(Replay(heatmaps, pafs), torch.device("cpu"), torch.float32)
    _, hands, face = pose_parts.DRAWS[module]
    mapper = pose_parts.WholePose(module, body, FakeHand() if hands else None, FakeFace() if face else None)  # type: ignore[arg-type]
    return mapper, body.keypoints(np.zeros((192, 192, 3), np.uint8))


@pytest.mark.parametrize("module", pose_parts.PART_MODULES)
def test_each_module_draws_what_the_extension_draws(module):
    """Two people: each one's hands (in boxes from its arms) and face (in a box from its head) where the module
    draws them, over its body unless faceonly; the first person's drawing dimmed by the second's body, as the
    extension's draw_bodypose dims the canvas."""
    mapper, people = whole(module)
    drawn = np.asarray(mapper(Image.fromarray(np.zeros((192, 192, 3), np.uint8))))
    draws_body, draws_hands, draws_face = pose_parts.DRAWS[module]
    assert drawn.shape == (192, 192, 3)
    for n, body in enumerate(people):
        dim = 1.0 if n == len(people) - 1 or not draws_body else 0.6
        hands, face = extension_boxes(body, 192, 192)
        assert len(hands) == 2 and face is not None
        for x, y, side, _ in hands:
            c = side // 2
            wrist, thumb = drawn[y + c, x + c], drawn[y + (c + 2) // 2, x + c]  # a dot, the edge between
            if draws_hands:
                assert tuple(wrist) == (0, 0, int(255 * dim)) and tuple(thumb) == (int(255 * dim), 0, 0)
            else:
                assert tuple(wrist) != (0, 0, 255)
        x, y, side = face
        c = side // 2
        assert (tuple(drawn[y + c, x + c + 8]) == (int(255 * dim),) * 3) == draws_face
        if draws_face:
            assert not drawn[y + 4, x + 2].any() or draws_body  # the keypoint at x 0 is not drawn
    neck = people[0][1]
    assert drawn[int(neck[1]), int(neck[0])].any() == draws_body  # the body's keypoints, unless faceonly
    if not draws_body:
        assert set(map(tuple, drawn.reshape(-1, 3))) == {(0, 0, 0), (255, 255, 255)}  # white face dots alone
    if draws_hands:
        assert sorted(mapper.hand.boxes) == sorted((s, s) for x, y, s, _ in (
            b for body in people for b in extension_boxes(body, 192, 192)[0]))  # type: ignore[union-attr]


def test_nobody_found_is_a_black_map_and_no_hand_or_face_is_searched():
    mapper = pose_parts.WholePose("openpose_full", pose.PoseEstimator(Replay(*synthetic_maps([], 64, 64)),
                                                                      torch.device("cpu"), torch.float32),
                                  FakeHand(), FakeFace())  # type: ignore[arg-type]
    drawn = mapper(Image.new("RGB", (60, 50)))
    assert drawn.size == (60, 50) and not np.asarray(drawn).any() and mapper.hand.boxes == []  # type: ignore[union-attr]


# --- loading and converting ------------------------------------------------------------------------------------------

def test_the_modules_load_from_one_folder_sharing_its_networks(tiny):
    loaded = pose.load({m: str(tiny / "openpose") for m in pose.POSE_MODULES}, torch.device("cpu"))
    assert isinstance(loaded["openpose"], pose.PoseEstimator)
    parts = [loaded[m] for m in pose_parts.PART_MODULES]
    assert all(p.body is loaded["openpose"] for p in parts)
    assert loaded["openpose_hand"].hand is loaded["openpose_full"].hand and loaded["openpose_hand"].face is None
    assert loaded["openpose_faceonly"].face is loaded["openpose_full"].face and loaded["openpose_face"].hand is None
    assert {p.dtype for p in loaded["openpose_full"].face.model.parameters()} == {torch.float32}


def test_a_module_without_its_networks_is_refused_naming_the_field(tmp_path, tiny):
    folder = tmp_path / "body-only"
    folder.mkdir()
    (folder / pose.WEIGHTS).symlink_to(tiny / "openpose" / pose.WEIGHTS)
    cpu = torch.device("cpu")
    assert set(pose.load({"openpose": str(folder)}, cpu)) == {"openpose"}
    for module, missing in (("openpose_hand", "hand_pose_model.safetensors"), ("openpose_faceonly",
                                                                               "facenet.safetensors")):
        with pytest.raises(ModelLoadError, match=f"no {missing}") as refused:
            pose.load({module: str(folder)}, cpu)
        assert refused.value.field == f"preprocessors.{module}" and status_of(refused.value) == 503
    with pytest.raises(ModelLoadError, match="folder holding body_pose_model.safetensors, facenet") as refused:
        pose.load({"openpose_face": str(tiny / "openpose" / pose.WEIGHTS)}, cpu)  # a file: one network
    assert refused.value.field == "preprocessors.openpose_face"
    wrong = tmp_path / "wrong"
    wrong.mkdir()
    for name in (pose.WEIGHTS, "hand_pose_model.safetensors"):  # the body's weights where the hand's should be
        (wrong / name).symlink_to(tiny / "openpose" / pose.WEIGHTS)
    with pytest.raises(ModelLoadError, match="not OpenPose's hand pose network") as refused:
        pose.load({"openpose_full": str(wrong)}, cpu)
    assert refused.value.field == "preprocessors.openpose_full"


def test_the_converter_recognises_the_hand_and_face_releases(tmp_path, tiny, capsys):
    from safetensors.torch import load_file

    from deployments.factory.pose import build_pose_pth
    from deployments.weights.convert import main

    downloads = tmp_path / "downloads"
    for kind in ("hand", "face"):
        build_pose_pth(downloads, network=kind)
    assert main([str(downloads), str(tmp_path / "openpose")]) == 0
    out = capsys.readouterr().out
    for kind in ("hand", "face"):
        assert f"architecture=openpose-{kind} purpose=preprocessor scale=-" in out
        state = load_file(tmp_path / "openpose" / pose_parts.WEIGHTS[kind])
        expected = load_file(tiny / "openpose" / pose_parts.WEIGHTS[kind])  # the factory's, the same seed
        assert list(state) == list(expected) and all(torch.equal(state[k], expected[k]) for k in state)


# --- as ControlNet units' preprocessors ------------------------------------------------------------------------------

def test_each_module_guides_the_base_and_detect_returns_its_map(base, astronaut, monkeypatch):
    """On the tiny base every pose module is configured (one folder, one body network shared): one request with a
    unit of each runs each module's map of the image at its resolution (black: no one found) through the ControlNet,
    which changes the image; detect answers the same map. The body network is a stand-in that sees no one (the real
    one takes seconds a map on two CPU cores; test_pose and the ingress's detect run it)."""
    from deployments.support.control import ControlUnit, at_resolution, detect
    from deployments.support.generation import GenerationRequest
    from tests.test_pose import SMALL, Recording

    assert set(pose_parts.PART_MODULES) <= set(base.describe()["preprocessors"])
    body = base.controls.pose["openpose"]
    assert all(base.controls.pose[m].body is body for m in pose_parts.PART_MODULES)
    monkeypatch.setattr(body, "model", Replay(*synthetic_maps([], 256, 256)))
    recorded = {}
    for module in pose_parts.PART_MODULES:
        recorded[module] = Recording(base.controls.pose[module])
        monkeypatch.setitem(base.controls.pose, module, recorded[module])
    units = [ControlUnit(model="tiny-canny", image=astronaut, module=m, processor_res=64 + 8 * n)
             for n, m in enumerate(pose_parts.PART_MODULES)]
    plain = np.asarray(base.generate(GenerationRequest(**SMALL)).images[0])
    guided = np.asarray(base.generate(GenerationRequest(**SMALL, control=units)).images[0])
    assert np.abs(guided.astype(int) - plain).mean() > 1.0
    for n, module in enumerate(pose_parts.PART_MODULES):
        ((seen, made),) = recorded[module].seen
        assert np.array_equal(np.asarray(seen), np.asarray(at_resolution(astronaut, 64 + 8 * n)))
        assert made.size == seen.size and made.mode == "RGB" and not np.asarray(made).any()
        mapped = detect(astronaut, module, 64 + 8 * n, estimators=base.controls.preprocessors)
        assert np.array_equal(np.asarray(mapped), np.asarray(made))


def test_the_modules_are_offered_where_configured_and_refused_naming_the_field():
    from deployments.support.config import SDXLBaseConfig
    from deployments.support.control import SLIDERS, detect, offered
    from graphs.api import a1111_controlnet
    from tests.helpers import module_list

    folder = {m: "x" for m in pose.POSE_MODULES}
    assert offered(folder)[3:9] == ["lineart_standard", *pose.POSE_MODULES]
    assert "openpose_hand" not in offered({"openpose": "x"})
    for module in pose_parts.PART_MODULES:
        assert SLIDERS[module] == SLIDERS["openpose"]
        assert a1111_controlnet.module_of(module.upper(), "m", offered(folder)) == module
        with pytest.raises(UnknownModel) as e:
            a1111_controlnet.module_of(module, "alwayson_scripts.ControlNet.args[0].module", offered({"openpose": "x"}))
        assert e.value.field == "alwayson_scripts.ControlNet.args[0].module" and status_of(e.value) == 422
        assert f"{module} needs {pose_parts.needs(module)}" in e.value.message
        with pytest.raises(UnknownModel) as e:  # the base's own check
            detect(Image.new("RGB", (64, 64)), module, estimators={"openpose": lambda image: image})
        assert e.value.field == "control.module"
    listed = module_list(folder, False)
    assert listed["module_list"] == ["none", "canny", "invert", "lineart_standard", *pose.POSE_MODULES,
                                     *listed["module_list"][9:]]
    assert listed["module_detail"]["openpose_full"]["sliders"] == [
        {"name": "Preprocessor Resolution", "value": 512, "min": 64, "max": 2048, "step": 8}]
    assert SDXLBaseConfig(model={"source": "x"}, preprocessors=folder).preprocessors == folder
