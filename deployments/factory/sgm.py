"""Diffusers -> original (SGM / A1111) key layout for SDXL, to write single-file checkpoints.

Real SDXL checkpoints shared as one ``.safetensors`` file use the layout of Stability's ``generative-models``
repository. The tiny-model factory writes its base model in that layout too, so that the single-file loading
path (diffusers' ``from_single_file``) is exercised exactly as with a downloaded checkpoint. The mapping is
the inverse of the one diffusers applies when it reads such a file.
"""

from __future__ import annotations

import torch

_UNET_RESNET = [
    ("norm1", "in_layers.0"),
    ("conv1", "in_layers.2"),
    ("norm2", "out_layers.0"),
    ("conv2", "out_layers.3"),
    ("time_emb_proj", "emb_layers.1"),
    ("conv_shortcut", "skip_connection"),
]
_UNET_TOP = [
    ("time_embedding.linear_1", "time_embed.0"),
    ("time_embedding.linear_2", "time_embed.2"),
    ("add_embedding.linear_1", "label_emb.0.0"),
    ("add_embedding.linear_2", "label_emb.0.2"),
    ("conv_in", "input_blocks.0.0"),
    ("conv_norm_out", "out.0"),
    ("conv_out", "out.2"),
]
_VAE_ATTENTION = [("group_norm", "norm"), ("to_q", "q"), ("to_k", "k"), ("to_v", "v"), ("to_out.0", "proj_out")]


def _unet_prefix_map(unet) -> list[tuple[str, str]]:
    """(diffusers prefix, SGM prefix) pairs for every block of this UNet's configuration."""
    per_level = unet.config.layers_per_block + 1
    pairs = list(_UNET_TOP)
    for level, block in enumerate(unet.down_blocks):
        for j in range(len(block.resnets)):
            sgm = f"input_blocks.{level * per_level + j + 1}"
            pairs.append((f"down_blocks.{level}.resnets.{j}", f"{sgm}.0"))
            if getattr(block, "attentions", None):
                pairs.append((f"down_blocks.{level}.attentions.{j}", f"{sgm}.1"))
        if block.downsamplers:
            pairs.append((f"down_blocks.{level}.downsamplers.0.conv", f"input_blocks.{(level + 1) * per_level}.0.op"))
    pairs += [
        ("mid_block.resnets.0", "middle_block.0"),
        ("mid_block.attentions.0", "middle_block.1"),
        ("mid_block.resnets.1", "middle_block.2"),
    ]
    for level, block in enumerate(unet.up_blocks):
        has_attention = bool(getattr(block, "attentions", None))
        for j in range(len(block.resnets)):
            sgm = f"output_blocks.{level * per_level + j}"
            pairs.append((f"up_blocks.{level}.resnets.{j}", f"{sgm}.0"))
            if has_attention:
                pairs.append((f"up_blocks.{level}.attentions.{j}", f"{sgm}.1"))
        if block.upsamplers:
            last = f"output_blocks.{level * per_level + per_level - 1}"
            pairs.append((f"up_blocks.{level}.upsamplers.0", f"{last}.{2 if has_attention else 1}"))
    return pairs


def _convert_unet(unet) -> dict[str, torch.Tensor]:
    prefixes = sorted(_unet_prefix_map(unet), key=lambda p: -len(p[0]))
    out = {}
    for key, value in unet.state_dict().items():
        for diffusers_prefix, sgm_prefix in prefixes:
            if key.startswith(diffusers_prefix + "."):
                rest = key[len(diffusers_prefix) + 1 :]
                if ".resnets." in diffusers_prefix or diffusers_prefix.startswith("mid_block.resnets"):
                    for new, old in _UNET_RESNET:
                        if rest.startswith(new + "."):
                            rest = old + rest[len(new) :]
                            break
                out[f"model.diffusion_model.{sgm_prefix}.{rest}"] = value
                break
        else:
            raise KeyError(f"no SGM name for UNet key {key!r}")
    return out


def _convert_vae(vae) -> dict[str, torch.Tensor]:
    num_up = len(vae.decoder.up_blocks)
    out = {}
    for key, value in vae.state_dict().items():
        sgm = key
        for part in ("encoder", "decoder"):
            sgm = sgm.replace(f"{part}.conv_norm_out", f"{part}.norm_out")
        sgm = sgm.replace("mid_block.resnets.0", "mid.block_1").replace("mid_block.resnets.1", "mid.block_2")
        sgm = sgm.replace("downsamplers.0", "downsample").replace("upsamplers.0", "upsample")
        sgm = sgm.replace("conv_shortcut", "nin_shortcut")
        if sgm.startswith("encoder.down_blocks."):
            sgm = sgm.replace("encoder.down_blocks.", "encoder.down.").replace(".resnets.", ".block.")
        if sgm.startswith("decoder.up_blocks."):
            level = int(sgm.split(".")[2])
            rest = sgm.split(".", 3)[3].replace("resnets.", "block.")
            sgm = f"decoder.up.{num_up - 1 - level}.{rest}"
        if ".mid_block.attentions.0." in sgm:
            head, rest = sgm.split(".mid_block.attentions.0.")
            for new, old in _VAE_ATTENTION:
                if rest.startswith(new + "."):
                    rest = old + rest[len(new) :]
                    break
            sgm = f"{head}.mid.attn_1.{rest}"
            if value.ndim == 2:  # the original attention uses 1x1 convolutions
                value = value[:, :, None, None]
        out[f"first_stage_model.{sgm}"] = value
    return out


def _convert_open_clip(model, prefix: str) -> dict[str, torch.Tensor]:
    out = {}
    state = model.state_dict()
    out[prefix + "token_embedding.weight"] = state["text_model.embeddings.token_embedding.weight"]
    out[prefix + "positional_embedding"] = state["text_model.embeddings.position_embedding.weight"]
    out[prefix + "ln_final.weight"] = state["text_model.final_layer_norm.weight"]
    out[prefix + "ln_final.bias"] = state["text_model.final_layer_norm.bias"]
    out[prefix + "text_projection"] = state["text_projection.weight"].T.contiguous()
    for i in range(model.config.num_hidden_layers):
        src = f"text_model.encoder.layers.{i}."
        dst = f"{prefix}transformer.resblocks.{i}."
        for kind in ("weight", "bias"):
            out[dst + f"attn.in_proj_{kind}"] = torch.cat(
                [state[src + f"self_attn.{p}_proj.{kind}"] for p in ("q", "k", "v")]
            )
            out[dst + f"attn.out_proj.{kind}"] = state[src + f"self_attn.out_proj.{kind}"]
            out[dst + f"ln_1.{kind}"] = state[src + f"layer_norm1.{kind}"]
            out[dst + f"ln_2.{kind}"] = state[src + f"layer_norm2.{kind}"]
            out[dst + f"mlp.c_fc.{kind}"] = state[src + f"mlp.fc1.{kind}"]
            out[dst + f"mlp.c_proj.{kind}"] = state[src + f"mlp.fc2.{kind}"]
    return out


def sdxl_to_sgm(pipe) -> dict[str, torch.Tensor]:
    """One state dict in the SGM layout holding the UNet, VAE and both text encoders of an SDXL base pipeline."""
    out = _convert_unet(pipe.unet)
    out.update(_convert_vae(pipe.vae))
    for key, value in pipe.text_encoder.state_dict().items():
        if not key.endswith("position_ids"):
            # Checkpoints name the first encoder's weights as transformers' CLIPTextModel did: text_model.*
            name = key if key.startswith("text_model.") else f"text_model.{key}"
            out[f"conditioner.embedders.0.transformer.{name}"] = value
    out.update(_convert_open_clip(pipe.text_encoder_2, "conditioner.embedders.1.model."))
    return {k: v.detach().contiguous() for k, v in out.items()}
