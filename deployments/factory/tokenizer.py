"""A CLIP byte-level BPE tokenizer learned locally from a small prompt-like corpus: the real tokenizer format
(vocab.json + merges.txt) with no hub download. Its ids are a prefix of any vocabulary size a model declares."""

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
