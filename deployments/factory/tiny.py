"""Deterministic random-weight models of the real architectures, at toy size.

``python -m deployments.factory OUT_DIR`` writes every model the service can load, in the formats real weights
come in, so that tests and the CPU demo run the real loading and inference code without a model hub:

    OUT_DIR/sdxl-base/                 diffusers folder (tokenizers, two text encoders, UNet, VAE, scheduler)
    OUT_DIR/sdxl-base.safetensors      the same weights as one original-layout (SGM) checkpoint
    OUT_DIR/sdxl-base-b/               a second base checkpoint (other random weights), diffusers folder
    OUT_DIR/checkpoints/sdxl-base-b.safetensors   the second base as one SGM file (a checkpoint folder to scan)
    OUT_DIR/sdxl-inpaint/              an SDXL inpainting checkpoint (9-channel UNet; factory/inpainting.py), folder
    OUT_DIR/sdxl-inpaint.safetensors   the same as one SGM file (loads with sdxl-base's configs)
    OUT_DIR/sdxl-refiner/              diffusers folder (second text encoder only, aesthetic-score UNet)
    OUT_DIR/ip-adapter/                IP-Adapter weights plus its CLIP image encoder
    OUT_DIR/controlnet-canny/          an SDXL ControlNet (diffusers ControlNetModel folder) of the tiny base UNet
    OUT_DIR/loras/*.safetensors        two LoRAs in the kohya / A1111 layout
    OUT_DIR/embeddings/*.safetensors   a two-vector textual-inversion embedding (clip_l / clip_g), token tiny-concept
    OUT_DIR/upscalers/*.safetensors    ESRGAN-family x2 (Real-ESRGAN pixel-unshuffle) and x4
    OUT_DIR/faces/*.safetensors        a RestoreFormer face restorer
    OUT_DIR/safety-checker/            a CLIP safety checker that flags one known generation (factory/safety.py)
    OUT_DIR/captioner/                 a BLIP image captioner in blip-image-captioning-large's layout
    OUT_DIR/depth-midas/               a DPT-Hybrid MiDaS (transformers' layout), the depth_midas preprocessor's model
    OUT_DIR/depth-anything/            Depth Anything (v1 layout: the backbone's last four layers), depth_anything's
    OUT_DIR/depth-anything-v2/         Depth Anything V2 (four layers spread over the backbone), depth_anything_v2's
    OUT_DIR/lineart/*.safetensors      the line-art networks as converted from lllyasviel/Annotators' releases
                                       (factory/lineart.py): sk_model (lineart_realistic), sk_model2 (lineart_coarse),
                                       netG (lineart_anime)
    OUT_DIR/openpose/                  OpenPose's networks as converted from the releases (factory/pose.py), at their
                                       real sizes, no toy ones: body_pose_model.safetensors (the body, 209 MB: every
                                       pose module), hand_pose_model.safetensors (147 MB: openpose_hand and _full),
                                       facenet.safetensors (154 MB: openpose_face, _faceonly and _full)
    OUT_DIR/softedge/*.safetensors     the soft-edge networks as converted from lllyasviel/Annotators' releases
                                       (factory/softedge.py), at their real sizes: ControlNetHED (HED: softedge_hed,
                                       softedge_hedsafe, scribble_hed; 59 MB), table5_pidinet (PiDiNet: the pidi ones)
    OUT_DIR/mlsd/mlsd_large_512_fp32.safetensors   M-LSD's large network (mlsd) as converted from the release's
                                       mlsd_large_512_fp32.pth (factory/mlsd.py): its real size (6 MB), no toy one

The weights are random: images are noise-like. Nothing in the serving path knows these models are tiny.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from safetensors.torch import save_file

from deployments.factory import captioner as blip
from deployments.factory import depth, inpainting
from deployments.factory.adapters import build_embedding, build_ip_adapter, build_lora, embedding_widths
from deployments.factory.lineart import build_lineart
from deployments.factory.mlsd import build_mlsd
from deployments.factory.pose import build_pose
from deployments.factory.safety import build_safety_checker
from deployments.factory.sgm import sdxl_to_sgm
from deployments.factory.softedge import build_softedge
from deployments.factory.tokenizer import build_clip_tokenizer

logger = logging.getLogger(__name__)

SEED = 0
SEED_B = 1000  # the second base checkpoint: same architecture, other weights

# The UNets keep SDXL's wiring (three levels, two resnets per level, text_time conditioning, linear projections)
# with attention only at the lowest resolution, so a 1536x1536 refine stays cheap on two CPU cores.
_UNET_COMMON = dict(
    sample_size=32,
    in_channels=4,
    out_channels=4,
    layers_per_block=2,
    block_out_channels=(16, 32, 64),
    down_block_types=("DownBlock2D", "DownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "UpBlock2D", "UpBlock2D"),
    attention_head_dim=(2, 4, 4),
    transformer_layers_per_block=1,
    norm_num_groups=8,
    use_linear_projection=True,
    addition_embed_type="text_time",
    addition_time_embed_dim=8,
)
# Two different widths, as in SDXL (768 and 1280): single-file loading tells the encoders apart by width.
TEXT_DIM = 32  # first text encoder (CLIP ViT-L in SDXL)
TEXT_DIM_2 = 48  # second text encoder (OpenCLIP bigG), also its projection (pooled) size
IMAGE_ENCODER_SIZE = 32  # input resolution of the tiny CLIP vision tower

def _save_tokenizer(src: Path, dst: Path, pad_token: str) -> None:
    from transformers import CLIPTokenizer

    # Loaded as a release folder is, from its vocab.json and merges.txt: transformers 5's CLIPTokenizer takes the
    # vocabulary itself, not file names, and given ``vocab_file=`` it silently keeps its two special tokens only
    # (every prompt then reads as the same unknown tokens).
    tokenizer = CLIPTokenizer.from_pretrained(str(src), pad_token=pad_token, model_max_length=77)
    if len(tokenizer) < 3:
        raise RuntimeError(f"the tokenizer built from {src} holds {len(tokenizer)} tokens")
    tokenizer.save_pretrained(dst)


def _text_config(vocab_size: int, projection: bool):
    from transformers import CLIPTextConfig

    width = TEXT_DIM_2 if projection else TEXT_DIM
    return CLIPTextConfig(
        vocab_size=vocab_size,
        bos_token_id=vocab_size - 2,
        eos_token_id=vocab_size - 1,
        pad_token_id=vocab_size - 1,
        hidden_size=width,
        intermediate_size=37,
        num_attention_heads=4,
        num_hidden_layers=2,
        max_position_embeddings=77,
        hidden_act="gelu" if projection else "quick_gelu",
        projection_dim=width,
    )


def _vae():
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        latent_channels=4,
        block_out_channels=(8, 8, 16, 16),  # four levels: the x8 spatial scale of the SDXL VAE
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        layers_per_block=1,
        norm_num_groups=4,
        sample_size=128,
        scaling_factor=0.13025,
        force_upcast=False,
    )


def _scheduler():
    from diffusers import EulerDiscreteScheduler

    return EulerDiscreteScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        num_train_timesteps=1000,
        steps_offset=1,
        timestep_spacing="leading",
        prediction_type="epsilon",
    )


def build_sdxl_base(out: Path, tokenizer_src: Path, vocab_size: int, seed: int = SEED):
    """Write the base pipeline as a diffusers folder; return it for the derived artefacts. Another ``seed`` gives
    another checkpoint of the same architecture (what a fine-tune is to the released base)."""
    from diffusers import StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPImageProcessor, CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        **_UNET_COMMON,
        cross_attention_dim=TEXT_DIM + TEXT_DIM_2,  # both encoders' hidden states, concatenated
        projection_class_embeddings_input_dim=6 * 8 + TEXT_DIM_2,  # six size/crop ids + pooled text
    )
    torch.manual_seed(seed + 1)
    vae = _vae()
    torch.manual_seed(seed + 2)
    text_encoder = CLIPTextModel(_text_config(vocab_size, projection=False))
    torch.manual_seed(seed + 3)
    text_encoder_2 = CLIPTextModelWithProjection(_text_config(vocab_size, projection=True))
    _save_tokenizer(tokenizer_src, out / "tokenizer", pad_token="<|endoftext|>")
    _save_tokenizer(tokenizer_src, out / "tokenizer_2", pad_token="!")
    from transformers import CLIPTokenizer

    pipe = StableDiffusionXLPipeline(
        vae=vae,
        text_encoder=text_encoder,
        text_encoder_2=text_encoder_2,
        tokenizer=CLIPTokenizer.from_pretrained(out / "tokenizer"),
        tokenizer_2=CLIPTokenizer.from_pretrained(out / "tokenizer_2"),
        unet=unet,
        scheduler=_scheduler(),
        feature_extractor=CLIPImageProcessor(
            size={"shortest_edge": IMAGE_ENCODER_SIZE},
            crop_size={"height": IMAGE_ENCODER_SIZE, "width": IMAGE_ENCODER_SIZE},
        ),
    )
    pipe.save_pretrained(out, safe_serialization=True)  # type: ignore[attr-defined]
    return pipe


def build_sdxl_refiner(out: Path, tokenizer_src: Path, vocab_size: int) -> None:
    from diffusers import StableDiffusionXLImg2ImgPipeline, UNet2DConditionModel
    from transformers import CLIPTextModelWithProjection, CLIPTokenizer

    torch.manual_seed(SEED + 10)
    unet = UNet2DConditionModel(
        **_UNET_COMMON,
        cross_attention_dim=TEXT_DIM_2,  # the refiner conditions on the second encoder alone
        projection_class_embeddings_input_dim=5 * 8 + TEXT_DIM_2,  # sizes, crop, aesthetic score + pooled text
    )
    torch.manual_seed(SEED + 11)
    vae = _vae()
    torch.manual_seed(SEED + 12)
    text_encoder_2 = CLIPTextModelWithProjection(_text_config(vocab_size, projection=True))
    _save_tokenizer(tokenizer_src, out / "tokenizer_2", pad_token="!")
    pipe = StableDiffusionXLImg2ImgPipeline(
        vae=vae,
        text_encoder=None,
        text_encoder_2=text_encoder_2,
        tokenizer=None,
        tokenizer_2=CLIPTokenizer.from_pretrained(out / "tokenizer_2"),
        unet=unet,
        scheduler=_scheduler(),
        requires_aesthetics_score=True,
        force_zeros_for_empty_prompt=False,
    )
    pipe.save_pretrained(out, safe_serialization=True)  # type: ignore[attr-defined]


def build_controlnet(out: Path, unet, seed: int) -> None:
    """An SDXL ControlNet made from the base UNet's encoder, as training starts one (``from_unet``), with the
    conditioning embedding at toy width. Training starts its zero convolutions (the control image's embedding out,
    every residual out) at zero, which would make it a no-op: here they are random, so the control image visibly
    moves the tiny base's pixels."""
    from diffusers import ControlNetModel

    torch.manual_seed(seed)
    net = ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=(8, 8, 16, 16))
    # PyTorch's default start shrinks the image's signal layer by layer to almost nothing at toy width: He's keeps
    # it, and the embedding's output is scaled up so that the image, not the latents, dominates the ControlNet's
    # residuals (tests tell two control images apart by their pixels).
    for conv in net.controlnet_cond_embedding.modules():
        if isinstance(conv, torch.nn.Conv2d):
            torch.nn.init.kaiming_normal_(conv.weight, nonlinearity="relu")
            torch.nn.init.zeros_(conv.bias)
    with torch.no_grad():
        net.controlnet_cond_embedding.conv_out.weight.mul_(30.0)
    for conv in [*net.controlnet_down_blocks, net.controlnet_mid_block]:
        torch.nn.init.normal_(conv.weight, std=0.1)
        torch.nn.init.zeros_(conv.bias)
    net.save_pretrained(out, safe_serialization=True)


def build_upscalers(out: Path) -> None:
    from spandrel.architectures.ESRGAN import ESRGAN

    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(SEED + 30)
    x4 = ESRGAN(in_nc=3, out_nc=3, num_filters=8, num_blocks=1, scale=4)
    save_file(x4.state_dict(), out / "tiny-esrgan-x4.safetensors")
    torch.manual_seed(SEED + 31)
    # Real-ESRGAN x2 folds the input with a pixel unshuffle (12 input channels) and upsamples x4.
    x2 = ESRGAN(in_nc=3, out_nc=3, num_filters=8, num_blocks=1, scale=2, shuffle_factor=2)
    save_file(x2.state_dict(), out / "tiny-realesrgan-x2.safetensors")


def build_face_restorer(out: Path) -> None:
    from spandrel.architectures.RestoreFormer import RestoreFormer

    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(SEED + 40)
    model = RestoreFormer(
        n_embed=64,
        embed_dim=32,
        ch=32,  # the architecture's group norms need multiples of 32
        ch_mult=(1, 1, 1, 1, 2, 2),
        num_res_blocks=1,
        attn_resolutions=(16,),
        z_channels=32,
        head_size=2,
    )
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, out / "tiny-restoreformer.safetensors")


def build_all(out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    tokenizer_src = out / "clip-tokenizer"
    vocab_size = build_clip_tokenizer(tokenizer_src)
    base = build_sdxl_base(out / "sdxl-base", tokenizer_src, vocab_size)
    save_file(sdxl_to_sgm(base), out / "sdxl-base.safetensors")
    second = build_sdxl_base(out / "sdxl-base-b", tokenizer_src, vocab_size, seed=SEED_B)
    (out / "checkpoints").mkdir(exist_ok=True)
    save_file(sdxl_to_sgm(second), out / "checkpoints" / "sdxl-base-b.safetensors")
    inpainting.build_sdxl_inpainting(out, tokenizer_src, vocab_size)  # sdxl-inpaint/ and sdxl-inpaint.safetensors
    build_sdxl_refiner(out / "sdxl-refiner", tokenizer_src, vocab_size)
    build_ip_adapter(out / "ip-adapter", base.unet, width=TEXT_DIM, image_size=IMAGE_ENCODER_SIZE, seed=SEED + 20)
    build_controlnet(out / "controlnet-canny", base.unet, seed=SEED + 70)
    (out / "loras").mkdir(exist_ok=True)
    build_lora(out / "loras" / "tiny-style.safetensors", base, seed=SEED + 50, rank=4, with_text_encoders=False)
    build_lora(out / "loras" / "tiny-detail.safetensors", base, seed=SEED + 51, rank=2, with_text_encoders=True)
    (out / "embeddings").mkdir(exist_ok=True)
    build_embedding(out / "embeddings" / "tiny-concept.safetensors", embedding_widths(base), vectors=2,
                    seed=SEED + 60)
    build_upscalers(out / "upscalers")
    build_face_restorer(out / "faces")
    blip.build_captioner(out / "captioner", blip.TINY)
    depth.build_midas(out / "depth-midas", depth.MIDAS_TINY)
    depth.build_depth_anything(out / "depth-anything", depth.ANYTHING_TINY, side=depth.TINY_SIDE)
    depth.build_depth_anything(out / "depth-anything-v2", depth.ANYTHING_V2_TINY, seed=depth.SEED + 2,
                               side=depth.TINY_SIDE)
    build_lineart(out / "lineart")
    build_pose(out / "openpose")
    build_softedge(out / "softedge")
    build_mlsd(out / "mlsd")
    build_safety_checker(out / "safety-checker", out)  # last: it calibrates on the tiny base's own images
    (out / "README.txt").write_text("Random-weight demo models generated by deployments.factory. Not for real use.\n")
    logger.info("tiny models written to %s", out)
