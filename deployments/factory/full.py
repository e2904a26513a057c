"""Full-size random-weight models in the exact on-disk layouts of the official releases.

``python -m deployments.factory OUT --full`` writes:

    OUT/sdxl-base/                 diffusers folder, ``fp16`` variant files only (``*.fp16.safetensors``)
    OUT/sdxl-base.safetensors      the same weights as one original-layout (SGM) checkpoint, fp16
    OUT/sdxl-base-configs/         the component configs and tokenizers a single-file checkpoint needs (no hub)
    OUT/sdxl-refiner/              diffusers folder, ``fp16`` variant files only
    OUT/releases/*.pth             Real-ESRGAN x4/x2, CodeFormer, GFPGAN 1.4, RetinaFace-R50 as released (pickles)
    OUT/safety-checker/            CompVis/stable-diffusion-safety-checker's layout: CLIP ViT-L/14 vision tower,
                                   768-wide projection, 17 + 3 concepts; fp32 model.safetensors with its nested keys
    OUT/captioner/                 Salesforce/blip-image-captioning-large's layout: ViT-L/16 at 384², BERT-base
                                   decoder, BERT's 30522-entry WordPiece plus [DEC] and [ENC]; fp32 model.safetensors
    OUT/depth-anything-v2/         depth-anything/Depth-Anything-V2-Large-hf's layout (the extension's
                                   depth_anything_v2): DINOv2 ViT-L/14 at 518², DPT neck; fp32 model.safetensors
    OUT/sdxl-inpaint/              diffusers/stable-diffusion-xl-1.0-inpainting-0.1's layout: the base's configuration
                                   with a 9-channel UNet, fp16 variant files only
    OUT/sdxl-inpaint.safetensors   the same weights as one SGM checkpoint (config: sdxl-base-configs)
    OUT/lineart/                   lllyasviel/Annotators' line-art releases as shipped (pickled state dicts, the
                                   converter's input): sk_model.pth, sk_model2.pth (the informative-drawings
                                   generator, 4.3 M), netG.pth (the anime U-Net, 54 M, names under module.)
    OUT/softedge/                  lllyasviel/Annotators' soft-edge releases as shipped (the converter's input):
                                   ControlNetHED.pth (HED, 14.7 M, a pickled state dict), table5_pidinet.pth
                                   (PiDiNet, 0.71 M, a training checkpoint, names under module.)
    OUT/mlsd/                      lllyasviel/Annotators' mlsd_large_512_fp32.pth as shipped (a pickled state dict):
                                   M-LSD's large network, 1.5 M weights, 6 MB (the same shrunk or not)
    OUT/controlnet-canny-sdxl/     diffusers/controlnet-canny-sdxl-1.0's layout (``--only controlnet``): the release's
                                   config.json, diffusion_pytorch_model.safetensors (fp32, 5.0 GB) and its fp16
                                   variant (2.5 GB); 1.25 B parameters, the base UNet's encoder and middle block

The configurations are those of stabilityai/stable-diffusion-xl-base-1.0 and -refiner-1.0: 2.6 B UNet parameters
for the base, 2.3 B for the refiner, CLIP ViT-L and OpenCLIP bigG text encoders, the 84 M parameter VAE. Weights
are PyTorch's default initialisation from fixed seeds, so images are noise, but every shape, kernel and byte
count is the real one: this is what the GPU benchmark and the full-size checks run.
"""

from __future__ import annotations

import gc
import json
import logging
import shutil
from pathlib import Path
from types import SimpleNamespace

import torch
from safetensors.torch import save_file

from deployments.factory import captioner as blip
from deployments.factory import depth, lineart, softedge
from deployments.factory.mlsd import build_mlsd_pth
from deployments.factory.sgm import sdxl_to_sgm
from deployments.factory.tiny import _save_tokenizer, _scheduler
from deployments.factory.tokenizer import build_clip_tokenizer

logger = logging.getLogger(__name__)

SEED = 1000
VOCAB = 49408  # CLIP's vocabulary; our locally trained tokenizer uses the first ids only
VARIANT = "fp16"

BASE_UNET = dict(
    sample_size=128,
    in_channels=4,
    out_channels=4,
    layers_per_block=2,
    block_out_channels=(320, 640, 1280),
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    attention_head_dim=(5, 10, 20),
    transformer_layers_per_block=(1, 2, 10),
    cross_attention_dim=2048,
    use_linear_projection=True,
    addition_embed_type="text_time",
    addition_time_embed_dim=256,
    projection_class_embeddings_input_dim=2816,  # 6 size/crop ids x 256 + 1280 pooled text
)
REFINER_UNET = dict(
    sample_size=128,
    in_channels=4,
    out_channels=4,
    layers_per_block=2,
    block_out_channels=(384, 768, 1536, 1536),
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    attention_head_dim=(6, 12, 24, 24),
    transformer_layers_per_block=4,
    cross_attention_dim=1280,
    use_linear_projection=True,
    addition_embed_type="text_time",
    addition_time_embed_dim=256,
    projection_class_embeddings_input_dim=2560,  # 5 size/crop/aesthetic ids x 256 + 1280 pooled text
)
VAE = dict(
    in_channels=3,
    out_channels=3,
    latent_channels=4,
    block_out_channels=(128, 256, 512, 512),
    down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4,
    layers_per_block=2,
    norm_num_groups=32,
    sample_size=1024,
    scaling_factor=0.13025,
    force_upcast=True,  # as released: the SDXL VAE overflows in fp16
)
TEXT_L = dict(hidden_size=768, intermediate_size=3072, num_attention_heads=12, num_hidden_layers=12,
              hidden_act="quick_gelu", projection_dim=768)
TEXT_G = dict(hidden_size=1280, intermediate_size=5120, num_attention_heads=20, num_hidden_layers=32,
              hidden_act="gelu", projection_dim=1280)

# CompVis/stable-diffusion-safety-checker: CLIP ViT-L/14's vision tower at 224^2 and a 768-wide projection.
SAFETY_VISION = dict(hidden_size=1024, intermediate_size=4096, num_attention_heads=16, num_hidden_layers=24,
                     image_size=224, patch_size=14, hidden_act="quick_gelu")
SAFETY_PROJECTION = 768

# diffusers/controlnet-canny-sdxl-1.0's config.json as released (diffusers 0.20.0.dev0, trained by diffusers'
# train_controlnet_sdxl.py from the base UNet: its down and middle blocks, then the zero convolutions). Written
# as is, so that the service loads the release's keys (no ``mid_block_type``: newer diffusers default it). The hub
# lists that file at 1.31 kB, this one is 1235 bytes: an entry that changes nothing loaded (``_name_or_path``, most
# likely) could not be read and is left out.
CONTROLNET_RELEASE = {"_class_name": "ControlNetModel", "_diffusers_version": "0.20.0.dev0"}
CONTROLNET = dict(
    act_fn="silu",
    addition_embed_type="text_time",
    addition_embed_type_num_heads=64,
    addition_time_embed_dim=256,
    attention_head_dim=[5, 10, 20],
    block_out_channels=[320, 640, 1280],
    class_embed_type=None,
    conditioning_channels=3,
    conditioning_embedding_out_channels=[16, 32, 96, 256],
    controlnet_conditioning_channel_order="rgb",
    cross_attention_dim=2048,
    down_block_types=["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    downsample_padding=1,
    encoder_hid_dim=None,
    encoder_hid_dim_type=None,
    flip_sin_to_cos=True,
    freq_shift=0,
    global_pool_conditions=False,
    in_channels=4,
    layers_per_block=2,
    mid_block_scale_factor=1,
    norm_eps=1e-05,
    norm_num_groups=32,
    num_attention_heads=None,
    num_class_embeds=None,
    only_cross_attention=False,
    projection_class_embeddings_input_dim=2816,
    resnet_time_scale_shift="default",
    transformer_layers_per_block=[1, 2, 10],
    upcast_attention=None,
    use_linear_projection=True,
)
# What a ControlNet shares with the base UNet it was made from: its shrunk values follow the shrunk base.
_CONTROLNET_FROM_BASE = ("attention_head_dim", "block_out_channels", "cross_attention_dim", "norm_num_groups",
                         "projection_class_embeddings_input_dim", "transformer_layers_per_block")

ARTEFACTS = ("sdxl-base", "sdxl-base-single", "sdxl-inpaint", "sdxl-refiner", "releases", "safety-checker",
             "captioner", "depth-anything-v2", "lineart", "softedge", "mlsd", "controlnet")


def shapes(shrink: bool = False) -> SimpleNamespace:
    """The released shapes, or (``shrink``) the same wiring at toy widths, so that the tests check the on-disk
    layouts in seconds: same files, names, variants and configs keys, smaller tensors."""
    real = SimpleNamespace(base=BASE_UNET, refiner=REFINER_UNET, vae=VAE, text_l=TEXT_L, text_g=TEXT_G, vocab=VOCAB,
                           controlnet=CONTROLNET)
    if not shrink:
        return real
    small = dict(block_out_channels=(32, 64, 64), attention_head_dim=(2, 4, 4), transformer_layers_per_block=1,
                 norm_num_groups=8, sample_size=32)
    text = dict(intermediate_size=37, num_attention_heads=4, num_hidden_layers=2)
    base = {**BASE_UNET, **small, "cross_attention_dim": 32 + 48, "projection_class_embeddings_input_dim": 6 * 256 + 48}
    return SimpleNamespace(
        base=base,
        refiner={**REFINER_UNET, **small, "block_out_channels": (32, 64, 64, 64), "attention_head_dim": (2, 4, 4, 4),
                 "cross_attention_dim": 48, "projection_class_embeddings_input_dim": 5 * 256 + 48},
        vae={**VAE, "block_out_channels": (32, 32, 32, 32), "norm_num_groups": 8, "layers_per_block": 1},
        text_l={**TEXT_L, **text, "hidden_size": 32, "projection_dim": 32},
        text_g={**TEXT_G, **text, "hidden_size": 48, "projection_dim": 48},
        vocab=1000,
        controlnet={**CONTROLNET, **{k: _json(base[k]) for k in _CONTROLNET_FROM_BASE}},
    )


def _json(value):
    """A config value as config.json holds it (tuples are lists there)."""
    return list(value) if isinstance(value, tuple) else value


def _text_config(shape: dict, eos: int, vocab: int):
    from transformers import CLIPTextConfig

    return CLIPTextConfig(vocab_size=vocab, max_position_embeddings=77, bos_token_id=eos - 1, eos_token_id=eos,
                          pad_token_id=eos, **shape)


def _made(factory, seed: int, device: str):
    """Build on ``device`` (seconds on a GPU instead of minutes of CPU initialisation), keep fp16 on the CPU."""
    torch.manual_seed(seed)
    with torch.device(device):
        model = factory()
    return model.to("cpu", torch.float16).eval()


def _save_component(model, folder: Path) -> None:
    model.save_pretrained(folder, safe_serialization=True, variant=VARIANT)


def _write_index(out: Path, refiner: bool) -> None:
    parts = {
        "vae": ["diffusers", "AutoencoderKL"],
        "unet": ["diffusers", "UNet2DConditionModel"],
        "scheduler": ["diffusers", "EulerDiscreteScheduler"],
        "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"],
        "tokenizer_2": ["transformers", "CLIPTokenizer"],
        "text_encoder": [None, None] if refiner else ["transformers", "CLIPTextModel"],
        "tokenizer": [None, None] if refiner else ["transformers", "CLIPTokenizer"],
        "feature_extractor": [None, None],
        "image_encoder": [None, None],
    }
    index = {
        "_class_name": "StableDiffusionXLImg2ImgPipeline" if refiner else "StableDiffusionXLPipeline",
        "_diffusers_version": "0.19.0.dev0",
        "force_zeros_for_empty_prompt": not refiner,
        **({"requires_aesthetics_score": True} if refiner else {}),
        **parts,
    }
    (out / "model_index.json").write_text(json.dumps(index, indent=2))


def build_sdxl(out: Path, tokenizer_src: Path, eos: int, *, refiner: bool, device: str,
               shape: SimpleNamespace) -> SimpleNamespace:
    """Write one SDXL pipeline folder component by component, so that peak memory stays one model's worth."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    out.mkdir(parents=True, exist_ok=True)
    seed = SEED + (100 if refiner else 0)
    parts = SimpleNamespace(text_encoder=None)
    if not refiner:
        parts.text_encoder = _made(lambda: CLIPTextModel(_text_config(shape.text_l, eos, shape.vocab)), seed + 1,
                                   device)
        _save_component(parts.text_encoder, out / "text_encoder")
        _save_tokenizer(tokenizer_src, out / "tokenizer", pad_token="<|endoftext|>")
    parts.text_encoder_2 = _made(lambda: CLIPTextModelWithProjection(_text_config(shape.text_g, eos, shape.vocab)),
                                 seed + 2, device)
    _save_component(parts.text_encoder_2, out / "text_encoder_2")
    _save_tokenizer(tokenizer_src, out / "tokenizer_2", pad_token="!")
    parts.vae = _made(lambda: AutoencoderKL(**shape.vae), seed + 3, device)
    _save_component(parts.vae, out / "vae")
    unet_shape = shape.refiner if refiner else shape.base
    parts.unet = _made(lambda: UNet2DConditionModel(**unet_shape), seed + 4, device)
    _save_component(parts.unet, out / "unet")
    _scheduler().save_pretrained(out / "scheduler")
    _write_index(out, refiner)
    logger.info("%s written (%.1f GB)", out, _size(out) / 1e9)
    return parts


def _size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def write_configs(folder: Path, dest: Path) -> None:
    """A weightless copy of a diffusers folder: what ``config:`` of a single-file checkpoint points at."""
    for path in folder.rglob("*"):
        if path.is_file() and path.suffix in {".json", ".txt"}:
            target = dest / path.relative_to(folder)
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(path, target)


def build_safety_checker(out: Path, device: str, shrink: bool) -> None:
    """The released checker's files: config.json, fp32 model.safetensors (keys ``vision_model.vision_model.*`` as
    in the release), preprocessor_config.json (CLIP's 224^2 preprocessing). Concepts are random directions with
    thresholds near the released ones', so a noise image is rarely flagged."""
    from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker
    from transformers import CLIPConfig, CLIPImageProcessor

    small = dict(hidden_size=32, intermediate_size=37, num_attention_heads=4, num_hidden_layers=2)
    vision = {**SAFETY_VISION, **(small if shrink else {})}
    text = {k: v for k, v in TEXT_L.items() if k != "projection_dim"} | (small if shrink else {})
    projection = 32 if shrink else SAFETY_PROJECTION
    config = CLIPConfig(text_config=text, vision_config=vision, projection_dim=projection)
    torch.manual_seed(SEED + 70)
    with torch.device(device):
        checker = StableDiffusionSafetyChecker(config)
    checker = checker.to("cpu", torch.float32).eval()
    generator = torch.Generator().manual_seed(SEED + 71)
    with torch.no_grad():
        checker.concept_embeds.copy_(torch.randn(17, projection, generator=generator))
        checker.special_care_embeds.copy_(torch.randn(3, projection, generator=generator))
        checker.concept_embeds_weights.fill_(0.2)
        checker.special_care_embeds_weights.fill_(0.2)
    out.mkdir(parents=True, exist_ok=True)
    state = {(f"vision_model.{k}" if k.startswith("vision_model.") else k): v.contiguous()
             for k, v in checker.state_dict().items()}
    save_file(state, out / "model.safetensors")
    checker.config.save_pretrained(out)
    CLIPImageProcessor().save_pretrained(out)


def build_controlnet(out: Path, shape: dict, device: str) -> None:
    """An SDXL ControlNet in diffusers/controlnet-canny-sdxl-1.0's files: the release's config.json, full-precision
    weights and their ``fp16`` variant (the same weights rounded), as that repository ships them beside its pickles
    (never written here). Initialised from the config on ``device``, not from a base UNet (``from_unet``), so that
    nothing else is built for it. Training starts its zero convolutions (the control image's embedding out and every
    residual out) at zero, which would add nothing to the UNet: here they take PyTorch's default start too, so the
    control image moves the latents as a trained one does."""
    from diffusers import ControlNetModel

    def made():
        net = ControlNetModel(**shape)
        for conv in (net.controlnet_cond_embedding.conv_out, *net.controlnet_down_blocks, net.controlnet_mid_block):
            conv.reset_parameters()
        return net

    torch.manual_seed(SEED + 80)
    with torch.device(device):
        net = made()
    state = {name: tensor.to("cpu").contiguous() for name, tensor in net.state_dict().items()}
    del net
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps({**CONTROLNET_RELEASE, **shape}, indent=2, sort_keys=True) + "\n")
    save_file(state, out / "diffusion_pytorch_model.safetensors", metadata={"format": "pt"})
    save_file({name: tensor.half() for name, tensor in state.items()},
              out / f"diffusion_pytorch_model.{VARIANT}.safetensors", metadata={"format": "pt"})
    logger.info("%s written (%.1f M parameters, %.1f GB)", out, sum(t.numel() for t in state.values()) / 1e6,
                _size(out) / 1e9)


def build_all(out: Path, only: set[str] | None = None, device: str = "cpu", shrink: bool = False) -> None:
    wanted = set(only or ARTEFACTS)
    unknown = wanted - set(ARTEFACTS)
    if unknown:
        raise ValueError(f"unknown artefacts {sorted(unknown)}; choose from {ARTEFACTS}")
    out.mkdir(parents=True, exist_ok=True)
    shape = shapes(shrink)
    tokenizer_src = out / "clip-tokenizer"
    eos = build_clip_tokenizer(tokenizer_src) - 1
    if wanted & {"sdxl-base", "sdxl-base-single"}:
        base = build_sdxl(out / "sdxl-base", tokenizer_src, eos, refiner=False, device=device, shape=shape)
        write_configs(out / "sdxl-base", out / "sdxl-base-configs")
        if "sdxl-base-single" in wanted:
            save_file(sdxl_to_sgm(base), out / "sdxl-base.safetensors")
        del base
        gc.collect()
    if "sdxl-inpaint" in wanted:
        from deployments.factory.inpainting import build_full as build_inpainting

        build_inpainting(out, tokenizer_src, eos, device=device, shape=shape)
        if not (out / "sdxl-base-configs").is_dir():  # its single file's configs (the loader reads its channels)
            write_configs(out / "sdxl-inpaint", out / "sdxl-base-configs")
        gc.collect()
    if "sdxl-refiner" in wanted:
        build_sdxl(out / "sdxl-refiner", tokenizer_src, eos, refiner=True, device=device, shape=shape)
        gc.collect()
    if "releases" in wanted:
        from deployments.factory.releases import build_release_files

        build_release_files(out / "releases", full=not shrink)
    if "safety-checker" in wanted:
        build_safety_checker(out / "safety-checker", device, shrink)
    if "captioner" in wanted:
        # Shrunk: toy widths, the release's tokenizer (BERT's 30522 entries) all the same.
        blip.build_captioner(out / "captioner", {**blip.TINY, "vocab": blip.LARGE["vocab"]} if shrink else blip.LARGE,
                             device)
    if "depth-anything-v2" in wanted:  # shrunk: the tiny one's widths, the release's preprocessing all the same
        depth.build_depth_anything(out / "depth-anything-v2",
                                   depth.ANYTHING_V2_TINY if shrink else depth.ANYTHING_V2_LARGE, device=device)
    if "lineart" in wanted:  # as released (pickles); shrunk: the anime U-Net at the tiny width
        lineart.build_releases(out / "lineart", full=not shrink)
    if "softedge" in wanted:  # as released (pickles), at their real sizes whether shrunk or not
        softedge.build_releases(out / "softedge")
    if "mlsd" in wanted:  # as released (a pickle), at its real size either way
        build_mlsd_pth(out / "mlsd")
    if "controlnet" in wanted:
        build_controlnet(out / "controlnet-canny-sdxl", shape.controlnet, device)
        gc.collect()
    (out / "README.txt").write_text("Full-size random-weight models written by deployments.factory --full.\n")
    logger.info("full-size models written to %s", out)
