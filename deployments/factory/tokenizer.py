"""Tokenizers made locally, in the real formats, with no hub download.

CLIP's byte-level BPE (vocab.json + merges.txt) is learned from a small prompt-like corpus; its ids are a prefix of
any vocabulary size a model declares. BLIP's BERT WordPiece (vocab.txt) keeps BERT's special tokens at BERT's ids
and fills the rest with the corpus's words and generated pieces, up to the size a model declares."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

# A small English corpus for the tokenizer's merges: prompt-like words so that tokens are not all single bytes.
_CORPUS = " ".join([
    "a an the of and with in on at by for to from photo photograph portrait picture painting illustration drawing",
    "render digital art artwork style anime manga fantasy realistic photorealistic cinematic dramatic lighting",
    "light soft sharp focus detailed highly detail intricate beautiful professional headshot studio background",
    "blurry blur bokeh depth field landscape mountain mountains river lake sea ocean beach sky cloud clouds sunset",
    "sunrise night day city street building house forest tree trees flower flowers garden field grass snow rain fog",
    "cat dog bird horse fox wolf dragon red green blue yellow orange purple pink black white gray golden silver",
    "apple fruit food cup coffee table chair window door car man woman girl boy child person people face eyes hair",
    "smile old young happy sad wearing dress shirt hat glasses high quality best masterpiece resolution ugly",
    "deformed bad anatomy low lowres worst jpeg artifacts watermark text signature cropped out frame",
]).split(" ")


def _bytes_to_unicode() -> dict[int, str]:
    """CLIP's reversible byte -> printable character table (the byte-level BPE alphabet)."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    printable += list(range(ord("®"), ord("ÿ") + 1))
    chars = printable[:]
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return dict(zip(printable, (chr(c) for c in chars), strict=True))


def build_clip_tokenizer(out_dir: Path, num_merges: int = 400) -> int:
    """Write a CLIP BPE tokenizer learned from the small corpus; return its vocabulary size."""
    alphabet = list(_bytes_to_unicode().values())
    vocab: list[str] = alphabet + [c + "</w>" for c in alphabet]
    words = Counter(tuple(w[:-1]) + (w[-1] + "</w>",) for w in _CORPUS)
    merges: list[tuple[str, str]] = []
    for _ in range(num_merges):
        pairs: Counter[tuple[str, str]] = Counter()
        for word, freq in words.items():
            for pair in zip(word, word[1:], strict=False):
                pairs[pair] += freq
        if not pairs:
            break
        best = max(sorted(pairs), key=lambda p: pairs[p])
        merges.append(best)
        vocab.append("".join(best))
        merged = {}
        for word, freq in words.items():
            out, i = [], 0
            while i < len(word):
                if i + 1 < len(word) and (word[i], word[i + 1]) == best:
                    out.append(word[i] + word[i + 1])
                    i += 2
                else:
                    out.append(word[i])
                    i += 1
            merged[tuple(out)] = freq
        words = Counter(merged)
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "vocab.json").write_text(json.dumps({tok: i for i, tok in enumerate(vocab)}))
    (out_dir / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges))
    return len(vocab)


# BERT's uncased WordPiece layout, as BLIP uses it: [PAD] 0, [UNK] 100, [CLS] 101, [SEP] 102 (BLIP's end of
# caption), [MASK] 103; BLIP adds [DEC] (its start of caption) and [ENC] after the vocabulary.
BERT_SPECIAL = {0: "[PAD]", 100: "[UNK]", 101: "[CLS]", 102: "[SEP]", 103: "[MASK]"}
BERT_VOCAB = 30522  # bert-base-uncased, which BLIP's tokenizer is


def _pieces() -> list[str]:
    """WordPiece entries: the corpus's words, then single characters and their ``##`` continuations, then every
    two- and three-letter piece and its continuation (what fills a full-size vocabulary). Repeats are dropped by
    ``bert_vocab``."""
    import itertools
    import string

    letters = string.ascii_lowercase
    chars = list(letters + string.digits + ".,!?'-")
    pieces = list(dict.fromkeys(_CORPUS)) + chars + [f"##{c}" for c in chars]
    for n in (2, 3):
        grams = ["".join(p) for p in itertools.product(letters, repeat=n)]
        pieces += grams + [f"##{g}" for g in grams]
    return pieces


def bert_vocab(size: int) -> list[str]:
    """A WordPiece vocabulary of ``size`` entries with BERT's special tokens at BERT's ids."""
    if size <= max(BERT_SPECIAL):
        raise ValueError(f"a BERT vocabulary needs more than {max(BERT_SPECIAL)} entries")
    pieces = iter(dict.fromkeys(_pieces()))
    return [BERT_SPECIAL.get(i) or next(pieces) for i in range(size)]


def build_bert_tokenizer(out_dir: Path, size: int) -> tuple[int, int]:
    """Write BLIP's tokenizer files (vocab.txt, tokenizer.json, tokenizer_config.json, special_tokens_map.json):
    BERT's WordPiece over ``bert_vocab(size)``, [DEC] and [ENC] added after it. Returns its length and [DEC]'s id."""
    from transformers import BertTokenizer

    out_dir.mkdir(parents=True, exist_ok=True)
    vocab_file = out_dir / "vocab.txt"
    vocab_file.write_text("".join(f"{token}\n" for token in bert_vocab(size)))
    tokenizer = BertTokenizer(vocab=str(vocab_file), model_max_length=512)
    tokenizer.add_special_tokens({"bos_token": "[DEC]", "additional_special_tokens": ["[ENC]"]})
    tokenizer.save_pretrained(out_dir)
    special = {"bos_token": "[DEC]", "cls_token": "[CLS]", "mask_token": "[MASK]", "pad_token": "[PAD]",
               "sep_token": "[SEP]", "unk_token": "[UNK]", "additional_special_tokens": ["[ENC]"]}
    (out_dir / "special_tokens_map.json").write_text(json.dumps(special, indent=2))
    return len(tokenizer), int(tokenizer.bos_token_id)
