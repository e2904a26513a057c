"""Textual-inversion embeddings, as Automatic1111 serves them for SDXL: ``.safetensors`` files holding ``clip_l``
(n x 768) and ``clip_g`` (n x 1280), each usable in a prompt by its file stem.

Three parts, each testable on its own:

- ``read_embedding``: one file checked and read (pickles refused by name and header, as every weight here);
- ``EmbeddingFiles``: the configured folder, read again when it changes (or on ``rescan``);
- ``TextualInversions``: a pipeline's tokenizers and text encoders with a folder's embeddings in them, and the
  ``Vocabulary`` that rewrites a prompt's embedding names into their tokens.

Each vector is added to its encoder under a token of its own (``<ti-K-I>``) that no prompt writes, and a name in a
prompt is rewritten into those tokens before anything tokenizes it, the same way on A1111 routes (per emphasis
fragment, so ``(name:1.2)`` weights every vector) and native ones. diffusers' own ``maybe_convert_prompt`` is not
relied on: it matches names case-sensitively inside other words, where A1111 matches the name's CLIP tokens, so
case-insensitively and only as whole words.
"""

from __future__ import annotations

import copy
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from deployments.support.folders import WatchedFolder
from deployments.weights import loader

if TYPE_CHECKING:
    import torch

logger = logging.getLogger(__name__)

# Which file key goes to which of a pipeline's tokenizer / text-encoder pairs (the refiner has the second alone).
ENCODERS = (("clip_l", "tokenizer", "text_encoder"), ("clip_g", "tokenizer_2", "text_encoder_2"))
MAX_VECTORS = 75  # a chunk's text positions: A1111 keeps an embedding whole in one chunk


class InvalidEmbedding(ValueError):
    """A file in the embeddings folder that is not an SDXL embedding."""


@dataclass(frozen=True)
class Embedding:
    """One embedding file: its name (the file stem), vectors by encoder key and what identifies this version."""

    name: str
    path: Path
    vectors: dict[str, torch.Tensor] = field(repr=False, compare=False)
    stamp: tuple[int, int]  # (mtime_ns, size): a file replaced under the same name is read again

    @property
    def count(self) -> int:
        return int(self.vectors["clip_g"].shape[0])

    @property
    def shape(self) -> int:
        """A1111's ``shape``: the widths of the two encoders' vectors added (2048 for SDXL)."""
        return sum(int(v.shape[-1]) for v in self.vectors.values())

    def listed(self) -> dict[str, Any]:
        """As A1111's /sdapi/v1/embeddings lists it (no training step or checkpoint: safetensors carry none)."""
        return {"step": None, "sd_checkpoint": None, "sd_checkpoint_name": None, "shape": self.shape,
                "vectors": self.count}


def read_embedding(path: Path) -> Embedding:
    """One SDXL embedding file; ``UnsafeWeights`` for a pickle or a malformed file, ``InvalidEmbedding`` for a
    safetensors file of another kind."""
    from safetensors.torch import load_file

    loader.check_safetensors(path)
    tensors = load_file(str(path), device="cpu")
    missing = [key for key, _, _ in ENCODERS if key not in tensors]
    if missing:
        raise InvalidEmbedding(f"{path.name}: no {' or '.join(missing)} tensor (SDXL embeddings hold clip_l and "
                               f"clip_g; found {sorted(tensors)[:4]})")
    vectors = {key: tensors[key].float() for key, _, _ in ENCODERS}
    for key, value in vectors.items():
        if value.ndim != 2 or value.shape[0] < 1:
            raise InvalidEmbedding(f"{path.name}: {key} has shape {tuple(value.shape)}, not vectors x width")
    if vectors["clip_l"].shape[0] != vectors["clip_g"].shape[0]:
        raise InvalidEmbedding(f"{path.name}: clip_l holds {vectors['clip_l'].shape[0]} vectors, clip_g "
                               f"{vectors['clip_g'].shape[0]}")
    if vectors["clip_g"].shape[0] > MAX_VECTORS:
        raise InvalidEmbedding(f"{path.name}: {vectors['clip_g'].shape[0]} vectors, more than a chunk's "
                               f"{MAX_VECTORS}")
    stat = path.stat()
    return Embedding(path.stem, path, vectors, (stat.st_mtime_ns, stat.st_size))


class EmbeddingFiles(WatchedFolder[Embedding]):
    """The embeddings of ``embeddings_dir`` by file stem. A pickle or a file that is no SDXL embedding is left out
    with a logged reason (A1111 logs and skips what it cannot read). A folder that does not exist holds none."""

    kind = "embeddings_dir"
    missing_ok = True

    def _read(self, folder: Path) -> dict[str, Embedding]:
        found: dict[str, Embedding] = {}
        for path in sorted(folder.glob("*")):
            if path.suffix.lower() not in loader.PICKLE_SUFFIXES | {".safetensors"}:
                continue
            try:
                found[path.stem] = read_embedding(path)
            except (loader.UnsafeWeights, InvalidEmbedding) as e:
                logger.warning("embedding skipped: %s", e)
        return found


def _edge(c: str, before: bool) -> str:
    """A lookaround that keeps a name's first (``before``) or last character from running into the text next to
    it, as CLIP's pre-tokenizer splits text: letters run together, so do punctuation marks; digits stand alone."""
    if c.isalpha():
        cls = r"[^\W\d_]"
    elif c.isdigit() or c.isspace():
        return ""
    else:
        cls = r"(?:[^\w\s]|_)"
    return f"(?<!{cls})" if before else f"(?!{cls})"


class Vocabulary:
    """The embeddings a pipeline holds: each name's tokens, one per vector. Names match as A1111 matches them, by
    their CLIP tokens: case-insensitively, as whole words, any whitespace inside a name matching any."""

    def __init__(self, tokens: dict[str, tuple[str, ...]] | None = None) -> None:
        self.tokens = tokens or {}
        self._order = sorted(self.tokens, key=len, reverse=True)  # the longest name first: "bad-hands" over "bad"
        patterns = []
        for k, name in enumerate(self._order):
            words = r"\s+".join(re.escape(w) for w in name.split())
            patterns.append(f"(?P<n{k}>{_edge(name[0], True)}{words}{_edge(name[-1], False)})")
        self._pattern = re.compile("|".join(patterns), re.IGNORECASE) if patterns else None

    def rewrite(self, text: str) -> str:
        """``text`` with every embedding name replaced by its tokens."""
        if self._pattern is None or not text:
            return text

        def replace(match: re.Match) -> str:
            name = self._order[int((match.lastgroup or "n0")[1:])]
            return " " + " ".join(self.tokens[name]) + " "

        return self._pattern.sub(replace, text)

    def groups(self, tokenizer) -> dict[int, int]:
        """Each embedding's first token id in ``tokenizer`` and its vector count, which a chunk keeps whole."""
        return {tokenizer.convert_tokens_to_ids(tokens[0]): len(tokens) for tokens in self.tokens.values()}


EMPTY = Vocabulary()


class TextualInversions:
    """The embeddings held by one set of pipelines that share their tokenizers and text encoders (a checkpoint's
    text-to-image, image-to-image and inpainting pipelines; or the refiner's one).

    ``sync`` puts a folder's embeddings in: on fresh copies of the tokenizers as loaded, swapped in whole (so that
    a prompt tokenized meanwhile elsewhere reads the old ones intact), and on the encoders cut back to their own
    vocabulary first. It runs where the encoders run (the inference thread). An embedding whose widths do not fit
    the encoders present is skipped, with a logged reason; the refiner, which has the second encoder alone, takes
    ``clip_g``."""

    def __init__(self, pipelines: list, label: str) -> None:
        self.pipelines, self.label = pipelines, label
        first = pipelines[0]
        self.present = [(key, tok, enc) for key, tok, enc in ENCODERS
                        if getattr(first, tok, None) is not None and getattr(first, enc, None) is not None]
        self._pristine = {tok: getattr(first, tok) for _, tok, _ in self.present}
        self._sizes = {enc: getattr(first, enc).get_input_embeddings().weight.shape[0] for _, _, enc in self.present}
        self.widths = {key: getattr(first, enc).get_input_embeddings().embedding_dim for key, _, enc in self.present}
        self.vocabulary = EMPTY
        self.loaded: dict[str, Embedding] = {}
        self.skipped: dict[str, Embedding] = {}
        self._signature: tuple | None = None

    def fits(self, embedding: Embedding) -> str | None:
        """Why ``embedding`` does not fit these encoders, or None."""
        for key, width in self.widths.items():
            own = int(embedding.vectors[key].shape[-1])
            if own != width:
                return f"its {key} vectors are {own} wide, the encoder's {width}"
        return None

    def sync(self, found: dict[str, Embedding]) -> bool:
        """Hold exactly ``found`` (those that fit); False when it held them already."""
        import torch

        signature = tuple((e.name, str(e.path), e.stamp) for e in found.values())
        if signature == self._signature:
            return False
        loaded, skipped = {}, {}
        for name, embedding in found.items():
            reason = self.fits(embedding)
            if reason is None:
                loaded[name] = embedding
            else:
                skipped[name] = embedding
                logger.warning("%s: embedding %r skipped: %s", self.label, name, reason)
        tokens = {name: tuple(f"<ti-{k}-{i}>" for i in range(e.count)) for k, (name, e) in enumerate(loaded.items())}
        flat = [t for own in tokens.values() for t in own]
        first = self.pipelines[0]
        fresh: dict[str, Any] = {}
        for key, tok, enc in self.present:
            encoder = getattr(first, enc)
            encoder.resize_token_embeddings(self._sizes[enc])  # the last sync's tokens gone
            fresh[tok] = copy.deepcopy(self._pristine[tok])
            if flat:
                vectors = torch.cat([e.vectors[key] for e in loaded.values()])
                # One call per encoder: each resizes the token table (a copy of 49k rows for SDXL).
                first.load_textual_inversion(vectors if len(flat) > 1 else vectors[0], token=flat if len(flat) > 1
                                             else flat[0], tokenizer=fresh[tok], text_encoder=encoder)
        for pipe in self.pipelines:
            for tok, tokenizer in fresh.items():
                setattr(pipe, tok, tokenizer)
        self.vocabulary = Vocabulary(tokens)
        self.loaded, self.skipped, self._signature = loaded, skipped, signature
        if found:
            logger.info("%s: %d embeddings loaded (%s), %d skipped", self.label, len(loaded),
                        ", ".join(loaded) or "none", len(skipped))
        return True

    def listed(self) -> dict[str, dict[str, dict]]:
        """A1111's /sdapi/v1/embeddings answer for these encoders."""
        return {"loaded": {n: e.listed() for n, e in self.loaded.items()},
                "skipped": {n: e.listed() for n, e in self.skipped.items()}}
