"""Automatic1111's reading of a prompt, for the requests its routes send (``prompt_syntax="a1111"``).

Three layers, each testable on its own:

- ``first_step`` and ``parse_emphasis``: plain string functions (no torch) that turn a prompt into weighted
  fragments of text and chunk breaks, as A1111's parser reads it; ``read`` does both, once per prompt (cached), and
  ``check`` is what the ingress calls on a request's prompts before anything runs;
- ``chunk``: those fragments' token ids cut into chunks of 75, moving the words after a late comma into the next
  chunk as A1111 does;
- ``PromptEncoder``: the chunks encoded one by one with a pipeline's own tokenizers and text encoders (so LoRAs set
  on them apply, and textual-inversion embeddings: each fragment's embedding names are rewritten into their tokens
  before it is tokenized, so an emphasis weights every vector of one), weighted, rescaled to their unweighted mean
  and concatenated along the sequence: the ``prompt_embeds`` / ``pooled_prompt_embeds`` pairs an SDXL pipeline
  takes in place of strings.

A prompt without syntax shorter than 75 tokens gives exactly what the pipeline's own ``encode_prompt`` computes.
Every refusal is an ``InvalidInput`` naming the field it read (``prompt`` or ``negative_prompt``), so that one
request's prompt fails that request alone. torch is imported inside the encoder only: the ingress imports this
module to check prompts and must stay light.
"""

from __future__ import annotations

import math
import re
import weakref
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from typing import TYPE_CHECKING, Any, NamedTuple

from deployments.support.errors import InvalidInput

if TYPE_CHECKING:
    import torch

    from deployments.support.embeddings import Vocabulary

READING = "a1111-emphasis-chunks-2"  # part of the result cache's key: answers read otherwise are not served
CHUNK_TOKENS = 75  # tokens of text per chunk: the encoders' 77 positions less the start and end tokens
COMMA_BACKTRACK = 20  # A1111's comma_padding_backtrack default
EMPHASIS = 1.1  # what one pair of round brackets multiplies by (square ones divide)
# Limits A1111 does not have. Its parser recurses and rescans, so a prompt of nested brackets costs it time; here
# every pass is linear, and these bound what a prompt can ask of the encoders and the denoiser.
MAX_NESTING = 32  # brackets open at once: 1.1**32 is already a weight of 21
MAX_WEIGHT = 100.0  # a token's weight (its brackets multiplied), either sign: float32 states stay finite after it
# Chunks of 75 tokens per prompt (600 tokens): each is one more text-encoder pass and 77 more positions that every
# cross-attention layer reads at every step, and a batch pads every prompt to its most. A1111 sets no cap; 8 is
# twice the longest prompts its users share.
MAX_CHUNKS = 8

EDITING_WARNING = ("prompt editing [from:to:when] and alternation [a|b] are not applied: the prompt runs as A1111 "
                   "reads it at its first step")
AND_WARNING = "AND (composable prompts) is not applied: it is read as a word"


class Fragment(NamedTuple):
    """A run of text and the weight of its tokens; ``breaks``: a ``BREAK`` (its text and weight unused)."""

    text: str
    weight: float
    breaks: bool = False


BREAK = Fragment("BREAK", 1.0, breaks=True)

# One lexical unit of the emphasis syntax, tried in this order. A weight is read in the form ``:1.5)``, with
# whitespace allowed around the number, as A1111 reads it; anything else with a colon is text.
_UNIT = re.compile(r"""
    (?P<escaped>\\[()\[\]\\])
  | (?P<backslash>\\)
  | (?P<open>[(\[])
  | :\s*(?P<weight>[+-]?[.\d]+)\s*\)
  | (?P<close>[)\]])
  | (?P<text>[^\\()\[\]:]+|:)
""", re.VERBOSE)
_BREAK_WORD = re.compile(r"\s*\bBREAK\b\s*")
_NUMBER = re.compile(r"[+-]?(?:\d+\.\d*|\.\d+|\d+)(?:[eE][+-]?\d+)?")
_AND_WORD = re.compile(r"\bAND\b")


def _too_deep(field_: str) -> InvalidInput:
    return InvalidInput(f"more than {MAX_NESTING} brackets are open at once", field=field_)


def parse_emphasis(text: str, field_: str = "prompt") -> list[Fragment]:
    """``text`` as weighted fragments: ``(x)`` multiplies by 1.1, ``[x]`` divides by 1.1, ``(x:1.5)`` multiplies by
    1.5, nesting multiplies; ``\\(`` ``\\)`` ``\\[`` ``\\]`` ``\\\\`` are those characters; brackets left open are
    closed at the end; a closing bracket with none open, and a colon outside ``:number)``, are text. ``BREAK`` as
    its own word becomes a ``BREAK`` fragment. Neighbours of equal weight are merged; never an empty fragment,
    except the single one of an empty prompt. Refused (``InvalidInput`` naming ``field_``): more than
    ``MAX_NESTING`` brackets open at once, or a weight beyond ``MAX_WEIGHT``."""
    out: list[list[Any]] = []  # [text, weight, breaks], mutable while brackets close over them
    round_open: list[int] = []
    square_open: list[int] = []

    def scale(start: int, factor: float) -> None:
        # Each part is scaled once per bracket around it: at most MAX_NESTING times, so the parse stays linear.
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
            if len(round_open) + len(square_open) > MAX_NESTING:
                raise _too_deep(field_)
        elif kind == "weight" and round_open:
            try:
                factor = float(unit.group("weight"))
            except ValueError:  # "1.2.3": A1111 would fail the request; read as text instead
                out.append([value, 1.0, False])
            else:
                if not abs(factor) <= MAX_WEIGHT:  # also NaN and inf (a number of 400 digits)
                    raise InvalidInput(f"the weight {unit.group('weight')[:20]} is outside ±{MAX_WEIGHT:g}",
                                       field=field_)
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

    merged: list[tuple[list[str], float] | None] = []  # None: a BREAK; texts joined once, at the end
    for text_, weight, breaks in out:
        if breaks:
            merged.append(None)
        elif not text_:
            continue
        elif not abs(weight) <= MAX_WEIGHT:  # nested weights multiply
            raise InvalidInput(f"brackets multiply to a weight of {weight:.3g}, outside ±{MAX_WEIGHT:g}",
                               field=field_)
        elif merged and (last := merged[-1]) is not None and last[1] == weight:
            last[0].append(text_)
        else:
            merged.append(([text_], weight))
    fragments = [BREAK if m is None else Fragment("".join(m[0]), m[1]) for m in merged]
    return fragments or [Fragment("", 1.0)]


@dataclass
class _Open:
    """A bracket open during ``first_step``'s pass, and (a square one) the separators at its own level."""

    kind: str
    at: int
    colons: list[int] = field(default_factory=list)
    pipes: list[int] = field(default_factory=list)


def first_step(text: str, steps: int, field_: str = "prompt") -> tuple[str, bool]:
    """``text`` as A1111 runs it at the first of ``steps`` sampling steps, and whether it used prompt editing or
    alternation. ``[from:to:when]`` is ``from`` when it switches at step 1 or later, else ``to``; ``when`` is a
    fraction of ``steps`` when written with a point, else a step number (A1111's default reading), so
    ``[cat:dog:0]``, and ``[cat:dog:0.01]`` under 100 steps, are ``dog``; ``[to:when]`` is nothing or ``to`` alike;
    ``[a|b|c]`` is ``a``; nested ones likewise. Square brackets that are neither stay for ``parse_emphasis``; an
    unbalanced one is text. One pass finds every bracket's match (a stack, no recursion), a second keeps the text
    that runs; refused: more than ``MAX_NESTING`` brackets open at once."""
    drops = [0] * (len(text) + 1)  # +1 where a dropped span begins, -1 where it ends
    found = False
    stack: list[_Open] = []
    squares = 0  # square brackets on the stack
    i = 0
    while i < len(text):
        c = text[i]
        if c == "\\":
            i += 2  # an escaped character is text, never a bracket or separator
            continue
        if c in "([":
            stack.append(_Open(c, i))
            squares += c == "["
            if len(stack) > MAX_NESTING:
                raise _too_deep(field_)
        elif c == ")" and stack and stack[-1].kind == "(":
            stack.pop()
        elif c == "]" and squares:
            while (top := stack.pop()).kind != "[":
                pass  # round brackets left open inside it end with it
            squares -= 1
            kept = _scheduled(text, top, i, steps)
            if kept is not None:  # drop the bracket but for the part that runs
                found = True
                drops[top.at] += 1
                drops[kept[0]] -= 1
                drops[kept[1]] += 1
                drops[i + 1] -= 1
        elif c in ":|" and stack and stack[-1].kind == "[":
            (stack[-1].colons if c == ":" else stack[-1].pipes).append(i)
        i += 1
    out, dropped = [], 0
    for i, c in enumerate(text):
        dropped += drops[i]
        if not dropped:
            out.append(c)
    return "".join(out), found


def _scheduled(text: str, bracket: _Open, end: int, steps: int) -> tuple[int, int] | None:
    """The span of text that runs at the first step when the square bracket from ``bracket.at`` to ``end`` is prompt
    editing or alternation, else None."""
    start, colons = bracket.at + 1, bracket.colons
    if len(colons) in (1, 2):
        number = text[colons[-1] + 1:end].strip()
        if _NUMBER.fullmatch(number):
            # A1111 switches after step int(when): from runs at step 1 when that is 1 or more.
            when = float(number) * (steps if "." in number else 1)
            before = (start, colons[0]) if len(colons) == 2 else (start, start)
            after = (colons[0] + 1, colons[1]) if len(colons) == 2 else (start, colons[0])
            return before if when >= 1 else after
    if not colons and bracket.pipes:
        return start, bracket.pipes[0]
    return None


@dataclass(frozen=True)
class Reading:
    """A prompt as A1111 reads it: its fragments, and what of its syntax this service does not apply."""

    fragments: tuple[Fragment, ...]
    warnings: tuple[str, ...] = ()

    def least_chunks(self) -> int:
        """A lower bound on its chunks with any CLIP tokenizer, without one: a word with a letter or digit is one
        token or more, and a chunk holds at most ``CHUNK_TOKENS``; each BREAK ends a chunk."""
        words = sum(any(c.isalnum() for c in word) for f in self.fragments if not f.breaks for word in f.text.split())
        breaks = sum(f.breaks for f in self.fragments)
        return max(1, breaks, math.ceil(words / CHUNK_TOKENS))


@lru_cache(maxsize=1024)
def read(prompt: str, steps: int, field_: str = "prompt") -> Reading:
    """A prompt (LoRA tags already stripped) as A1111 reads it at the first of ``steps``; cached, so that the
    checks, the batching key and each tokenizer on a replica parse it once."""
    text, edited = first_step(prompt, steps, field_)
    warnings = [EDITING_WARNING] if edited else []
    if _AND_WORD.search(text):
        warnings.append(AND_WARNING)
    return Reading(tuple(parse_emphasis(text, field_)), tuple(warnings))


def check(prompt: str, steps: int, field_: str = "prompt") -> Reading:
    """``prompt`` read, or refused when it cannot be: what the ingress asks before a request runs. Its chunks are
    counted without a tokenizer here (a lower bound); the replica counts them exactly (``PromptEncoder.count``)."""
    reading = read(prompt, steps, field_)
    if reading.least_chunks() > MAX_CHUNKS:
        raise InvalidInput(f"the prompt needs more than {MAX_CHUNKS} chunks of {CHUNK_TOKENS} tokens", field=field_)
    return reading


@dataclass
class Chunk:
    """Up to ``CHUNK_TOKENS`` token ids of text and their weights (no start, end or padding yet)."""

    tokens: list[int] = field(default_factory=list)
    weights: list[float] = field(default_factory=list)


def chunk(pieces: Sequence[tuple[list[int], float] | None], comma: int | None, length: int = CHUNK_TOKENS,
          backtrack: int = COMMA_BACKTRACK, groups: dict[int, int] | None = None) -> list[Chunk]:
    """Token ids and weights (one entry per fragment; None: a BREAK) cut into chunks of ``length``. When a chunk
    fills and its last ``comma`` is among its last ``backtrack`` tokens, the tokens after that comma start the next
    chunk, so that a phrase is not cut in two. A BREAK ends the chunk (even an empty one). ``groups``: the first
    token of each embedding and its vector count; an embedding that does not fit in what is left of a chunk starts
    the next one, as in A1111. At least one chunk."""
    groups = groups or {}
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
            if token in groups and current.tokens and len(current.tokens) + groups[token] > length:
                close()
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


FIELDS = ("prompt", "negative_prompt")  # what each group of texts was, for the errors that name it
_COMMAS: weakref.WeakKeyDictionary[Any, int | None] = weakref.WeakKeyDictionary()


def _comma(tokenizer) -> int | None:
    """The tokenizer's id of a word-final comma, looked up once per tokenizer (its vocabulary is 49k entries)."""
    if tokenizer not in _COMMAS:
        _COMMAS[tokenizer] = tokenizer.get_vocab().get(",</w>")
    return _COMMAS[tokenizer]


class PromptEncoder:
    """A1111's encoding of prompts with one pipeline's tokenizers and text encoders: the base's two (CLIP-L and
    OpenCLIP bigG) or the refiner's one. Each chunk is encoded on its own as start + 75 tokens + end, padded as the
    encoder's tokenizer pads; each token's penultimate hidden state is multiplied by its weight and the chunk
    rescaled to its unweighted mean (A1111's "Original" emphasis); chunks are concatenated along the sequence and
    the encoders' states along the features, as diffusers does. The pooled embedding is the last encoder's
    projected output of the first chunk, unweighted."""

    def __init__(self, pipe, vocabulary: Vocabulary | None = None) -> None:
        self.pipe = pipe
        self.vocabulary = vocabulary
        pairs = [(getattr(pipe, "tokenizer", None), getattr(pipe, "text_encoder", None)),
                 (getattr(pipe, "tokenizer_2", None), getattr(pipe, "text_encoder_2", None))]
        self.encoders = [(t, e) for t, e in pairs if t is not None and e is not None]

    def chunks(self, text: str, tokenizer, steps: int, field_: str = "prompt") -> list[Chunk]:
        """A prompt's chunks by one tokenizer: each fragment tokenized on its own, as A1111 does."""
        fragments = read(text, steps, field_).fragments
        texts = [f.text for f in fragments]
        groups = None
        if self.vocabulary is not None and self.vocabulary.tokens:
            texts = [self.vocabulary.rewrite(t) for t in texts]
            groups = self.vocabulary.groups(tokenizer)
        ids = tokenizer(texts, add_special_tokens=False, truncation=False, verbose=False)["input_ids"]
        return chunk([None if f.breaks else (own, f.weight) for f, own in zip(fragments, ids, strict=True)],
                     _comma(tokenizer), length=tokenizer.model_max_length - 2, groups=groups)

    def count(self, text: str, steps: int, field_: str = "prompt") -> int:
        """The chunks ``text`` needs alone (the most of any of the encoders' tokenizers); refused beyond
        ``MAX_CHUNKS``. Requests batched together must need as many, or padding would change their pixels."""
        count = max(len(self.chunks(text, tokenizer, steps, field_)) for tokenizer, _ in self.encoders)
        if count > MAX_CHUNKS:
            raise InvalidInput(f"the prompt needs {count} chunks of {CHUNK_TOKENS} tokens, more than {MAX_CHUNKS}",
                               field=field_)
        return count

    def counts(self, prompt: str, negative: str, steps: int) -> tuple[int, int]:
        """The chunks a request's prompt (LoRA tags stripped) and negative prompt need alone; 0 for no negative."""
        return self.count(prompt, steps), self.count(negative, steps, "negative_prompt") if negative else 0

    def __call__(self, prompts: list[str], negatives: list[str] | None, steps: int) -> dict[str, torch.Tensor]:
        """The four embeddings an SDXL pipeline takes for ``prompts`` (one per image) and their ``negatives``, read
        at the first of ``steps``; None: no negative prompt, read as diffusers reads it (zeros where the
        checkpoint's config says ``force_zeros_for_empty_prompt``, else the encoding of ""). Every text ends with
        as many chunks as the longest of them, padded with chunks of the empty prompt (the batching keys keep
        texts that need different counts apart). Non-finite embeddings are refused, never denoised."""
        import torch

        zeros = negatives is None and bool(self.pipe.config.get("force_zeros_for_empty_prompt", False))
        # Prompts and negatives are encoded as two batches, as diffusers does, so that a plain prompt gives the
        # very numbers it gives there.
        groups = [prompts] if zeros else [prompts, negatives if negatives is not None else [""] * len(prompts)]
        read_by: list[dict[str, list[Chunk]]] = []
        for tokenizer, _ in self.encoders:
            read_by.append({text: self.chunks(text, tokenizer, steps, name)
                            for group, name in zip(groups, FIELDS, strict=False) for text in group})
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
        for (states, pooled_), name in zip(encoded, FIELDS, strict=False):
            # A backstop behind the weight caps: an overflow (float16, or a rescale by a mean near zero) would
            # denoise into a black image, cached as an answer.
            if not (bool(torch.isfinite(states).all()) and bool(torch.isfinite(pooled_).all())):
                raise InvalidInput("the weighted prompt encodes to non-finite values", field=name)
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
