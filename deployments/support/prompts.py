"""Automatic1111's reading of a prompt, for the requests its routes send (``prompt_syntax="a1111"``).

Three layers, each testable on its own:

- ``first_step`` and ``parse_emphasis``: plain string functions (no torch) that turn a prompt into weighted
  fragments of text and chunk breaks, as A1111's parser reads it;
- ``chunk``: those fragments' token ids cut into chunks of 75, moving the words after a late comma into the next
  chunk as A1111 does;
- ``PromptEncoder``: the chunks encoded one by one with a pipeline's own tokenizers and text encoders (so LoRAs set
  on them apply), weighted, rescaled to their unweighted mean and concatenated along the sequence: the
  ``prompt_embeds`` / ``pooled_prompt_embeds`` pairs an SDXL pipeline takes in place of strings.

A prompt without syntax shorter than 75 tokens gives exactly what the pipeline's own ``encode_prompt`` computes.
torch is imported inside the encoder only: the ingress imports this module's neighbours and must stay light.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, NamedTuple

if TYPE_CHECKING:
    import torch

READING = "a1111-emphasis-chunks-1"  # part of the result cache's key: answers read otherwise are not served
CHUNK_TOKENS = 75  # tokens of text per chunk: the encoders' 77 positions less the start and end tokens
COMMA_BACKTRACK = 20  # A1111's comma_padding_backtrack default
EMPHASIS = 1.1  # what one pair of round brackets multiplies by (square ones divide)

EDITING_WARNING = ("prompt editing [from:to:when] and alternation [a|b] are not applied: the prompt runs as A1111 "
                   "reads it at its first step")
AND_WARNING = "AND (composable prompts) is not applied: it is read as a word"


class Fragment(NamedTuple):
    """A run of text and the weight of its tokens; ``breaks``: a ``BREAK`` (its text and weight unused)."""

    text: str
    weight: float
    breaks: bool = False


BREAK = Fragment("BREAK", 1.0, breaks=True)

# One lexical unit of the emphasis syntax, tried in this order. A weight is read only in the form ``:1.5)``, with no
# space, as A1111 reads it; anything else with a colon is text.
_UNIT = re.compile(r"""
    (?P<escaped>\\[()\[\]\\])
  | (?P<backslash>\\)
  | (?P<open>[(\[])
  | :(?P<weight>[+-]?[.\d]+)\)
  | (?P<close>[)\]])
  | (?P<text>[^\\()\[\]:]+|:)
""", re.VERBOSE)
_BREAK_WORD = re.compile(r"\s*\bBREAK\b\s*")
_NUMBER = re.compile(r"[+-]?(?:\d+\.\d*|\.\d+|\d+)(?:[eE][+-]?\d+)?")
_AND_WORD = re.compile(r"\bAND\b")


def parse_emphasis(text: str) -> list[Fragment]:
    """``text`` as weighted fragments: ``(x)`` multiplies by 1.1, ``[x]`` divides by 1.1, ``(x:1.5)`` multiplies by
    1.5, nesting multiplies; ``\\(`` ``\\)`` ``\\[`` ``\\]`` ``\\\\`` are those characters; brackets left open are
    closed at the end; a closing bracket with none open, and a colon outside ``:number)``, are text. ``BREAK`` as
    its own word becomes a ``BREAK`` fragment. Neighbours of equal weight are merged; never an empty fragment,
    except the single one of an empty prompt."""
    out: list[list[Any]] = []  # [text, weight, breaks], mutable while brackets close over them
    round_open: list[int] = []
    square_open: list[int] = []

    def scale(start: int, factor: float) -> None:
        for part in out[start:]:
            part[1] *= factor

    for unit in _UNIT.finditer(text):
        kind, value = unit.lastgroup, unit.group(0)
        if kind == "escaped":
            out.append([value[1], 1.0, False])
        elif kind == "backslash":
            continue  # a backslash before anything else escapes nothing and is dropped (A1111 drops it too)
        elif kind == "open":
            (round_open if value == "(" else square_open).append(len(out))
        elif kind == "weight" and round_open:
            try:
                factor = float(unit.group("weight"))
            except ValueError:  # "1.2.3": A1111 would fail the request; read as text instead
                out.append([value, 1.0, False])
            else:
                scale(round_open.pop(), factor)
        elif kind == "close" and value == ")" and round_open:
            scale(round_open.pop(), EMPHASIS)
        elif kind == "close" and value == "]" and square_open:
            scale(square_open.pop(), 1 / EMPHASIS)
        else:  # text, a stray colon, a weight or a bracket that closes nothing
            for i, part in enumerate(_BREAK_WORD.split(value)):
                if i:
                    out.append([BREAK.text, BREAK.weight, True])
                out.append([part, 1.0, False])
    # What is left open closes at the end, innermost first.
    for start in reversed(round_open):
        scale(start, EMPHASIS)
    for start in reversed(square_open):
        scale(start, 1 / EMPHASIS)

    fragments: list[Fragment] = []
    for text_, weight, breaks in out:
        if breaks:
            fragments.append(BREAK)
        elif not text_:
            continue
        elif fragments and not fragments[-1].breaks and fragments[-1].weight == weight:
            fragments[-1] = Fragment(fragments[-1].text + text_, weight)
        else:
            fragments.append(Fragment(text_, weight))
    return fragments or [Fragment("", 1.0)]


def first_step(text: str) -> tuple[str, bool]:
    """``text`` as A1111 runs it at its first sampling step, and whether it used prompt editing or alternation:
    ``[from:to:when]`` is ``from``, ``[to:when]`` nothing, ``[a|b|c]`` is ``a`` (nested ones likewise). Square
    brackets that are neither stay for ``parse_emphasis``; an unbalanced one is text."""
    out: list[str] = []
    found = False
    i = 0
    while i < len(text):
        if text[i] == "\\":
            out.append(text[i:i + 2])
            i += 2
            continue
        if text[i] == "[":
            end = _closing(text, i)
            chosen = _scheduled(text[i + 1:end]) if end != -1 else None
            if chosen is not None:
                inner, _ = first_step(chosen)
                out.append(inner)
                found = True
                i = end + 1
                continue
        out.append(text[i])
        i += 1
    return "".join(out), found


def _closing(text: str, start: int) -> int:
    """The index of the ``]`` that closes the ``[`` at ``start``, or -1."""
    depth, i = 0, start
    while i < len(text):
        if text[i] == "\\":
            i += 2
            continue
        depth += {"[": 1, "]": -1}.get(text[i], 0)
        if depth == 0:
            return i
        i += 1
    return -1


def _top_level(body: str, separator: str) -> list[str]:
    """``body`` split at each ``separator`` outside nested brackets and escapes."""
    parts, depth, current, i = [], 0, [], 0
    while i < len(body):
        c = body[i]
        if c == "\\":
            current.append(body[i:i + 2])
            i += 2
            continue
        if c in "([":
            depth += 1
        elif c in ")]":
            depth -= 1
        if c == separator and depth == 0:
            parts.append("".join(current))
            current = []
        else:
            current.append(c)
        i += 1
    return [*parts, "".join(current)]


def _scheduled(body: str) -> str | None:
    """The first-step text of a bracket's ``body`` when it is prompt editing or alternation, else None."""
    colons = _top_level(body, ":")
    if len(colons) in (2, 3) and _NUMBER.fullmatch(colons[-1].lstrip()):
        return colons[0] if len(colons) == 3 else ""  # [from:to:when] begins with from; [to:when] with nothing
    options = _top_level(body, "|")
    if len(colons) == 1 and len(options) > 1:
        return options[0]
    return None


@dataclass
class Reading:
    """A prompt as A1111 reads it: its fragments, and what of its syntax this service does not apply."""

    fragments: list[Fragment]
    warnings: list[str] = field(default_factory=list)


def read(prompt: str) -> Reading:
    """A prompt (LoRA tags already stripped) as A1111 reads it at the first step."""
    text, edited = first_step(prompt)
    warnings = [EDITING_WARNING] if edited else []
    if _AND_WORD.search(text):
        warnings.append(AND_WARNING)
    return Reading(parse_emphasis(text), warnings)


@dataclass
class Chunk:
    """Up to ``CHUNK_TOKENS`` token ids of text and their weights (no start, end or padding yet)."""

    tokens: list[int] = field(default_factory=list)
    weights: list[float] = field(default_factory=list)


def chunk(pieces: Sequence[tuple[list[int], float] | None], comma: int | None, length: int = CHUNK_TOKENS,
          backtrack: int = COMMA_BACKTRACK) -> list[Chunk]:
    """Token ids and weights (one entry per fragment; None: a BREAK) cut into chunks of ``length``. When a chunk
    fills and its last ``comma`` is among its last ``backtrack`` tokens, the tokens after that comma start the next
    chunk, so that a phrase is not cut in two. A BREAK ends the chunk (even an empty one). At least one chunk."""
    chunks: list[Chunk] = []
    current = Chunk()
    last_comma = -1  # the position of the current chunk's last comma

    def close() -> None:
        nonlocal current, last_comma
        chunks.append(current)
        current, last_comma = Chunk(), -1

    for piece in pieces:
        if piece is None:
            close()
            continue
        tokens, weight = piece
        for token in tokens:
            if token == comma:
                last_comma = len(current.tokens)
            elif len(current.tokens) == length and last_comma != -1 and length - last_comma <= backtrack:
                moved = Chunk(current.tokens[last_comma + 1:], current.weights[last_comma + 1:])
                del current.tokens[last_comma + 1:], current.weights[last_comma + 1:]
                close()
                current = moved
            if len(current.tokens) == length:
                close()
            current.tokens.append(token)
            current.weights.append(weight)
    if current.tokens or not chunks:
        close()
    return chunks


class PromptEncoder:
    """A1111's encoding of prompts with one pipeline's tokenizers and text encoders: the base's two (CLIP-L and
    OpenCLIP bigG) or the refiner's one. Each chunk is encoded on its own as start + 75 tokens + end, padded as the
    encoder's tokenizer pads; each token's penultimate hidden state is multiplied by its weight and the chunk
    rescaled to its unweighted mean (A1111's "Original" emphasis); chunks are concatenated along the sequence and
    the encoders' states along the features, as diffusers does. The pooled embedding is the last encoder's
    projected output of the first chunk, unweighted."""

    def __init__(self, pipe) -> None:
        self.pipe = pipe
        pairs = [(getattr(pipe, "tokenizer", None), getattr(pipe, "text_encoder", None)),
                 (getattr(pipe, "tokenizer_2", None), getattr(pipe, "text_encoder_2", None))]
        self.encoders = [(t, e) for t, e in pairs if t is not None and e is not None]

    def chunks(self, text: str, tokenizer) -> list[Chunk]:
        """A prompt's chunks by one tokenizer: each fragment tokenized on its own, as A1111 does."""
        fragments = read(text).fragments
        ids = tokenizer([f.text for f in fragments], add_special_tokens=False, truncation=False,
                        verbose=False)["input_ids"]
        comma = tokenizer.get_vocab().get(",</w>")
        return chunk([None if f.breaks else (own, f.weight) for f, own in zip(fragments, ids, strict=True)], comma,
                     length=tokenizer.model_max_length - 2)

    def __call__(self, prompts: list[str], negatives: list[str] | None) -> dict[str, torch.Tensor]:
        """The four embeddings an SDXL pipeline takes for ``prompts`` (one per image) and their ``negatives``;
        None: no negative prompt, read as diffusers reads it (zeros where the checkpoint's config says
        ``force_zeros_for_empty_prompt``, else the encoding of ""). Every text ends with as many chunks as the
        longest of them, padded with chunks of the empty prompt."""
        import torch

        zeros = negatives is None and bool(self.pipe.config.get("force_zeros_for_empty_prompt", False))
        # Prompts and negatives are encoded as two batches, as diffusers does, so that a plain prompt gives the
        # very numbers it gives there.
        groups = [prompts] if zeros else [prompts, negatives if negatives is not None else [""] * len(prompts)]
        read_by: list[dict[str, list[Chunk]]] = []
        for tokenizer, _ in self.encoders:
            read_by.append({text: self.chunks(text, tokenizer) for group in groups for text in group})
        count = max(len(chunks) for by_text in read_by for chunks in by_text.values())
        dtype = self.encoders[-1][1].dtype
        encoded: list[tuple[torch.Tensor, torch.Tensor]] = []
        with torch.no_grad():
            for group in groups:
                states: list[torch.Tensor] = []
                pooled: torch.Tensor | None = None
                for (tokenizer, encoder), by_text in zip(self.encoders, read_by, strict=True):
                    hidden, first = self._encode(tokenizer, encoder, [by_text[t] for t in group], count)
                    states.append(hidden)
                    pooled = first if first is not None else pooled
                if pooled is None:
                    raise ValueError("the pipeline's last text encoder gives no pooled output")
                encoded.append((torch.cat(states, dim=-1).to(dtype=dtype), pooled))
        (embeds, pooled), *negative = encoded
        if zeros:
            negative = [(torch.zeros_like(embeds), torch.zeros_like(pooled))]
        return {"prompt_embeds": embeds, "pooled_prompt_embeds": pooled,
                "negative_prompt_embeds": negative[0][0], "negative_pooled_prompt_embeds": negative[0][1]}

    @staticmethod
    def _encode(tokenizer, encoder, readings: list[list[Chunk]], count: int
                ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Every text's ``count`` chunks through one encoder: the weighted hidden states, texts x (77 x count) x
        features, and the pooled output of the first chunks (None for an encoder without one)."""
        import torch
        from diffusers.utils.torch_utils import get_module_execution_device

        bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
        device = get_module_execution_device(encoder)
        parts, pooled = [], None
        for k in range(count):
            chunks = [own[k] if k < len(own) else Chunk() for own in readings]  # past its end: the empty prompt
            width = tokenizer.model_max_length - 2
            # The end token once, then the tokenizer's padding: CLIP-L pads with its end token, bigG with id 0.
            ids = torch.tensor([[bos, *c.tokens, eos, *[pad] * (width - len(c.tokens))] for c in chunks],
                               device=device)
            weights = torch.tensor([[1.0, *c.weights, *[1.0] * (width + 1 - len(c.tokens))] for c in chunks],
                                   device=device)
            out = encoder(ids, output_hidden_states=True)
            if k == 0 and out[0].ndim == 2:  # a projection model's text_embeds, as diffusers takes them
                pooled = out[0]
            hidden = out.hidden_states[-2]
            if bool((weights != 1.0).any()):
                hidden = _emphasised(hidden, weights)
            parts.append(hidden)
        return torch.cat(parts, dim=1), pooled


def _emphasised(hidden: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Each token's state times its weight, then each chunk rescaled so that its mean is what it was: the weights
    change the tokens' relative emphasis, not the chunk's overall magnitude."""
    states = hidden.float()
    before = states.mean(dim=(1, 2), keepdim=True)
    states = states * weights[..., None]
    states = states * (before / states.mean(dim=(1, 2), keepdim=True))
    return states.to(hidden.dtype)
