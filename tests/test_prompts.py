"""A1111's prompt syntax: the parser and the chunking on plain values, the encoder on the tiny SDXL base and refiner
against the pipelines' own ``encode_prompt``, and the base's pixels for A1111 requests."""

from __future__ import annotations

import time

import numpy as np
import pytest
from PIL import Image

from deployments.support.errors import InvalidInput
from deployments.support.generation import GenerationRequest, RefineRequest, StageResult
from deployments.support.prompts import (
    CHUNK_TOKENS,
    MAX_CHUNKS,
    MAX_NESTING,
    Chunk,
    check,
    chunk,
    current,
    parse_emphasis,
    read,
    schedule,
)
from tests.helpers import pixels


def pairs(text: str) -> list[tuple[str, float | None]]:
    """The parse as (text, weight), a BREAK as ("BREAK", None)."""
    return [("BREAK", None) if f.breaks else (f.text, f.weight) for f in parse_emphasis(text)]


# --- parsing -------------------------------------------------------------------------------------------------------

def test_round_and_square_brackets_multiply_and_nest():
    assert pairs("a (red) [cat] ((bird)) [[dog]]") == [
        ("a ", 1.0), ("red", 1.1), (" ", 1.0), ("cat", pytest.approx(1 / 1.1)), (" ", 1.0),
        ("bird", pytest.approx(1.21)), (" ", 1.0), ("dog", pytest.approx(1 / 1.21))]


def test_explicit_weights_set_the_factor_and_nest_with_brackets():
    assert pairs("(masterpiece:1.2), ((sky:1.5)) (x:-0.5) (y:.25)") == [
        ("masterpiece", 1.2), (", ", 1.0), ("sky", pytest.approx(1.65)), (" ", 1.0), ("x", -0.5), (" ", 1.0),
        ("y", 0.25)]
    assert pairs("(a:1)") == pairs("a") == [("a", 1.0)]


def test_escaped_brackets_and_backslash_are_literal():
    assert pairs(r"\(a\) \[b\] c\\d (e)") == [("(a) [b] c\\d ", 1.0), ("e", 1.1)]


def test_unbalanced_brackets_close_at_the_end_and_stray_closers_are_text():
    assert pairs("a (b") == [("a ", 1.0), ("b", 1.1)]
    assert pairs("a [b") == [("a ", 1.0), ("b", pytest.approx(1 / 1.1))]
    assert pairs("a ]b) c") == [("a ]b) c", 1.0)]


def test_a_colon_is_text_unless_it_reads_as_a_weight():
    assert pairs("time: 10:30 (a:2 x) b:3)") == [("time: 10:30 ", 1.0), ("a:2 x", 1.1), (" b:3)", 1.0)]


def test_a_weight_may_have_whitespace_around_its_number():
    """As A1111 reads ``(masterpiece: 1.2)``; a space before the colon stays with the text."""
    assert pairs("(masterpiece: 1.2), (cat :1.5 ) (dog:\t0.5\n)") == [
        ("masterpiece", 1.2), (", ", 1.0), ("cat ", 1.5), (" ", 1.0), ("dog", 0.5)]
    assert pairs("(a: 2) b") == [("a", 2.0), (" b", 1.0)]


def test_break_is_an_upper_case_word_of_its_own():
    assert pairs("a, b BREAK c BREAKfast break (d BREAK e:1.3)") == [
        ("a, b", 1.0), ("BREAK", None), ("c BREAKfast break ", 1.0), ("d", 1.3), ("BREAK", None), ("e", 1.3)]
    assert pairs("") == [("", 1.0)]


def first_step(prompt: str, steps: int) -> str:
    return schedule(prompt, steps)[0][1]


def test_prompt_editing_and_alternation_at_their_first_step():
    assert first_step("a [dog:cat:0.5] in a (hat:1.2)", 20) == "a dog in a (hat:1.2)"
    assert first_step("[cat:10] on a [red|green|blue] mat", 20) == " on a red mat"
    assert first_step("a[b:[c:d:2]:0.3]e", 20) == "abe"  # nested: the outer's from, read in turn
    assert first_step("([a:b:0.5]:1.2) x", 20) == "(a:1.2) x"  # inside emphasis, which stays
    assert schedule("[(x:2)] [y] [p:q:r] [open", 20) == ((20, "[(x:2)] [y] [p:q:r] [open"),)
    assert first_step("a [b : c : 1 ] d", 10) == "a b  d"  # whitespace around when, as A1111's grammar
    reading = read("[photo:painting:0.5] of a cat AND a dog", 20)
    assert [[(f.text, f.weight) for f in text] for text in reading.texts] == [
        [("photo of a cat", 1.0)], [("painting of a cat", 1.0)], [(" a dog", 1.0)]]  # each subprompt's schedule


@pytest.mark.parametrize(("prompt", "steps", "expected"), [
    ("[cat:dog:0]", 20, "dog"),  # switches before step 1: to runs from the first step
    ("[cat:dog:0.01]", 20, "dog"),  # 0.2 of a step rounds down to step 0
    ("[cat:dog:0.01]", 100, "cat"),  # step 1
    ("[cat:dog:0.5]", 1, "dog"),  # half of one step: 0
    ("[cat:dog:1]", 20, "cat"),
    ("[cat:dog:1.0]", 20, "cat"),  # with a point: a fraction, all of the steps
    ("[cat:dog:-3]", 20, "dog"),
    ("[dog:0]", 20, "dog"),  # [to:when]: nothing until when, which is before the first step
    ("[dog:0.5]", 20, ""),
    ("[dog:1]", 20, ""),
])
def test_the_first_step_reads_when_as_a1111_does(prompt, steps, expected):
    """A1111 switches after step int(when), ``when`` a fraction of the steps when written with a point, else a
    step number; the first step runs ``from`` when that step is 1 or later."""
    assert first_step(prompt, steps) == expected


def a1111(prompt: str, steps: int = 10, first_pass: int | None = None) -> list[list]:
    return [list(entry) for entry in schedule(prompt, steps, "prompt", first_pass)]


@pytest.mark.parametrize(("prompt", "expected"), [
    ("test", [[10, "test"]]),
    ("a [b:3]", [[3, "a "], [10, "a b"]]),
    ("a [b: 3]", [[3, "a "], [10, "a b"]]),
    ("a [[[b]]:2]", [[2, "a "], [10, "a [[b]]"]]),
    ("[(a:2):3]", [[3, ""], [10, "(a:2)"]]),
    ("a [b : c : 1] d", [[1, "a b  d"], [10, "a  c  d"]]),
    ("a[b:[c:d:2]:1]e", [[1, "abe"], [2, "ace"], [10, "ade"]]),
    ("a [unbalanced", [[10, "a [unbalanced"]]),
    ("a [b:.5] c", [[5, "a  c"], [10, "a b c"]]),
    ("a [{b|d{:.5] c", [[5, "a  c"], [10, "a {b|d{ c"]]),
    ("((a][:b:c [d:3]", [[3, "((a][:b:c "], [10, "((a][:b:c d"]]),
    ("[a|(b:1.1)]", [[1, "a"], [2, "(b:1.1)"], [3, "a"], [4, "(b:1.1)"], [5, "a"], [6, "(b:1.1)"], [7, "a"],
                     [8, "(b:1.1)"], [9, "a"], [10, "(b:1.1)"]]),
    ("[fe|]male", [[1, "female"], [2, "male"], [3, "female"], [4, "male"], [5, "female"], [6, "male"],
                   [7, "female"], [8, "male"], [9, "female"], [10, "male"]]),
    ("[fe|||]male", [[1, "female"], [2, "male"], [3, "male"], [4, "male"], [5, "female"], [6, "male"],
                     [7, "male"], [8, "male"], [9, "female"], [10, "male"]]),
])
def test_schedules_match_a1111s_doctests(prompt, expected):
    """A1111 1.10's modules/prompt_parser.py doctests for get_learned_conditioning_prompt_schedules, 10 steps."""
    assert a1111(prompt) == expected


def test_the_hires_pass_schedules_on_from_the_first():
    """A1111's own doctests with a first pass of 10 steps: a fraction past 1 spans the second pass, one under 1
    has switched already; a step number counts on from the first pass's steps."""
    assert a1111("a [b:.5] c", 10, first_pass=10) == [[10, "a b c"]]
    assert a1111("a [b:1.5] c", 10, first_pass=10) == [[5, "a  c"], [10, "a b c"]]
    assert a1111("[cat:dog:14]", 10, first_pass=10) == [[4, "cat"], [10, "dog"]]
    assert a1111("[cat:dog:6]", 10, first_pass=10) == [[10, "dog"]]


def test_the_comment_example_of_a1111s_parser():
    prompt = ("fantasy landscape with a [mountain:lake:0.25] and [an oak:a christmas tree:0.75][ in foreground::0.6]"
              "[ in background:0.25] [shoddy:masterful:0.5]")
    assert a1111(prompt, 100) == [
        [25, "fantasy landscape with a mountain and an oak in foreground shoddy"],
        [50, "fantasy landscape with a lake and an oak in foreground in background shoddy"],
        [60, "fantasy landscape with a lake and an oak in foreground in background masterful"],
        [75, "fantasy landscape with a lake and an oak in background masterful"],
        [100, "fantasy landscape with a lake and a christmas tree in background masterful"]]


def test_each_model_evaluation_takes_the_first_entry_ending_at_or_after_its_count():
    """A1111's reconstruct_cond_batch: its denoiser counts evaluations from 0 against end steps counted from 1,
    so the first two evaluations both run the first entry and a switch at step 5 comes at the seventh."""
    ends = [end for end, _ in schedule("[cat:dog:5]", 10)]
    assert [current(ends, k) for k in range(10)] == [0] * 6 + [1] * 4
    ends = [end for end, _ in schedule("[a|b]", 4)]
    assert [current(ends, k) for k in range(4)] == [0, 0, 1, 2]  # a, a, b, a


# --- what is refused ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("prompt", [
    "[" * 1000 + "a" + "|b]" * 1000,  # nested alternations: a recursion per bracket before
    "[" * 10_000,  # a rescan to the end per bracket before: seconds
    "(" * 10_000 + "a",
    "(a" * 5000,
])
def test_deep_brackets_are_refused_at_once_naming_the_field(prompt):
    started = time.perf_counter()
    for field in ("prompt", "negative_prompt"):
        with pytest.raises(InvalidInput, match=f"more than {MAX_NESTING} brackets") as refused:
            read(prompt, 20, field)
        assert refused.value.field == field
    assert time.perf_counter() - started < 0.5


def test_a_long_prompt_of_brackets_within_the_cap_reads_in_linear_time():
    nested = "[" * MAX_NESTING + "a:b:0.5" + "]" * MAX_NESTING
    emphasis = "(" * MAX_NESTING + "a" + ")" * MAX_NESTING
    for unit in (nested, "[a|" * 30 + "b" + "]" * 30, "(a" * 30 + "b" + ")" * 30, emphasis, "a:(b:1.1) [c]"):
        prompt = (unit * (10_000 // len(unit) + 1))[:10_000]
        started = time.perf_counter()
        read(prompt + " ", 20)  # a text the cache has not seen
        assert time.perf_counter() - started < 0.5, unit


@pytest.mark.parametrize(("prompt", "match"), [
    ("(a:" + "1" + "0" * 39 + ")", "outside"),  # 1e39: finite in float64, not in float32
    ("(a:" + "9" * 400 + ")", "outside"),  # inf in float64
    ("(a:100.5)", "outside"),
    ("(a:-101)", "outside"),
    ("((a:90):1.2)", "multiply"),  # 108
    ("(" * 25 + "(a:20)" + ")" * 25, "multiply"),  # 1.1**25 * 20 = 217
])
def test_a_weight_beyond_the_cap_is_refused(prompt, match):
    with pytest.raises(InvalidInput, match=match) as refused:
        read(prompt, 20, "negative_prompt")
    assert refused.value.field == "negative_prompt"
    assert pairs("(a:100) (b:-100)")[0] == ("a", 100.0)  # the cap itself is accepted


def test_the_ingress_check_counts_chunks_from_below_without_a_tokenizer():
    assert check("BREAK " * MAX_CHUNKS, 20).least_chunks() == MAX_CHUNKS
    assert check(" ".join(["cat"] * (MAX_CHUNKS * CHUNK_TOKENS)), 20).least_chunks() == MAX_CHUNKS
    for prompt in ("BREAK " * 1600, "BREAK " * (MAX_CHUNKS + 1), " ".join(["cat"] * (MAX_CHUNKS * CHUNK_TOKENS + 1))):
        with pytest.raises(InvalidInput, match=f"more than {MAX_CHUNKS} chunks") as refused:
            check(prompt, 20, "negative_prompt")
        assert refused.value.field == "negative_prompt"
    assert check(", , , \u0301 " * 2000, 20).least_chunks() == 1  # no word that is surely a token


def test_the_parse_is_cached():
    prompt = "a (cached:1.2) prompt"
    assert read(prompt, 20) is read(prompt, 20)
    assert read(prompt, 20) is not read(prompt, 20, "negative_prompt")


# --- chunking ------------------------------------------------------------------------------------------------------

COMMA = 0


def sizes(chunks: list[Chunk]) -> list[int]:
    return [len(c.tokens) for c in chunks]


def test_long_token_runs_split_into_chunks_of_75_with_their_weights():
    chunks = chunk([(list(range(1, 121)), 1.0), (list(range(121, 201)), 1.5)], COMMA)
    assert sizes(chunks) == [75, 75, 50]
    assert chunks[1].tokens[:2] == [76, 77] and chunks[2].tokens[-1] == 200
    assert chunks[1].weights == [1.0] * 45 + [1.5] * 30
    assert sizes(chunk([([], 1.0)], COMMA)) == [0]  # the empty prompt: one empty chunk


def test_break_ends_a_chunk_even_an_empty_one():
    a, b = (list(range(1, 11)), 1.0), (list(range(11, 16)), 1.0)
    assert sizes(chunk([a, None, b], COMMA)) == [10, 5]
    assert sizes(chunk([None, a], COMMA)) == [0, 10]
    assert sizes(chunk([a, None], COMMA)) == [10]
    assert sizes(chunk([(list(range(1, 76)), 1.0), None, b], COMMA)) == [75, 5]  # a full chunk is not split twice


@pytest.mark.parametrize(("at", "expected"), [(70, [71, 14]), (55, [56, 29]), (54, [75, 10]), (74, [75, 10])])
def test_words_after_a_late_comma_move_to_the_next_chunk(at, expected):
    """A comma at index ``at`` of 85 tokens: within the chunk's last 20 tokens (index 55 or later), the tokens after
    it move on; at index 74 it ends the chunk and nothing need move."""
    tokens = [COMMA if i == at else 100 + i for i in range(85)]
    chunks = chunk([(tokens, 1.2)], COMMA)
    assert sizes(chunks) == expected
    assert [t for c in chunks for t in c.tokens] == tokens  # nothing lost or reordered
    if expected[0] < 75:
        assert chunks[0].tokens[-1] == COMMA and chunks[1].weights == [1.2] * expected[1]


def test_no_backtrack_without_a_comma_token():
    assert sizes(chunk([(list(range(1, 86)), 1.0)], None)) == [75, 10]


# --- encoding on the tiny models -----------------------------------------------------------------------------------

NAMES = ("prompt_embeds", "negative_prompt_embeds", "pooled_prompt_embeds", "negative_pooled_prompt_embeds")


@pytest.fixture(scope="module")
def pipe(base):
    return base.checkpoint().txt2img


def encoded(pipe, prompts, negatives=None, steps=20):
    from deployments.support.prompts import PromptEncoder

    return PromptEncoder(pipe)(prompts, negatives, steps)


def tokens(pipe, text: str) -> int:
    return len(pipe.tokenizer(text, add_special_tokens=False).input_ids)


@pytest.mark.parametrize("negative", [None, "blurry, lowres"])
def test_a_plain_short_prompt_encodes_as_the_pipeline_does(pipe, negative):
    import torch

    ours = encoded(pipe, ["a photo of a cat, red"], [negative] if negative else None)
    theirs = pipe.encode_prompt("a photo of a cat, red", device=pipe.device, negative_prompt=negative)
    for name, expected in zip(NAMES, theirs, strict=True):
        torch.testing.assert_close(ours[name], expected, rtol=0, atol=1e-6)
    assert ours["prompt_embeds"].shape == (1, 77, 80)


def test_the_refiner_reads_with_its_one_encoder_as_its_pipeline_does(refiner):
    import torch

    ours = encoded(refiner.pipe, ["a photo of a cat"], None)
    theirs = refiner.pipe.encode_prompt("a photo of a cat", device=refiner.pipe.device, negative_prompt=None)
    for name, expected in zip(NAMES, theirs, strict=True):
        torch.testing.assert_close(ours[name], expected, rtol=0, atol=1e-6)
    assert ours["prompt_embeds"].shape == (1, 77, 48)  # bigG alone: its width


def test_a_weight_scales_only_its_tokens_before_the_mean_is_restored(pipe):
    import torch

    plain = encoded(pipe, ["a word b"])
    weighted = encoded(pipe, ["a (word:1.5) b"])
    start = 1 + tokens(pipe, "a ")
    stop = start + tokens(pipe, "word")
    factors = torch.ones(77)
    factors[start:stop] = 1.5
    for cut in (slice(0, 32), slice(32, 80)):  # each encoder (CLIP-L 32 wide, bigG 48) rescaled on its own
        states = plain["prompt_embeds"][0, :, cut]
        scaled = states * factors[:, None]
        expected = scaled * (states.mean() / scaled.mean())
        torch.testing.assert_close(weighted["prompt_embeds"][0, :, cut], expected, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(weighted["prompt_embeds"], plain["prompt_embeds"])
    assert torch.equal(weighted["pooled_prompt_embeds"], plain["pooled_prompt_embeds"])  # pooled: unweighted


def test_a_200_token_prompt_is_three_chunks_none_truncated(pipe):
    import torch

    long = " ".join(["a"] * 200)
    assert tokens(pipe, long) == 200
    whole = encoded(pipe, [long])["prompt_embeds"]
    assert whole.shape == (1, 3 * 77, 80)
    # The third chunk holds the last 50 tokens: a prompt of 150 ends with an empty chunk there instead.
    shorter = encoded(pipe, [" ".join(["a"] * 150)])["prompt_embeds"]
    assert shorter.shape == (1, 2 * 77, 80)
    assert torch.equal(shorter[0, :154], whole[0, :154])
    assert encoded(pipe, [" ".join(["a"] * 150) + " BREAK"])["prompt_embeds"].shape == shorter.shape  # chunk full
    assert not torch.allclose(encoded(pipe, [""])["prompt_embeds"][0], whole[0, 154:])


def test_break_starts_a_chunk_encoded_as_a_prompt_of_its_own(pipe):
    import torch

    both = encoded(pipe, ["a cat BREAK a dog"])["prompt_embeds"]
    assert both.shape == (1, 154, 80)
    assert torch.equal(both[:, :77], encoded(pipe, ["a cat"])["prompt_embeds"])
    assert torch.equal(both[:, 77:], encoded(pipe, ["a dog"])["prompt_embeds"])


def test_a_shorter_prompt_repeats_its_last_vector_and_negatives_keep_their_own_length(pipe):
    """As A1111 1.10 stacks a batch's conditionings (``stack_conds``): a prompt shorter than the batch's longest
    repeats its last vector. A negative prompt keeps its own length (A1111 runs it in a UNet call of its own): the
    pipeline's rows hold it padded with the empty prompt's chunks, and ``lengths`` says what the UNet reads."""
    import torch

    from deployments.support.prompts import PromptEncoder

    long = " ".join(["a"] * 100)
    c = PromptEncoder(pipe).scheduled(["a cat", long], ["blurry", "blurry"], 20)
    out = c.at(0)
    assert out["prompt_embeds"].shape == out["negative_prompt_embeds"].shape == (2, 154, 80)
    assert c.lengths == (154, 77)
    cat = encoded(pipe, ["a cat"])["prompt_embeds"]
    assert torch.equal(out["prompt_embeds"][0, :77], cat[0])
    assert torch.equal(out["prompt_embeds"][0, 77:], cat[0, 76:].expand(77, -1))
    empty = encoded(pipe, [""])["prompt_embeds"]
    # Batched and single passes may round apart in the last bits on CPU.
    torch.testing.assert_close(out["negative_prompt_embeds"][1, 77:], empty[0], rtol=0, atol=1e-5)
    zeros = encoded(pipe, [long], None)  # no negative on a force_zeros checkpoint: zeros, as many chunks
    assert zeros["negative_prompt_embeds"].shape == (1, 154, 80) and not zeros["negative_prompt_embeds"].any()


def test_chunks_past_the_cap_are_refused_by_the_replicas_count(pipe):
    """One word of commas passes the ingress's lower bound; the tokenizers count its 800 tokens."""
    from deployments.support.prompts import PromptEncoder

    encoder = PromptEncoder(pipe)
    assert encoder.counts("a cat", "", 20) == (1, 0)
    assert encoder.counts("a cat BREAK a dog", "blurry", 20) == (2, 1)
    wordy = "a," * 400
    assert check(wordy, 20).least_chunks() == 1
    with pytest.raises(InvalidInput, match=f"more than {MAX_CHUNKS}") as refused:
        encoder.counts("a cat", wordy, 20)
    assert refused.value.field == "negative_prompt"


def test_non_finite_embeddings_are_an_error_not_an_image(pipe, monkeypatch):
    import torch

    from deployments.support import prompts

    monkeypatch.setattr(prompts, "_emphasised", lambda hidden, weights: torch.full_like(hidden, float("inf")))
    with pytest.raises(InvalidInput, match="non-finite") as refused:
        encoded(pipe, ["a cat"], ["(blurry:2)"])
    assert refused.value.field == "negative_prompt"
    encoded(pipe, ["a cat"])  # no weight: no rescale


def test_the_comma_is_looked_up_once_per_tokenizer(pipe, monkeypatch):
    from deployments.support import prompts

    calls = []
    for tokenizer in (pipe.tokenizer, pipe.tokenizer_2):
        vocab = tokenizer.get_vocab
        monkeypatch.setattr(tokenizer, "get_vocab", lambda vocab=vocab: calls.append(1) or vocab())
    monkeypatch.setattr(prompts, "_COMMAS", prompts.weakref.WeakKeyDictionary())
    encoded(pipe, ["a cat, red", "a dog, blue"], ["blurry", "dark"])
    encoded(pipe, ["a bird"])
    assert len(calls) == 2


# --- the base's pixels ---------------------------------------------------------------------------------------------

# A high guidance scale: the tiny model's random text conditioning moves few pixels, and this spreads them. Where
# the reading is the same the pixels are equal to the bit, so any difference at all is the syntax's doing; the
# thresholds below are a few times under what each case measures.
SMALL = dict(prompt="a photo of a cat", width=64, height=64, steps=4, guidance_scale=12.0, seed=11)
SEEN = 0.01  # mean grey levels: what a change of reading moves at least (0.027 measured for emphasis)


def image(base, **kw) -> np.ndarray:
    return pixels(base.generate(GenerationRequest(**{**SMALL, **kw})).images[0])


@pytest.mark.parametrize("extra", [{}, {"negative_prompt": "blurry"}, {"prompt": "a cat <lora:tiny-detail:0.8>"},
                                   {"init_image": Image.new("RGB", (64, 64), (90, 140, 200)), "strength": 0.6}])
def test_a_plain_a1111_prompt_gives_the_same_pixels_as_before(base, extra):
    """The LoRA case: tiny-detail patches both text encoders, which the A1111 reading calls with its adapters set;
    the image-to-image pipeline reads as the text-to-image one."""
    assert np.array_equal(image(base, **extra), image(base, prompt_syntax="a1111", **extra))


def test_emphasis_changes_the_pixels(base):
    word = image(base, prompt="a cat", prompt_syntax="a1111")
    assert np.abs(image(base, prompt="a (cat:1.4)", prompt_syntax="a1111") - word).mean() > SEEN
    assert np.array_equal(image(base, prompt="a (cat:1)", prompt_syntax="a1111"), word)


def test_a_long_prompts_tail_changes_the_image_only_when_read_in_chunks(base):
    head = ", ".join(["a photo of a cat"] * 25)
    tail = head + ", on a red chair by the window"
    assert np.array_equal(image(base, prompt=head), image(base, prompt=tail))  # plain: truncated at 77
    assert np.abs(image(base, prompt=head, prompt_syntax="a1111")
                  - image(base, prompt=tail, prompt_syntax="a1111")).mean() > SEEN


def a1111_image(base, **kw) -> np.ndarray:
    return image(base, prompt_syntax="a1111", **kw)


def test_prompt_editing_switches_the_prompt_during_sampling_without_a_warning(base):
    """Over 4 steps ``when`` 1 switches at A1111's third evaluation: two steps of each, unlike either alone."""
    edited = base.generate(GenerationRequest(**{**SMALL, "prompt": "a [cat:dog:1]", "prompt_syntax": "a1111"}))
    assert edited.warnings == []
    both = pixels(edited.images[0])
    for alone in ("a cat", "a dog"):
        assert np.abs(both - a1111_image(base, prompt=alone)).mean() > SEEN / 4, alone
    assert np.array_equal(a1111_image(base, prompt="a [cat:dog:0.25]"), both)  # a quarter of 4 steps: step 1


@pytest.mark.parametrize(("prompt", "same_as"), [
    ("a [cat:dog:0]", "a dog"),
    ("a [cat:dog:1.0]", "a cat"),
    ("a [cat:dog:3]", "a cat"),  # A1111 counts evaluations from 0: the 4th runs the text of step 3
    ("a [cat|cat]", "a cat"),  # a schedule whose text never changes changes nothing
    ("a [:cat:0]", "a cat"),
])
def test_prompt_editing_reads_when_as_a1111s_denoiser_counts(base, prompt, same_as):
    assert np.array_equal(a1111_image(base, prompt=prompt), a1111_image(base, prompt=same_as))


def test_alternation_changes_the_prompt_from_step_to_step(base):
    swapped = a1111_image(base, prompt="a [cat|dog]")  # cat, cat, dog, cat
    assert np.abs(swapped - a1111_image(base, prompt="a cat")).mean() > SEEN / 4
    assert not np.array_equal(swapped, a1111_image(base, prompt="a [dog|cat]"))


def test_the_negative_prompt_has_its_schedule_too(base):
    edited = a1111_image(base, negative_prompt="[blurry:dark:1]")
    for alone in ("blurry", "dark"):
        assert np.abs(edited - a1111_image(base, negative_prompt=alone)).mean() > SEEN / 4, alone
    assert np.array_equal(a1111_image(base, negative_prompt="[blurry:dark:0]"),
                          a1111_image(base, negative_prompt="dark"))


def test_a_second_order_sampler_schedules_over_twice_the_steps(base):
    """A1111 counts Heun's two evaluations a step: over 4 steps, 8, so step 3 is in the second step."""
    heun = {"sampler": "Heun"}
    cat = a1111_image(base, prompt="a cat", **heun)
    assert np.array_equal(a1111_image(base, prompt="a [cat:dog:7]", **heun), cat)
    assert not np.array_equal(a1111_image(base, prompt="a [cat:dog:3]", **heun), cat)


def test_image_to_image_counts_from_the_first_step_that_runs(base):
    """A1111 schedules over all the steps asked for and counts from 0 at the first that runs: at strength 0.75 of
    4 steps, three run, and ``when`` 2 never switches."""
    init = {"init_image": Image.new("RGB", (64, 64), (90, 140, 200)), "strength": 0.75}
    cat = a1111_image(base, prompt="a cat", **init)
    assert np.array_equal(a1111_image(base, prompt="a [cat:dog:2]", **init), cat)
    assert np.abs(a1111_image(base, prompt="a [cat:dog:1]", **init) - cat).mean() > SEEN / 4


def test_items_with_different_schedules_share_a_batch_each_with_its_own_pixels(base):
    from deployments.sdxl_base import batch_key, chunk_counts
    from deployments.support.generation import BatchItem

    pipe = base.checkpoint()
    requests = [GenerationRequest(**{**SMALL, "prompt": p, "prompt_syntax": "a1111"})
                for p in ("a [cat:dog:1]", "a [dog|bird]", "a cat")]
    assert len({batch_key(r, chunk_counts(pipe, r)) for r in requests}) == 1
    together = base.generate_batch([BatchItem(r, f"r{i}") for i, r in enumerate(requests)])
    for alone, result in zip(requests, together, strict=True):
        # Batched and single convolutions may round differently on CPU: allow two grey levels.
        assert np.abs(pixels(result.images[0]) - pixels(base.generate(alone).images[0])).max() <= 2


def test_requests_needing_different_chunk_counts_never_share_a_batch(base):
    """A batch pads every text to its most chunks, so the batching key holds each request's own counts: a short
    prompt never runs padded beside a long one, and a batch's items get the pixels they get alone."""
    from deployments.sdxl_base import batch_key, chunk_counts
    from deployments.support.generation import BatchItem

    pipe = base.checkpoint()
    quick = {**SMALL, "steps": 2, "guidance_scale": 5.0, "prompt_syntax": "a1111"}
    short, other, long = (GenerationRequest(**{**quick, "prompt": p}) for p in ("a cat", "a red dog", "a " * 160))

    def key(request: GenerationRequest) -> tuple | None:
        return batch_key(request, chunk_counts(pipe, request))

    assert [chunk_counts(pipe, r) for r in (short, other, long)] == [(1, 0), (1, 0), (3, 0)]
    assert key(short) == key(other) != key(long)
    assert key(short.model_copy(update={"negative_prompt": "blurry"})) != key(
        short.model_copy(update={"negative_prompt": "blurry BREAK dark"}))
    assert chunk_counts(pipe, short.model_copy(update={"prompt_syntax": "plain"})) is None
    together = base.generate_batch([BatchItem(r, f"r{i}") for i, r in enumerate([short, other])])
    for alone, result in zip([short, other], together, strict=True):
        # Batched and single convolutions may round differently on CPU: allow two grey levels.
        assert np.abs(pixels(result.images[0]) - pixels(base.generate(alone).images[0])).max() <= 2


def test_a_prompt_that_cannot_be_read_fails_its_own_request_alone(base):
    from deployments.support.generation import BatchItem

    quick = {**SMALL, "steps": 2, "prompt_syntax": "a1111"}
    good = GenerationRequest(**quick)
    bad = [GenerationRequest(**{**quick, "prompt": "[" * 1000 + "a" + "|b]" * 1000}),
           GenerationRequest(**{**quick, "negative_prompt": "(a:" + "9" * 400 + ")"}),
           GenerationRequest(**{**quick, "prompt": "a," * 400})]  # past the chunk cap by the tokenizers' count
    outcomes = base.generate_batch([BatchItem(r, f"r{i}") for i, r in enumerate([*bad, good])])
    for outcome, field in zip(outcomes, ["prompt", "negative_prompt", "prompt"], strict=False):
        assert isinstance(outcome, InvalidInput) and outcome.field == field
    assert isinstance(outcomes[-1], StageResult)
    assert np.array_equal(pixels(outcomes[-1].images[0]), pixels(base.generate(good).images[0]))


def test_prompt_editing_that_switches_before_the_first_step_runs_its_second_part(base):
    assert np.array_equal(image(base, prompt="a [cat:dog:0]", prompt_syntax="a1111"), image(base, prompt="a dog"))


def test_the_latent_hires_pass_reads_the_same_syntax(base):
    from deployments.support.generation import LatentHires

    hires = LatentHires(width=96, height=96, steps=2, strength=0.5)
    plain = image(base, prompt="a cat", hires=hires)
    assert np.array_equal(image(base, prompt="a cat", hires=hires, prompt_syntax="a1111"), plain)
    assert not np.array_equal(image(base, prompt="a (cat:1.5)", hires=hires, prompt_syntax="a1111"),
                              image(base, prompt="a cat", hires=hires, prompt_syntax="a1111"))


def test_the_hires_pass_schedules_its_own_steps_on_from_the_first(base):
    """A1111 recomputes the schedule for the second pass: a step number counts on from the first pass's 4 steps,
    and a fraction from 1.0 to 2.0 spans the second pass."""
    from deployments.support.generation import LatentHires

    hires = LatentHires(width=96, height=96, steps=4, strength=0.5)
    cat, dog = (a1111_image(base, prompt=p, hires=hires) for p in ("a cat", "a dog"))
    assert np.array_equal(a1111_image(base, prompt="a [cat:dog:2.0]", hires=hires), cat)
    assert np.array_equal(a1111_image(base, prompt="a [cat:dog:0]", hires=hires), dog)
    assert np.array_equal(a1111_image(base, prompt="a [cat:dog:1.5]", hires=hires),
                          a1111_image(base, prompt="a [cat:dog:6]", hires=hires))  # step 2 of the second pass
    switched = a1111_image(base, prompt="a [cat:dog:4]", hires=hires)  # cat first, dog second
    for alone in (cat, dog):
        assert np.abs(switched - alone).mean() > SEEN / 4


def test_the_refiner_reads_the_same_syntax(refiner):
    source = StageResult(images=[Image.new("RGB", (64, 64), (128, 128, 128))], seeds=[3])

    def refined(prompt: str, syntax: str) -> np.ndarray:
        request = RefineRequest(prompt=prompt, steps=4, strength=0.5, prompt_syntax=syntax)
        return pixels(refiner.refine_images(request, source).images[0])

    assert np.array_equal(refined("a cat", "plain"), refined("a cat", "a1111"))
    assert np.abs(refined("a (cat:1.6)", "a1111") - refined("a cat", "a1111")).mean() > SEEN


def test_the_refiner_refuses_an_unreadable_prompt_for_its_request_alone(refiner):
    from deployments.support.generation import BatchItem

    source = StageResult(images=[Image.new("RGB", (64, 64), (128, 128, 128))], seeds=[3])
    requests = [RefineRequest(prompt=p, steps=2, strength=0.5, prompt_syntax="a1111")
                for p in ("(" * 100, "BREAK " * 9, "a cat")]
    outcomes = refiner.refine_batch([BatchItem(r, f"r{i}", source=source) for i, r in enumerate(requests)],
                                    ensemble=False)
    assert [type(o) for o in outcomes] == [InvalidInput, InvalidInput, StageResult]
    assert refiner.chunk_counts(requests[2]) == (1, 0)
