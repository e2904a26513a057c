"""The line-art preprocessors as A1111's ControlNet extension makes their maps: lineart_standard's formula, the
informative-drawings generator (lineart_realistic, lineart_coarse) and the anime U-Net on the factory's random
weights in the released layouts, their loading and conversion from the released .pth files, a unit guiding the tiny
base, and which modules are offered."""

from __future__ import annotations

import warnings

import cv2
import numpy as np
import pytest
import torch
from PIL import Image
from pydantic import ValidationError
from safetensors.torch import load_file, save_file

from deployments.support import lineart
from deployments.support.config import SDXLBaseConfig
from deployments.support.control import ControlUnit, detect, offered
from deployments.support.errors import ModelLoadError, UnknownModel, UnsafeWeights
from deployments.support.generation import GenerationRequest
from deployments.support.lineart_nets import AnimeUNet, InformativeDrawings
from deployments.support.model_free import MODULES as MODEL_FREE
from deployments.weights import loader
from tests.helpers import b64, module_list, pixels

SMALL = dict(prompt="a lighthouse", width=64, height=64, steps=2, guidance_scale=5.0, seed=5)

# The state-dict names of lllyasviel/Annotators' sk_model.pth and sk_model2.pth: the extension's
# annotator/lineart Generator(3, 1, 3) (model0: pad, conv; model1: two conv, norm, relu; model2: three residual
# blocks, each pad, conv, norm, relu, pad, conv, norm; model3: two transposed conv, norm, relu; model4: pad, conv).
SK_MODEL = [
    "model0.1.weight", "model0.1.bias",
    "model1.0.weight", "model1.0.bias", "model1.3.weight", "model1.3.bias",
    *(f"model2.{i}.conv_block.{j}.{p}" for i in range(3) for j in (1, 5) for p in ("weight", "bias")),
    "model3.0.weight", "model3.0.bias", "model3.3.weight", "model3.3.bias",
    "model4.1.weight", "model4.1.bias",
]
# netG.pth's (after DataParallel's "module."): the extension's annotator/lineart_anime UnetGenerator(3, 1, 8, 64),
# levels nested as model.model.1 ... (a middle level: leaky relu 0, down conv 1, norm 2, inner level 3, relu 4, up
# conv 5, norm 6; the innermost: down conv 1, up conv 3; the outermost: down conv 0, inner 1, relu 2, up conv 3).
_OUTER, _MIDDLE = "model.model", ".model.3"
_LEVELS = [_OUTER + ".1" + _MIDDLE * depth for depth in range(7)]  # the seven levels inside the outermost
NET_G = [
    f"{_OUTER}.0.weight", f"{_OUTER}.0.bias",
    *(f"{level}.model.1.{p}" for level in _LEVELS for p in ("weight", "bias")),
    f"{_LEVELS[-1]}.model.3.weight", f"{_LEVELS[-1]}.model.3.bias",
    *(f"{level}.model.5.{p}" for level in reversed(_LEVELS[:-1]) for p in ("weight", "bias")),
    f"{_OUTER}.3.weight", f"{_OUTER}.3.bias",
]


@pytest.fixture(scope="module")
def detectors(tiny):
    """The factory's three networks, as a CPU replica loads them."""
    files = {m: str(tiny / "lineart" / f"{name}.safetensors")
             for m, name in (("lineart_realistic", "sk_model"), ("lineart_coarse", "sk_model2"),
                             ("lineart_anime", "netG"))}
    return lineart.load(files, torch.device("cpu"))


def drawing() -> Image.Image:
    """Black strokes on white, as a scanned pen drawing: lines, a circle, a grey hatch."""
    canvas = np.full((200, 300, 3), 255, np.uint8)
    cv2.line(canvas, (20, 30), (280, 170), (0, 0, 0), 2)
    cv2.circle(canvas, (150, 100), 60, (10, 10, 10), 3)
    cv2.rectangle(canvas, (30, 120), (90, 180), (40, 40, 40), 1)
    for x in range(200, 260, 6):
        cv2.line(canvas, (x, 20), (x + 20, 60), (110, 110, 110), 1)
    return Image.fromarray(canvas)


def extension_standard(image: Image.Image, resolution: int) -> np.ndarray:
    """lineart_standard written out from the extension's code, independently of ours: its resize_image_with_pad
    (the shorter side at ``resolution``, cubic up, area down; the right and bottom padded to 64s with edge pixels),
    the Gaussian blur (sigma 6) as a plain separable convolution in float64 (OpenCV's float kernel: 49 taps, borders
    reflected without repeating the edge), min over channels of blur - image, clipped, divided by max(16, the median
    of the values above 8), times 127, truncated; the padding cropped."""
    rgb = np.asarray(image.convert("RGB"))
    height, width = rgb.shape[:2]
    k = resolution / min(height, width)
    h, w = int(np.round(height * k)), int(np.round(width * k))
    resized = cv2.resize(rgb, (w, h), interpolation=cv2.INTER_CUBIC if k > 1 else cv2.INTER_AREA)
    x = np.pad(resized, ((0, -h % 64), (0, -w % 64), (0, 0)), mode="edge").astype(np.float64)
    taps = np.arange(-24, 25)
    kernel = np.exp(-taps ** 2 / (2 * 6.0 ** 2))
    kernel /= kernel.sum()
    blurred = x
    for axis in (0, 1):
        size = blurred.shape[axis]
        wide = np.pad(blurred, [(24, 24) if a == axis else (0, 0) for a in range(3)], mode="reflect")
        blurred = sum(weight * np.take(wide, np.arange(i, i + size), axis=axis) for i, weight in enumerate(kernel))
    intensity = np.clip((blurred - x).min(axis=2), 0, 255)
    intensity = intensity / max(16, np.median(intensity[intensity > 8])) * 127
    return np.clip(intensity, 0, 255).astype(np.uint8)[:h, :w]


def agrees(made: Image.Image, expected: np.ndarray) -> np.ndarray:
    """A 3-channel map equal to ``expected`` but for float rounding (a pixel may cross one level, rarely)."""
    got = np.asarray(made)
    assert made.mode == "RGB" and got.shape[:2] == expected.shape and (got == got[..., :1]).all()
    diff = np.abs(got[..., 0].astype(int) - expected)
    assert diff.max() <= 1 and (diff == 0).mean() > 0.99
    return got[..., 0]


def test_lineart_standard_is_the_extensions_formula_on_drawings(astronaut):
    """On a pen drawing (enlarged: cubic) and a photo (shrunk: area), padded to 64s and normalised over the padded
    image: the strokes bright, the white ground black."""
    from skimage import data

    pen = drawing()
    made = detect(pen, "lineart_standard", 256)
    assert made.size == (384, 256)  # 300x200 with its shorter side at 256
    lines = agrees(made, extension_standard(pen, 256))
    ink = cv2.resize(255 - np.asarray(pen.convert("L")), (384, 256), interpolation=cv2.INTER_CUBIC)
    ground = cv2.dilate((ink > 20).astype(np.uint8), np.ones((9, 9), np.uint8)) == 0  # away from every stroke
    assert lines[ink > 200].mean() > 100 and (lines[ground] == 0).all() and ground.mean() > 0.5
    text = Image.fromarray(data.text()).convert("RGB")  # dark characters on a lighter ground
    agrees(detect(text, "lineart_standard", 100), extension_standard(text, 100))
    agrees(detect(astronaut, "lineart_standard", 96), extension_standard(astronaut, 96))


def test_lineart_standard_of_a_blank_page_is_black_without_warnings():
    """Nothing above 8: numpy's median of nothing is NaN, which the extension's max(16, ...) passes over; here it
    divides by 16 the same without numpy's warning."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        blank = np.asarray(detect(Image.new("RGB", (90, 70), (250, 250, 250)), "lineart_standard", 64))
    assert blank.shape == (64, 82, 3) and not blank.any()


def test_the_realistic_map_is_the_generators_inverted_drawing(tiny, detectors, astronaut):
    """RGB / 255 into the generator at processor_res; its sigmoid's output times 255, truncated, inverted (the
    extension's "auto inversion": lines white on black), repeated to three channels. A second network loaded from
    the same file gives the same pixels; the coarse one's weights others. (The padding to 64s and the crop are the
    anime map's, below: the same code, at a tenth of the cost.)"""
    made = detect(astronaut, "lineart_realistic", 64, estimators=detectors)
    rgb = cv2.resize(np.asarray(astronaut), (64, 64), interpolation=cv2.INTER_AREA)
    net = InformativeDrawings().eval()
    net.load_state_dict(load_file(tiny / "lineart" / "sk_model.safetensors"))
    with torch.no_grad():
        line = net(torch.from_numpy(rgb).float().permute(2, 0, 1)[None] / 255.0)[0, 0].numpy()
    assert line.min() > 0.0 and line.max() < 1.0  # a sigmoid's
    expected = 255 - (line * 255.0).clip(0, 255).astype(np.uint8)
    got = np.asarray(made)
    assert made.size == (64, 64) and made.mode == "RGB" and (got == got[..., :1]).all()
    assert np.array_equal(got[..., 0], expected)
    assert len(np.unique(got)) > 30  # a map of the photo, not a flat image
    coarse = np.asarray(detect(astronaut, "lineart_coarse", 64, estimators=detectors))
    assert coarse.shape == (64, 64, 3) and np.abs(coarse.astype(int) - got).mean() > 1


def test_the_anime_map_runs_at_multiples_of_256_and_comes_back_cubic(tiny, detectors, astronaut):
    """512x384 at processor_res 64 is 85x64, padded on the right to 128x64 with edge pixels, resized (cubic, 8-bit)
    to 256x256, scaled to -1..1; the U-Net's tanh scaled back to 0..255, resized (cubic) to 128x64, truncated,
    inverted, cropped back to 85x64. The same image gives the same map."""
    wide = astronaut.crop((0, 64, 512, 448))
    rgb = cv2.resize(np.asarray(wide), (85, 64), interpolation=cv2.INTER_AREA)
    padded = np.pad(rgb, ((0, 0), (0, 43), (0, 0)), mode="edge")
    x = cv2.resize(padded, (256, 256), interpolation=cv2.INTER_CUBIC).astype(np.float32) / 127.5 - 1.0
    net = AnimeUNet(width=8).eval()
    net.load_state_dict(load_file(tiny / "lineart" / "netG.safetensors"))
    with torch.no_grad():
        line = net(torch.from_numpy(x).permute(2, 0, 1)[None])[0, 0].numpy() * 127.5 + 127.5
    back = cv2.resize(line, (128, 64), interpolation=cv2.INTER_CUBIC).clip(0, 255).astype(np.uint8)
    made = detect(wide, "lineart_anime", 64, estimators=detectors)
    assert made.size == (85, 64)
    assert np.array_equal(np.asarray(made)[..., 0], (255 - back)[:, :85])
    assert len(np.unique(np.asarray(made))) > 30
    assert np.array_equal(np.asarray(detect(wide, "lineart_anime", 64, estimators=detectors)), np.asarray(made))


def test_the_networks_have_the_released_names():
    """Our networks' state-dict names are the released files' (as the extension's classes name them), in order."""
    with torch.device("meta"):
        assert list(InformativeDrawings().state_dict()) == SK_MODEL
        assert list(AnimeUNet().state_dict()) == NET_G
    # And the released sizes: sk_model.pth holds 4.3 M float32 weights (17 MB), netG.pth 54 M (218 MB).
    with torch.device("meta"):
        assert sum(p.numel() for p in InformativeDrawings().parameters()) == 4_290_945
        assert sum(p.numel() for p in AnimeUNet().parameters()) == 54_405_505


def test_the_loader_refuses_pickles_and_other_networks_naming_the_field(tmp_path, tiny):
    """A .pth, a folder of pickles alone, a file of other names or other shapes, the other network: each refused
    naming ``preprocessors.<module>``; a folder holding one file is read."""
    from deployments.factory.lineart import write_release

    with pytest.raises(ModelLoadError) as e:
        loader.load_lineart(str(tmp_path / "missing.safetensors"), "lineart_realistic")
    assert e.value.field == "preprocessors.lineart_realistic"
    release = write_release(tmp_path / "sk_model.pth", "lineart_realistic")
    with pytest.raises(UnsafeWeights) as e:
        loader.load_lineart(str(release), "lineart_realistic")
    assert e.value.field == "preprocessors.lineart_realistic"
    with pytest.raises(UnsafeWeights) as e:
        loader.load_lineart(str(tmp_path), "lineart_coarse")  # the folder holds sk_model.pth alone
    assert e.value.field == "preprocessors.lineart_coarse"
    save_file({"conv.weight": torch.zeros(4, 3, 3, 3)}, tmp_path / "other.safetensors")
    with pytest.raises(ModelLoadError, match="not the lineart network's weights: missing") as e:
        loader.load_lineart(str(tmp_path / "other.safetensors"), "lineart_realistic")
    assert e.value.field == "preprocessors.lineart_realistic"
    state = load_file(tiny / "lineart" / "sk_model.safetensors")
    state["model4.1.weight"] = torch.zeros(3, 64, 7, 7)  # an RGB head: the names fit, a shape does not
    save_file(state, tmp_path / "rgb.safetensors")
    with pytest.raises(ModelLoadError, match="model4.1.weight") as e:
        loader.load_lineart(str(tmp_path / "rgb.safetensors"), "lineart_coarse")
    assert e.value.field == "preprocessors.lineart_coarse"
    with pytest.raises(ModelLoadError, match="a 'lineart_anime' network; lineart_realistic runs a 'lineart' one"):
        loader.load_lineart(str(tiny / "lineart" / "netG.safetensors"), "lineart_realistic")
    with pytest.raises(ModelLoadError, match="holds 3 .safetensors files") as e:
        loader.load_lineart(str(tiny / "lineart"), "lineart_anime")
    assert e.value.field == "preprocessors.lineart_anime"
    folder = tmp_path / "anime"
    folder.mkdir()
    (folder / "netG.safetensors").write_bytes((tiny / "lineart" / "netG.safetensors").read_bytes())
    assert isinstance(loader.load_lineart(str(folder), "lineart_anime"), AnimeUNet)
    with pytest.raises(ValidationError, match="lineart_manga"):
        SDXLBaseConfig(model={"source": "x"}, preprocessors={"lineart_manga": str(folder)})


@pytest.mark.parametrize("module", ["lineart_realistic", "lineart_anime"])
def test_the_converter_recognises_the_released_files(tmp_path, tiny, module, capsys):
    """sk_model.pth (a plain state dict) and netG.pth (its names under DataParallel's module.) as released:
    converted to safetensors (which the converter has loaded through the service's loader before publishing), reported
    as a line-art preprocessor, the factory's tiny files' tensors exactly."""
    from deployments.factory.lineart import RELEASES, write_release
    from deployments.weights.convert import main

    name = RELEASES[module][0]
    release = write_release(tmp_path / f"{name}.pth", module)
    assert main([str(release), str(tmp_path / "out")]) == 0
    converted = tmp_path / "out" / f"{name}.safetensors"
    architecture = lineart.ARCHITECTURES[module]
    assert f"architecture={architecture} purpose=preprocessor scale=-" in capsys.readouterr().out
    state, tiny_state = load_file(converted), load_file(tiny / "lineart" / f"{name}.safetensors")
    assert list(state) == list(tiny_state) and all(torch.equal(state[k], tiny_state[k]) for k in state)


def test_a_lineart_unit_guides_the_base(base, astronaut):
    """The base loads the configured networks with its ControlNets: a lineart_realistic unit changes the image,
    and not as the photo itself (module none) does; a module without its network is refused naming the field."""
    def gen(**unit) -> np.ndarray:
        control = [ControlUnit(model="tiny-canny", image=astronaut, processor_res=64, **unit)]
        return pixels(base.generate(GenerationRequest(**SMALL, control=control)).images[0])

    assert np.abs(gen(module="lineart_realistic") - gen(module="none")).mean() > 0.5
    assert set(base.controls.lineart) == {"lineart_realistic", "lineart_anime"}
    assert {"preprocessor:lineart_realistic", "preprocessor:lineart_anime"} <= set(base.fingerprint())
    unit = ControlUnit(model="tiny-canny", image=astronaut, module="lineart_coarse")
    with pytest.raises(UnknownModel) as e:
        base.generate(GenerationRequest(**SMALL, control=[unit]))
    assert e.value.field == "control[0].module" and "lineart_coarse" not in e.value.details["choices"]


def test_the_modules_offered_and_the_extensions_names():
    """lineart_standard is always offered, a network's module where it is configured, on every route: the
    extension's key ``lineart`` is lineart_realistic, its long label lineart_standard; the sliders read
    processor_res alone (64 to 2048, else 512, with a note)."""
    from graphs.api import a1111_controlnet, control_fields
    from graphs.api.a1111_models import Txt2ImgRequest

    assert offered({}) == ["none", "canny", "invert", "lineart_standard", *MODEL_FREE]
    some = offered({"lineart_coarse": "/models/sk_model2.safetensors", "depth_midas": "/models/dpt"})
    assert some == ["none", "canny", "invert", "depth_midas", "lineart_standard", "lineart_coarse", *MODEL_FREE]
    assert a1111_controlnet.module_of("lineart_standard (from white bg & black line)", "m", some) == "lineart_standard"
    assert a1111_controlnet.module_of("lineart_coarse", "m", some) == "lineart_coarse"
    with pytest.raises(UnknownModel) as e:
        a1111_controlnet.module_of("lineart", "controlnet_module", some)  # the realistic one, not configured
    assert e.value.field == "controlnet_module" and e.value.details["choices"] == some

    image = "data:image/png;base64," + b64(Image.new("RGB", (64, 64), (255, 255, 255)))
    request = Txt2ImgRequest(prompt="x", alwayson_scripts={"ControlNet": {"args": [
        {"module": "lineart", "model": "tiny-canny", "image": image, "processor_res": 4096, "threshold_a": 3},
        {"module": "lineart_anime", "model": "tiny-canny", "image": image, "processor_res": 256}]}})
    realistic = offered(["lineart_realistic", "lineart_anime"])
    first, second = a1111_controlnet.control_units(request, {"tiny-canny": "x"}, edit=False, modules=realistic)
    assert (first.module, first.processor_res, first.threshold_a) == ("lineart_realistic", 512, None)  # not read
    assert (second.module, second.processor_res) == ("lineart_anime", 256)
    assert any("processor_res=4096 is outside lineart_realistic's 64 to 2048" in n
               for n in a1111_controlnet.notes(request))
    with pytest.raises(UnknownModel) as e:
        a1111_controlnet.control_units(request, {"tiny-canny": "x"}, edit=False, modules=some)
    assert e.value.field == "alwayson_scripts.ControlNet.args[0].module"
    native = [{"model": "tiny-canny", "image": image, "preprocessor": "lineart_coarse", "processor_res": 128}]
    (unit,) = control_fields.control_units(native, ["tiny-canny"], edit=False, modules=some)
    assert (unit.module, unit.processor_res) == ("lineart_coarse", 128)
    with pytest.raises(UnknownModel) as e:
        control_fields.control_units(native, ["tiny-canny"], edit=False, modules=realistic)
    assert e.value.field == "controlnets.0.preprocessor"

    keys = module_list({"lineart_realistic": "x"}, False)
    assert keys["module_list"][:5] == ["none", "canny", "invert", "lineart_standard", "lineart"]
    assert keys["module_detail"]["lineart"]["sliders"] == [
        {"name": "Preprocessor Resolution", "value": 512, "min": 64, "max": 2048, "step": 1}]
    labels = module_list({"lineart_anime": "x"}, True)["module_list"]
    assert labels[:5] == ["none", "canny", "invert (from white bg & black line)",
                          "lineart_standard (from white bg & black line)", "lineart_anime"]
