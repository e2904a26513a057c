"""The soft-edge and scribble preprocessors as A1111's ControlNet extension makes their maps: HED
(ControlNetHED_Apache2) and PiDiNet (table5_pidinet, its pixel differences as plain convolutions) on the factory's
random weights in the released layouts against the extension's computation written out here, the safe quantisation
and the scribble's post-processing against float64 rewrites, loading and conversion from the released .pth files, a
unit guiding the tiny base, and the extension's names on the routes."""

from __future__ import annotations

import cv2
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from pydantic import ValidationError
from safetensors.torch import load_file, save_file

from deployments.factory.softedge import write_release
from deployments.support import model_free, softedge, softedge_nets
from deployments.support.config import SDXLBaseConfig
from deployments.support.control import ControlUnit, control_image, detect, offered
from deployments.support.control_maps import frame_map
from deployments.support.errors import ModelLoadError, UnknownModel, UnsafeWeights, status_of
from deployments.support.generation import GenerationRequest
from deployments.weights import loader
from tests.helpers import b64, gaussian64, module_list, pixels

# --- the releases' layouts, as the extension's classes lay them out -------------------------------------------------

# ControlNetHED.pth: annotator/hed's ControlNetHED_Apache2: norm, then five DoubleConvBlocks (convs.0 .. convs.n-1,
# projection), (in, out, convolutions): (3, 64, 2), (64, 128, 2), (128, 256, 3), (256, 512, 3), (512, 512, 3).
CONTROLNET_HED = [
    ("norm", (1, 3, 1, 1)),
    *((name, shape) for block, (inputs, width, layers) in enumerate(
        [(3, 64, 2), (64, 128, 2), (128, 256, 3), (256, 512, 3), (512, 512, 3)], start=1)
      for name, shape in [
          *((f"block{block}.convs.{j}.{p}", (width, inputs if j == 0 else width, 3, 3) if p == "weight" else (width,))
            for j in range(layers) for p in ("weight", "bias")),
          (f"block{block}.projection.weight", (1, width, 1, 1)), (f"block{block}.projection.bias", (1,))]),
]


def _pdc_block(name: str, inplane: int, ouplane: int, stride: int = 1) -> list:
    """annotator/pidinet's PDCBlock: (pool and) a 1x1 shortcut with a bias where it widens, a depthwise 3x3 pixel
    difference conv1 without one, a 1x1 conv2 without one."""
    shortcut = [(f"{name}.shortcut.weight", (ouplane, inplane, 1, 1)), (f"{name}.shortcut.bias", (ouplane,))]
    return [*(shortcut if stride > 1 else []), (f"{name}.conv1.weight", (inplane, 1, 3, 3)),
            (f"{name}.conv2.weight", (ouplane, inplane, 1, 1))]


# table5_pidinet.pth's state_dict after DataParallel's "module.": pidinet() = PiDiNet(60, carv4, dil=24, sa=True):
# the stem, 15 blocks, then (registered in this order) four MapReduce(24), four CSAM(24), four CDCM(C, 24), the
# classifier.
TABLE5_PIDINET = [
    ("init_block.weight", (60, 3, 3, 3)),
    *_pdc_block("block1_1", 60, 60), *_pdc_block("block1_2", 60, 60), *_pdc_block("block1_3", 60, 60),
    *_pdc_block("block2_1", 60, 120, 2), *_pdc_block("block2_2", 120, 120), *_pdc_block("block2_3", 120, 120),
    *_pdc_block("block2_4", 120, 120),
    *_pdc_block("block3_1", 120, 240, 2), *_pdc_block("block3_2", 240, 240), *_pdc_block("block3_3", 240, 240),
    *_pdc_block("block3_4", 240, 240),
    *_pdc_block("block4_1", 240, 240, 2), *_pdc_block("block4_2", 240, 240), *_pdc_block("block4_3", 240, 240),
    *_pdc_block("block4_4", 240, 240),
    *((name, shape) for i in range(4)
      for name, shape in [(f"conv_reduces.{i}.conv.weight", (1, 24, 1, 1)), (f"conv_reduces.{i}.conv.bias", (1,))]),
    *((name, shape) for i in range(4)
      for name, shape in [(f"attentions.{i}.conv1.weight", (4, 24, 1, 1)), (f"attentions.{i}.conv1.bias", (4,)),
                          (f"attentions.{i}.conv2.weight", (1, 4, 3, 3))]),
    *((name, shape) for i, c in enumerate((60, 120, 240, 240))
      for name, shape in [(f"dilations.{i}.conv1.weight", (24, c, 1, 1)), (f"dilations.{i}.conv1.bias", (24,)),
                          *((f"dilations.{i}.conv2_{k}.weight", (24, 24, 3, 3)) for k in range(1, 5))]),
    ("classifier.weight", (1, 4, 1, 1)), ("classifier.bias", (1,)),
]
# carv4: each pixel-difference convolution's kind, the stem's first, then blocks 1_1 ... 4_4.
CARV4 = ["cd", "ad", "rd", "cv"] * 4
BLOCKS = [("block1_1", 1), ("block1_2", 1), ("block1_3", 1), ("block2_1", 2), ("block2_2", 1), ("block2_3", 1),
          ("block2_4", 1), ("block3_1", 2), ("block3_2", 1), ("block3_3", 1), ("block3_4", 1), ("block4_1", 2),
          ("block4_2", 1), ("block4_3", 1), ("block4_4", 1)]


def test_the_networks_read_the_released_names_and_shapes():
    """The releases' names in their files' order and each one's shape; 14.7 M weights in ControlNetHED.pth (59 MB in
    float32), 0.71 M in table5_pidinet.pth; our PiDiNet's radial kernels are 5x5 once rewritten, the rest as
    released."""
    assert list(softedge_nets.release_shapes("hed").items()) == CONTROLNET_HED
    assert list(softedge_nets.release_shapes("pidinet").items()) == TABLE5_PIDINET
    assert sum(int(np.prod(s)) for _, s in CONTROLNET_HED) == 14_716_168
    assert sum(int(np.prod(s)) for _, s in TABLE5_PIDINET) == 710_149
    with torch.device("meta"):
        plain = {k: tuple(v.shape) for k, v in softedge_nets.PiDiNet().state_dict().items()}
    differences = ["init_block.weight", *(f"{name}.conv1.weight" for name, _ in BLOCKS)]
    radial = {name for name, kind in zip(differences, CARV4, strict=True) if kind == "rd"}
    assert radial == {"block1_2.conv1.weight", "block2_3.conv1.weight", "block3_3.conv1.weight",
                      "block4_3.conv1.weight"}
    assert {k for k, s in plain.items() if s != dict(TABLE5_PIDINET)[k]} == radial
    assert all(plain[k][2:] == (5, 5) for k in radial)


# --- the extension's computation, written out -----------------------------------------------------------------------

def hed_reference(state: dict[str, torch.Tensor], rgb: np.ndarray) -> np.ndarray:
    """annotator/hed's apply_hed on an RGB array, float64 throughout: RGB 0..255 less ``norm``; each block (2x2 max-pool
    first but in the first) its 3x3 convolutions with ReLUs, and its 1x1 projection; the five projections resized
    bilinearly to the input's size (PyTorch's, half-pixel centres, as OpenCV's), averaged, sigmoid."""
    w = {k: v.double() for k, v in state.items()}
    x = torch.from_numpy(rgb.astype(np.float64)).permute(2, 0, 1)[None] - w["norm"]
    sides = []
    for block in range(1, 6):
        if block > 1:
            x = F.max_pool2d(x, 2, 2)
        j = 0
        while f"block{block}.convs.{j}.weight" in w:
            x = F.relu(F.conv2d(x, w[f"block{block}.convs.{j}.weight"], w[f"block{block}.convs.{j}.bias"], padding=1))
            j += 1
        side = F.conv2d(x, w[f"block{block}.projection.weight"], w[f"block{block}.projection.bias"])
        sides.append(F.interpolate(side, rgb.shape[:2], mode="bilinear", align_corners=False))
    return torch.sigmoid(torch.cat(sides, 1).mean(1))[0].numpy()


def convolved(x: torch.Tensor, weight: torch.Tensor, padding: int, groups: int) -> torch.Tensor:
    """A convolution; a depthwise one (``groups``: every channel) as each channel's patches times its kernel (PyTorch's
    float64 grouped convolution runs one slow call per channel)."""
    if groups == 1:
        return F.conv2d(x, weight, padding=padding)
    k = weight.shape[-1]
    patches = F.unfold(x, k, padding=padding).reshape(x.shape[1], k * k, -1)
    out = torch.einsum("ckl,ck->cl", patches, weight.reshape(x.shape[1], k * k))
    return out.reshape(1, x.shape[1], x.shape[2] + 2 * padding - k + 1, x.shape[3] + 2 * padding - k + 1)


def pixel_difference(kind: str, x: torch.Tensor, weight: torch.Tensor, groups: int) -> torch.Tensor:
    """annotator/pidinet's createConvFunc: a 3x3 weight's vanilla, central (the convolution less its summed 1x1),
    angular (each tap less its clockwise neighbour) or radial (a 5x5 ring pair) convolution."""
    if kind == "cv":
        return convolved(x, weight, 1, groups)
    if kind == "cd":
        return convolved(x, weight, 1, groups) - convolved(x, weight.sum(dim=(2, 3), keepdim=True), 0, groups)
    flat = weight.reshape(*weight.shape[:2], 9)
    if kind == "ad":
        return convolved(x, (flat - flat[:, :, [3, 0, 1, 6, 4, 2, 7, 8, 5]]).reshape(weight.shape), 1, groups)
    buffer = torch.zeros(*weight.shape[:2], 25, dtype=weight.dtype)
    buffer[:, :, [0, 2, 4, 10, 14, 20, 22, 24]] = flat[:, :, 1:]
    buffer[:, :, [6, 7, 8, 11, 13, 16, 17, 18]] = -flat[:, :, 1:]
    return convolved(x, buffer.reshape(*weight.shape[:2], 5, 5), 2, groups)


def pidinet_reference(state: dict[str, torch.Tensor], rgb: np.ndarray) -> np.ndarray:
    """annotator/pidinet's apply_pidinet on an RGB array, float64, from the released 3x3 weights: BGR / 255; the
    stem and blocks as pixel differences; each stage's end through CDCM (ReLU, 1x1, dilations 5/7/9/11 summed),
    CSAM (times the sigmoid of 1x1 then 3x3 of its ReLU) and MapReduce, resized bilinearly; the classifier's
    sigmoid (the last of its outputs)."""
    w = {k: v.double() for k, v in state.items()}
    x = torch.from_numpy(np.ascontiguousarray(rgb[..., ::-1]).astype(np.float64) / 255.0).permute(2, 0, 1)[None]
    size = rgb.shape[:2]
    x = pixel_difference(CARV4[0], x, w["init_block.weight"], 1)
    stages = []
    for (name, stride), kind in zip(BLOCKS, CARV4[1:], strict=True):
        if stride > 1:
            x = F.max_pool2d(x, 2, 2)
        y = F.relu(pixel_difference(kind, x, w[f"{name}.conv1.weight"], x.shape[1]))
        y = F.conv2d(y, w[f"{name}.conv2.weight"])
        x = y + (F.conv2d(x, w[f"{name}.shortcut.weight"], w[f"{name}.shortcut.bias"]) if stride > 1 else x)
        if name.endswith(("1_3", "2_4", "3_4", "4_4")):
            stages.append(x)
    sides = []
    for i, feature in enumerate(stages):
        d = F.conv2d(F.relu(feature), w[f"dilations.{i}.conv1.weight"], w[f"dilations.{i}.conv1.bias"])
        d = sum(F.conv2d(d, w[f"dilations.{i}.conv2_{k}.weight"], padding=r, dilation=r)
                for k, r in enumerate((5, 7, 9, 11), start=1))
        mask = F.conv2d(F.conv2d(F.relu(d), w[f"attentions.{i}.conv1.weight"], w[f"attentions.{i}.conv1.bias"]),
                        w[f"attentions.{i}.conv2.weight"], padding=1)
        side = F.conv2d(d * torch.sigmoid(mask), w[f"conv_reduces.{i}.conv.weight"], w[f"conv_reduces.{i}.conv.bias"])
        sides.append(F.interpolate(side, size, mode="bilinear", align_corners=False))
    return torch.sigmoid(F.conv2d(torch.cat(sides, 1), w["classifier.weight"], w["classifier.bias"]))[0, 0].numpy()



def scribble_reference(edges: np.ndarray) -> np.ndarray:
    """processor.py's scribble_hed / scribble_pidinet after the map: nms(map, 127, 3.0) (blur, keep a pixel not below
    its two neighbours along some direction, above 127 white), blur again (8-bit: rounded), above 4 white."""
    blurred = gaussian64(edges, 3.0, 25)
    wide = np.pad(blurred, 1, constant_values=-np.inf)  # outside the map: no neighbour (dilation ignores it)
    h, w = blurred.shape
    keep = np.zeros_like(blurred)
    for dy, dx in ((0, 1), (1, 0), (1, 1), (1, -1)):
        before = wide[1 - dy:1 - dy + h, 1 - dx:1 - dx + w]
        after = wide[1 + dy:1 + dy + h, 1 + dx:1 + dx + w]
        ridge = (blurred >= before) & (blurred >= after)
        keep[ridge] = blurred[ridge]
    strokes = np.where(keep > 127, 255.0, 0.0)
    return np.where(np.round(gaussian64(strokes, 3.0, 19)) > 4, 255, 0).astype(np.uint8)


def to_map(probability: np.ndarray, safe: bool = False) -> np.ndarray:
    """The 8-bit map of a float64 probability: (quantised to halves, floor(3p) / 2,) times 255, truncated."""
    if safe:
        probability = np.floor(probability * 3) / 2
    return np.clip(probability * 255, 0, 255).astype(np.uint8)


def agrees(made: Image.Image, expected: np.ndarray, share: float = 0.99, levels: int = 1) -> np.ndarray:
    """A 3-channel map equal to ``expected`` but for float rounding: within ``levels`` everywhere but a sliver, and
    exact at ``share`` of its pixels."""
    got = np.asarray(made)
    assert made.mode == "RGB" and got.shape[:2] == expected.shape and (got == got[..., :1]).all()
    diff = np.abs(got[..., 0].astype(int) - expected)
    assert (diff <= levels).mean() > 0.999 and (diff == 0).mean() > share, ((diff == 0).mean(), diff.max())
    return got[..., 0]


@pytest.fixture(scope="module")
def detectors(tiny):
    """The six modules on the factory's two networks, as a CPU replica loads them from one folder."""
    return softedge.load({m: str(tiny / "softedge") for m in softedge.SOFTEDGE_MODULES}, torch.device("cpu"))


@pytest.fixture(scope="module")
def wide(astronaut):
    """The astronaut at 128x96: at processor_res 64, 85x64, padded on the right to 128x64."""
    return astronaut.resize((128, 96))


def at_64(image: Image.Image) -> tuple[np.ndarray, np.ndarray]:
    """The image as the extension sizes it for processor_res 64 (area down), and that padded to 64s (edge pixels)."""
    rgb = cv2.resize(np.asarray(image), (85, 64), interpolation=cv2.INTER_AREA)
    return rgb, np.pad(rgb, ((0, 0), (0, 43), (0, 0)), mode="edge")


# --- the maps -------------------------------------------------------------------------------------------------------

def test_the_hed_maps_are_the_extensions(tiny, detectors, wide):
    """softedge_hed: the sigmoid of the five side outputs' mean on the padded image, times 255, cropped; hedsafe: the
    same probability quantised to halves (0, 127 or 255); both against the computation written out above, in
    float64 from the released tensors."""
    state = load_file(tiny / "softedge" / "ControlNetHED.safetensors")
    rgb, padded = at_64(wide)
    probability = hed_reference(state, padded)[:, :85]
    hed = agrees(detect(wide, "softedge_hed", 64, estimators=detectors), to_map(probability))
    assert hed.shape == (64, 85) and len(np.unique(hed)) > 50  # a map of the photo, not a flat image
    safe = agrees(detect(wide, "softedge_hedsafe", 64, estimators=detectors), to_map(probability, safe=True),
                  levels=128)
    assert set(np.unique(safe)) == {0, 127, 255}
    again = np.asarray(detect(wide, "softedge_hed", 64, estimators=detectors))
    assert np.array_equal(again[..., 0], hed)


def test_the_pidinet_maps_are_the_extensions_pixel_differences(tiny, detectors, wide):
    """softedge_pidinet runs plain convolutions rewritten from the released pixel differences at load: its map is
    the pixel-difference network's (written out above, float64, the released 3x3 weights); pidisafe's quantised."""
    state = load_file(tiny / "softedge" / "table5_pidinet.safetensors")
    _, padded = at_64(wide)
    probability = pidinet_reference(state, padded)[:, :85]
    pidi = agrees(detect(wide, "softedge_pidinet", 64, estimators=detectors), to_map(probability))
    assert len(np.unique(pidi)) > 50
    safe = agrees(detect(wide, "softedge_pidisafe", 64, estimators=detectors), to_map(probability, safe=True),
                  levels=128)
    assert set(np.unique(safe)) <= {0, 127, 255} and len(np.unique(safe)) > 1


@pytest.mark.parametrize("kind", ["cd", "ad", "rd", "cv"])
def test_each_pixel_difference_is_its_plain_kernel(kind):
    """A rewritten kernel convolves as the pixel difference it came from, at the borders too (depthwise, float64)."""
    torch.manual_seed(3)
    weight, x = torch.randn(5, 1, 3, 3, dtype=torch.float64), torch.randn(1, 5, 12, 9, dtype=torch.float64)
    plain = softedge_nets.plain_kernels(kind, weight)
    assert plain.shape[2:] == ((5, 5) if kind == "rd" else (3, 3))
    got = F.conv2d(x, plain, padding=plain.shape[2] // 2, groups=5)
    assert torch.allclose(got, pixel_difference(kind, x, weight, 5), atol=1e-12)
    with pytest.raises(ValueError, match="3x3"):
        softedge_nets.plain_kernels(kind, plain if kind == "rd" else torch.zeros(5, 1, 5, 5))


def drawing() -> np.ndarray:
    """A soft-edge map as HED draws one, 200x300: soft bright lines (a stroke, a circle) and a faint box on black."""
    canvas = np.zeros((200, 300), np.uint8)
    cv2.line(canvas, (20, 30), (280, 170), 255, 7)
    cv2.circle(canvas, (150, 100), 60, 230, 6)
    cv2.rectangle(canvas, (30, 120), (90, 180), 60, 3)
    return cv2.GaussianBlur(canvas, (0, 0), 2.0)


def test_the_scribble_is_the_extensions_post_processing():
    """On a soft-edge drawing: blurred, thinned to its ridges, the ridges above 127 white, blurred again and every
    pixel above 4 white: bold strokes along the bright lines, nothing of the faint box (its ridge stays under 127),
    black away from them; as the float64 rewrite makes it."""
    soft = drawing()
    made = softedge.scribble(soft)
    assert made.dtype == np.uint8 and set(np.unique(made)) == {0, 255}
    assert (made == scribble_reference(soft)).mean() > 0.999
    assert (made[soft > 150] == 255).all()  # the lines' centres
    assert not made[125:175, 26:34].any()  # the box's left side
    far = cv2.dilate((soft > 20).astype(np.uint8), np.ones((31, 31), np.uint8)) == 0
    assert far.mean() > 0.2 and not made[far].any()
    assert not softedge.scribble(np.full((50, 60), 100, np.uint8)).any()  # no ridge above 127: nothing


def test_the_scribble_modules_scribble_the_cropped_map(detectors, wide):
    """scribble_hed and scribble_pidinet: the softedge map (cropped: the padding never blurs in) post-processed."""
    for soft, scribbled in (("softedge_hed", "scribble_hed"), ("softedge_pidinet", "scribble_pidinet")):
        edges = np.asarray(detect(wide, soft, 64, estimators=detectors))[..., 0]
        made = np.asarray(detect(wide, scribbled, 64, estimators=detectors))
        assert made.shape == (64, 85, 3) and set(np.unique(made)) <= {0, 255}
        assert np.array_equal(made[..., 0], softedge.scribble(edges))
        assert (made[..., 0] == scribble_reference(edges)).mean() > 0.99


def test_safe_step_is_floor_of_three_halves():
    p = np.array([0.0, 0.1, 0.33, 0.34, 0.5, 0.66, 0.67, 0.99, 1.0])
    assert softedge.safe_step(p).tolist() == [0.0, 0.0, 0.0, 0.5, 0.5, 0.5, 1.0, 1.0, 1.5]
    assert to_map(softedge.safe_step(p).astype(np.float64)).tolist() == [0, 0, 0, 127, 127, 127, 255, 255, 255]


# --- loading --------------------------------------------------------------------------------------------------------

def test_modules_of_one_source_share_its_network(tiny, detectors):
    """One HED and one PiDiNet for the six modules named from one folder; another source, another network. Each runs
    in float32, as the extension runs them."""
    hed = {id(detectors[m].network) for m in softedge.SOFTEDGE_MODULES if softedge.ARCHITECTURES[m] == "hed"}
    pidi = {id(detectors[m].network) for m in softedge.SOFTEDGE_MODULES if softedge.ARCHITECTURES[m] == "pidinet"}
    assert len(hed) == len(pidi) == 1 and hed != pidi
    assert isinstance(detectors["scribble_hed"].network.net, softedge_nets.HEDNetwork)
    assert {p.dtype for p in detectors["softedge_pidinet"].network.net.parameters()} == {torch.float32}
    other = softedge.load({"softedge_hed": str(tiny / "softedge"),
                           "scribble_hed": str(tiny / "softedge" / "ControlNetHED.safetensors")}, torch.device("cpu"))
    assert other["softedge_hed"].network is not other["scribble_hed"].network


def test_the_loader_refuses_pickles_and_other_networks_naming_the_field(tmp_path, tiny):
    """A missing source, a .pth, a folder of pickles alone, a folder without the file's name, other names, other
    shapes (an already rewritten PiDiNet), the other network: each refused naming ``preprocessors.<module>``."""
    with pytest.raises(ModelLoadError) as e:
        loader.load_softedge(str(tmp_path / "missing.safetensors"), "softedge_hed")
    assert e.value.field == "preprocessors.softedge_hed"
    release = write_release(tmp_path / "releases" / "ControlNetHED.pth", "hed")
    for source in (release, release.parent):
        with pytest.raises(UnsafeWeights) as e:
            loader.load_softedge(str(source), "scribble_hed")
        assert e.value.field == "preprocessors.scribble_hed" and status_of(e.value) == 503
    with pytest.raises(ModelLoadError, match="no table5_pidinet.safetensors") as e:
        loader.load_softedge(str(tmp_path), "softedge_pidinet")
    assert e.value.field == "preprocessors.softedge_pidinet"

    save_file({"norm": torch.zeros(1, 3, 1, 1), "head.weight": torch.zeros(1)}, tmp_path / "other.safetensors")
    with pytest.raises(ModelLoadError, match="not the hed network's weights: 36 missing") as e:
        loader.load_softedge(str(tmp_path / "other.safetensors"), "softedge_hedsafe")
    assert e.value.field == "preprocessors.softedge_hedsafe" and e.value.details["unexpected"] == ["head.weight"]
    state = load_file(tiny / "softedge" / "table5_pidinet.safetensors")
    state["block1_2.conv1.weight"] = softedge_nets.plain_kernels("rd", state["block1_2.conv1.weight"])  # 5x5
    save_file(state, tmp_path / "converted.safetensors")
    with pytest.raises(ModelLoadError, match=r"1 wrong shape \(block1_2.conv1.weight") as e:
        loader.load_softedge(str(tmp_path / "converted.safetensors"), "scribble_pidinet")
    assert e.value.field == "preprocessors.scribble_pidinet"
    assert e.value.details["wrong_shape"] == ["block1_2.conv1.weight"] and "missing" not in e.value.details
    with pytest.raises(ModelLoadError, match="a 'hed' network; softedge_pidisafe runs a 'pidinet' one") as e:
        loader.load_softedge(str(tiny / "softedge" / "ControlNetHED.safetensors"), "softedge_pidisafe")
    assert e.value.field == "preprocessors.softedge_pidisafe"
    with pytest.raises(ValidationError, match="softedge_teed"):
        SDXLBaseConfig(model={"source": "x"}, preprocessors={"softedge_teed": str(tmp_path)})


@pytest.mark.parametrize("kind", ["hed", "pidinet"])
def test_the_converter_recognises_the_released_files(tmp_path, tiny, kind, capsys):
    """ControlNetHED.pth (a plain state dict) and table5_pidinet.pth (a training checkpoint, its names under
    DataParallel's module.) as released: converted to safetensors by their names (loaded through the service's loader
    before they are published), reported as soft-edge preprocessors, the factory's tiny files' tensors exactly."""
    from deployments.weights.convert import main

    releases = tmp_path / "annotators"
    write_release(releases / ("ControlNetHED.pth" if kind == "hed" else "table5_pidinet.pth"), kind)
    assert main([str(releases), str(tmp_path / "out")]) == 0
    assert f"architecture={kind} purpose=preprocessor scale=-" in capsys.readouterr().out
    name = softedge.WEIGHTS[kind]
    state, tiny_state = load_file(tmp_path / "out" / name), load_file(tiny / "softedge" / name)
    assert list(state) == list(tiny_state) and all(torch.equal(state[k], tiny_state[k]) for k in state)
    module = "softedge_hed" if kind == "hed" else "scribble_pidinet"
    assert softedge.load({module: str(tmp_path / "out")}, torch.device("cpu"))[module].network.kind == kind


# --- as a ControlNet unit's preprocessor ----------------------------------------------------------------------------

SMALL = dict(prompt="a lighthouse", width=96, height=64, steps=2, guidance_scale=5.0, seed=5)


def test_a_softedge_unit_guides_the_base(base, astronaut):
    """The base loads the configured networks with its ControlNets: a softedge_hed unit's control image is the
    framed map, and changes the image otherwise than the photo itself (module none) does; a scribble unit's is
    binary; a module without its network is refused naming the field."""
    def gen(**unit) -> np.ndarray:
        control = [ControlUnit(model="tiny-canny", image=astronaut, processor_res=64, **unit)]
        return pixels(base.generate(GenerationRequest(**SMALL, control=control)).images[0])

    assert set(base.controls.softedge) == {"softedge_hed", "scribble_hed", "softedge_pidisafe"}
    assert {f"preprocessor:{m}" for m in base.controls.softedge} <= set(base.fingerprint())
    assert np.abs(gen(module="softedge_hed") - gen(module="none")).mean() > 0.5
    models = base.controls.preprocessors
    unit = ControlUnit(model="tiny-canny", image=astronaut, module="scribble_hed", processor_res=64,
                       resize_mode="stretch")
    expected = frame_map(detect(astronaut, "scribble_hed", 64, estimators=models), 96, 64, "stretch")
    framed = control_image(unit, None, 96, 64, models)
    assert np.array_equal(pixels(framed), pixels(expected)) and set(np.unique(pixels(framed))) <= {0, 255}
    refused = ControlUnit(model="tiny-canny", image=astronaut, module="softedge_pidinet")
    with pytest.raises(UnknownModel) as e:
        base.generate(GenerationRequest(**SMALL, control=[refused]))
    assert e.value.field == "control[0].module" and "softedge_pidinet" not in e.value.details["choices"]
    assert status_of(e.value) == 422


def test_the_modules_by_the_extensions_names():
    """Each module where its network is configured, on every route, by the extension's keys (hed, hed_safe,
    pidinet, pidinet_safe, pidinet_scribble, and scribble_hed's first, fake_scribble) and labels (our names);
    processor_res alone (64 to 2048, else 512 with a note); the HED sliders step by 8, the PiDiNet ones by 1. Where
    not configured, a 422 naming the module's field."""
    from graphs.api import a1111_controlnet, control_fields
    from graphs.api.a1111_models import Txt2ImgRequest

    every = offered({m: "x" for m in softedge.SOFTEDGE_MODULES})
    assert every == ["none", "canny", "invert", "lineart_standard", *softedge.SOFTEDGE_MODULES, *model_free.MODULES]
    assert offered({}) == ["none", "canny", "invert", "lineart_standard", *model_free.MODULES]
    for name, module in (("hed", "softedge_hed"), ("hed_safe", "softedge_hedsafe"), ("pidinet", "softedge_pidinet"),
                         ("pidinet_safe", "softedge_pidisafe"), ("pidinet_scribble", "scribble_pidinet"),
                         ("fake_scribble", "scribble_hed"), ("Scribble_HED", "scribble_hed"),
                         *((m, m) for m in softedge.SOFTEDGE_MODULES)):
        assert a1111_controlnet.module_of(name, "m", every) == module
    only_pidi = offered({"softedge_pidinet": "x"})
    with pytest.raises(UnknownModel) as e:
        a1111_controlnet.module_of("hed", "controlnet_module", only_pidi)
    assert (e.value.field, e.value.details["choices"], status_of(e.value)) == ("controlnet_module", only_pidi, 422)

    image = "data:image/png;base64," + b64(Image.new("RGB", (64, 64), (255, 255, 255)))
    request = Txt2ImgRequest(prompt="x", alwayson_scripts={"ControlNet": {"args": [
        {"module": "hed", "model": "tiny-canny", "image": image, "processor_res": 4096, "threshold_a": 3},
        {"module": "pidinet_scribble", "model": "tiny-canny", "image": image, "pixel_perfect": True}]}})
    first, second = a1111_controlnet.control_units(request, {"tiny-canny": "x"}, edit=False, modules=every)
    assert (first.module, first.processor_res, first.threshold_a) == ("softedge_hed", 512, None)  # not read
    assert (second.module, second.pixel_perfect) == ("scribble_pidinet", True)
    assert any("processor_res=4096 is outside softedge_hed's 64 to 2048: it ran at 512" in n
               for n in a1111_controlnet.notes(request))
    with pytest.raises(UnknownModel) as e:
        a1111_controlnet.control_units(request, {"tiny-canny": "x"}, edit=False, modules=only_pidi)
    assert e.value.field == "alwayson_scripts.ControlNet.args[0].module"
    native = [{"model": "tiny-canny", "image": image, "preprocessor": "softedge_hedsafe", "processor_res": 128}]
    (unit,) = control_fields.control_units(native, ["tiny-canny"], edit=False, modules=every)
    assert (unit.module, unit.processor_res) == ("softedge_hedsafe", 128)
    with pytest.raises(UnknownModel) as e:
        control_fields.control_units(native, ["tiny-canny"], edit=False, modules=only_pidi)
    assert e.value.field == "controlnets.0.preprocessor" and status_of(e.value) == 422

    configured = {m: "x" for m in softedge.SOFTEDGE_MODULES}
    keys = module_list(configured, False)
    assert keys["module_list"][4:10] == ["hed", "hed_safe", "pidinet", "pidinet_safe", "scribble_hed",
                                         "pidinet_scribble"]
    labels = module_list(configured, True)
    assert labels["module_list"][4:10] == list(softedge.SOFTEDGE_MODULES)
    for name, step in (("hed", 8), ("hed_safe", 8), ("scribble_hed", 8), ("pidinet", 1), ("pidinet_safe", 1),
                       ("pidinet_scribble", 1)):
        assert keys["module_detail"][name]["sliders"] == [
            {"name": "Preprocessor Resolution", "value": 512, "min": 64, "max": 2048, "step": step}]
    assert "hed" not in module_list({"softedge_pidinet": "x"}, False)["module_list"]
