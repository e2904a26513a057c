"""Adapters in the layouts they are published in: IP-Adapter (SDXL, plain) with its CLIP image encoder, and LoRAs
in the kohya / A1111 key layout. Built against a given base pipeline, so their shapes follow it."""

from __future__ import annotations

import re
from pathlib import Path

import torch
from safetensors.torch import save_file


def build_ip_adapter(out: Path, unet, *, width: int, image_size: int, seed: int) -> None:
    """IP-Adapter (SDXL, plain variant): image projection + per-cross-attention to_k_ip / to_v_ip."""
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModelWithProjection

    torch.manual_seed(seed)
    encoder = CLIPVisionModelWithProjection(
        CLIPVisionConfig(
            hidden_size=width,
            projection_dim=width,
            intermediate_size=37,
            num_attention_heads=4,
            num_hidden_layers=2,
            image_size=image_size,
            patch_size=8,
        )
    )
    encoder.save_pretrained(out / "image_encoder", safe_serialization=True)
    CLIPImageProcessor(
        size={"shortest_edge": image_size},
        crop_size={"height": image_size, "width": image_size},
    ).save_pretrained(out / "image_encoder")

    cross_dim = unet.config.cross_attention_dim
    num_tokens = 4
    generator = torch.Generator().manual_seed(seed + 1)
    tensors = {
        "image_proj.proj.weight": torch.randn(cross_dim * num_tokens, width, generator=generator) * 0.2,
        "image_proj.proj.bias": torch.zeros(cross_dim * num_tokens),
        "image_proj.norm.weight": torch.ones(cross_dim),
        "image_proj.norm.bias": torch.zeros(cross_dim),
    }
    # The reference numbering: every attention processor takes an index, cross-attention ones are the odd ones.
    for index, (name, _) in enumerate(unet.attn_processors.items()):
        if not name.endswith("attn2.processor"):
            continue
        hidden = unet.get_submodule(name.removesuffix(".processor")).to_k.out_features
        for proj in ("to_k_ip", "to_v_ip"):
            tensors[f"ip_adapter.{index}.{proj}.weight"] = torch.randn(hidden, cross_dim, generator=generator) * 0.5
    save_file(tensors, out / "ip-adapter_sdxl.safetensors")


def _kohya_name(module_path: str, prefix: str) -> str:
    return f"{prefix}_{module_path.replace('.', '_')}"


def build_lora(path: Path, pipe, seed: int, rank: int, with_text_encoders: bool) -> None:
    """A LoRA in the kohya / A1111 layout: lora_unet_* / lora_te1_* / lora_te2_* with down, up and alpha."""
    generator = torch.Generator().manual_seed(seed)
    tensors: dict[str, torch.Tensor] = {}
    targets = [("lora_unet", pipe.unet, re.compile(r"attn[12]\.(to_q|to_k|to_v|to_out\.0)$"))]
    if with_text_encoders:
        pattern = re.compile(r"self_attn\.(q_proj|k_proj|v_proj|out_proj)$")
        targets += [("lora_te1", pipe.text_encoder, pattern), ("lora_te2", pipe.text_encoder_2, pattern)]
    for prefix, model, pattern in targets:
        for name, module in model.named_modules():
            if not pattern.search(name):
                continue
            if prefix != "lora_unet" and not name.startswith("text_model."):
                name = f"text_model.{name}"  # kohya names follow transformers' classic CLIPTextModel layout
            key = _kohya_name(name, prefix)
            tensors[f"{key}.lora_down.weight"] = torch.randn(rank, module.in_features, generator=generator) * 0.3
            tensors[f"{key}.lora_up.weight"] = torch.randn(module.out_features, rank, generator=generator) * 0.3
            tensors[f"{key}.alpha"] = torch.tensor(float(rank))
    save_file(tensors, path, metadata={"ss_network_module": "networks.lora", "ss_base_model_version": "sdxl_base_v1-0"})


SDXL_EMBEDDING_WIDTHS = (768, 1280)  # clip_l and clip_g of a real SDXL checkpoint


def build_embedding(path: Path, widths: tuple[int, int], vectors: int, seed: int, scale: float = 1.0) -> None:
    """A textual-inversion embedding in the SDXL layout A1111 and diffusers read: ``clip_l`` (vectors x the first
    encoder's width) and ``clip_g`` (vectors x the second's). ``widths``: a pipeline's (``embedding_widths``) or
    ``SDXL_EMBEDDING_WIDTHS``, which a tiny checkpoint skips."""
    generator = torch.Generator().manual_seed(seed)
    tensors = {"clip_l": torch.randn(vectors, widths[0], generator=generator) * scale,
               "clip_g": torch.randn(vectors, widths[1], generator=generator) * scale}
    save_file(tensors, path)


def embedding_widths(pipe) -> tuple[int, int]:
    """The widths of a base pipeline's two token tables (32 and 48 for the tiny one)."""
    return (pipe.text_encoder.get_input_embeddings().embedding_dim,
            pipe.text_encoder_2.get_input_embeddings().embedding_dim)
