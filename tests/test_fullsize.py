"""Full-size checks on CPU (``make fullsize``): the released shapes load and run through the serving classes.

Opt-in: they read ``FULLSIZE_MODELS`` (written by ``python -m deployments.factory DIR --full``), need about 16 GB
of memory and several minutes, and skip unless ``IMAGEGEN_FULLSIZE=1``. The ControlNet's check runs the base and
the ControlNet in bfloat16 (about 10 GB; in float32, as a CPU replica runs, they would take about 19 GB).
"""

from __future__ import annotations

import gc
import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from deployments.support.config import ModelSource, SDXLBaseConfig, SDXLRefinerConfig
from deployments.weights import loader

pytestmark = pytest.mark.skipif(not os.environ.get("IMAGEGEN_FULLSIZE"), reason="opt-in: make fullsize")

# Parameter counts of the released networks (stabilityai/stable-diffusion-xl-*-1.0, their text encoders).
RELEASED = {
    ("sdxl-base", "unet"): 2_567_463_684,
    ("sdxl-base", "text_encoder"): 123_060_480,
    ("sdxl-base", "text_encoder_2"): 694_659_840,
    ("sdxl-base", "vae"): 83_653_863,
}
# The refiner UNet's released fp16 file (unet/diffusion_pytorch_model.fp16.safetensors): 4.52 GB.
REFINER_UNET_FP16_BYTES = 4.52e9
# diffusers/controlnet-canny-sdxl-1.0: diffusion_pytorch_model.safetensors "5 GB", its fp16 variant "2.5 GB" (the
# hub's rounding), which is the parameter count of ControlNetModel on the release's config.json.
CONTROLNET_PARAMETERS = 1_251_014_160


@pytest.fixture(scope="module")
def models() -> Path:
    path = Path(os.environ.get("FULLSIZE_MODELS", Path.home() / ".cache" / "imagegen" / "fullsize-models"))
    if not (path / "sdxl-base" / "model_index.json").exists():
        pytest.fail(f"no full-size models in {path}: run python -m deployments.factory {path} --full")
    return path


def _free() -> None:
    gc.collect()


@pytest.mark.parametrize(("folder", "part"), list(RELEASED))
def test_parameter_counts_are_the_released_ones(models, folder, part):
    from safetensors import safe_open

    files = list((models / folder / part).glob("*.safetensors"))
    count = 0
    for path in files:
        with safe_open(path, "pt") as f:
            count += sum(int(np.prod(f.get_slice(k).get_shape())) for k in f.keys())  # noqa: SIM118
    assert count == RELEASED[(folder, part)]


def test_refiner_unet_has_the_released_size(models):
    size = (models / "sdxl-refiner" / "unet" / "diffusion_pytorch_model.fp16.safetensors").stat().st_size
    assert abs(size - REFINER_UNET_FP16_BYTES) / REFINER_UNET_FP16_BYTES < 0.005


def test_single_file_matches_the_folder(models, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    single = loader.load_sdxl(ModelSource(source=str(models / "sdxl-base.safetensors"),
                                          config=str(models / "sdxl-base-configs")), refiner=False,
                              dtype=torch.float16)
    folder = loader.load_sdxl(ModelSource(source=str(models / "sdxl-base")), refiner=False, dtype=torch.float16)
    for name in ("unet", "vae", "text_encoder", "text_encoder_2"):
        a, b = getattr(single, name).state_dict(), getattr(folder, name).state_dict()
        assert a.keys() == b.keys()
        for key in list(a)[:: max(1, len(a) // 50)]:
            assert torch.equal(a[key], b[key]), f"{name}.{key}"
    del single, folder
    _free()


def test_the_inpainting_checkpoint_loads_with_nine_channels_as_folder_and_single_file(models, monkeypatch):
    """diffusers/stable-diffusion-xl-1.0-inpainting-0.1's layout, and the same weights as one SGM file read with the
    base's component configs: the UNet takes the file's 9 input channels (the base's parameters and 5 x 320 x 3 x 3
    more in its first convolution), and the two give the same weights."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    if not (models / "sdxl-inpaint" / "model_index.json").exists():
        pytest.fail(f"no full-size inpainting checkpoint in {models}: python -m deployments.factory {models} --full "
                    "--only sdxl-inpaint")
    def unet(source: ModelSource):  # its channels, its parameter count and every 50th tensor, the rest freed
        pipe = loader.load_sdxl(source, refiner=False, dtype=torch.float16)
        state = pipe.unet.state_dict()
        facts = (pipe.unet.config.in_channels, sum(p.numel() for p in pipe.unet.parameters()),
                 {k: state[k].clone() for k in list(state)[:: max(1, len(state) // 50)]})
        del pipe, state
        _free()
        return facts

    channels, count, sampled = unet(ModelSource(source=str(models / "sdxl-inpaint.safetensors"),
                                                config=str(models / "sdxl-base-configs")))
    with open(models / "sdxl-base" / "unet" / "config.json") as f:
        width = json.load(f)["block_out_channels"][0]
    assert channels == 9
    assert count == unet(ModelSource(source=str(models / "sdxl-base")))[1] + 5 * width * 3 * 3
    channels, _, folder = unet(ModelSource(source=str(models / "sdxl-inpaint")))
    assert channels == 9 and sampled.keys() == folder.keys()
    for key in sampled:
        assert torch.equal(sampled[key], folder[key]), key


def test_the_lineart_releases_convert_and_load(models, tmp_path):
    """lllyasviel/Annotators' sk_model.pth, sk_model2.pth and netG.pth as released (pickles) go through the
    converter and load through the loader as the base's preprocessors, each mapping an image at its resolution."""
    from deployments.support import lineart
    from deployments.support.control import detect
    from deployments.weights import convert

    releases = models / "lineart"
    if not (releases / "netG.pth").exists():
        pytest.fail(f"no line-art releases in {models}: python -m deployments.factory {models} --full --only lineart")
    assert convert.main([str(releases), str(tmp_path)]) == 0
    sources = {"lineart_realistic": "sk_model", "lineart_coarse": "sk_model2", "lineart_anime": "netG"}
    networks = lineart.load({m: str(tmp_path / f"{name}.safetensors") for m, name in sources.items()},
                            torch.device("cpu"))
    assert sum(p.numel() for p in networks["lineart_realistic"].net.parameters()) == 4_290_945
    photo = Image.fromarray(np.random.default_rng(0).integers(0, 256, (192, 256, 3), dtype=np.uint8))
    for module in sources:
        made = detect(photo, module, 256, estimators=networks)
        assert made.size == (341, 256) and made.mode == "RGB", module


def test_the_softedge_releases_convert_and_load(models, tmp_path):
    """lllyasviel/Annotators' ControlNetHED.pth and table5_pidinet.pth as released (pickles; PiDiNet's a training
    checkpoint under module.) go through the converter and load as the six modules (one network each, shared), each
    mapping an image at the extension's default resolution, 512."""
    from deployments.support import softedge
    from deployments.support.control import detect
    from deployments.weights import convert

    releases = models / "softedge"
    if not (releases / "table5_pidinet.pth").exists():
        pytest.fail(f"no soft-edge releases in {models}: python -m deployments.factory {models} --full --only softedge")
    assert convert.main([str(releases), str(tmp_path)]) == 0
    detectors = softedge.load({m: str(tmp_path) for m in softedge.SOFTEDGE_MODULES}, torch.device("cpu"))
    assert sum(p.numel() for p in detectors["softedge_hed"].network.net.parameters()) == 14_716_168
    radial = 16 * (60 + 120 + 240 + 240)  # four depthwise 3x3 kernels rewritten as 5x5
    assert sum(p.numel() for p in detectors["scribble_pidinet"].network.net.parameters()) == 710_149 + radial
    photo = Image.fromarray(np.random.default_rng(0).integers(0, 256, (192, 256, 3), dtype=np.uint8))
    for module in softedge.SOFTEDGE_MODULES:
        made = detect(photo, module, 512, estimators=detectors)
        assert made.size == (683, 512) and made.mode == "RGB", module


def test_the_mlsd_release_converts_and_loads(models, tmp_path):
    """lllyasviel/Annotators' mlsd_large_512_fp32.pth as released (a pickle) goes through the converter and loads
    through the loader as the base's mlsd preprocessor, mapping an image at its resolution."""
    from deployments.support import mlsd
    from deployments.support.control import detect
    from deployments.weights import convert

    release = models / "mlsd" / "mlsd_large_512_fp32.pth"
    if not release.exists():
        pytest.fail(f"no M-LSD release in {models}: python -m deployments.factory {models} --full --only mlsd")
    assert convert.main([str(release), str(tmp_path)]) == 0
    detectors = mlsd.load({"mlsd": str(tmp_path / mlsd.WEIGHTS)}, torch.device("cpu"))
    assert sum(p.numel() for p in detectors["mlsd"].model.parameters()) == 1_533_680
    photo = Image.fromarray(np.random.default_rng(0).integers(0, 256, (192, 256, 3), dtype=np.uint8))
    made = detect(photo, "mlsd", 512, 0.1, 0.1, estimators=detectors)
    assert made.size == (683, 512) and made.mode == "RGB"


def test_base_generates_at_256(models):
    from deployments.sdxl_base import BaseGenerator
    from deployments.support.generation import GenerationRequest

    base = BaseGenerator(SDXLBaseConfig(model={"source": str(models / "sdxl-base")}))
    result = base.generate(GenerationRequest(prompt="a lighthouse", width=256, height=256, steps=2, seed=1))
    image = np.asarray(result.images[0])
    assert image.shape == (256, 256, 3) and image.std() > 0
    del base
    _free()


def test_refiner_refines_at_256(models):
    from deployments.sdxl_refiner import Refiner
    from deployments.support.generation import RefineRequest

    refiner = Refiner(SDXLRefinerConfig(model={"source": str(models / "sdxl-refiner")}))
    photo = Image.fromarray(np.random.default_rng(0).integers(0, 256, (256, 256, 3), dtype=np.uint8))
    out = refiner.refine_images(RefineRequest(prompt="a lighthouse", seeds=[1], steps=4, strength=0.5), photo)
    assert out.image.size == (256, 256)
    del refiner
    _free()


@pytest.mark.parametrize(("name", "scale"), [("RealESRGAN_x4plus", 4), ("RealESRGAN_x2plus", 2),
                                             ("codeformer", 1), ("GFPGANv1.4", 1)])
def test_released_pickles_convert_and_load(models, tmp_path, name, scale):
    from deployments.weights.convert import convert_file

    out = tmp_path / f"{name}.safetensors"
    convert_file(models / "releases" / f"{name}.pth", out)
    descriptor = loader.load_spandrel(str(out))
    assert descriptor.scale == scale
    if scale > 1:
        with torch.inference_mode():
            assert descriptor(torch.rand(1, 3, 32, 32)).shape[-1] == 32 * scale


def test_retinaface_converts_and_detects(models, tmp_path):
    from deployments.support.faces import RetinaFaceDetector
    from deployments.weights.convert import convert_file

    out = tmp_path / "retinaface.safetensors"
    convert_file(models / "releases" / "detection_Resnet50_Final.pth", out)
    detector = RetinaFaceDetector(str(out), torch.device("cpu"))
    assert isinstance(detector.detect(np.zeros((256, 256, 3), np.uint8)), list)


def test_the_safety_checker_has_the_released_size_and_runs(models):
    """CompVis/stable-diffusion-safety-checker's CLIP ViT-L/14 vision tower (303.2 M parameters) and projection."""
    from deployments.safety_checker import ContentFilter
    from deployments.support.config import SafetyCheckerConfig

    if not (models / "safety-checker" / "model.safetensors").exists():
        pytest.fail(f"no full-size safety checker in {models}: python -m deployments.factory {models} --full "
                    "--only safety-checker")
    checker = ContentFilter(SafetyCheckerConfig(model=str(models / "safety-checker")))
    assert sum(p.numel() for p in checker.model.vision_model.parameters()) == 303_179_776
    assert sum(p.numel() for p in checker.model.parameters()) == 303_981_588
    photo = Image.fromarray(np.random.default_rng(0).integers(0, 256, (1024, 1024, 3), dtype=np.uint8))
    assert checker.scores([photo]).shape == (1, 17)
    del checker
    _free()


def test_the_captioner_has_the_released_size_and_runs(models):
    """Salesforce/blip-image-captioning-large's BLIP: a ViT-L/16 vision tower at 384² (303.7 M parameters) and a
    BERT-base decoder cross-attending to it, 446.3 M parameters in all (the decoder's output layer tied to its
    word embeddings); a caption within A1111's token bounds."""
    from deployments.captioner import BlipCaptioner
    from deployments.support.config import CaptionerConfig

    if not (models / "captioner" / "model.safetensors").exists():
        pytest.fail(f"no full-size captioner in {models}: python -m deployments.factory {models} --full "
                    "--only captioner")
    captioner = BlipCaptioner(CaptionerConfig(model=str(models / "captioner")))
    assert sum(p.numel() for p in captioner.model.vision_model.parameters()) == 303_690_752
    assert sum(p.numel() for p in captioner.model.parameters()) == 446_290_492
    assert len(captioner.processor.tokenizer) == 30524
    photo = Image.fromarray(np.random.default_rng(0).integers(0, 256, (768, 512, 3), dtype=np.uint8))
    assert 24 <= len(captioner.tokens(photo)) <= 48
    del captioner
    _free()


def test_depth_anything_v2_large_has_the_released_size_and_maps(models):
    """depth-anything/Depth-Anything-V2-Large-hf, the extension's depth_anything_v2: a DINOv2 ViT-L/14 backbone
    (304.4 M parameters) under a DPT neck, 335.3 M in all; an 8-bit map at the processor resolution."""
    from deployments.support import depth
    from deployments.support.control import detect

    folder = models / "depth-anything-v2"
    if not (folder / "model.safetensors").exists():
        pytest.fail(f"no full-size Depth Anything V2 in {models}: python -m deployments.factory {models} --full "
                    "--only depth-anything-v2")
    estimators = depth.load({"depth_anything_v2": str(folder)}, torch.device("cpu"), torch.float32)
    model = estimators["depth_anything_v2"].model
    assert sum(p.numel() for p in model.backbone.parameters()) == 304_368_640
    assert sum(p.numel() for p in model.parameters()) == 335_315_649
    photo = Image.fromarray(np.random.default_rng(0).integers(0, 256, (384, 512, 3), dtype=np.uint8))
    made = detect(photo, "depth_anything_v2", 512, estimators=estimators)
    assert made.size == (683, 512) and made.mode == "RGB"
    del estimators, model
    _free()


def test_the_controlnet_has_the_released_size_and_guides_the_full_size_base(models, monkeypatch):
    """diffusers/controlnet-canny-sdxl-1.0's files (the release's config.json, 1.25 B parameters in float32 and in
    the fp16 variant), loaded by the service's own loader beside the full-size base, whose UNet it fits; one canny
    unit (balanced) runs a 256² call of 2 steps on CPU and moves the image. bfloat16, where a CPU replica would run
    float32: the two in float32 take about 19 GB."""
    from safetensors import safe_open

    from deployments import sdxl_base
    from deployments.sdxl_base import BaseGenerator
    from deployments.support.control import ControlUnit
    from deployments.support.generation import GenerationRequest

    folder = models / "controlnet-canny-sdxl"
    if not (folder / "config.json").exists():
        pytest.fail(f"no full-size ControlNet in {models}: python -m deployments.factory {models} --full "
                    "--only controlnet")
    assert sorted(p.name for p in folder.iterdir()) == [
        "config.json", "diffusion_pytorch_model.fp16.safetensors", "diffusion_pytorch_model.safetensors"]
    for name, dtype in (("diffusion_pytorch_model.safetensors", "F32"), ("diffusion_pytorch_model.fp16.safetensors",
                                                                         "F16")):
        with safe_open(folder / name, "pt") as f:
            slices = [f.get_slice(k) for k in f.keys()]  # noqa: SIM118
            assert sum(int(np.prod(s.get_shape())) for s in slices) == CONTROLNET_PARAMETERS, name
            assert {s.get_dtype() for s in slices} == {dtype}, name
    config = json.loads((folder / "config.json").read_text())
    unet = json.loads((models / "sdxl-base" / "unet" / "config.json").read_text())
    for key in ("block_out_channels", "transformer_layers_per_block", "cross_attention_dim",
                "projection_class_embeddings_input_dim"):
        assert config[key] == unet[key], key

    monkeypatch.setattr(sdxl_base.devices, "resolve", lambda _config: (torch.device("cpu"), torch.bfloat16))
    base = BaseGenerator(SDXLBaseConfig(model={"source": str(models / "sdxl-base")},
                                        controlnets={"canny": str(folder)}))
    net = base.controls.models["canny"]
    assert net.dtype == torch.bfloat16 and sum(p.numel() for p in net.parameters()) == CONTROLNET_PARAMETERS
    request = dict(prompt="a lighthouse", width=256, height=256, steps=2, seed=1)
    plain = np.asarray(base.generate(GenerationRequest(**request)).images[0], dtype=np.float32)
    photo = Image.fromarray(np.random.default_rng(0).integers(0, 256, (384, 512, 3), dtype=np.uint8))
    unit = ControlUnit(model="canny", image=photo, module="canny")
    controlled = np.asarray(base.generate(GenerationRequest(**request, control=[unit])).images[0], dtype=np.float32)
    assert controlled.shape == (256, 256, 3) and controlled.std() > 0
    assert np.abs(controlled - plain).mean() > 0.5
    del base, net
    _free()
