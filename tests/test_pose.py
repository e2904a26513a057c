"""The OpenPose body preprocessor: its decoding on heatmaps and PAFs where the answer is known (two people and a
stray limb), its drawing, the network in the release's keys and shapes, the estimator end to end on the factory's
random network, the loader's refusals, the converter on the released .pth, and ``openpose`` as a ControlNet unit's
module: on the tiny base, and by the extension's names on the routes' units."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import save_file

from deployments.factory.pose import build_pose, build_pose_pth
from deployments.support import model_free, pose
from deployments.support.errors import ModelLoadError, UnknownModel, UnsafeWeights, status_of
from deployments.weights import loader
from tests.helpers import module_list

# --- the release's network, as the original model definition (CMU's, by way of pytorch-openpose) lays it out ------

# (layer, out channels, in channels, kernel)
OFFICIAL_BACKBONE = [("conv1_1", 64, 3, 3), ("conv1_2", 64, 64, 3), ("conv2_1", 128, 64, 3), ("conv2_2", 128, 128, 3),
                     ("conv3_1", 256, 128, 3), ("conv3_2", 256, 256, 3), ("conv3_3", 256, 256, 3),
                     ("conv3_4", 256, 256, 3), ("conv4_1", 512, 256, 3), ("conv4_2", 512, 512, 3),
                     ("conv4_3_CPM", 256, 512, 3), ("conv4_4_CPM", 128, 256, 3)]


def official_layers() -> list[tuple[str, int, int, int]]:
    out = list(OFFICIAL_BACKBONE)
    for branch, width in ((1, 38), (2, 19)):
        out += [(f"conv5_1_CPM_L{branch}", 128, 128, 3), (f"conv5_2_CPM_L{branch}", 128, 128, 3),
                (f"conv5_3_CPM_L{branch}", 128, 128, 3), (f"conv5_4_CPM_L{branch}", 512, 128, 1),
                (f"conv5_5_CPM_L{branch}", width, 512, 1)]
        for stage in range(2, 7):
            out += [(f"Mconv1_stage{stage}_L{branch}", 128, 185, 7),
                    *((f"Mconv{i}_stage{stage}_L{branch}", 128, 128, 7) for i in range(2, 6)),
                    (f"Mconv6_stage{stage}_L{branch}", 128, 128, 1), (f"Mconv7_stage{stage}_L{branch}", width, 128, 1)]
    return out


OFFICIAL = {key: shape for name, o, i, k in official_layers()
            for key, shape in ((f"{name}.weight", (o, i, k, k)), (f"{name}.bias", (o,)))}


# --- synthetic maps: people whose keypoints are known --------------------------------------------------------------

# One person's 18 keypoints (x, y) in a 60 x 140 box, in OpenPose's order.
SKELETON = [(30, 14), (30, 30), (16, 30), (12, 52), (10, 72), (44, 30), (48, 52), (50, 72), (22, 76), (22, 102),
            (22, 128), (38, 76), (38, 102), (38, 128), (26, 10), (34, 10), (20, 13), (40, 13)]
HEIGHT, WIDTH = 160, 192
PEOPLE = [[(x + dx, y + 8) for x, y in SKELETON] for dx in (32, 122)]
STRAY = {9: (106, 116), 10: (106, 146)}  # a lone right knee and ankle: a limb, but not a person

Keypoints = dict[int, tuple[int, int]]


def synthetic_maps(people: list[Keypoints], height: int = HEIGHT, width: int = WIDTH,
                   sigma: float = 2.0) -> tuple[np.ndarray, np.ndarray]:
    """Heatmaps (a Gaussian peak at every keypoint) and PAFs (the limb's unit vector within 2 pixels of each limb
    whose two keypoints are there) of ``people`` (keypoint -> x, y)."""
    ys, xs = np.mgrid[0:height, 0:width].astype(np.float64)
    heatmaps = np.zeros((height, width, 19))
    pafs = np.zeros((height, width, 38))
    for points in people:
        for part, (x, y) in points.items():
            heatmaps[..., part] += np.exp(-((xs - x) ** 2 + (ys - y) ** 2) / (2 * sigma ** 2))
        for (a, b), (cx, cy) in zip(pose.LIMBS, pose.PAF_CHANNELS, strict=True):
            if a not in points or b not in points:
                continue
            start, end = np.array(points[a], float), np.array(points[b], float)
            length = np.linalg.norm(end - start)
            unit = (end - start) / length
            along = (xs - start[0]) * unit[0] + (ys - start[1]) * unit[1]
            across = np.abs((ys - start[1]) * unit[0] - (xs - start[0]) * unit[1])
            near = (along >= -1) & (along <= length + 1) & (across <= 2)
            pafs[near, cx], pafs[near, cy] = unit[0], unit[1]
    return heatmaps, pafs


@pytest.fixture(scope="module")
def decoded():
    heatmaps, pafs = synthetic_maps([dict(enumerate(p)) for p in PEOPLE] + [STRAY])
    parts = pose.peaks(heatmaps)
    limbs = pose.connections(parts, pafs, HEIGHT)
    return parts, limbs, pose.people(parts, limbs)


def test_peaks_are_the_keypoints_with_ids_across_parts(decoded):
    parts, _, _ = decoded
    assert len(parts) == 18
    for part, found in enumerate(parts):
        expected = sorted((p[part] for p in PEOPLE), key=lambda xy: (xy[1], xy[0]))  # reading order
        expected += [STRAY[part]] if part in STRAY else []
        assert [tuple(xy) for xy in found[:, :2].astype(int)] == expected
        assert (found[:, 2] > 0.9).all()  # the unsmoothed heatmap's score
    ids = np.concatenate([p[:, 3] for p in parts])
    assert (ids == np.arange(len(ids))).all()


def test_connections_pair_each_persons_keypoints_along_their_pafs(decoded):
    parts, limbs, _ = decoded
    assert len(limbs) == 19 and all(found is not None for found in limbs)
    ids = {tuple(int(v) for v in row[:2]): int(row[3]) for row in np.concatenate(parts)}
    owner = {ids[xy]: n for n, person in enumerate(PEOPLE) for xy in person}
    stray = {ids[xy] for xy in STRAY.values()}
    for k, found in enumerate(limbs):
        pairs = {(int(a), int(b)) for a, b in found[:, :2]}
        assert all(owner.get(a, "stray") == owner.get(b, "stray") for a, b in pairs)  # never across people
        assert len(pairs) == (3 if k == 8 else 2)  # the stray knee-ankle is a limb of its own
        assert (found[:-1, 2] >= found[1:, 2]).all()  # best first
    assert tuple(sorted(stray)) in {(int(a), int(b)) for a, b in limbs[8][:, :2]}


def test_people_are_assembled_and_a_lone_limb_is_dropped(decoded):
    parts, _, assembled = decoded
    assert assembled.shape == (2, 20)
    assert (assembled[:, -1] == 18).all()  # every keypoint of both
    found = pose.bodies(parts, assembled, HEIGHT, WIDTH)
    recovered = sorted(([(x * WIDTH, y * HEIGHT) for x, y in body] for body in found), key=lambda b: b[0][0])
    for body, person in zip(recovered, PEOPLE, strict=True):
        assert np.abs(np.array(body) - np.array(person)).max() < 1  # within a pixel, each in its own person


def test_a_missing_keypoint_leaves_a_person_without_it():
    heatmaps, pafs = synthetic_maps([{part: xy for part, xy in enumerate(PEOPLE[0]) if part != 4}])  # no right wrist
    parts = pose.peaks(heatmaps)
    limbs = pose.connections(parts, pafs, HEIGHT)
    assert limbs[3] is None  # elbow to wrist: no wrist to pair
    (body,) = pose.bodies(parts, pose.people(parts, limbs), HEIGHT, WIDTH)
    assert body[4] is None and sum(point is not None for point in body) == 17


def test_without_a_neck_the_ear_limbs_join_arms_to_the_head_and_the_legs_are_dropped():
    """With no neck, each arm and each leg starts a person of its own, as the head does; the ear-to-shoulder limbs
    then join both arms to the head (two people with no keypoint in common become one), and each leg, 3 keypoints,
    is too few to be a person."""
    heatmaps, pafs = synthetic_maps([{part: xy for part, xy in enumerate(PEOPLE[0]) if part != 1}])
    parts = pose.peaks(heatmaps)
    (body,) = pose.bodies(parts, pose.people(parts, pose.connections(parts, pafs, HEIGHT)), HEIGHT, WIDTH)
    assert {part for part, point in enumerate(body) if point is not None} == {0, 2, 3, 4, 5, 6, 7, 14, 15, 16, 17}


def test_nothing_above_the_threshold_is_nobody():
    heatmaps = np.full((32, 40, 19), 0.05)
    parts = pose.peaks(heatmaps)
    assert all(len(p) == 0 for p in parts)
    limbs = pose.connections(parts, np.zeros((32, 40, 38)), 32)
    assert limbs == [None] * 19 and pose.people(parts, limbs).shape == (0, 20)


# --- drawing --------------------------------------------------------------------------------------------------------

def test_a_limb_is_drawn_dimmed_and_its_keypoints_in_full():
    body: list[tuple[float, float] | None] = [None] * 18
    body[1], body[2] = (0.5, 0.25), (0.25, 0.25)  # neck (40, 10) and right shoulder (20, 10) on 80 x 40
    canvas = pose.draw([body], 40, 80)
    assert canvas.shape == (40, 80, 3) and canvas.dtype == np.uint8
    assert tuple(canvas[10, 30]) == (153, 0, 0)  # limb 0's red at 60%, at its midpoint
    assert tuple(canvas[10, 40]) == (255, 85, 0) and tuple(canvas[10, 20]) == (255, 170, 0)  # the keypoints' colours
    assert tuple(canvas[14, 30]) == (153, 0, 0) and tuple(canvas[16, 30]) == (0, 0, 0)  # 4 pixels wide, no more
    drawn = np.zeros((40, 80), bool)
    drawn[5:16, 15:46] = True
    assert not canvas[~drawn].any()  # black elsewhere


def test_each_later_body_dims_the_earlier_ones_again():
    first: list[tuple[float, float] | None] = [None] * 18
    second: list[tuple[float, float] | None] = [None] * 18
    first[1], first[2] = (0.5, 0.25), (0.25, 0.25)
    second[1], second[2] = (0.5, 0.75), (0.25, 0.75)
    canvas = pose.draw([first, second], 40, 80)
    assert tuple(canvas[10, 30]) == (91, 0, 0)  # int(153 * 0.6): dimmed with the second body's canvas
    assert tuple(canvas[30, 30]) == (153, 0, 0)
    assert tuple(canvas[10, 40]) == (153, 51, 0)  # the first's keypoint too


def test_the_ear_limbs_are_not_drawn():
    body: list[tuple[float, float] | None] = [None] * 18
    body[2], body[16] = (0.25, 0.5), (0.75, 0.5)  # right shoulder and right ear: limb 17, never drawn
    canvas = pose.draw([body], 40, 80)
    assert not canvas[20, 30:50].any()


# --- the network ----------------------------------------------------------------------------------------------------

def test_the_network_has_the_releases_keys_and_shapes():
    with torch.device("meta"):
        network = pose.body_pose_network()
    state = network.state_dict()
    assert {k: tuple(v.shape) for k, v in state.items()} == OFFICIAL
    assert pose.official_shapes() == OFFICIAL and len(OFFICIAL) == 184
    assert sum(v.numel() for v in state.values()) == 52_311_446


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    return build_pose(tmp_path_factory.mktemp("openpose"))


@pytest.fixture(scope="module")
def estimator(weights):
    return pose.load({"openpose": str(weights)}, torch.device("cpu"))["openpose"]


@pytest.fixture(scope="module")
def release(tmp_path_factory):
    """body_pose_model.pth as released (a pickled state dict): the factory's network of the same seed."""
    return build_pose_pth(tmp_path_factory.mktemp("release"))


def test_the_network_maps_at_an_eighth_of_the_input(estimator):
    with torch.inference_mode():
        pafs, heatmaps = estimator.model(torch.randn(1, 3, 40, 24))
    assert pafs.shape == (1, 38, 5, 3) and heatmaps.shape == (1, 19, 5, 3)
    assert (heatmaps >= 0).all() and (pafs < 0).any()  # the release's heatmaps pass a last ReLU, its PAFs do not


def test_the_factorys_weights_are_recognised(weights):
    from safetensors.torch import load_file

    state = load_file(weights)
    assert pose.recognise(state)
    assert not pose.recognise({k: v for k, v in state.items() if k != "conv1_1.bias"})
    assert not pose.recognise({**state, "conv1_1.bias": torch.zeros(63)})
    assert not pose.recognise({**state, "extra.weight": torch.zeros(1)})


class Recorder(torch.nn.Module):
    """A stand-in network: records its input, answers constant maps at an eighth of it."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[torch.Tensor] = []

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        self.seen.append(x)
        size = (1, 1, x.shape[2] // 8, x.shape[3] // 8)
        return torch.full(size, -0.5).expand(1, 38, *size[2:]), torch.full(size, 0.25).expand(1, 19, *size[2:])


def test_the_network_sees_the_image_as_the_extension_feeds_it():
    recorder = Recorder()
    estimator = pose.PoseEstimator(recorder, torch.device("cpu"), torch.float32)
    red = np.zeros((128, 64, 3), np.uint8)
    red[..., 0] = 255
    heatmaps, pafs = estimator.maps(np.ascontiguousarray(red[..., ::-1]))
    (x,) = recorder.seen
    assert x.shape == (1, 3, 184, 96)  # 368 / 2 high, 64 * 184 / 128 = 92 wide, padded to 96
    assert torch.allclose(x[0, :, :, :92].mean(dim=(1, 2)), torch.tensor([-0.5, -0.5, 255 / 256 - 0.5]))  # BGR
    assert (x[0, :, :, 92:] == 0).all()  # padded with grey 128: 128 / 256 - 0.5
    assert heatmaps.shape == (128, 64, 19) and pafs.shape == (128, 64, 38)
    assert np.allclose(heatmaps, 0.25, atol=1e-5) and np.allclose(pafs, -0.5, atol=1e-5)


class Replay(torch.nn.Module):
    """A stand-in network that sees the people of given maps (at the image's size): it answers them shrunk to an
    eighth of its input, by area, as a network's stride sees them."""

    def __init__(self, heatmaps: np.ndarray, pafs: np.ndarray) -> None:
        super().__init__()
        self.heatmaps = torch.from_numpy(heatmaps).permute(2, 0, 1)[None].float()
        self.pafs = torch.from_numpy(pafs).permute(2, 0, 1)[None].float()

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        size = (x.shape[2] // 8, x.shape[3] // 8)
        return F.adaptive_avg_pool2d(self.pafs, size), F.adaptive_avg_pool2d(self.heatmaps, size)


def test_the_estimator_finds_and_draws_the_people_its_network_sees():
    """End to end on a 192² image (the network sees it at 184², its maps at 23²): the people come back within a
    pixel and are drawn in the limbs' colours, the first one dimmed again by the second."""
    heatmaps, pafs = synthetic_maps([dict(enumerate(p)) for p in PEOPLE], 192, 192, sigma=5.0)
    estimator = pose.PoseEstimator(Replay(heatmaps, pafs), torch.device("cpu"), torch.float32)
    image = np.zeros((192, 192, 3), np.uint8)
    found = sorted(estimator.detect(image), key=lambda body: body[0][0] if body[0] else 0)
    assert len(found) == 2
    for body, person in zip(found, PEOPLE, strict=True):
        assert all(point is not None for point in body)
        assert np.abs(np.array(body) * 192 - np.array(person)).max() <= 1
    drawn = np.asarray(estimator(Image.fromarray(image)))
    assert drawn.shape == (192, 192, 3)
    thighs = {tuple(drawn[97, x]) for x in (54, 144)}  # each right thigh's midpoint: limb 7, (0, 255, 85)
    assert thighs == {(0, 153, 51), (0, 91, 30)}
    assert not drawn[:, :20].any() and not drawn[170:].any()  # black around


def test_the_estimator_maps_an_image_at_its_size_deterministically(estimator):
    rng = np.random.default_rng(3)
    # 200 x 48, padded to 256 x 64: the network sees it 184 x 48 (the search's height), as small as a map gets.
    image = Image.fromarray(rng.integers(0, 256, (200, 48, 3), dtype=np.uint8))
    with ThreadPoolExecutor(2) as pool:  # a replica's two threads: one model call at a time, the same maps
        first, second = pool.map(estimator, [image, image])
    assert first.mode == "RGB" and first.size == (48, 200)
    assert np.array_equal(np.asarray(first), np.asarray(second))


# --- loading --------------------------------------------------------------------------------------------------------

def test_a_replica_runs_the_network_in_float32(estimator):
    """As the extension runs it, whatever the replica's dtype (``pose.load`` takes none)."""
    assert {p.dtype for p in estimator.model.parameters()} == {torch.float32} and estimator.dtype == torch.float32


def test_load_pose_refuses_pickles_naming_the_field(tmp_path, weights, release):
    from safetensors.torch import load_file

    state = torch.load(release, weights_only=True)  # what the converter will read: the release's layout
    assert pose.recognise(state)
    saved = load_file(weights)  # the same seed: the same weights in both files
    assert state.keys() == saved.keys() and all(torch.equal(v, saved[k]) for k, v in state.items())
    for source in (release, release.parent):  # the file, and a folder holding only it
        with pytest.raises(UnsafeWeights) as refused:
            loader.load_pose(str(source))
        assert refused.value.field == pose.FIELD == "preprocessors.openpose" and status_of(refused.value) == 503
    with pytest.raises(ModelLoadError) as refused:  # a source that is not there
        loader.load_pose(str(tmp_path / "missing" / pose.WEIGHTS))
    assert refused.value.field == "preprocessors.openpose"


def test_a_folder_is_read_by_the_files_name(tmp_path, weights):
    """A folder of several converted releases holds the network as body_pose_model.safetensors: that one is read,
    whatever else is there; without it, the folder is refused naming the field."""
    folder = tmp_path / "annotators"
    folder.mkdir()
    save_file({"x": torch.zeros(1)}, str(folder / "hand_pose_model.safetensors"))
    with pytest.raises(ModelLoadError, match="no body_pose_model.safetensors") as refused:
        loader.load_pose(str(folder))
    assert refused.value.field == "preprocessors.openpose"
    (folder / pose.WEIGHTS).symlink_to(weights)
    network = loader.load_pose(str(folder))
    assert sum(p.numel() for p in network.parameters()) == 52_311_446


def test_load_pose_refuses_another_networks_weights_naming_the_field(tmp_path):
    wrong = tmp_path / "other.safetensors"
    save_file({"conv1_1.weight": torch.zeros(64, 3, 3, 3), "head.weight": torch.zeros(2, 2)}, str(wrong))
    with pytest.raises(ModelLoadError) as refused:
        loader.load_pose(str(wrong))
    assert refused.value.field == "preprocessors.openpose"
    assert refused.value.details["unexpected"] == ["head.weight"] and len(refused.value.details["missing"]) == 10
    assert "183 missing" in refused.value.message and "1 unexpected (head.weight" in refused.value.message
    assert status_of(refused.value) == 503

    shapes = tmp_path / "shapes"  # a folder holding the file by its name: every key, none of its shape
    shapes.mkdir()
    save_file({key: torch.zeros(1) for key in OFFICIAL}, str(shapes / pose.WEIGHTS))
    with pytest.raises(ModelLoadError) as refused:
        loader.load_pose(str(shapes))
    assert refused.value.field == "preprocessors.openpose" and "184 wrong shape" in refused.value.message
    assert "missing" not in refused.value.details and "unexpected" not in refused.value.details


def test_the_converter_recognises_the_released_file(tmp_path, release, weights, capsys):
    """body_pose_model.pth as released: converted to safetensors (loaded through the service's loader before it is
    published), reported as the openpose preprocessor, the factory's tensors exactly."""
    from safetensors.torch import load_file

    from deployments.weights.convert import main

    assert main([str(release), str(tmp_path / "openpose")]) == 0
    assert "architecture=openpose purpose=preprocessor scale=-" in capsys.readouterr().out
    state, expected = load_file(tmp_path / "openpose" / pose.WEIGHTS), load_file(weights)
    assert list(state) == list(expected) and all(torch.equal(state[k], expected[k]) for k in state)


# --- as a ControlNet unit's preprocessor ----------------------------------------------------------------------------

SMALL = dict(prompt="a lighthouse", width=96, height=64, steps=2, guidance_scale=5.0, seed=5)


class Recording:
    """A preprocessor's model that keeps what it is handed and what it answers."""

    def __init__(self, inner) -> None:
        self.inner, self.seen = inner, []

    def __call__(self, image: Image.Image) -> Image.Image:
        made = self.inner(image)
        self.seen.append((image, made))
        return made


def test_an_openpose_unit_guides_the_base_by_its_map(base, astronaut, monkeypatch):
    """The base loads the configured network with its ControlNets, and a unit runs through the pipeline with the
    pose map of the image at its resolution (pixel_perfect's: Resize and Fill at 96x64 from 512² is 64) as its
    control image, framed at the generation size: the random network's is black (its heatmaps stay under the 0.1 of
    a peak). A network that sees two people gives their skeletons, framed the same way."""
    from deployments.support.control import ControlUnit, at_resolution
    from deployments.support.control_maps import frame_map
    from deployments.support.generation import GenerationRequest
    from tests.helpers import pixels

    assert set(base.controls.pose) == set(pose.POSE_MODULES) and "openpose" in base.describe()["preprocessors"]
    assert "preprocessor:openpose" in base.fingerprint()
    given: list[dict] = []
    kwargs = base.controls.kwargs  # what the pipeline is called with: the control images among it
    monkeypatch.setattr(base.controls, "kwargs", lambda *args: given.append(kwargs(*args)) or given[-1])

    def recorded(estimator) -> Recording:
        recording = Recording(estimator)
        monkeypatch.setitem(base.controls.pose, "openpose", recording)
        return recording

    random = recorded(base.controls.pose["openpose"])
    unit = ControlUnit(model="tiny-canny", image=astronaut, module="openpose", pixel_perfect=True, resize_mode="fill")
    assert base.generate(GenerationRequest(**SMALL, control=[unit])).images[0].size == (96, 64)
    ((seen, made),) = random.seen
    assert np.array_equal(np.asarray(seen), np.asarray(at_resolution(astronaut, 64)))
    assert made.size == (64, 64) and made.mode == "RGB" and not np.asarray(made).any()
    assert np.array_equal(pixels(given[-1]["image"][0]), pixels(frame_map(made, 96, 64, "fill")))

    heatmaps, pafs = synthetic_maps([dict(enumerate(p)) for p in PEOPLE], 192, 192, sigma=5.0)
    people = recorded(pose.PoseEstimator(Replay(heatmaps, pafs), torch.device("cpu"), torch.float32))
    unit = unit.model_copy(update={"pixel_perfect": False, "processor_res": 192, "resize_mode": "crop"})
    (control,) = base.controls.kwargs("txt2img", [unit], None, 96, 64)["image"]
    ((seen, made),) = people.seen
    assert seen.size == made.size == (192, 192)
    assert {made.getpixel((x, 97)) for x in (54, 144)} == {(0, 153, 51), (0, 91, 30)}  # the two right thighs
    assert np.array_equal(pixels(control), pixels(frame_map(made, 96, 64, "crop")))


def test_openpose_by_the_extensions_names_and_the_pose_modules_not_served():
    """openpose (the extension's key and label) is offered where its network is configured, on every route, reading
    processor_res alone (64 to 2048, else 512 with a note; its slider steps by 8, as depth's) and pixel_perfect. The
    extension's DWPose and animal modules are refused as an unknown module is, naming the unit's field, told which
    pose modules are served (or that none is, where none is configured)."""
    from pydantic import ValidationError

    from deployments.support.config import SDXLBaseConfig
    from deployments.support.control import detect, offered
    from graphs.api import a1111_controlnet, control_fields
    from graphs.api.a1111_models import Txt2ImgRequest
    from tests.helpers import b64

    served, unserved = offered({"openpose": "x", "depth_midas": "y"}), offered({"depth_midas": "y"})
    assert served == ["none", "canny", "invert", "depth_midas", "lineart_standard", "openpose", *model_free.MODULES]
    assert "openpose" not in unserved and pose.UNSERVED == ("dw_openpose_full", "animal_openpose")
    assert a1111_controlnet.module_of(" OpenPose", "m", served) == "openpose"
    for name in (*pose.UNSERVED, "openpose", "openpose_hand"):
        for modules, why in ((served, "; of its pose modules openpose is served here)"),
                             (unserved, "; none of its pose modules is configured here)")):
            if name == "openpose" and modules is served:
                continue
            with pytest.raises(UnknownModel) as e:
                a1111_controlnet.module_of(name, "controlnet_module", modules)
            assert (e.value.field, e.value.details["choices"]) == ("controlnet_module", modules)
            assert why in e.value.message and status_of(e.value) == 422
            assert ("DWPose and animal pose models are not served here" in e.value.message) == (name in pose.UNSERVED)
    with pytest.raises(UnknownModel) as e:  # a module the extension has not: as before, no word of pose
        a1111_controlnet.module_of("depth_zoe", "m", served)
    assert "pose modules" not in e.value.message
    with pytest.raises(UnknownModel) as e:  # the base's own check: no network, no map
        detect(Image.new("RGB", (64, 64)), "openpose", estimators={})
    assert e.value.field == "control.module"

    image = "data:image/png;base64," + b64(Image.new("RGB", (64, 64), (255, 255, 255)))
    units = [{"module": "openpose", "model": "tiny-canny", "image": image, "processor_res": 4096},
             {"module": "openpose", "model": "tiny-canny", "image": image, "pixel_perfect": True}]
    request = Txt2ImgRequest(prompt="x", alwayson_scripts={"ControlNet": {"args": units}})
    first, second = a1111_controlnet.control_units(request, {"tiny-canny": "x"}, edit=False, modules=served)
    assert (first.module, first.processor_res, first.threshold_a, second.pixel_perfect) == ("openpose", 512, None,
                                                                                           True)
    assert any("processor_res=4096 is outside openpose's 64 to 2048: it ran at 512" in n
               for n in a1111_controlnet.notes(request))
    full = Txt2ImgRequest(prompt="x", alwayson_scripts={"ControlNet": {"args": [
        units[1], {**units[1], "module": "openpose_full"}]}})
    with pytest.raises(UnknownModel) as e:  # served where configured: not here
        a1111_controlnet.control_units(full, {"tiny-canny": "x"}, edit=False, modules=served)
    assert e.value.field == "alwayson_scripts.ControlNet.args[1].module"
    assert "openpose_full needs OpenPose's body, hand and face networks" in e.value.message
    native = [{"model": "tiny-canny", "image": image, "preprocessor": "openpose", "processor_res": 128,
               "pixel_perfect": True}]
    (unit,) = control_fields.control_units(native, ["tiny-canny"], edit=False, modules=served)
    assert (unit.module, unit.processor_res, unit.pixel_perfect) == ("openpose", 128, True)
    with pytest.raises(UnknownModel) as e:
        control_fields.control_units(native, ["tiny-canny"], edit=False, modules=unserved)
    assert e.value.field == "controlnets.0.preprocessor"

    for alias_names in (False, True):
        listed = module_list({"openpose": "x"}, alias_names)
        assert "openpose" in listed["module_list"] and "openpose" not in module_list({}, alias_names)["module_list"]
        assert listed["module_detail"]["openpose"]["sliders"] == [
            {"name": "Preprocessor Resolution", "value": 512, "min": 64, "max": 2048, "step": 8}]
    assert SDXLBaseConfig(model={"source": "x"}, preprocessors={"openpose": "y"}).preprocessors == {"openpose": "y"}
    with pytest.raises(ValidationError, match="dw_openpose_full"):
        SDXLBaseConfig(model={"source": "x"}, preprocessors={"dw_openpose_full": "y"})
