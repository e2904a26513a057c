"""Automatic1111's reading of a prompt, for the requests its routes send (``prompt_syntax="a1111"``).

Three layers, each testable on its own:

- ``subprompts``, ``schedule`` and ``parse_emphasis``: plain string functions (no torch). ``subprompts`` splits a
  prompt on ``AND`` into weighted subprompts as A1111's composable diffusion does (``composable`` guides with
  them); ``schedule`` gives the texts a subprompt runs at each sampling step (prompt editing ``[from:to:when]``
  and alternation ``[a|b]``), as A1111 1.10's ``get_learned_conditioning_prompt_schedules`` does;
  ``parse_emphasis`` turns one such text into weighted fragments and chunk breaks as its ``parse_prompt_attention``
  does; ``read`` does all three, once per prompt (cached), and ``check`` is what the ingress calls on a request's
  prompts before anything runs;
- ``chunk``: those fragments' token ids cut into chunks of 75, moving the words after a late comma into the next
  chunk as A1111 does;
- ``PromptEncoder``: the chunks encoded one by one with a pipeline's own tokenizers and text encoders (so LoRAs set
  on them apply, and textual-inversion embeddings: each fragment's embedding names are rewritten into their tokens
  before it is tokenized, so an emphasis weights every vector of one), weighted, rescaled to their unweighted mean
  and concatenated along the sequence: the ``prompt_embeds`` / ``pooled_prompt_embeds`` pairs an SDXL pipeline
  takes in place of strings, with a ``Conditioning`` that swaps them from step to step as each image's schedule
  moves on (each subprompt's: the pipeline's rows hold the first, ``composable.Composed`` the others).

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
from typing import TYPE_CHECKING, Any, Literal, NamedTuple

from deployments.support.errors import InvalidInput

if TYPE_CHECKING:
    import torch

    from deployments.support.embeddings import Vocabulary

READING = "a1111-emphasis-chunks-schedule-6"  # part of the result cache's key: answers read otherwise are not served
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
# Subprompts joined by AND: each is one more UNet evaluation per image at every step. A1111 sets no cap.
MAX_SUBPROMPTS = 8
# The fields whose text is never split on AND: A1111 composes the positive prompt alone.
NEGATIVE_FIELDS = ("negative_prompt", "hr_negative_prompt")
# How a prompt and a negative prompt of different lengths meet: A1111 1.10's options pad_cond_uncond ("empty") and
# pad_cond_uncond_v0 ("v0", which wins when both are on); "off", its default, runs each in UNet calls of its own.
Padding = Literal["off", "empty", "v0"]


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
# A subprompt's trailing ``:weight``, as A1111 1.10's ``re_weight``: read whether or not the prompt has an AND, after
# any number of lines (``(?:\s|.)`` crosses line breaks).
_TRAILING_WEIGHT = re.compile(r"^((?:\s|.)*?)(?:\s*:\s*([-+]?(?:\d+\.?|\d*\.\d+)))?\s*$")


class Subprompt(NamedTuple):
    """One part of a prompt split on AND: its text (its own schedule and emphasis) and its guidance weight."""

    text: str
    weight: float = 1.0


@lru_cache(maxsize=1024)
def subprompts(prompt: str, field_: str = "prompt") -> tuple[Subprompt, ...]:
    """``prompt`` split on the word ``AND`` into A1111's composable subprompts, each with the ``:weight`` it ends
    in (1.0 without one), as its ``get_multicond_prompt_list`` reads them: ``a cat :1.5`` is "a cat" at 1.5 even
    with no AND. A negative prompt (``NEGATIVE_FIELDS``) is one subprompt, its text as written. Refused
    (``InvalidInput`` naming ``field_``): more than ``MAX_SUBPROMPTS``, or a weight beyond ``MAX_WEIGHT``."""
    if field_ in NEGATIVE_FIELDS:
        return (Subprompt(prompt),)
    parts = _AND_WORD.split(prompt)
    if len(parts) > MAX_SUBPROMPTS:
        raise InvalidInput(f"the prompt has {len(parts)} subprompts joined by AND, more than {MAX_SUBPROMPTS}",
                           field=field_)
    out = []
    for part in parts:
        found = _TRAILING_WEIGHT.search(part)
        if found is None or found.group(2) is None:
            out.append(Subprompt(found.group(1) if found is not None else part))
            continue
        weight = float(found.group(2))
        if not abs(weight) <= MAX_WEIGHT:  # also inf (a number of 400 digits)
            raise InvalidInput(f"the subprompt weight {found.group(2)[:20]} is outside ±{MAX_WEIGHT:g}", field=field_)
        out.append(Subprompt(found.group(1), weight))
    return tuple(out)


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
    """A bracket open during ``_brackets``'s pass, and (a square one) the separators at its own level."""

    kind: str
    at: int
    colons: list[int] = field(default_factory=list)
    pipes: list[int] = field(default_factory=list)


@dataclass(frozen=True)
class _Edit:
    """A square bracket that is prompt editing (``when`` set: its A1111 step) or alternation (``options``): the
    spans of text it may keep, from ``start`` to ``end`` (the brackets themselves) in the prompt."""

    start: int
    end: int
    spans: tuple[tuple[int, int], ...]  # editing: (from, to); alternation: one per option
    when: float | None = None  # the number as written, read against the steps in ``schedule``
    fraction: bool = False  # written with a point: a fraction of the steps


def _brackets(text: str, field_: str) -> list[_Edit]:
    """Every square bracket of ``text`` that is prompt editing or alternation, found in one pass (a stack, no
    recursion); square brackets that are neither stay for ``parse_emphasis``, and an unbalanced one is text.
    Refused: more than ``MAX_NESTING`` brackets open at once."""
    edits: list[_Edit] = []
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
            edit = _edit(text, top, i)
            if edit is not None:
                edits.append(edit)
        elif c in ":|" and stack and stack[-1].kind == "[":
            (stack[-1].colons if c == ":" else stack[-1].pipes).append(i)
        i += 1
    return edits


def _edit(text: str, bracket: _Open, end: int) -> _Edit | None:
    """The square bracket from ``bracket.at`` to ``end`` as prompt editing or alternation, else None."""
    start, colons = bracket.at + 1, bracket.colons
    if len(colons) in (1, 2):
        number = text[colons[-1] + 1:end].strip()
        if _NUMBER.fullmatch(number):
            before = (start, colons[0]) if len(colons) == 2 else (start, start)
            after = (colons[0] + 1, colons[1]) if len(colons) == 2 else (start, colons[0])
            return _Edit(bracket.at, end, (before, after), float(number), "." in number)
    if not colons and bracket.pipes:
        bounds = [bracket.at, *bracket.pipes, end]
        return _Edit(bracket.at, end, tuple((a + 1, b) for a, b in zip(bounds, bounds[1:], strict=False)))
    return None


def _switch(when: float, fraction: bool, steps: int, first_pass: int | None) -> int:
    """The last step of ``steps`` at which an edit keeps its ``from``, as A1111 1.10 reads ``when``: a number with
    a point is a fraction of the steps, else a step number, capped at ``steps``. In a hires pass (``first_pass``:
    the first pass's steps) a step number counts on from the first pass and a fraction from 1.0 to 2.0 spans the
    second, so that ``[a:b:0.5]`` is ``b`` throughout it."""
    at = (when - (first_pass is not None)) * steps if fraction else when - (first_pass or 0)
    return min(steps, int(at))


@lru_cache(maxsize=1024)
def schedule(text: str, steps: int, field_: str = "prompt", first_pass: int | None = None
             ) -> tuple[tuple[int, str], ...]:
    """``text`` over ``steps`` sampling steps as A1111 1.10's ``get_learned_conditioning_prompt_schedules``
    gives it: ``(end_step, text)`` pairs, the text that runs up to and including each end step, the last ending at
    ``steps``. ``[from:to:when]`` is ``from`` up to step ``when`` (see ``_switch``) and ``to`` after it;
    ``[to:when]`` is nothing, then ``to``; ``[from::when]`` is ``from``, then nothing; ``[a|b|c]`` is option
    ``(step - 1) % 3`` at each step; nested ones likewise. ``first_pass``: this is the hires pass after a first
    pass of that many steps. Cached: the checks, the batching key and the encoder read a prompt once."""
    edits = _brackets(text, field_)
    if not edits:
        return ((steps, text),)
    switches = {i: _switch(e.when, e.fraction, steps, first_pass) for i, e in enumerate(edits) if e.when is not None}
    ends = {steps, *(at for at in switches.values() if at >= 1)}
    if len(switches) < len(edits):  # alternation: a text per step
        ends.update(range(1, steps + 1))
    texts: dict[tuple[int, ...], str] = {}  # by the span each edit keeps: steps that keep the same share a text
    out: list[tuple[int, str]] = []
    for step in sorted(ends):
        kept = tuple(int(step > switches[i]) if i in switches else (step - 1) % len(e.spans)
                     for i, e in enumerate(edits))
        if kept not in texts:
            texts[kept] = _keep(text, edits, kept)
        out.append((step, texts[kept]))
    return tuple(out)


def _keep(text: str, edits: list[_Edit], kept: tuple[int, ...]) -> str:
    """``text`` with each edit's brackets dropped but for the span it keeps (nested edits in a dropped span go
    with it): a count of the dropped spans open at each position, swept once."""
    drops = [0] * (len(text) + 1)  # +1 where a dropped span begins, -1 where it ends
    for e, k in zip(edits, kept, strict=True):
        start, end = e.spans[k]
        drops[e.start] += 1
        drops[start] -= 1
        drops[end] += 1
        drops[e.end + 1] -= 1
    out, dropped, since = [], 0, 0
    for i in sorted({e.start for e in edits} | {s for e, k in zip(edits, kept, strict=True) for s in e.spans[k]}
                    | {e.end + 1 for e in edits}):
        if not dropped:
            out.append(text[since:i])
        dropped += drops[i]
        since = i
    if not dropped:
        out.append(text[since:])
    return "".join(out)


def current(ends: Sequence[int], counter: int) -> int:
    """The entry of a schedule (its end steps) that A1111 conditions its ``counter``-th model evaluation on,
    counting from 0: the first whose end step is ``counter`` or more. A1111 counts evaluations from 0 against end
    steps counted from 1, so its first two steps both run the first entry, and each switch comes a step after its
    ``when``."""
    return next((i for i, end in enumerate(ends) if counter <= end), 0)


@lru_cache(maxsize=4096)
def fragments(text: str, field_: str = "prompt") -> tuple[Fragment, ...]:
    """One text of a schedule as weighted fragments (``parse_emphasis``), cached."""
    return tuple(parse_emphasis(text, field_))


@dataclass(frozen=True)
class Reading:
    """A prompt as A1111 reads it: its subprompts (split on AND) and every text of their schedules, each as
    fragments."""

    texts: tuple[tuple[Fragment, ...], ...]
    parts: tuple[Subprompt, ...]

    @property
    def fragments(self) -> tuple[Fragment, ...]:
        """The first step's fragments (of the first subprompt)."""
        return self.texts[0]

    def least_chunks(self) -> int:
        """A lower bound on its chunks with any CLIP tokenizer, without one: a word with a letter or digit is one
        token or more, and a chunk holds at most ``CHUNK_TOKENS``; each BREAK ends a chunk. The most of any of its
        texts: A1111 pads a prompt's texts to its longest."""
        def least(text: tuple[Fragment, ...]) -> int:
            words = sum(any(c.isalnum() for c in word) for f in text if not f.breaks for word in f.text.split())
            breaks = sum(f.breaks for f in text)
            return max(1, breaks, math.ceil(words / CHUNK_TOKENS))

        return max(least(text) for text in self.texts)


@lru_cache(maxsize=1024)
def read(prompt: str, steps: int, field_: str = "prompt", first_pass: int | None = None) -> Reading:
    """A prompt (LoRA tags already stripped) as A1111 reads it over ``steps``: its subprompts (``subprompts``),
    each over ``schedule``; cached, so that the checks and the batching key parse it once."""
    parts = subprompts(prompt, field_)
    texts = [text for part in parts for _, text in schedule(part.text, steps, field_, first_pass)]
    return Reading(tuple(dict.fromkeys(fragments(text, field_) for text in texts)), parts)


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

    def chunks(self, text: str, tokenizer, field_: str = "prompt") -> list[Chunk]:
        """One text of a schedule as chunks by one tokenizer: each fragment tokenized on its own, as A1111 does."""
        parts = fragments(text, field_)
        texts = [f.text for f in parts]
        groups = None
        if self.vocabulary is not None and self.vocabulary.tokens:
            texts = [self.vocabulary.rewrite(t) for t in texts]
            groups = self.vocabulary.groups(tokenizer)
        ids = tokenizer(texts, add_special_tokens=False, truncation=False, verbose=False)["input_ids"]
        return chunk([None if f.breaks else (own, f.weight) for f, own in zip(parts, ids, strict=True)],
                     _comma(tokenizer), length=tokenizer.model_max_length - 2, groups=groups)

    def count(self, prompt: str, steps: int, field_: str = "prompt", first_pass: int | None = None) -> int:
        """The chunks ``prompt`` needs alone over ``steps``: the most of any text of its schedule with any of the
        encoders' tokenizers (A1111 pads a schedule's texts to its longest); refused beyond ``MAX_CHUNKS``.
        Requests batched together must need as many, or padding would change their pixels."""
        count = max(len(self.chunks(text, tokenizer, field_)) for part in subprompts(prompt, field_)
                    for _, text in schedule(part.text, steps, field_, first_pass) for tokenizer, _ in self.encoders)
        if count > MAX_CHUNKS:
            raise InvalidInput(f"the prompt needs {count} chunks of {CHUNK_TOKENS} tokens, more than {MAX_CHUNKS}",
                               field=field_)
        return count

    def counts(self, prompt: str, negative: str, steps: int, first_pass: int | None = None) -> tuple[int, int]:
        """The chunks a request's prompt (LoRA tags stripped) and negative prompt need alone; 0 for no negative."""
        return (self.count(prompt, steps, first_pass=first_pass),
                self.count(negative, steps, "negative_prompt", first_pass) if negative else 0)

    def __call__(self, prompts: list[str], negatives: list[str] | None, steps: int) -> dict[str, torch.Tensor]:
        """The four embeddings an SDXL pipeline takes for ``prompts`` (one per image) and their ``negatives``, as
        they are at the first of ``steps`` (``scheduled`` gives every step's)."""
        return self.scheduled(prompts, negatives, steps).at(0)

    def scheduled(self, prompts: list[str], negatives: list[str] | None, steps: int,
                  first_pass: int | None = None, padding: Padding = "off") -> Conditioning:
        """``prompts`` (one per image) and their ``negatives`` over ``steps`` (A1111's count: twice the sampling
        steps for a second-order sampler; ``first_pass``: see ``schedule``): each prompt split on AND
        (``subprompts``), each distinct text of their schedules encoded once. The pipeline's own rows are each
        image's first subprompt; the others and the weights are for ``composable.Composed``. None: no negative
        prompt, read as diffusers reads it (zeros where the checkpoint's config says
        ``force_zeros_for_empty_prompt``, else the encoding of ""). Non-finite embeddings are refused, never
        denoised.

        Lengths as A1111 1.10 makes them: a subprompt's (or a negative prompt's) schedule is encoded in one call,
        which pads its shorter texts with chunks of the empty prompt; a subprompt shorter than the longest of the
        prompts' then repeats its last vector up to it (``stack_conds``); the pooled embeddings are each text's own.
        A prompt and a negative prompt of different lengths are then met as ``padding`` says (A1111's
        ``pad_cond_uncond`` options): "off", its default, runs them in UNet calls of their own, each at its own
        length (``Conditioning.lengths``: the pipeline's rows carry both at the longer, ``Composed`` cuts them);
        "empty" pads the shorter with chunks of the empty prompt; "v0" repeats the negative prompt's last vector up
        to the prompt's length, or cuts it there."""
        import torch

        zeros = negatives is None and bool(self.pipe.config.get("force_zeros_for_empty_prompt", False))
        groups = [prompts] if zeros else [prompts, negatives if negatives is not None else [""] * len(prompts)]
        # Per group, per image, per subprompt (one for a negative): its schedule's end steps and texts.
        parts: list[list[list[tuple[tuple[int, ...], tuple[str, ...]]]]] = []
        weights: list[tuple[float, ...]] = []
        for group, name in zip(groups, FIELDS, strict=False):
            parts.append([])
            for prompt in group:
                split = subprompts(prompt, name)
                if name == "prompt":
                    weights.append(tuple(part.weight for part in split))
                entries = [schedule(part.text, steps, name, first_pass) for part in split]
                parts[-1].append([(tuple(end for end, _ in own), tuple(text for _, text in own)) for own in entries])
        read_by = [{text: self.chunks(text, tokenizer, name) for own, name in zip(parts, FIELDS, strict=False)
                    for image in own for _, texts in image for text in texts} for tokenizer, _ in self.encoders]
        # Each subprompt's chunks: the most of its schedule's texts (with any of the tokenizers).
        chunks = [[[max(len(by_text[t]) for by_text in read_by for t in texts) for _, texts in image] for image in own]
                  for own in parts]
        cond = max(n for image in chunks[0] for n in image)
        uncond = 1 if zeros else max(n for image in chunks[1] for n in image)  # A1111's zeros are one chunk long
        width = cond if padding == "v0" else max(cond, uncond)  # the chunks of every row the pipeline holds
        # Zeros attend to nothing at any length (their keys and values are zero): no call of their own for them.
        apart = padding == "off" and cond != uncond and not zeros
        count = max(width, *(len(c) for by_text in read_by for c in by_text.values()))
        empty = zeros and padding == "empty" and width > 1  # zeros, then chunks of the empty prompt
        dtype = self.encoders[-1][1].dtype
        encoded: list[dict[str, tuple[torch.Tensor, torch.Tensor]]] = []
        with torch.no_grad():
            # Each text is encoded on its own: a batch's other texts would change the last bits of its numbers (the
            # pooled projection's on CPU), and so its pixels; a plain prompt gives the very numbers of diffusers.
            for own, name in zip(parts, FIELDS, strict=False):
                texts = dict.fromkeys(t for image in own for _, texts in image for t in texts)
                if empty and name == "prompt":
                    texts[""] = None
                encoded.append({})
                for text in texts:
                    states: list[torch.Tensor] = []
                    pooled: torch.Tensor | None = None
                    for (tokenizer, encoder), by_text in zip(self.encoders, read_by, strict=True):
                        read = by_text[text] if text in by_text else [Chunk()]  # the empty prompt: one chunk
                        hidden, first = self._encode(tokenizer, encoder, [read], count)
                        states.append(hidden)
                        pooled = first if first is not None else pooled
                    if pooled is None:
                        raise ValueError("the pipeline's last text encoder gives no pooled output")
                    encoded[-1][text] = (torch.cat(states, dim=-1).to(dtype=dtype)[0], pooled[0])
                # A backstop behind the weight caps: an overflow (float16, or a rescale by a mean near zero) would
                # denoise into a black image, cached as an answer.
                if not all(bool(torch.isfinite(s).all()) and bool(torch.isfinite(p).all())
                           for s, p in encoded[-1].values()):
                    raise InvalidInput("the weighted prompt encodes to non-finite values", field=name)
        per = next(iter(encoded[0].values()))[0].shape[0] // count  # positions a chunk (77)
        rows: list[dict[tuple[str, int], int]] = []
        plans: list[list[list[Plan]]] = []
        for own, lengths in zip(parts, chunks, strict=True):
            index: dict[tuple[str, int], int] = {}
            plans.append([[(ends, tuple(index.setdefault((text, n), len(index)) for text in texts))
                           for (ends, texts), n in zip(image, image_lengths, strict=True)]
                          for image, image_lengths in zip(own, lengths, strict=True)])
            rows.append(index)
        # A subprompt repeats its last vector up to the prompts' length; a negative prompt keeps its own length but
        # under "v0", where it repeats its last vector up to the prompts' or is cut there.
        repeats = [cond, cond if padding == "v0" else None]
        built = [(torch.stack([_fitted(encoded[g][text][0], n, repeats[g] or n, width, per) for text, n in index]),
                  torch.stack([encoded[g][text][1] for text, _ in index]))
                 for g, index in enumerate(rows)]
        if zeros:
            embeds, pooled = built[0]
            nothing = torch.zeros_like(embeds[:1])
            if empty:
                nothing[0, per:] = encoded[0][""][0][per:width * per]
            built.append((nothing, torch.zeros_like(pooled[:1])))
            plans.append([[((steps,), (0,))]] * len(prompts))
        return Conditioning(*built[0], *built[1], [own[0] for own in plans[0]], [own[0] for own in plans[1]],
                            [own[1:] for own in plans[0]], weights,
                            lengths=(cond * per, uncond * per) if apart else None)

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


def _fitted(states: torch.Tensor, own: int, repeat_to: int, width: int, per: int) -> torch.Tensor:
    """A text's states (its ``own`` chunks of ``per`` positions, then chunks of the empty prompt) as ``width``
    chunks: past its own, its last vector repeated up to ``repeat_to`` chunks (A1111's ``stack_conds`` and
    ``pad_cond_uncond_v0``), the empty prompt's chunks after that; cut at ``width``."""
    out = states[:width * per].clone()
    if repeat_to > own:
        out[own * per:repeat_to * per] = states[own * per - 1]
    return out


def _emphasised(hidden: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Each token's state times its weight, then each chunk rescaled so that its mean is what it was: the weights
    change the tokens' relative emphasis, not the chunk's overall magnitude."""
    states = hidden.float()
    before = states.mean(dim=(1, 2), keepdim=True)
    states = states * weights[..., None]
    states = states * (before / states.mean(dim=(1, 2), keepdim=True))
    return states.to(hidden.dtype)


Plan = tuple[tuple[int, ...], tuple[int, ...]]  # a schedule's end steps and the rows of their texts


@dataclass
class Conditioning:
    """Every distinct text of a batch's schedules encoded once, and which of them each image conditions on at each
    model evaluation: what ``PromptEncoder.scheduled`` gives. ``at`` is a pipeline's four embeddings at one
    evaluation; ``step_end``, called from a pipeline's ``callback_on_step_end``, swaps in the next evaluation's
    wherever a schedule moves on, row by row, so that each image of a batch follows its own."""

    embeds: torch.Tensor  # distinct prompt texts (at their lengths) x sequence x features
    pooled: torch.Tensor
    negative_embeds: torch.Tensor
    negative_pooled: torch.Tensor
    prompts: list[Plan]  # per image: its (first subprompt's) schedule's end steps, their texts' rows
    negatives: list[Plan]
    others: list[list[Plan]] | None = None  # per image: its subprompts after the first (None: none has any)
    weights: list[tuple[float, ...]] | None = None  # per image: each subprompt's weight, the first's first
    # The positions the UNet reads of a prompt's rows and of a negative prompt's, where A1111 calls it on each apart
    # (their lengths differ); None: every row at its full length, in one call.
    lengths: tuple[int, int] | None = None
    applied: tuple | None = None  # the rows the pipeline (and ``composable.Composed``) holds now

    @property
    def moves(self) -> bool:
        """Whether any image's prompt, subprompt or negative prompt changes during sampling."""
        others = [plan for own in self.others or [] for plan in own]
        return any(len(ends) > 1 for ends, _ in (*self.prompts, *self.negatives, *others))

    @property
    def composes(self) -> bool:
        """Whether any image's guidance is not its one prompt's at weight 1: it has an AND or a weight."""
        return any(weights != (1.0,) for weights in self.weights or [])

    @property
    def reshapes(self) -> bool:
        """Whether the UNet's calls need ``composable.Composed``: to compose, or to run a prompt and a negative
        prompt of different lengths apart."""
        return self.composes or self.lengths is not None

    def rows(self, counter: int) -> tuple[tuple[int, ...], tuple[int, ...], tuple[tuple[int, ...], ...]]:
        """Each image's prompt and negative prompt rows at A1111's ``counter``-th evaluation (``current``), and
        the rows of its other subprompts."""
        def pick(plans: list[Plan]) -> tuple[int, ...]:
            return tuple(rows[current(ends, counter)] for ends, rows in plans)

        others = tuple(pick(own) for own in self.others or [[] for _ in self.prompts])
        return pick(self.prompts), pick(self.negatives), others

    def at(self, counter: int) -> dict[str, torch.Tensor]:
        """The embeddings an SDXL pipeline takes in place of prompts, as they are at evaluation ``counter``."""
        self.applied = self.rows(counter)
        positive, negative, _ = self.applied
        return {"prompt_embeds": self.embeds[list(positive)], "pooled_prompt_embeds": self.pooled[list(positive)],
                "negative_prompt_embeds": self.negative_embeds[list(negative)],
                "negative_pooled_prompt_embeds": self.negative_pooled[list(negative)]}

    def step_end(self, pipe, step: int, callback_kwargs: dict, evaluations: int = 1) -> None:
        """After the pipeline's loop iteration ``step``: the next iteration's ``prompt_embeds`` and
        ``add_text_embeds`` into ``callback_kwargs`` when they change (the pipeline takes them back from there;
        with guidance, negatives first, as it concatenates them). ``evaluations``: A1111's model evaluations per
        sampling step (2 for its second-order samplers), against the scheduler's loop iterations per step, so that
        the counter is A1111's whatever the diffusers scheduler counts."""
        import torch

        counter = (step + 1) * evaluations // getattr(pipe.scheduler, "order", 1)
        if self.rows(counter) == self.applied:
            return
        now = self.at(counter)
        current_embeds, current_pooled = callback_kwargs["prompt_embeds"], callback_kwargs["add_text_embeds"]
        embeds, pooled = now["prompt_embeds"], now["pooled_prompt_embeds"]
        if pipe.do_classifier_free_guidance:  # the pipeline's own order: negatives, then prompts
            embeds = torch.cat([now["negative_prompt_embeds"], embeds])
            pooled = torch.cat([now["negative_pooled_prompt_embeds"], pooled])
        callback_kwargs["prompt_embeds"] = embeds.to(device=current_embeds.device, dtype=current_embeds.dtype)
        callback_kwargs["add_text_embeds"] = pooled.to(device=current_pooled.device, dtype=current_pooled.dtype)

