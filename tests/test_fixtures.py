"""The full-size factory's on-disk layouts (at toy widths) and the loader's choice of file variants."""

from __future__ import annotations

import json
import logging
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from deployments.factory.full import BASE_UNET, CONTROLNET, CONTROLNET_RELEASE, REFINER_UNET, build_all
from deployments.support.config import ModelSource
from deployments.support.errors import ModelLoadError
from deployments.weights import loader


@pytest.fixture(scope="module")
def shrunk(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("fullsize-layout")
    build_all(out, shrink=True)
    return out


def _weights(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*.safetensors"))


def test_diffusers_folders_hold_fp16_variant_files_as_released(shrunk):
    assert _weights(shrunk / "sdxl-base") == [
        "text_encoder/model.fp16.safetensors",
        "text_encoder_2/model.fp16.safetensors",
        "unet/diffusion_pytorch_model.fp16.safetensors",
        "vae/diffusion_pytorch_model.fp16.safetensors",
    ]
    assert _weights(shrunk / "sdxl-refiner") == [
        "text_encoder_2/model.fp16.safetensors",
        "unet/diffusion_pytorch_model.fp16.safetensors",
        "vae/diffusion_pytorch_model.fp16.safetensors",
    ]
    base_index = json.loads((shrunk / "sdxl-base" / "model_index.json").read_text())
    refiner_index = json.loads((shrunk / "sdxl-refiner" / "model_index.json").read_text())
    assert base_index["_class_name"] == "StableDiffusionXLPipeline"
    assert refiner_index["_class_name"] == "StableDiffusionXLImg2ImgPipeline"
    assert refiner_index["text_encoder"] == [None, None] and refiner_index["requires_aesthetics_score"] is True
    unet = json.loads((shrunk / "sdxl-base" / "unet" / "config.json").read_text())
    refiner_unet = json.loads((shrunk / "sdxl-refiner" / "unet" / "config.json").read_text())
    # The conditioning wiring is the released one even at toy widths.
    for config, released in ((unet, BASE_UNET), (refiner_unet, REFINER_UNET)):
        for key in ("addition_embed_type", "addition_time_embed_dim", "down_block_types", "up_block_types",
                    "layers_per_block", "use_linear_projection"):
            assert config[key] == (list(v) if isinstance(v := released[key], tuple) else v), key
    vae = json.loads((shrunk / "sdxl-base" / "vae" / "config.json").read_text())
    assert vae["force_upcast"] is True and vae["scaling_factor"] == 0.13025


def test_release_pickles_keep_their_official_dictionaries(shrunk):
    names = sorted(p.name for p in (shrunk / "releases").glob("*.pth"))
    assert {"RealESRGAN_x4plus.pth", "RealESRGAN_x2plus.pth", "codeformer.pth", "GFPGANv1.4.pth",
            "detection_Resnet50_Final.pth"} <= set(names)
    for name in ("RealESRGAN_x4plus.pth", "codeformer.pth", "GFPGANv1.4.pth"):
        assert "params_ema" in torch.load(shrunk / "releases" / name, map_location="cpu", weights_only=True)
    retina = torch.load(shrunk / "releases" / "detection_Resnet50_Final.pth", map_location="cpu", weights_only=True)
    assert all(key.startswith("module.") for key in retina)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_fp16_only_folders_load_in_any_precision(shrunk, dtype, caplog):
    with caplog.at_level(logging.INFO, logger="deployments.weights.loader"):
        pipe = loader.load_sdxl(ModelSource(source=str(shrunk / "sdxl-base")), refiner=False, dtype=dtype)
    assert pipe.unet.dtype == dtype and pipe.text_encoder_2.dtype == dtype
    assert "fp16 files" in caplog.text
    refiner = loader.load_sdxl(ModelSource(source=str(shrunk / "sdxl-refiner")), refiner=True, dtype=dtype)
    assert refiner.unet.config.cross_attention_dim == 48 and refiner.text_encoder is None


def test_single_file_loads_from_the_weightless_configs_folder(shrunk, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    configs = shrunk / "sdxl-base-configs"
    assert not list(configs.rglob("*.safetensors"))
    single = loader.load_sdxl(ModelSource(source=str(shrunk / "sdxl-base.safetensors"), config=str(configs)),
                              refiner=False, dtype=torch.float32)
    folder = loader.load_sdxl(ModelSource(source=str(shrunk / "sdxl-base")), refiner=False, dtype=torch.float32)
    for name, tensor in folder.unet.state_dict().items():
        assert torch.equal(tensor, single.unet.state_dict()[name]), name


@pytest.fixture(scope="module")
def both_variants(tiny, tmp_path_factory) -> Path:
    """The tiny base with full-precision files and an fp16 variant beside them, as most releases ship."""
    folder = tmp_path_factory.mktemp("variants") / "sdxl-base"
    shutil.copytree(tiny / "sdxl-base", folder)
    pipe = loader.load_sdxl(ModelSource(source=str(folder)), refiner=False, dtype=torch.float16)
    for part in ("unet", "vae", "text_encoder", "text_encoder_2"):
        getattr(pipe, part).save_pretrained(folder / part, safe_serialization=True, variant="fp16")
    return folder


def test_the_variant_matching_the_dtype_is_preferred(both_variants, caplog):
    assert loader.pick_variant(both_variants, torch.float16) == "fp16"
    assert loader.pick_variant(both_variants, torch.float32) is None
    # bfloat16 rounds once from full precision rather than twice through float16
    assert loader.pick_variant(both_variants, torch.bfloat16) is None
    with caplog.at_level(logging.INFO, logger="deployments.weights.loader"):
        half = loader.load_sdxl(ModelSource(source=str(both_variants)), refiner=False, dtype=torch.float16)
        full = loader.load_sdxl(ModelSource(source=str(both_variants)), refiner=False, dtype=torch.float32)
    assert "fp16 files" in caplog.text and "full-precision files" in caplog.text
    name, weight = next(iter(full.unet.state_dict().items()))
    assert torch.equal(half.unet.state_dict()[name], weight.half())


def test_a_controlnet_reads_the_variant_matching_the_dtype(tiny, tmp_path, caplog):
    """diffusers/controlnet-canny-sdxl-1.0 ships both files: float16 reads the fp16 one (half the bytes), float32
    the full-precision one; a folder with one of them reads it whatever the dtype. The listed hash is the file's."""
    folder = tmp_path / "controlnet"
    shutil.copytree(tiny / "controlnet-canny", folder)
    net = loader.load_controlnet(str(folder), torch.float16)
    net.save_pretrained(folder, safe_serialization=True, variant="fp16")
    assert loader.controlnet_weights(folder, torch.float16).name == "diffusion_pytorch_model.fp16.safetensors"
    assert loader.controlnet_weights(folder, torch.float32).name == "diffusion_pytorch_model.safetensors"
    with caplog.at_level(logging.INFO, logger="deployments.weights.loader"):
        loader.load_controlnet(str(folder), torch.float16, name="canny")
    assert "ControlNet canny: fp16 files" in caplog.text
    (folder / "diffusion_pytorch_model.safetensors").unlink()
    assert loader.controlnet_weights(folder, torch.float32).name == "diffusion_pytorch_model.fp16.safetensors"


def test_a_variant_missing_from_one_component_is_named(both_variants, tmp_path):
    broken = tmp_path / "sdxl-base"
    shutil.copytree(both_variants, broken)
    for plain in (broken / "unet").glob("diffusion_pytorch_model.safetensors"):
        plain.unlink()
    for variant in (broken / "vae").glob("*.fp16.safetensors"):
        variant.unlink()
    with pytest.raises(ModelLoadError) as err:
        loader.pick_variant(broken, torch.float32)
    assert err.value.field == "source"


def test_the_safety_checker_has_the_released_layout(shrunk):
    """CompVis/stable-diffusion-safety-checker's files and key names; it loads through the loader."""
    from safetensors import safe_open

    from deployments.factory.full import SAFETY_VISION
    from deployments.safety_checker import ContentFilter
    from deployments.support.config import SafetyCheckerConfig

    folder = shrunk / "safety-checker"
    assert sorted(p.name for p in folder.iterdir()) == ["config.json", "model.safetensors", "preprocessor_config.json"]
    with safe_open(folder / "model.safetensors", "pt") as f:
        keys = set(f.keys())
        assert f.get_tensor("concept_embeds").shape[0] == 17 and f.get_tensor("special_care_embeds").shape[0] == 3
    assert "vision_model.vision_model.embeddings.patch_embedding.weight" in keys and "visual_projection.weight" in keys
    vision = json.loads((folder / "config.json").read_text())["vision_config"]
    assert (vision["image_size"], vision["patch_size"]) == (SAFETY_VISION["image_size"], SAFETY_VISION["patch_size"])
    preprocessing = json.loads((folder / "preprocessor_config.json").read_text())
    assert preprocessing["crop_size"] == {"height": 224, "width": 224}
    checker = ContentFilter(SafetyCheckerConfig(model=str(folder)))
    assert checker.scores([Image.new("RGB", (300, 200))]).shape == (1, 17)


def test_the_captioner_has_the_released_layout(shrunk, astronaut):
    """Salesforce/blip-image-captioning-large's files, its tokenizer's ids (BERT's 30522 entries, [DEC] and [ENC]
    after them) and its decoder's wiring; it loads through the loader and captions."""
    from transformers import BertTokenizer

    from deployments.captioner import BlipCaptioner
    from deployments.factory.captioner import LARGE
    from deployments.support.config import CaptionerConfig

    folder = shrunk / "captioner"
    assert sorted(p.name for p in folder.iterdir()) == [
        "config.json", "model.safetensors", "preprocessor_config.json", "special_tokens_map.json", "tokenizer.json",
        "tokenizer_config.json", "vocab.txt"]
    assert len((folder / "vocab.txt").read_text().splitlines()) == 30522
    tokenizer = BertTokenizer.from_pretrained(folder)
    assert (len(tokenizer), tokenizer.pad_token_id, tokenizer.sep_token_id) == (30524, 0, 102)
    assert tokenizer.convert_tokens_to_ids(["[DEC]", "[ENC]", "[CLS]", "[MASK]"]) == [30522, 30523, 101, 103]
    config = json.loads((folder / "config.json").read_text())
    assert config["architectures"] == ["BlipForConditionalGeneration"]
    text = config["text_config"]
    assert (text["vocab_size"], text["bos_token_id"], text["sep_token_id"], text["pad_token_id"]) == (
        30524, 30522, 102, 0)
    assert text["encoder_hidden_size"] == config["vision_config"]["hidden_size"]  # cross-attention to the tower
    side = config["vision_config"]["image_size"]  # the tower's input is what the processor makes
    assert json.loads((folder / "preprocessor_config.json").read_text())["size"] == {"height": side, "width": side}
    assert LARGE["vision"]["image_size"] == 384 and LARGE["text"]["max_position_embeddings"] == 512
    captioner = BlipCaptioner(CaptionerConfig(model=str(folder)))
    assert 24 <= len(captioner.tokens(astronaut)) <= 48 and captioner.caption(astronaut)


def test_depth_anything_v2_has_the_released_layout(shrunk, astronaut):
    """depth-anything/Depth-Anything-V2-Large-hf's files, preprocessing (518² lower bound in multiples of 14,
    ImageNet's mean and std) and v2 wiring (four taps spread over the backbone); it loads and maps."""
    from deployments.factory.depth import ANYTHING_V2_LARGE
    from deployments.support import depth
    from deployments.support.control import detect

    folder = shrunk / "depth-anything-v2"
    assert sorted(p.name for p in folder.iterdir()) == ["config.json", "model.safetensors", "preprocessor_config.json"]
    config = json.loads((folder / "config.json").read_text())
    assert (config["architectures"], config["model_type"]) == (["DepthAnythingForDepthEstimation"], "depth_anything")
    processor = json.loads((folder / "preprocessor_config.json").read_text())
    assert (processor["size"], processor["ensure_multiple_of"], processor["keep_aspect_ratio"]) == (
        {"height": 518, "width": 518}, 14, True)
    assert processor["image_mean"] == [0.485, 0.456, 0.406] and processor["image_std"] == [0.229, 0.224, 0.225]
    backbone = ANYTHING_V2_LARGE["backbone_config"]
    assert (backbone["hidden_size"], backbone["num_hidden_layers"], backbone["out_indices"]) == (1024, 24,
                                                                                                [5, 12, 18, 24])
    estimators = depth.load({"depth_anything_v2": str(folder)}, torch.device("cpu"), torch.float32)
    assert detect(astronaut, "depth_anything_v2", 64, estimators=estimators).size == (64, 64)


def test_the_controlnet_has_the_released_layout(shrunk, astronaut):
    """diffusers/controlnet-canny-sdxl-1.0's files and config.json as released (its keys, its values, the base's
    widths shrunk), the ``fp16`` variant the full-precision file rounded; the service's loader reads it, and a canny
    unit on it moves the shrunk base's pixels (its zero convolutions are not zero)."""
    from safetensors.torch import load_file

    from deployments.sdxl_base import BaseGenerator
    from deployments.support.config import SDXLBaseConfig
    from deployments.support.control import ControlUnit
    from deployments.support.generation import GenerationRequest
    from tests.helpers import pixels

    folder = shrunk / "controlnet-canny-sdxl"
    assert sorted(p.name for p in folder.iterdir()) == [
        "config.json", "diffusion_pytorch_model.fp16.safetensors", "diffusion_pytorch_model.safetensors"]
    config = json.loads((folder / "config.json").read_text())
    assert config.keys() == CONTROLNET_RELEASE.keys() | CONTROLNET.keys()  # no key newer diffusers would add
    assert (config["_class_name"], config["_diffusers_version"]) == ("ControlNetModel", "0.20.0.dev0")
    unet = json.loads((shrunk / "sdxl-base" / "unet" / "config.json").read_text())
    for key in ("block_out_channels", "attention_head_dim", "transformer_layers_per_block", "cross_attention_dim",
                "projection_class_embeddings_input_dim", "down_block_types", "layers_per_block", "norm_num_groups",
                "addition_embed_type", "addition_time_embed_dim", "use_linear_projection", "in_channels"):
        assert config[key] == unet[key], key  # it fits the base it was made for
    for key in ("conditioning_embedding_out_channels", "conditioning_channels", "controlnet_conditioning_channel_order",
                "global_pool_conditions", "upcast_attention", "addition_embed_type_num_heads"):
        assert config[key] == CONTROLNET[key], key
    full = load_file(folder / "diffusion_pytorch_model.safetensors")
    half = load_file(folder / "diffusion_pytorch_model.fp16.safetensors")
    assert full.keys() == half.keys() and all(t.dtype == torch.float32 for t in full.values())
    assert all(torch.equal(half[k], full[k].half()) for k in full)
    assert full["controlnet_mid_block.weight"].abs().sum() > 0
    base = BaseGenerator(SDXLBaseConfig(model={"source": str(shrunk / "sdxl-base")},
                                        controlnets={"canny": str(folder)}))
    assert base.controls.names == ["canny"] and base.controls.models["canny"].dtype == torch.float32
    small = dict(prompt="a lighthouse", width=64, height=64, steps=2, seed=3)
    plain = pixels(base.generate(GenerationRequest(**small)).images[0])
    unit = ControlUnit(model="canny", image=astronaut, module="canny")
    controlled = pixels(base.generate(GenerationRequest(**small, control=[unit])).images[0])
    assert controlled.shape == (64, 64, 3) and np.abs(controlled.astype(float) - plain).mean() > 1.0


def test_a_replica_runs_in_its_configured_dtype(shrunk, astronaut, monkeypatch):
    """The image-to-image, inpainting and ControlNet pipelines a replica derives from a checkpoint's share its modules
    in its dtype (diffusers 0.42's ``from_pipe`` converts them to float32 unless told the dtype). bfloat16 on a CPU
    here, as a GPU replica runs."""
    from deployments import sdxl_base
    from deployments.support.config import SDXLBaseConfig
    from deployments.support.control import ControlUnit
    from deployments.support.generation import GenerationRequest

    monkeypatch.setattr(sdxl_base.devices, "resolve", lambda _config: (torch.device("cpu"), torch.bfloat16))
    base = sdxl_base.BaseGenerator(SDXLBaseConfig(model={"source": str(shrunk / "sdxl-base")},
                                                  controlnets={"canny": str(shrunk / "controlnet-canny-sdxl")}))
    pipes = base.checkpoint()
    unit = ControlUnit(model="canny", image=astronaut, module="canny")
    base.generate(GenerationRequest(prompt="a lighthouse", width=64, height=64, steps=1, seed=3, control=[unit]))
    controlled = base.controls.pipeline(pipes, "txt2img", [unit])
    for pipe in (pipes.txt2img, pipes.img2img, pipes.inpaint, controlled):
        assert {m.dtype for m in (pipe.unet, pipe.vae, pipe.text_encoder, pipe.text_encoder_2)} == {torch.bfloat16}
    assert base.controls.models["canny"].dtype == torch.bfloat16


def test_the_full_size_controlnet_is_the_base_unets_encoder():
    """The release's config at full size (on the meta device: no memory) makes 1,251,014,160 parameters, 5.00 GB in
    float32 as its diffusion_pytorch_model.safetensors, and each weight it shares with the base UNet (conv_in, the
    time and text-time embeddings, the down blocks and the middle block) has the base's name and shape."""
    from diffusers import ControlNetModel, UNet2DConditionModel

    with torch.device("meta"):
        net = ControlNetModel(**CONTROLNET)
        unet = UNet2DConditionModel(**BASE_UNET)
    assert sum(p.numel() for p in net.parameters()) == 1_251_014_160
    own = {k: v.shape for k, v in net.state_dict().items()}
    shared = {k: v.shape for k, v in unet.state_dict().items()
              if k.split(".")[0] in ("conv_in", "time_embedding", "add_embedding", "down_blocks", "mid_block")}
    assert len(shared) == 808 and all(own.get(k) == shape for k, shape in shared.items())
    extra = {k.split(".")[0] for k in own.keys() - shared.keys()}
    assert extra == {"controlnet_cond_embedding", "controlnet_down_blocks", "controlnet_mid_block"}


@pytest.mark.device_kit
def test_the_gpu_stage_benchmark_runs_every_stage_on_these_layouts(shrunk, tmp_path):
    """``tests/bench_gpu.py``'s GPU plan (every variant and stage) on the toy-width layouts, so that a lent GPU is
    never spent finding that the benchmark itself drifted from the serving classes; on a CPU the compile settings
    run eagerly, and an attention kernel the CPU lacks falls back to one it has. A minute of CPU: ``make
    device-kit`` runs it before it packs the kit, ``make test`` does not."""
    from tests import bench_gpu

    (shrunk / ".stamp").touch()  # every artefact is there: the benchmark builds nothing
    out = tmp_path / "bench-gpu.json"
    assert bench_gpu.main(["--shrink", "--quick", "--models", str(shrunk), "--out", str(out), "--budget", "600"]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert not [row for row in rows if "error" in row]
    assert not [row for row in rows if "skipped" in row]
    measured = {row.get("variant", row["stage"]): row for row in rows if "median_s" in row}
    for name in ("eager float32 (reference)", "shipped: bfloat16 + channels-last + compile full + VAE compiled",
                 "refiner 384² strength 0.35 (bf16, channels-last)", "CodeFormer one 512² face bfloat16",
                 "Real-ESRGAN x2 192→384 float16 + channels-last, tile 512", "VAE decode 384² bfloat16 compiled",
                 "canny ControlNet (balanced) on eager bfloat16",
                 "Depth Anything V2 Large map, processor_res 1024, bfloat16"):
        assert measured[name]["median_s"] > 0, name
    bases = [row for row in rows if "variant" in row and "controlnet_s" not in row]
    assert len(bases) >= 6
    assert all(row["finite"] and math.isfinite(row["latent_rel_error"]) and row["psnr_db"] > 0 for row in bases)
    # One unit beside the plain call of its variant (--quick: the eager one alone), which it moved.
    controlled = [row for row in rows if "controlnet_s" in row]
    assert [row["variant"] for row in controlled] == ["canny ControlNet (balanced) on eager bfloat16"]
    assert controlled[0]["finite"] and controlled[0]["latent_change_vs_plain"] > 0.01
    assert "ControlNet +" in bench_gpu.table(rows) or "ControlNet -" in bench_gpu.table(rows)
