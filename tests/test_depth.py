"""The depth preprocessors on the factory's tiny DPT-Hybrid and Depth Anything: the map is the model's prediction
normalised as A1111's ControlNet extension does it, a depth unit guides the base, a module whose model is not
configured is refused naming its field, and the loader refuses pickles."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import cv2
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from deployments.support import depth
from deployments.support.control import ControlUnit, control_image, detect, offered
from deployments.support.control_maps import frame_map
from deployments.support.errors import STATUS, ModelLoadError, UnknownModel, UnsafeWeights
from deployments.support.generation import GenerationRequest
from deployments.support.model_free import MODULES as MODEL_FREE
from deployments.weights import loader
from tests.helpers import b64, pixels

SMALL = dict(prompt="a lighthouse", width=64, height=64, steps=4, guidance_scale=5.0, seed=5)
IMAGENET = (np.array([0.485, 0.456, 0.406], np.float32), np.array([0.229, 0.224, 0.225], np.float32))


@pytest.fixture(scope="module")
def estimators(tiny):
    """Every module's estimator, float32 on the CPU (as a CPU replica loads them)."""
    return depth.load({"depth_midas": str(tiny / "depth-midas"), "depth_anything": str(tiny / "depth-anything"),
                       "depth_anything_v2": str(tiny / "depth-anything-v2")}, torch.device("cpu"), torch.float32)


def by_hand(prediction: np.ndarray) -> np.ndarray:
    """The extension's 8-bit map of a prediction: min to 0, max to 255, truncated."""
    return ((prediction - prediction.min()) / (prediction.max() - prediction.min()) * 255).astype(np.uint8)


def agrees(made: Image.Image, expected: np.ndarray) -> None:
    """A 3-channel map equal to ``expected`` (float rounding may move a pixel across a level: one level, rarely)."""
    got = np.asarray(made)
    assert made.mode == "RGB" and got.shape[:2] == expected.shape
    assert (got == got[..., :1]).all()  # one channel, repeated
    diff = np.abs(got[..., 0].astype(int) - expected)
    assert diff.max() <= 1 and (diff == 0).mean() > 0.99
    assert int(got.max()) - int(got.min()) > 150 and len(np.unique(got)) > 100  # a map, not a flat image


def test_depth_midas_is_the_dpts_prediction_at_the_processor_resolution(tiny, estimators, astronaut):
    """MiDaS runs on the image as the extension feeds it (x / 127.5 - 1, at processor_res, no resize to 384²): at the
    tiny DPT's own square size it is transformers' plain model call; normalised, it is the map."""
    plain, _ = loader.load_depth(str(tiny / "depth-midas"), "depth_midas", torch.float32)
    assert plain.config.is_hybrid and plain.config.image_size == 64  # BiT under a ViT, as Intel/dpt-hybrid-midas
    rgb = cv2.resize(np.asarray(astronaut), (64, 64), interpolation=cv2.INTER_AREA)  # 512² at processor_res 64
    x = torch.from_numpy((rgb.astype(np.float32) / 127.5 - 1.0).transpose(2, 0, 1))[None]
    with torch.no_grad():
        raw = plain(pixel_values=x).predicted_depth[0].numpy()
    assert np.allclose(estimators["depth_midas"].predict(rgb), raw, atol=1e-5)
    agrees(detect(astronaut, "depth_midas", 64, estimators=estimators), by_hand(raw))


def test_a_wide_image_is_padded_to_64s_normalised_whole_and_cropped(estimators, astronaut):
    """512x384 at processor_res 64 is 85x64, run padded to 128x64 with its edge pixels repeated (transformers'
    DPT would refuse that shape: the estimator gives its neck the grid); the map is normalised over the padded
    prediction, then cropped."""
    wide = astronaut.crop((0, 64, 512, 448))
    rgb = cv2.resize(np.asarray(wide), (85, 64), interpolation=cv2.INTER_AREA)
    padded = np.pad(rgb, ((0, 0), (0, 43), (0, 0)), mode="edge")
    prediction = estimators["depth_midas"].predict(padded)
    assert prediction.shape == (64, 128)
    made = detect(wide, "depth_midas", 64, estimators=estimators)
    assert made.size == (85, 64)
    agrees(made, by_hand(prediction)[:, :85])


@pytest.mark.parametrize("module", ["depth_anything", "depth_anything_v2"])
def test_depth_anything_runs_at_its_lower_bound_size_and_comes_back_bilinearly(tiny, estimators, astronaut, module):
    """Depth Anything sees the padded image resized (cubic) so that both sides are at least its processor's size
    (518 released, 140 tiny) and multiples of 14, ImageNet-normalised; its prediction is resized back (bilinear) to
    the padded size, normalised, cropped."""
    plain, processor = loader.load_depth(str(tiny / module.replace("_", "-")), module, torch.float32)
    assert (processor.size["height"], processor.ensure_multiple_of) == (140, 14)
    wide = astronaut.crop((0, 64, 512, 448))
    rgb = cv2.resize(np.asarray(wide), (85, 64), interpolation=cv2.INTER_AREA)
    padded = np.pad(rgb, ((0, 0), (0, 43), (0, 0)), mode="edge")
    x = cv2.resize(padded.astype(np.float32) / 255, (280, 140), interpolation=cv2.INTER_CUBIC)  # 128x64, x 2.19
    x = torch.from_numpy(((x - IMAGENET[0]) / IMAGENET[1]).transpose(2, 0, 1))[None]
    with torch.no_grad():
        raw = plain(pixel_values=x).predicted_depth
    back = F.interpolate(raw[:, None], size=(64, 128), mode="bilinear", align_corners=False)[0, 0].numpy()
    agrees(detect(wide, module, 64, estimators=estimators), by_hand(back)[:, :85])


def test_depth_anythings_input_size():
    assert depth.input_size(64, 128, (518, 518), 14) == (518, 1036)
    assert depth.input_size(64, 100, (518, 518), 14) == (518, 812)  # 809.4 rounds to 58 patches
    assert depth.input_size(600, 700, (518, 518), 14) == (518, 602)  # shrunk: the shorter side at 518
    assert depth.input_size(100, 100, (510, 510), 14) == (518, 518)  # 504 would fall short: rounded up


def test_a_depth_unit_guides_the_base_by_its_map(base, astronaut):
    """The unit's control image is the depth map framed at the generation size; it changes the image, and not as
    the photo itself (module none) does."""
    def gen(**unit) -> np.ndarray:
        control = [ControlUnit(model="tiny-canny", image=astronaut, processor_res=64, **unit)] if unit else []
        return pixels(base.generate(GenerationRequest(**SMALL, control=control)).images[0])

    plain, raw, midas = gen(), gen(module="none"), gen(module="depth_midas")
    assert np.abs(midas - plain).mean() > 1.0 and np.abs(midas - raw).mean() > 0.5
    unit = ControlUnit(model="tiny-canny", image=astronaut, module="depth_midas", processor_res=64,
                       resize_mode="stretch")
    framed = control_image(unit, None, 96, 64, base.controls.depth)
    expected = frame_map(detect(astronaut, "depth_midas", 64, estimators=base.controls.depth), 96, 64, "stretch")
    assert np.array_equal(pixels(framed), pixels(expected))
    assert base.describe()["preprocessors"] == ["none", "canny", "invert", "depth_midas", "depth_anything_v2",
                                                "lineart_standard", "lineart_realistic", "lineart_anime",
                                                "openpose", "openpose_hand", "openpose_face", "openpose_faceonly",
                                                "openpose_full", "softedge_hed", "softedge_pidisafe", "scribble_hed",
                                                "mlsd", *MODEL_FREE]
    assert {"preprocessor:depth_midas", "preprocessor:depth_anything_v2"} <= set(base.fingerprint())


def test_a_module_without_its_model_is_refused_naming_the_field(base, astronaut):
    """The base (a queued job's units reach it unchecked) and every route's unit mapping refuse a depth module
    whose model is not configured: a 422 naming the field and listing what is offered."""
    from graphs.api import a1111_controlnet, control_fields
    from graphs.api.a1111_models import Txt2ImgRequest

    unit = ControlUnit(model="tiny-canny", image=astronaut, module="depth_anything")
    with pytest.raises(UnknownModel) as e:
        base.generate(GenerationRequest(**SMALL, control=[unit]))
    assert e.value.field == "control[0].module" and "depth_anything" not in e.value.details["choices"]
    assert STATUS[e.value.code] == 422
    with pytest.raises(UnknownModel) as e:
        detect(astronaut, "depth_anything", estimators=base.controls.depth)
    only_midas = offered({"depth_midas": "/models/dpt-hybrid-midas"})
    assert only_midas == ["none", "canny", "invert", "depth_midas", "lineart_standard", *MODEL_FREE]
    photo = "data:image/png;base64," + b64(astronaut.resize((64, 64)))
    request = Txt2ImgRequest(prompt="x", alwayson_scripts={"ControlNet": {"args": [
        {"module": "depth", "model": "tiny-canny", "image": photo, "processor_res": 4096},
        {"module": "depth_anything_v2", "model": "tiny-canny", "image": photo}]}})
    with pytest.raises(UnknownModel) as e:
        a1111_controlnet.control_units(request, {"tiny-canny": "x"}, edit=False, modules=only_midas)
    assert e.value.field == "alwayson_scripts.ControlNet.args[1].module"
    assert e.value.details["choices"] == only_midas
    first = request.model_copy(update={"alwayson_scripts": {"ControlNet": {"args": [
        request.alwayson_scripts["ControlNet"]["args"][0]]}}})
    (mapped,) = a1111_controlnet.control_units(first, {"tiny-canny": "x"}, edit=False, modules=only_midas)
    assert (mapped.module, mapped.processor_res) == ("depth_midas", 512)  # "depth" is MiDaS; 4096 reset, as the
    assert any("processor_res=4096 is outside depth_midas's" in n for n in a1111_controlnet.notes(first))  # extension
    native = [{"model": "tiny-canny", "image": photo, "preprocessor": "depth_anything_v2", "processor_res": 256}]
    (kept,) = control_fields.control_units(native, ["tiny-canny"], edit=False, modules=offered(["depth_anything_v2"]))
    assert (kept.module, kept.processor_res) == ("depth_anything_v2", 256)
    with pytest.raises(UnknownModel) as e:
        control_fields.control_units(native, ["tiny-canny"], edit=False, modules=only_midas)
    assert e.value.field == "controlnets.0.preprocessor"
    with pytest.raises(UnknownModel) as e:
        a1111_controlnet.module_of("depth_anything", "controlnet_module", only_midas)  # /controlnet/detect's
    assert e.value.field == "controlnet_module"


def test_two_threads_share_an_estimator(estimators, astronaut):
    """/controlnet/detect's worker thread and the inference thread may run one model at once: each call gets its
    own image's map (MiDaS's grid is per call)."""
    images = [astronaut.resize(size) for size in ((64, 64), (96, 64), (64, 128), (80, 64))]
    alone = [pixels(detect(i, "depth_midas", 64, estimators=estimators)) for i in images]
    with ThreadPoolExecutor(2) as pool:
        together = list(pool.map(lambda i: pixels(detect(i, "depth_midas", 64, estimators=estimators)), images))
    assert all(np.array_equal(a, b) for a, b in zip(alone, together, strict=True))


def test_half_precision_maps_agree(tiny, estimators, astronaut):
    """A GPU replica runs the estimator in its dtype: bfloat16's map is float32's, within rounding."""
    half = depth.load({"depth_midas": str(tiny / "depth-midas")}, torch.device("cpu"), torch.bfloat16)
    a, b = (pixels(detect(astronaut, "depth_midas", 64, estimators=e))[..., 0] for e in (estimators, half))
    assert np.corrcoef(a.ravel(), b.ravel())[0, 1] > 0.99


def test_the_loader_refuses_pickles_files_and_other_architectures(tmp_path, tiny):
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    for name in ("config.json", "preprocessor_config.json"):
        (pickled / name).write_text((tiny / "depth-midas" / name).read_text())
    (pickled / "pytorch_model.bin").write_bytes(b"\x80\x04pickle")
    with pytest.raises(UnsafeWeights) as e:
        loader.load_depth(str(pickled), "depth_midas", torch.float32)
    assert e.value.field == "preprocessors.depth_midas"
    with pytest.raises(ModelLoadError) as e:
        loader.load_depth(str(tiny / "depth-midas" / "model.safetensors"), "depth_midas", torch.float32)
    assert e.value.field == "preprocessors.depth_midas"
    with pytest.raises(ModelLoadError, match="'depth_anything' model; depth_midas runs a 'dpt' one"):
        loader.load_depth(str(tiny / "depth-anything"), "depth_midas", torch.float32)


def test_the_factory_writes_transformers_layout_deterministically(tmp_path, tiny):
    from deployments.factory import depth as factory

    factory.build_midas(tmp_path / "again", factory.MIDAS_TINY)
    assert sorted(p.name for p in (tmp_path / "again").iterdir()) == [
        "config.json", "model.safetensors", "preprocessor_config.json"]
    assert (tmp_path / "again" / "model.safetensors").read_bytes() == (tiny / "depth-midas" / "model.safetensors"
                                                                       ).read_bytes()
