"""The M-LSD straight-line preprocessor: the network against a functional rewrite of the original model definition, the
decoding of maps whose segments are known (centres, suppression, both thresholds, the 200 best), the drawing, the
release's keys and shapes, the detector end to end on a stand-in network, the loader's refusals, the converter on
the released .pth, and ``mlsd`` as a ControlNet unit's module: on the tiny base, and by the extension's names and
sliders on the routes' units and on the native API."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

import cv2
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from pydantic import ValidationError
from safetensors.torch import load_file, save_file

from deployments.factory.mlsd import build_mlsd, build_mlsd_pth, mlsd_state_dict
from deployments.support import mlsd, model_free
from deployments.support.errors import ModelLoadError, UnknownModel, UnsafeWeights, status_of
from deployments.weights import loader
from tests.helpers import b64, module_list

# --- the release's state dict, as MobileV2_MLSD_Large lays it out -------------------------------------------------

# MobileNetV2's blocks as M-LSD keeps them: (index, in, out, stride, expansion); block 0 is the stem (4 -> 32, /2).
BLOCKS = [(1, 32, 16, 1, 1), (2, 16, 24, 2, 6), (3, 24, 24, 1, 6), (4, 24, 32, 2, 6), (5, 32, 32, 1, 6),
          (6, 32, 32, 1, 6), (7, 32, 64, 2, 6), (8, 64, 64, 1, 6), (9, 64, 64, 1, 6), (10, 64, 64, 1, 6),
          (11, 64, 96, 1, 6), (12, 96, 96, 1, 6), (13, 96, 96, 1, 6)]
TAPPED = (1, 3, 6, 10, 13)
# The decoder's BlockTypeA (name, in_c1: the tap's channels, in_c2: the deeper ones', upscale) and BlockTypeB names.
MERGES = [("block15", 64, 96, False, "block16"), ("block17", 32, 64, True, "block18"),
          ("block19", 24, 64, True, "block20"), ("block21", 16, 64, True, "block22")]


def _bn(prefix: str, channels: int) -> dict[str, tuple[int, ...]]:
    return {f"{prefix}.weight": (channels,), f"{prefix}.bias": (channels,), f"{prefix}.running_mean": (channels,),
            f"{prefix}.running_var": (channels,), f"{prefix}.num_batches_tracked": ()}


def _conv(prefix: str, out: int, inputs: int, kernel: int, bias: bool) -> dict[str, tuple[int, ...]]:
    return {f"{prefix}.weight": (out, inputs, kernel, kernel), **({f"{prefix}.bias": (out,)} if bias else {})}


def release_layout() -> dict[str, tuple[int, ...]]:
    out = {**_conv("backbone.features.0.0", 32, 4, 3, False), **_bn("backbone.features.0.1", 32)}
    for index, cin, cout, _, expansion in BLOCKS:
        p, hidden, n = f"backbone.features.{index}.conv", cin * expansion, 0
        if expansion != 1:
            out |= {**_conv(f"{p}.0.0", hidden, cin, 1, False), **_bn(f"{p}.0.1", hidden)}
            n = 1
        out |= {**_conv(f"{p}.{n}.0", hidden, 1, 3, False), **_bn(f"{p}.{n}.1", hidden),
                **_conv(f"{p}.{n + 1}", cout, hidden, 1, False), **_bn(f"{p}.{n + 2}", cout)}
    for merge, tap, deeper, _, refine in MERGES:
        out |= {**_conv(f"{merge}.conv1.0", 64, deeper, 1, True), **_bn(f"{merge}.conv1.1", 64),
                **_conv(f"{merge}.conv2.0", 64, tap, 1, True), **_bn(f"{merge}.conv2.1", 64),
                **_conv(f"{refine}.conv1.0", 128, 128, 3, True), **_bn(f"{refine}.conv1.1", 128),
                **_conv(f"{refine}.conv2.0", 64, 128, 3, True), **_bn(f"{refine}.conv2.1", 64)}
    return out | {**_conv("block23.conv1.0", 64, 64, 3, True), **_bn("block23.conv1.1", 64),
                  **_conv("block23.conv2.0", 64, 64, 3, True), **_bn("block23.conv2.1", 64),
                  **_conv("block23.conv3", 16, 64, 1, True)}


RELEASE = release_layout()


def test_the_network_has_the_releases_keys_and_shapes():
    with torch.device("meta"):
        state = mlsd.mlsd_network().state_dict()
    assert {k: tuple(v.shape) for k, v in state.items()} == RELEASE
    assert mlsd.official_shapes() == RELEASE and len(RELEASE) == 362
    assert sum(p.numel() for p in mlsd.from_state_dict(mlsd_state_dict()).parameters()) == 1_533_680


# --- the network, against the original's arithmetic written out ---------------------------------------------------

def functional(state: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """MobileV2_MLSD_Large's forward, step by step in torch's functions on the state dict."""
    def bn(y: torch.Tensor, p: str) -> torch.Tensor:
        return F.batch_norm(y, state[f"{p}.running_mean"], state[f"{p}.running_var"], state[f"{p}.weight"],
                            state[f"{p}.bias"], training=False, eps=1e-5)

    def conv_bn_relu6(y: torch.Tensor, p: str, stride: int = 1, groups: int = 1) -> torch.Tensor:
        weight = state[f"{p}.0.weight"]
        if stride == 2:  # ConvBNReLU: TFLite's padding
            y, padding = F.pad(y, (0, 1, 0, 1)), 0
        else:
            padding = weight.shape[-1] // 2
        return F.relu6(bn(F.conv2d(y, weight, None, stride, padding, groups=groups), f"{p}.1"))

    def unit(y: torch.Tensor, p: str, padding: int = 0, dilation: int = 1) -> torch.Tensor:
        return F.relu(bn(F.conv2d(y, state[f"{p}.0.weight"], state[f"{p}.0.bias"], padding=padding,
                                  dilation=dilation), f"{p}.1"))

    x = conv_bn_relu6(x, "backbone.features.0", stride=2)
    taps = []
    for index, cin, cout, stride, expansion in BLOCKS:
        p, y, n = f"backbone.features.{index}.conv", x, 0
        if expansion != 1:
            y, n = conv_bn_relu6(y, f"{p}.0"), 1
        y = conv_bn_relu6(y, f"{p}.{n}", stride, groups=cin * expansion)
        y = bn(F.conv2d(y, state[f"{p}.{n + 1}.weight"]), f"{p}.{n + 2}")
        x = x + y if stride == 1 and cin == cout else y
        if index in TAPPED:
            taps.append(x)
    x = taps[4]
    for (merge, _, _, upscale, refine), tap in zip(MERGES, (taps[3], taps[2], taps[1], taps[0]), strict=True):
        deeper = unit(x, f"{merge}.conv1")
        if upscale:
            deeper = F.interpolate(deeper, scale_factor=2.0, mode="bilinear", align_corners=True)
        x = torch.cat((unit(tap, f"{merge}.conv2"), deeper), dim=1)
        x = unit(unit(x, f"{refine}.conv1", 1) + x, f"{refine}.conv2", 1)
    x = unit(unit(x, "block23.conv1", 5, 5), "block23.conv2", 1)
    return F.conv2d(x, state["block23.conv3.weight"], state["block23.conv3.bias"])[:, 7:]


@pytest.fixture(scope="module")
def network():
    return mlsd.from_state_dict(mlsd_state_dict())


def test_the_network_is_the_originals_arithmetic(network):
    state = mlsd_state_dict()
    x = torch.randn(1, 4, 32, 48, generator=torch.Generator().manual_seed(5))
    with torch.inference_mode():
        ours, theirs = network(x), functional(state, x)
    assert ours.shape == (1, 9, 16, 24)
    assert torch.allclose(ours, theirs, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(ours[0, 0], ours[0, 0].mean())  # the maps vary: the test compares something


# --- decoding -------------------------------------------------------------------------------------------------------

def synthetic(height: int, width: int, centres: list[tuple[int, int, float, tuple[float, ...]]]) -> torch.Tensor:
    """The network's maps (9, height, width): centre logits of -8 (a score of 0.0003) but at ``centres`` (y, x,
    logit, the displacements to the two ends: x0, y0, x1, y1)."""
    maps = torch.zeros(9, height, width)
    maps[0] = -8.0
    for y, x, logit, ends in centres:
        maps[0, y, x] = logit
        maps[1:5, y, x] = torch.tensor(ends)
    return maps


CENTRES = [(10, 12, 2.0, (-5.0, 0.0, 5.0, 0.0)),   # A: horizontal, 10 map pixels long, score 0.88
           (10, 13, 1.5, (0.0, -6.0, 0.0, 6.0)),   # beside A, lower: no peak of its window
           (20, 30, 0.0, (0.0, -4.0, 0.0, 4.0)),   # B: vertical, 8 long, score 0.5
           (25, 5, -1.0, (0.02, 0.0, -0.02, 0.0)),  # C: 0.04 long, score 0.27
           (3, 35, -3.0, (1.0, 1.0, -1.0, -1.0))]  # D: score 0.047
A, B, C, D = (14.0, 20.0, 34.0, 20.0), (60.0, 32.0, 60.0, 48.0), (10.04, 50.0, 9.96, 50.0), (72.0, 8.0, 68.0, 4.0)


def test_segments_are_the_peaks_above_both_thresholds_at_twice_the_maps_pixels():
    maps = synthetic(32, 40, CENTRES)
    found = mlsd.segments(maps[None], 0.1, 0.1)
    assert found.dtype == np.float64 and found.shape == (2, 4)
    assert np.allclose(found, [A, B])  # best first; C too short, D too faint, A's neighbour no peak
    assert np.allclose(mlsd.segments(maps, 0.01, 0.01), [A, B, C, D], atol=1e-6)
    assert np.allclose(mlsd.segments(maps, 0.01, 9.0), [A])  # B's 8 is not over 9, A's 10 is
    assert np.allclose(mlsd.segments(maps, 0.6, 0.1), [A])
    assert mlsd.segments(maps, 2.0, 0.1).shape == (0, 4)  # no score reaches the slider's largest


def test_the_value_threshold_compares_in_float64_as_numpy_1_did():
    """A1111 runs numpy 1.26, whose comparison of a float32 score with a Python float is made in float64: a
    threshold just under the score keeps it (numpy 2 would round the threshold to the score and drop it)."""
    maps = synthetic(16, 16, [(8, 8, 0.3, (-3.0, 0.0, 3.0, 0.0))])
    score = float(torch.sigmoid(torch.tensor(0.3)))
    assert mlsd.segments(maps, score - 1e-12, 0.1).shape == (1, 4)
    assert mlsd.segments(maps, score, 0.1).shape == (0, 4)


def test_only_the_200_best_centres_are_read():
    centres = [(2 * i, 2 * j, 1.0 + 0.001 * (25 * i + j), (-2.0, 0.0, 2.0, 0.0)) for i in range(20) for j in range(25)]
    found = mlsd.segments(synthetic(40, 50, centres), 0.1, 0.1)
    assert found.shape == (200, 4)
    best = sorted(centres, key=lambda c: -c[2])[:200]
    assert np.allclose(found[:, :2], [(2 * (x - 2.0), 2 * y) for y, x, _, _ in best])


# --- drawing --------------------------------------------------------------------------------------------------------

def test_segments_are_drawn_one_pixel_wide_their_ends_truncated():
    canvas = mlsd.draw(np.array([[2.9, 3.2, 12.7, 3.9], [-0.9, 6.5, 5.9, 6.1]]), 8, 16)
    assert canvas.shape == (8, 16) and canvas.dtype == np.uint8
    expected = np.zeros((8, 16), np.uint8)
    expected[3, 2:13] = 255
    expected[6, 0:6] = 255  # -0.9 truncates toward zero
    assert np.array_equal(canvas, expected)


def test_drawing_is_the_extensions_white_line_on_its_first_channel():
    rng = np.random.default_rng(4)
    lines = rng.uniform(-20, 84, (30, 4))
    theirs = np.zeros((64, 48, 3), np.uint8)
    for line in lines:
        x0, y0, x1, y1 = (int(v) for v in line)
        cv2.line(theirs, (x0, y0), (x1, y1), [255, 255, 255], 1)
    assert np.array_equal(mlsd.draw(lines, 64, 48), theirs[:, :, 0])


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), 3e9])
def test_an_end_opencv_cannot_take_ends_the_drawing_there(bad):
    canvas = mlsd.draw(np.array([[0, 0, 5, 0], [bad, 1, 2, 2], [0, 5, 5, 5]]), 8, 8)
    assert canvas[0, :6].all() and not canvas[1:].any()


# --- the detector ---------------------------------------------------------------------------------------------------

class Replay(torch.nn.Module):
    """A stand-in network: records its input, answers given maps (9, H/2, W/2)."""

    def __init__(self, maps: torch.Tensor) -> None:
        super().__init__()
        self.maps, self.seen = maps, []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.seen.append(x)
        assert x.shape[2:] == (2 * self.maps.shape[1], 2 * self.maps.shape[2])
        return self.maps[None]


def test_the_detector_reads_the_padded_image_and_crops_its_lines():
    """A 100 x 70 image is padded to 128² (edge pixels); the network sees RGB and ones as x / 127.5 - 1; a line in the
    padding is cropped off with it."""
    maps = synthetic(64, 64, [(10, 20, 3.0, (-8.0, 0.0, 8.0, 0.0)), (20, 55, 3.0, (-3.0, 0.0, 3.0, 0.0))])
    replay = Replay(maps)
    detector = mlsd.LineDetector(replay, torch.device("cpu"))
    rgb = np.zeros((70, 100, 3), np.uint8)
    rgb[..., 0], rgb[..., 2] = 255, 51
    made = detector(Image.fromarray(rgb), 0.1, 0.1)
    (x,) = replay.seen
    assert x.shape == (1, 4, 128, 128) and x.dtype == torch.float32
    assert torch.allclose(x[0, :, 0, 0], torch.tensor([1.0, -1.0, 51 / 127.5 - 1, 1 / 127.5 - 1]), atol=1e-7)
    assert torch.equal(x[0, :, 127, 127], x[0, :, 0, 0])  # the edge, repeated
    assert made.size == (100, 70) and made.mode == "RGB"
    lines = np.asarray(made)[..., 0]
    expected = np.zeros((70, 100), np.uint8)
    expected[20, 24:57] = 255
    assert np.array_equal(lines, expected) and np.array_equal(np.asarray(made)[..., 2], expected)
    assert not detector(Image.fromarray(rgb), 0.1, 17.0).getbbox()  # 16 map pixels is not over 17


def test_detect_runs_mlsd_at_the_resolution_with_both_thresholds():
    from deployments.support.control import at_resolution, detect

    seen = []

    def model(image, value, distance):
        seen.append((image.size, value, distance))
        return Image.new("RGB", image.size)

    made = detect(Image.new("RGB", (300, 200), "white"), "mlsd", 64, 0.3, 7.5, estimators={"mlsd": model})
    assert seen == [(at_resolution(Image.new("RGB", (300, 200)), 64).size, 0.3, 7.5)] and made.size == (96, 64)
    with pytest.raises(UnknownModel) as refused:  # no network, no map
        detect(Image.new("RGB", (64, 64)), "mlsd", estimators={})
    assert refused.value.field == "control.module" and "M-LSD" in refused.value.message


def test_the_factorys_network_maps_an_image_deterministically(network):
    detector = mlsd.LineDetector(network, torch.device("cpu"))
    image = Image.fromarray(np.random.default_rng(2).integers(0, 256, (72, 64, 3), dtype=np.uint8))
    first, second = detector(image), detector(image)
    assert first.size == (64, 72) and np.array_equal(np.asarray(first), np.asarray(second))
    assert set(np.unique(np.asarray(first))) <= {0, 255}


# --- loading --------------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    return build_mlsd(tmp_path_factory.mktemp("mlsd"))


@pytest.fixture(scope="module")
def release(tmp_path_factory):
    """mlsd_large_512_fp32.pth as released (a pickled state dict): the factory's network of the same seed."""
    return build_mlsd_pth(tmp_path_factory.mktemp("release"))


def test_a_replica_runs_the_network_in_float32(weights):
    (detector,) = mlsd.load({"mlsd": str(weights)}, torch.device("cpu")).values()
    assert {p.dtype for p in detector.model.parameters()} == {torch.float32}
    assert not detector.model.training


def test_load_mlsd_refuses_pickles_and_missing_sources_naming_the_field(tmp_path, release):
    for source in (release, release.parent):  # the file, and a folder holding only it
        with pytest.raises(UnsafeWeights) as refused:
            loader.load_mlsd(str(source))
        assert refused.value.field == mlsd.FIELD == "preprocessors.mlsd" and status_of(refused.value) == 503
    with pytest.raises(ModelLoadError) as refused:
        loader.load_mlsd(str(tmp_path / "missing" / mlsd.WEIGHTS))
    assert refused.value.field == "preprocessors.mlsd"


def test_load_mlsd_refuses_another_networks_weights_naming_the_field(tmp_path, weights):
    state = load_file(weights)
    wrong = tmp_path / "other.safetensors"
    save_file({**{k: v for k, v in state.items() if not k.startswith("block23.")}, "head.weight": torch.zeros(2)},
              str(wrong))
    with pytest.raises(ModelLoadError) as refused:
        loader.load_mlsd(str(wrong))
    assert refused.value.field == "preprocessors.mlsd" and status_of(refused.value) == 503
    assert refused.value.details["unexpected"] == ["head.weight"]
    assert refused.value.details["missing"][0] == "block23.conv1.0.bias"
    assert "14 missing" in refused.value.message  # block23's, its step counters aside
    shapes = tmp_path / "shapes"  # a folder holding the file by its name: one tensor of another shape
    shapes.mkdir()
    save_file({**state, "block23.conv3.weight": torch.zeros(9, 64, 1, 1)}, str(shapes / mlsd.WEIGHTS))
    with pytest.raises(ModelLoadError) as refused:
        loader.load_mlsd(str(shapes))
    assert refused.value.details["wrong_shape"] == ["block23.conv3.weight"] and "missing" not in refused.value.details


def test_a_file_without_batchnorms_step_counters_loads(tmp_path, weights):
    state, file = load_file(weights), tmp_path / "a.safetensors"
    save_file({k: v for k, v in state.items() if not k.endswith("num_batches_tracked")}, str(file))
    network = loader.load_mlsd(str(file))
    assert network.state_dict()["block23.conv1.1.num_batches_tracked"] == 0
    assert torch.equal(network.state_dict()["block23.conv3.weight"], state["block23.conv3.weight"])


def test_the_converter_recognises_the_released_file(tmp_path, release, weights, capsys):
    """mlsd_large_512_fp32.pth as released: converted to safetensors (loaded through the service's loader before it
    is published), reported as the mlsd preprocessor, the factory's tensors exactly."""
    from deployments.weights.convert import main

    assert main([str(release), str(tmp_path / "mlsd")]) == 0
    assert "architecture=mlsd purpose=preprocessor scale=-" in capsys.readouterr().out
    state, expected = load_file(tmp_path / "mlsd" / mlsd.WEIGHTS), load_file(weights)
    assert list(state) == list(expected) and all(torch.equal(state[k], expected[k]) for k in state)
    assert mlsd.recognise(torch.load(release, weights_only=True))


# --- as a ControlNet unit's preprocessor ----------------------------------------------------------------------------

SMALL = dict(prompt="a lighthouse", width=96, height=64, steps=2, guidance_scale=5.0, seed=5)


def test_an_mlsd_unit_guides_the_base_by_its_map(base, astronaut, monkeypatch):
    """The base loads the configured network with its ControlNets; a unit's map is the detector's of the image at its
    resolution with the unit's thresholds (its sliders' defaults when unset), framed at the generation size. The
    factory's random network draws a few short lines at the defaults, none at the largest value threshold."""
    from deployments.support.control import ControlUnit, at_resolution
    from deployments.support.control_maps import frame_map
    from deployments.support.generation import GenerationRequest
    from tests.helpers import pixels

    assert set(base.controls.mlsd) == {"mlsd"} and "mlsd" in base.describe()["preprocessors"]
    assert "preprocessor:mlsd" in base.fingerprint()
    detector, seen = base.controls.mlsd["mlsd"], []

    def recording(image, value, distance):
        seen.append((image, value, distance))
        return detector(image, value, distance)

    monkeypatch.setitem(base.controls.mlsd, "mlsd", recording)
    given: list[dict] = []
    kwargs = base.controls.kwargs  # what the pipeline is called with: the control images among it
    monkeypatch.setattr(base.controls, "kwargs", lambda *args: given.append(kwargs(*args)) or given[-1])
    unit = ControlUnit(model="tiny-canny", image=astronaut, module="mlsd", processor_res=64)
    assert (unit.threshold_a, unit.threshold_b) == (0.1, 0.1)
    assert base.generate(GenerationRequest(**SMALL, control=[unit])).images[0].size == (96, 64)
    ((image, value, distance),) = seen
    assert np.array_equal(np.asarray(image), np.asarray(at_resolution(astronaut, 64))) and (value, distance) == (0.1,
                                                                                                                0.1)
    made = detector(image, 0.1, 0.1)
    assert made.size == (64, 64) and np.asarray(made).any()
    assert np.array_equal(pixels(given[-1]["image"][0]), pixels(frame_map(made, 96, 64, "crop")))
    (control,) = base.controls.kwargs("txt2img", [unit.model_copy(update={"threshold_a": 2.0})], None, 96, 64)["image"]
    assert seen[-1][1:] == (2.0, 0.1) and not pixels(control).any()


def test_mlsd_by_the_extensions_names_and_sliders():
    """mlsd (the extension's key and label) is offered where its network is configured, reading processor_res and
    both thresholds within the extension's bounds (else their defaults, with a note, as the extension resets them);
    the module list gives its three sliders; where it is not configured it is refused naming the module's field,
    /controlnet/detect's too."""
    from deployments.support.config import SDXLBaseConfig
    from deployments.support.control import offered
    from graphs.api import a1111_controlnet
    from graphs.api.a1111_models import Txt2ImgRequest
    from graphs.api.controlnet import ControlNetRoutes, DetectRequest

    served, unserved = offered({"mlsd": "x"}), offered({"openpose": "y"})
    assert served == ["none", "canny", "invert", "lineart_standard", "mlsd", *model_free.MODULES]
    assert "mlsd" not in unserved
    assert a1111_controlnet.module_of(" MLSD", "m", served) == "mlsd"
    image = "data:image/png;base64," + b64(Image.new("RGB", (64, 64), "white"))
    units = [{"module": "mlsd", "model": "tiny-canny", "image": image},
             {"module": "mlsd", "model": "tiny-canny", "image": image, "processor_res": 256, "threshold_a": 0.5,
              "threshold_b": 12.5},
             {"module": "mlsd", "model": "tiny-canny", "image": image, "threshold_a": 100, "threshold_b": 200}]
    request = Txt2ImgRequest(prompt="x", alwayson_scripts={"ControlNet": {"args": units}})
    made = a1111_controlnet.control_units(request, {"tiny-canny": "x"}, edit=False, modules=served)
    assert [(u.module, u.processor_res, u.threshold_a, u.threshold_b) for u in made] == [
        ("mlsd", 512, 0.1, 0.1), ("mlsd", 256, 0.5, 12.5), ("mlsd", 512, 0.1, 0.1)]
    assert [n for n in a1111_controlnet.notes(request) if "args[2]" in n] == [
        "alwayson_scripts.ControlNet.args[2].threshold_a=100 is outside mlsd's 0.01 to 2: it ran at 0.1, as the "
        "extension resets it",
        "alwayson_scripts.ControlNet.args[2].threshold_b=200 is outside mlsd's 0.01 to 20: it ran at 0.1, as the "
        "extension resets it"]
    assert "Threshold A: 0.5, Threshold B: 12.5" in a1111_controlnet.infotext(request)["ControlNet 1"]
    with pytest.raises(UnknownModel) as refused:
        a1111_controlnet.control_units(request, {"tiny-canny": "x"}, edit=False, modules=unserved)
    assert refused.value.field == "alwayson_scripts.ControlNet.args[0].module" and status_of(refused.value) == 422

    for alias_names in (False, True):
        listed = module_list({"mlsd": "x"}, alias_names)
        assert "mlsd" in listed["module_list"] and "mlsd" not in module_list({}, alias_names)["module_list"]
        assert listed["module_detail"]["mlsd"]["sliders"] == [
            {"name": "Preprocessor Resolution", "value": 512, "min": 64, "max": 2048, "step": 8},
            {"name": "MLSD Value Threshold", "value": 0.1, "min": 0.01, "max": 2.0, "step": 0.01},
            {"name": "MLSD Distance Threshold", "value": 0.1, "min": 0.01, "max": 20.0, "step": 0.01}]
    routes = SimpleNamespace(config=SimpleNamespace(base=SimpleNamespace(preprocessors={"openpose": "y"})))
    body = DetectRequest(controlnet_module="mlsd", controlnet_input_images=[image])
    with pytest.raises(UnknownModel) as refused:
        asyncio.run(ControlNetRoutes.controlnet_detect(routes, body))  # type: ignore[arg-type]
    assert (refused.value.field, status_of(refused.value)) == ("controlnet_module", 422)
    assert SDXLBaseConfig(model={"source": "x"}, preprocessors={"mlsd": "y"}).preprocessors == {"mlsd": "y"}


def test_mlsd_on_the_native_api_and_each_modules_threshold_bounds():
    """The native unit's low_threshold and high_threshold are mlsd's value and distance thresholds (unset: 0.1
    each), each checked against the preprocessor's own bounds, naming the field; canny's stay 1 to 255. The base's
    unit checks the same, and an mlsd unit's unset thresholds are its defaults."""
    from deployments.support.control import ControlUnit
    from graphs.api.control_fields import ControlNetUnit, control_units

    image = b64(Image.new("RGB", (48, 32), "white"))
    native = [{"model": "tiny-canny", "image": image, "preprocessor": "mlsd"},
              {"model": "tiny-canny", "image": image, "preprocessor": "mlsd", "low_threshold": 1.5,
               "high_threshold": 20}]
    made = control_units(native, ["tiny-canny"], edit=False, modules=["none", "mlsd"])
    assert [(u.module, u.threshold_a, u.threshold_b) for u in made] == [("mlsd", 0.1, 0.1), ("mlsd", 1.5, 20.0)]
    (canny,) = control_units([{"model": "tiny-canny", "image": image, "preprocessor": "canny"}], ["tiny-canny"],
                             edit=False)
    assert (canny.threshold_a, canny.threshold_b) == (100.0, 200.0)
    for preprocessor, field, value in (("mlsd", "low_threshold", 2.5), ("mlsd", "high_threshold", 0.001),
                                       ("canny", "low_threshold", 0.5), ("canny", "high_threshold", 300)):
        with pytest.raises(ValidationError) as refused:
            ControlNetUnit(model="tiny-canny", preprocessor=preprocessor, **{field: value})
        (error,) = refused.value.errors()
        assert error["loc"] == (field,) and (preprocessor in error["msg"] or error["type"] != "value_error")
    assert ControlNetUnit(model="tiny-canny", preprocessor="depth_midas", low_threshold=0.5).low_threshold == 0.5

    assert (ControlUnit(model="m", module="mlsd").threshold_a, ControlUnit(model="m", module="canny").threshold_a,
            ControlUnit(model="m").threshold_a) == (0.1, 100.0, None)  # none reads no threshold
    for module, field, value in (("mlsd", "threshold_a", 3.0), ("mlsd", "threshold_b", 25.0),
                                 ("canny", "threshold_a", 0.5)):
        with pytest.raises(ValidationError, match=f"{field}={value:g} is outside {module}'s"):
            ControlUnit(model="m", module=module, **{field: value})
