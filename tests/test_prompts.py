"""A1111's prompt syntax: the parser and the chunking on plain values, the encoder on the tiny SDXL base and refiner
against the pipelines' own ``encode_prompt``, and the base's pixels for A1111 requests."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from deployments.support.generation import GenerationRequest, RefineRequest, StageResult
from deployments.support.prompts import (
    AND_WARNING,
    EDITING_WARNING,
    Chunk,
    chunk,
    first_step,
    parse_emphasis,
    read,
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
    # "(a: 2)": a space before the number makes it text, and the bracket a plain 1.1.
    assert pairs("time: 10:30 (a: 2) b:3)") == [("time: 10:30 ", 1.0), ("a: 2", 1.1), (" b:3)", 1.0)]


def test_break_is_an_upper_case_word_of_its_own():
    assert pairs("a, b BREAK c BREAKfast break (d BREAK e:1.3)") == [
        ("a, b", 1.0), ("BREAK", None), ("c BREAKfast break ", 1.0), ("d", 1.3), ("BREAK", None), ("e", 1.3)]
    assert pairs("") == [("", 1.0)]


def test_prompt_editing_and_alternation_run_as_at_their_first_step():
    assert first_step("a [dog:cat:0.5] in a (hat:1.2)") == ("a dog in a (hat:1.2)", True)
    assert first_step("[cat:10] on a [red|green|blue] mat") == (" on a red mat", True)
    assert first_step("a[b:[c:d:2]:0.3]e") == ("abe", True)  # nested: the outer's from, read in turn
    assert first_step("([a:b:0.5]:1.2) x") == ("(a:1.2) x", True)  # inside emphasis, which stays
    assert first_step("[(x:2)] [y] [p:q:r] [open") == ("[(x:2)] [y] [p:q:r] [open", False)
    reading = read("[photo:painting:0.5] of a cat AND a dog")
    assert [(f.text, f.weight) for f in reading.fragments] == [("photo of a cat AND a dog", 1.0)]
    assert reading.warnings == [EDITING_WARNING, AND_WARNING]
    assert read("(cat:1.2) [dog]").warnings == []


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


def encoded(pipe, prompts, negatives=None):
    from deployments.support.prompts import PromptEncoder

    return PromptEncoder(pipe)(prompts, negatives)


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


def test_prompts_and_negatives_are_padded_to_the_most_chunks_with_empty_prompt_chunks(pipe):
    import torch

    long = " ".join(["a"] * 100)
    out = encoded(pipe, ["a cat", long], ["blurry", "blurry"])
    assert out["prompt_embeds"].shape == out["negative_prompt_embeds"].shape == (2, 154, 80)
    empty = encoded(pipe, [""])["prompt_embeds"]
    # Batched and single passes may round apart in the last bits on CPU.
    torch.testing.assert_close(out["prompt_embeds"][0, 77:], empty[0], rtol=0, atol=1e-5)
    torch.testing.assert_close(out["negative_prompt_embeds"][1, 77:], empty[0], rtol=0, atol=1e-5)
    zeros = encoded(pipe, [long], None)  # no negative on a force_zeros checkpoint: zeros, as many chunks
    assert zeros["negative_prompt_embeds"].shape == (1, 154, 80) and not zeros["negative_prompt_embeds"].any()


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


def test_prompt_editing_runs_its_first_part_with_a_warning(base):
    edited = base.generate(GenerationRequest(**{**SMALL, "prompt": "a [dog:cat:0.5]", "prompt_syntax": "a1111"}))
    assert EDITING_WARNING in edited.warnings
    assert np.array_equal(pixels(edited.images[0]), image(base, prompt="a dog"))
    assert EDITING_WARNING not in base.generate(GenerationRequest(**SMALL, prompt_syntax="a1111")).warnings


def test_a_batch_pads_every_item_to_its_most_chunks_with_empty_prompt_chunks(base):
    """In one pipeline call the short prompt is read with two empty chunks after its own, as three BREAKs read it
    alone; the long one as it is."""
    from deployments.support.generation import BatchItem

    quick = {**SMALL, "steps": 2, "guidance_scale": 5.0, "prompt_syntax": "a1111"}
    requests = [GenerationRequest(**{**quick, "prompt": p}) for p in ("a cat", " ".join(["a"] * 160))]
    together = base.generate_batch([BatchItem(r, f"r{i}") for i, r in enumerate(requests)])
    padded = GenerationRequest(**{**quick, "prompt": "a cat BREAK BREAK BREAK"})
    for alone, result in zip([padded, requests[1]], together, strict=True):
        # Batched and single convolutions may round differently on CPU: allow two grey levels.
        assert np.abs(pixels(result.images[0]) - pixels(base.generate(alone).images[0])).max() <= 2


def test_the_latent_hires_pass_reads_the_same_syntax(base):
    from deployments.support.generation import LatentHires

    hires = LatentHires(width=96, height=96, steps=2, strength=0.5)
    plain = image(base, prompt="a cat", hires=hires)
    assert np.array_equal(image(base, prompt="a cat", hires=hires, prompt_syntax="a1111"), plain)
    assert not np.array_equal(image(base, prompt="a (cat:1.5)", hires=hires, prompt_syntax="a1111"),
                              image(base, prompt="a cat", hires=hires, prompt_syntax="a1111"))


def test_the_refiner_reads_the_same_syntax(refiner):
    source = StageResult(images=[Image.new("RGB", (64, 64), (128, 128, 128))], seeds=[3])

    def refined(prompt: str, syntax: str) -> np.ndarray:
        request = RefineRequest(prompt=prompt, steps=4, strength=0.5, prompt_syntax=syntax)
        return pixels(refiner.refine_images(request, source).images[0])

    assert np.array_equal(refined("a cat", "plain"), refined("a cat", "a1111"))
    assert np.abs(refined("a (cat:1.6)", "a1111") - refined("a cat", "a1111")).mean() > SEEN
