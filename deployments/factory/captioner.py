"""A random-weight BLIP image captioner in Salesforce/blip-image-captioning-large's layout.

    config.json                 BlipConfig (the vision tower's and the text decoder's sizes)
    model.safetensors           BlipForConditionalGeneration's weights, float32 as released
    preprocessor_config.json    BlipImageProcessor (the vision tower's square input, CLIP's mean and std)
    vocab.txt, tokenizer.json, tokenizer_config.json, special_tokens_map.json
                                BERT's uncased WordPiece with [DEC] and [ENC] added (factory/tokenizer.py)

``TINY`` is the same wiring at toy widths for the tests and the CPU demo; ``LARGE`` is the release's: a ViT-L/16
vision tower at 384² and a BERT-base decoder cross-attending to it (470 M weights). The captions of random weights
are random words, but every shape, file and token id is the real one.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from deployments.factory.tokenizer import BERT_VOCAB, build_bert_tokenizer

logger = logging.getLogger(__name__)

SEED = 80

TINY = dict(
    vocab=512,
    # Initialised at transformers' defaults (1e-10 for BLIP's vision tower, 0.02 for its decoder), a random BLIP
    # gives every image one caption: the tower's output barely depends on the pixels and the decoder's
    # cross-attention barely moves its logits. At 0.02 and 0.2 the captions follow the pixels, as tests want.
    vision=dict(hidden_size=32, intermediate_size=37, num_attention_heads=4, num_hidden_layers=2, image_size=32,
                patch_size=4, initializer_range=0.02),
    # 64 positions: room for A1111's max_length of 48 (the default) with a few to spare.
    text=dict(hidden_size=32, intermediate_size=37, num_attention_heads=4, num_hidden_layers=2,
              max_position_embeddings=64, initializer_range=0.2),
)
LARGE = dict(
    vocab=BERT_VOCAB,
    vision=dict(hidden_size=1024, intermediate_size=4096, num_attention_heads=16, num_hidden_layers=24,
                image_size=384, patch_size=16, layer_norm_eps=1e-5),
    text=dict(hidden_size=768, intermediate_size=3072, num_attention_heads=12, num_hidden_layers=12,
              max_position_embeddings=512),
)


def build_captioner(out: Path, sizes: dict, device: str = "cpu") -> None:
    """Write the captioner's folder at ``sizes`` (``TINY`` or ``LARGE``), weights initialised on ``device``."""
    from transformers import BlipConfig, BlipForConditionalGeneration, BlipImageProcessor

    vocab_size, dec = build_bert_tokenizer(out, sizes["vocab"])
    text = dict(sizes["text"], vocab_size=vocab_size, bos_token_id=dec, sep_token_id=102, pad_token_id=0)
    # BlipConfig sets the decoder's encoder_hidden_size (its cross-attention input) to the vision tower's width.
    config = BlipConfig(text_config=text, vision_config=sizes["vision"])
    torch.manual_seed(SEED)
    with torch.device(device):
        model = BlipForConditionalGeneration(config)
    model = model.to("cpu", torch.float32).eval()
    model.save_pretrained(out, safe_serialization=True)
    (out / "generation_config.json").unlink(missing_ok=True)  # the release has none: generate() reads config.json
    side = sizes["vision"]["image_size"]
    BlipImageProcessor(size={"height": side, "width": side}).save_pretrained(out)
    weights = sum(p.numel() for p in model.parameters())
    logger.info("BLIP captioner written to %s (%.1f M parameters)", out, weights / 1e6)
