"""A1111's composable diffusion (``AND``): the split into weighted subprompts on plain strings, the guidance
``Composed`` gives on a stand-in UNet whose every row can be computed by hand, and the base's pixels on the tiny
SDXL model."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from deployments.support.composable import Composed, composing
from deployments.support.errors import GenerationCancelled, InvalidInput
from deployments.support.generation import BatchItem, GenerationRequest, StageResult
from deployments.support.prompts import (
    MAX_SUBPROMPTS,
    MAX_WEIGHT,
    Conditioning,
    PromptEncoder,
    Subprompt,
    check,
    read,
    subprompts,
)
from tests.helpers import centre_square, pixels

# --- the split -----------------------------------------------------------------------------------------------------


def test_and_splits_the_prompt_into_subprompts_each_with_its_trailing_weight():
    assert subprompts("a cat AND a dog :0.5 AND (red:1.2) sky") == (
        Subprompt("a cat"), Subprompt(" a dog", 0.5), Subprompt(" (red:1.2) sky"))  # an emphasis is no weight
    assert subprompts("a cat") == (Subprompt("a cat"),)


@pytest.mark.parametrize(("prompt", "expected"), [
    ("a cat :1.5", [("a cat", 1.5)]),  # read with no AND at all, as A1111 does
    ("a cat:2", [("a cat", 2.0)]),
    ("a cat : -0.5", [("a cat", -0.5)]),
    ("a cat:+.25 ", [("a cat", 0.25)]),
    ("a cat:1.", [("a cat", 1.0)]),
    ("at 10:30", [("at 10", 30.0)]),  # A1111 reads a time so too
    ("a cat:1e3", [("a cat:1e3", 1.0)]),  # not a number of its grammar: text
    ("a cat:", [("a cat:", 1.0)]),
    ("a\ncat :2", [("a\ncat", 2.0)]),  # after a line break too: A1111 1.10's pattern crosses lines
    ("a cat\n:2\n", [("a cat", 2.0)]),
    ("x AND", [("x", 1.0), ("", 1.0)]),
    ("ANDROID and sAND AND b", [("ANDROID and sAND", 1.0), (" b", 1.0)]),  # AND as its own upper-case word alone
])
def test_a_subprompts_weight_is_read_as_a1111s_pattern_reads_it(prompt, expected):
    assert [(p.text, p.weight) for p in subprompts(prompt)] == expected


@pytest.mark.parametrize("field", ["negative_prompt", "hr_negative_prompt"])
def test_and_in_a_negative_prompt_is_text(field):
    assert subprompts("blurry AND dark :2", field) == (Subprompt("blurry AND dark :2"),)
    assert [[f.text for f in text] for text in read("blurry AND dark :2", 20, field).texts] == [
        ["blurry AND dark :2"]]


def test_every_subprompt_has_its_own_schedule_and_emphasis():
    reading = read("a [cat:dog:0.5] :0.8 AND (sky:1.5)", 20)
    assert reading.parts == (Subprompt("a [cat:dog:0.5]", 0.8), Subprompt(" (sky:1.5)"))
    assert [[(f.text, f.weight) for f in text] for text in reading.texts] == [
        [("a cat", 1.0)], [("a dog", 1.0)], [(" ", 1.0), ("sky", 1.5)]]


@pytest.mark.parametrize("field", ["prompt", "hr_prompt"])
def test_too_many_subprompts_or_too_large_a_weight_are_refused_naming_the_field(field):
    assert len(subprompts(" AND ".join(["a"] * MAX_SUBPROMPTS), field)) == MAX_SUBPROMPTS
    refusals = [" AND ".join(["a"] * (MAX_SUBPROMPTS + 1)), f"a :{MAX_WEIGHT * 1.01}", "a AND b :-101",
                "a :" + "9" * 400]
    for prompt in refusals:
        with pytest.raises(InvalidInput) as refused:
            check(prompt, 20, field)
        assert refused.value.field == field, prompt
    assert check(f"a :{MAX_WEIGHT:g} AND b :-{MAX_WEIGHT:g}", 20, field).parts[1].weight == -MAX_WEIGHT


# --- the guidance, on a stand-in UNet ------------------------------------------------------------------------------

class RowUNet:
    """A UNet whose output for a row is a fixed function of that row's inputs alone, so that any row can be
    computed by hand: a routing mistake (another image's latents, time ids or embeddings) changes the numbers."""

    def __init__(self) -> None:
        self.calls: list[int] = []

    def __call__(self, sample, timestep, encoder_hidden_states, timestep_cond=None, cross_attention_kwargs=None,
                 added_cond_kwargs=None, return_dict=True):
        self.calls.append(sample.shape[0])
        added = added_cond_kwargs
        per_row = (encoder_hidden_states.mean(dim=(1, 2)) * 3 + added["text_embeds"].mean(dim=1) * 5
                   + added["time_ids"].sum(dim=1) / 100 + added["image_embeds"][0].mean(dim=(1, 2)) * 7)
        return (sample * (1 + per_row[:, None, None, None]) + timestep / 1000,)


class Guided:
    def __init__(self, scale: float) -> None:
        self.guidance_scale = scale


def conditioning(images: int, weights: list[tuple[float, ...]]) -> Conditioning:
    """Random embeddings for 10 distinct texts; image ``i``'s subprompts are rows ``3i``, ``3i + 1``, ...; its
    negative row ``9 - i``."""
    generator = torch.Generator().manual_seed(0)
    embeds, pooled = torch.randn(10, 6, 4, generator=generator), torch.randn(10, 3, generator=generator)
    return Conditioning(embeds, pooled, embeds.flip(0), pooled.flip(0),
                        [((10,), (3 * i,)) for i in range(images)], [((10,), (i,)) for i in range(images)],
                        [[((10,), (3 * i + k,)) for k in range(1, len(w))] for i, w in enumerate(weights)],
                        weights)


def unet_inputs(c: Conditioning, guided: bool) -> dict:
    """The call a diffusers SDXL pipeline makes: [uncond; cond] rows with guidance, cond rows without."""
    now = c.at(0)
    images = len(c.prompts)
    generator = torch.Generator().manual_seed(1)
    rows = 2 * images if guided else images
    states = torch.cat([now["negative_prompt_embeds"], now["prompt_embeds"]]) if guided else now["prompt_embeds"]
    pooled = (torch.cat([now["negative_pooled_prompt_embeds"], now["pooled_prompt_embeds"]]) if guided
              else now["pooled_prompt_embeds"])
    time_ids = torch.arange(images * 6, dtype=torch.float32).reshape(images, 6)
    return dict(sample=torch.randn(rows, 4, 2, 2, generator=generator), timestep=torch.tensor(500.0),
                encoder_hidden_states=states, timestep_cond=None, cross_attention_kwargs=None,
                added_cond_kwargs={"text_embeds": pooled, "time_ids": time_ids.repeat(rows // images, 1),
                                   "image_embeds": [torch.randn(rows, 1, 5, generator=generator)]})


def row(unet: RowUNet, inputs: dict, source: int, embeds: torch.Tensor, pooled: torch.Tensor) -> torch.Tensor:
    """The stand-in's output for pipeline row ``source``'s latents and time ids with other text embeddings."""
    added = inputs["added_cond_kwargs"]
    return unet(inputs["sample"][source:source + 1], inputs["timestep"], embeds[None],
                added_cond_kwargs={"text_embeds": pooled[None], "time_ids": added["time_ids"][source:source + 1],
                                   "image_embeds": [added["image_embeds"][0][source:source + 1]]})[0][0]


def test_composed_guides_with_uncond_plus_each_weighted_difference():
    """Two images: ``a :1 AND b :0.5 AND c :-0.25`` and a plain one; the second call holds the first image's two
    other subprompts alone, and the plain image's rows come back untouched."""
    c = conditioning(2, [(1.0, 0.5, -0.25), (1.0,)])
    unet, inputs = RowUNet(), unet_inputs(c, guided=True)
    plain = unet(**inputs, return_dict=False)[0]
    out = Composed(unet, Guided(7.0), lambda: c)(**inputs, return_dict=False)[0]
    assert unet.calls == [4, 4, 2]
    uncond = plain[0]
    conds = [row(unet, inputs, 2, c.embeds[k], c.pooled[k]) for k in (0, 1, 2)]
    expected = uncond + 1.0 * (conds[0] - uncond) + 0.5 * (conds[1] - uncond) - 0.25 * (conds[2] - uncond)
    torch.testing.assert_close(out[2], expected, rtol=1e-5, atol=1e-6)
    assert torch.equal(out[[0, 1, 3]], plain[[0, 1, 3]])


def test_a_single_weighted_subprompt_scales_its_difference_with_no_second_call():
    c = conditioning(1, [(2.0,)])
    unet, inputs = RowUNet(), unet_inputs(c, guided=True)
    plain = unet(**inputs, return_dict=False)[0]
    out = Composed(unet, Guided(7.0), lambda: c)(**inputs, return_dict=True).sample
    assert unet.calls == [2, 2]
    torch.testing.assert_close(out[1], plain[0] + 2 * (plain[1] - plain[0]))


def test_without_classifier_free_guidance_composed_runs_the_negative_and_applies_the_scale():
    """diffusers runs no uncond at guidance_scale <= 1 and takes the UNet's output as the prediction: A1111's
    ``uncond + cfg * sum w (cond - uncond)`` comes back, the uncond being the image's negative prompt."""
    c = conditioning(1, [(0.5, 1.5)])
    unet, inputs = RowUNet(), unet_inputs(c, guided=False)
    out = Composed(unet, Guided(0.8), lambda: c)(**inputs, return_dict=False)[0]
    assert unet.calls == [1, 2]
    uncond = row(unet, inputs, 0, c.negative_embeds[0], c.negative_pooled[0])
    first, second = (row(unet, inputs, 0, c.embeds[k], c.pooled[k]) for k in (0, 1))
    torch.testing.assert_close(out[0], uncond + 0.8 * (0.5 * (first - uncond) + 1.5 * (second - uncond)),
                               rtol=1e-5, atol=1e-6)


def test_the_other_subprompts_run_in_calls_no_larger_than_the_pipelines():
    """Unguided, the pipeline's call is one row: three subprompts and the negative make three more rows, run two at
    a time (a guided call's rows, which the batch is sized for), and compose as in one call."""
    c = conditioning(1, [(1.0, 0.5, -0.25)])
    unet, inputs = RowUNet(), unet_inputs(c, guided=False)
    out = Composed(unet, Guided(0.8), lambda: c)(**inputs, return_dict=False)[0]
    assert unet.calls == [1, 2, 1]
    uncond = row(unet, inputs, 0, c.negative_embeds[0], c.negative_pooled[0])
    conds = [row(unet, inputs, 0, c.embeds[k], c.pooled[k]) for k in (0, 1, 2)]
    total = sum(w * (cond - uncond) for w, cond in zip((1.0, 0.5, -0.25), conds, strict=True))
    torch.testing.assert_close(out[0], uncond + 0.8 * total, rtol=1e-5, atol=1e-6)


def test_composed_follows_each_subprompts_schedule():
    """The second subprompt switches from row 1 to row 4 after step 2; ``at`` moves every row at once."""
    c = conditioning(1, [(1.0, 1.0)])
    c.others = [[((2, 10), (1, 4))]]
    unet, inputs = RowUNet(), unet_inputs(c, guided=True)
    composed = Composed(unet, Guided(7.0), lambda: c)
    early = composed(**inputs, return_dict=False)[0]
    c.at(3)
    assert c.applied[2] == ((4,),)
    late = composed(**inputs, return_dict=False)[0]
    uncond, first = unet(**inputs, return_dict=False)[0]
    for out, text in ((early, 1), (late, 4)):
        other = row(unet, inputs, 1, c.embeds[text], c.pooled[text])
        torch.testing.assert_close(out[1], first + (other - uncond), rtol=1e-5, atol=1e-6)


def test_composing_puts_the_unet_back_however_the_block_ends():
    class Pipe:
        def __init__(self, unet) -> None:
            self.unet = unet

    unet = RowUNet()
    pipe = Pipe(unet)
    with composing([pipe, pipe], lambda: None):
        assert isinstance(pipe.unet, Composed) and pipe.unet.unet is unet  # once, not wrapped twice
        assert pipe.unet.calls is unet.calls  # the rest of the UNet reads through
    assert pipe.unet is unet
    with pytest.raises(RuntimeError), composing([pipe], lambda: None):
        raise RuntimeError("a failed step")
    assert pipe.unet is unet


# --- the base's pixels ---------------------------------------------------------------------------------------------

SMALL = dict(prompt="a cat", width=64, height=64, steps=4, guidance_scale=12.0, seed=11, prompt_syntax="a1111")
SEEN = 0.01  # as tests/test_prompts.py: mean grey levels a change of reading moves at least
ROUNDING = 2  # grey levels: batched and single UNet calls may round apart on CPU


def image(base, **kw) -> np.ndarray:
    return pixels(base.generate(GenerationRequest(**{**SMALL, **kw})).images[0])


def test_a_weight_of_one_is_todays_path_to_the_bit(base):
    cat = image(base, prompt_syntax="plain")
    assert np.array_equal(image(base), cat)
    assert np.array_equal(image(base, prompt="a cat :1"), cat)  # the weight read off, the text "a cat"
    assert not np.array_equal(image(base, prompt="a cat :1", prompt_syntax="plain"), cat)  # plain: it is text


def test_two_halves_of_one_subprompt_are_that_subprompt(base):
    assert np.abs(image(base, prompt="a cat :0.5 AND a cat :0.5") - image(base)).max() <= ROUNDING


def test_a_subprompts_weight_multiplies_its_guidance(base):
    """``uncond + 6 * 2 (cond - uncond)`` is guidance 12 at weight 1; at guidance 1 (no CFG in diffusers) the
    weight still applies, through the negative prompt's evaluation."""
    assert np.abs(image(base, prompt="a cat :2", guidance_scale=6.0) - image(base)).max() <= ROUNDING
    assert np.abs(image(base, prompt="a cat :2", guidance_scale=1.0)
                  - image(base, guidance_scale=2.0)).max() <= ROUNDING
    assert np.abs(image(base, prompt="a cat :0.5 AND a cat :0.5", guidance_scale=1.0)
                  - image(base, guidance_scale=1.0)).max() <= ROUNDING


def test_and_composes_both_subprompts_in_either_order(base):
    both = image(base, prompt="a cat AND a dog")
    for alone in ("a cat", "a dog"):
        assert np.abs(both - image(base, prompt=alone)).mean() > SEEN, alone
    assert np.abs(both - image(base, prompt="a dog AND a cat")).max() <= ROUNDING
    assert np.abs(both - image(base, prompt="a cat AND a dog :0.5")).mean() > SEEN


def test_prompt_editing_inside_a_subprompt_switches_at_its_step(base):
    """As ``a [cat:dog:1]`` alone (tests/test_prompts.py): over 4 steps it switches at A1111's third evaluation."""
    switched = image(base, prompt="a cat AND a [bird:dog:1]")
    for alone in ("a cat AND a bird", "a cat AND a dog"):
        assert np.abs(switched - image(base, prompt=alone)).mean() > SEEN / 4, alone
    assert np.array_equal(image(base, prompt="a cat AND a [bird:dog:0.25]"), switched)
    assert np.array_equal(image(base, prompt="a cat AND a [bird:dog:0]"), image(base, prompt="a cat AND a dog"))


def test_requests_with_and_without_and_share_a_batch_each_with_its_own_pixels(base):
    from deployments.sdxl_base import batch_key, chunk_counts

    pipes = base.checkpoint()
    requests = [GenerationRequest(**{**SMALL, "prompt": p}) for p in ("a cat AND a dog :0.7", "a bird", "a cat :2")]
    assert len({batch_key(r, chunk_counts(pipes, r)) for r in requests}) == 1
    together = base.generate_batch([BatchItem(r, f"r{i}") for i, r in enumerate(requests)])
    for alone, result in zip(requests, together, strict=True):
        assert np.abs(pixels(result.images[0]) - pixels(base.generate(alone).images[0])).max() <= ROUNDING


@pytest.mark.parametrize("mode", ["img2img", "inpaint"])
def test_image_to_image_and_inpainting_compose_too(base, mode):
    """Inpainting's UNet takes the mask and the masked image as more channels of each row's latents."""
    from PIL import Image

    init = {"init_image": Image.new("RGB", (64, 64), (90, 140, 200)), "strength": 0.75}
    if mode == "inpaint":
        init["mask"] = centre_square()
    cat = image(base, **init)
    assert np.abs(image(base, prompt="a cat :0.5 AND a cat :0.5", **init) - cat).max() <= ROUNDING
    assert np.abs(image(base, prompt="a cat AND a dog", **init) - cat).mean() > SEEN / 4


def test_a_long_subprompt_sets_the_chunk_count_of_its_request(base):
    from deployments.sdxl_base import chunk_counts

    pipes = base.checkpoint()
    long = GenerationRequest(**{**SMALL, "prompt": "a cat AND " + "a " * 100})
    assert chunk_counts(pipes, long) == (2, 0)
    assert pixels(base.generate(long).images[0]).shape == (64, 64, 3)


def test_the_latent_hires_pass_composes_too(base):
    from deployments.support.generation import LatentHires

    hires = LatentHires(width=96, height=96, steps=2, strength=0.5)
    assert np.abs(image(base, prompt="a cat :0.5 AND a cat :0.5", hires=hires)
                  - image(base, hires=hires)).max() <= ROUNDING
    assert np.abs(image(base, prompt="a cat AND a dog", hires=hires) - image(base, hires=hires)).mean() > SEEN


def test_the_refiner_composes_each_subprompts_first_text(refiner):
    """The refiner's image mode runs no schedule (each subprompt's first text throughout, and it says so) but
    composes its subprompts as the base does; its UNet is its own again afterwards."""
    from PIL import Image

    from deployments.support.generation import RefineRequest

    source = StageResult(images=[Image.new("RGB", (64, 64), (128, 128, 128))], seeds=[3])
    unet = refiner.pipe.unet

    def refined(prompt: str, **kw) -> np.ndarray:
        request = RefineRequest(prompt=prompt, steps=4, strength=0.5, prompt_syntax="a1111", **kw)
        return pixels(refiner.refine_images(request, source).images[0])

    cat = refined("a cat")
    assert np.abs(refined("a cat :0.5 AND a cat :0.5") - cat).max() <= ROUNDING
    assert np.abs(refined("a cat :2", guidance_scale=2.5) - refined("a cat", guidance_scale=5.0)).max() <= ROUNDING
    assert np.abs(refined("a cat AND a dog") - cat).mean() > SEEN / 4
    assert np.array_equal(refined("a cat AND a [dog:bird:2]"), refined("a cat AND a dog"))
    assert refiner.pipe.unet is unet


@pytest.mark.parametrize("how", ["stop", "cancel", "error"])
def test_the_unet_is_put_back_after_an_interrupt_a_cancel_or_an_error(base, how, monkeypatch):
    pipes = base.checkpoint()
    unets = (pipes.txt2img.unet, pipes.img2img.unet)
    request = GenerationRequest(**{**SMALL, "prompt": "a cat AND a dog"})
    if how == "error":
        def fail(self, *args, **kwargs):
            raise RuntimeError("the second call failed")

        monkeypatch.setattr(Composed, "_compose", fail)
        progress = None
    else:
        def progress(step: int, total: int) -> None:
            assert isinstance(pipes.txt2img.unet, Composed)  # composing while it runs
            if step == 2:
                getattr(base.cancellation, how)("r0")

    outcome = base.generate_batch([BatchItem(request, "r0", on_progress=progress)])[0]
    expected = {"stop": StageResult, "cancel": GenerationCancelled, "error": RuntimeError}[how]
    assert isinstance(outcome, expected), outcome
    if how == "stop":
        assert outcome.info["stopped_at"] == [2, 4]
    assert (pipes.txt2img.unet, pipes.img2img.unet) == unets
    assert not isinstance(pipes.txt2img.unet, Composed)


def test_the_encoder_keeps_each_images_subprompts_and_weights(base):
    pipe = base.checkpoint().txt2img
    c = PromptEncoder(pipe).scheduled(["a cat AND a dog :0.5", "a dog", "a cat :2"], None, 8)
    assert c.weights == [(1.0, 0.5), (1.0,), (2.0,)] and c.composes
    assert c.embeds.shape[0] == 3  # "a cat", " a dog" and "a dog": each distinct text encoded once
    assert c.rows(0) == ((0, 2, 0), (0, 0, 0), ((1,), (), ()))  # the negatives: one row of zeros
    assert c.at(0)["prompt_embeds"].shape == (3, 77, 80)  # the pipeline's rows: each image's first subprompt
    assert not PromptEncoder(pipe).scheduled(["a cat", "a dog :1"], None, 8).composes


# --- lengths: a shorter subprompt, schedule or negative prompt, as A1111 1.10 meets it ----------------------------

LONG = "a " * 100  # 100 tokens of text: two chunks


def test_a_shorter_subprompt_repeats_its_last_vector_and_keeps_its_own_pooled_embedding(base):
    """A1111's ``stack_conds`` makes every subprompt as long as the longest by repeating its last vector (no chunks
    of the empty prompt); each keeps its own pooled embedding, which no padding touches."""
    encoder = PromptEncoder(base.checkpoint().txt2img)
    c = encoder.scheduled([f"{LONG}AND a cat"], ["blurry"], 8)
    (_, (short,)), = c.others[0]
    alone = encoder.scheduled([" a cat"], None, 8)  # the subprompt's text as a prompt of its own: one chunk
    assert c.embeds.shape[1] == 154 and alone.embeds.shape[1] == 77
    assert torch.equal(c.embeds[short, :77], alone.embeds[0])
    assert torch.equal(c.embeds[short, 77:], alone.embeds[0, 76:].expand(77, -1))
    assert torch.equal(c.pooled[short], alone.pooled[0])
    assert not torch.equal(c.pooled[short], c.pooled[c.prompts[0][1][0]])


def test_a_schedules_shorter_text_is_padded_with_the_empty_prompt(base):
    """A1111 encodes one prompt's schedule in one call, which pads its shorter texts with chunks of the empty
    prompt: ``a [cat:<two chunks>:3]`` is "a cat" and then the empty prompt until step 3."""
    encoder = PromptEncoder(base.checkpoint().txt2img)
    c = encoder.scheduled([f"a [cat:{LONG}:3]"], ["blurry"], 8)
    ends, (first, later) = c.prompts[0]
    nothing = encoder.scheduled([""], None, 8).embeds[0]  # the empty prompt's one chunk
    assert ends == (3, 8) and c.embeds.shape[1] == 154
    assert torch.equal(c.embeds[first, :77], encoder.scheduled(["a cat"], None, 8).embeds[0])
    assert torch.equal(c.embeds[first, 77:], nothing)
    assert not torch.equal(c.embeds[later, 77:], nothing)


def test_a_prompt_and_a_negative_prompt_of_different_lengths_meet_as_a1111s_options(base):
    """Off (A1111's default): each keeps its own length (``lengths``: the UNet reads 154 and 77 positions; the
    pipeline's rows hold both at 154). pad_cond_uncond ("empty"): the shorter gets chunks of the empty prompt.
    pad_cond_uncond_v0: the negative prompt repeats its last vector up to the prompt's length, or is cut there."""
    encoder = PromptEncoder(base.checkpoint().txt2img)
    nothing = encoder.scheduled([""], None, 8).embeds[0]
    off = encoder.scheduled([LONG], ["blurry"], 8)
    assert off.lengths == (154, 77) and off.embeds.shape[1] == off.negative_embeds.shape[1] == 154
    assert encoder.scheduled([LONG], [LONG], 8).lengths is None  # of one length: one call, as before
    empty = encoder.scheduled([LONG], ["blurry"], 8, padding="empty")
    assert empty.lengths is None and torch.equal(empty.negative_embeds[0, :77], off.negative_embeds[0, :77])
    assert torch.equal(empty.negative_embeds[0, 77:], nothing)
    v0 = encoder.scheduled([LONG], ["blurry"], 8, padding="v0")
    assert v0.lengths is None and torch.equal(v0.negative_embeds[0, :77], off.negative_embeds[0, :77])
    assert torch.equal(v0.negative_embeds[0, 77:], off.negative_embeds[0, 76:77].expand(77, -1))
    assert torch.equal(v0.embeds, off.embeds)  # the prompt is never touched by v0
    cut = encoder.scheduled(["a cat"], [LONG], 8, padding="v0")  # a longer negative prompt: cut at the prompt's
    assert cut.lengths is None and cut.negative_embeds.shape[1] == 77
    assert torch.equal(cut.negative_embeds[0], encoder.scheduled([LONG], None, 8).embeds[0, :77])
    longer = encoder.scheduled(["a cat"], [LONG], 8, padding="empty")  # the prompt is the shorter: it is padded
    assert torch.equal(longer.embeds[0, 77:], nothing) and longer.lengths is None
    assert encoder.scheduled(["a cat"], [LONG], 8).lengths == (77, 154)


def test_zeros_for_no_negative_prompt_run_in_the_prompts_call_but_pad_as_a1111s_one_chunk(base):
    """SDXL's zeros for an empty negative prompt: A1111's are one chunk long. Keys and values of zeros attend to
    nothing at any length, so they run at the prompt's in one call; padded with the empty prompt, their second
    chunk is the empty prompt's."""
    encoder = PromptEncoder(base.checkpoint().txt2img)
    assert base.checkpoint().txt2img.config.get("force_zeros_for_empty_prompt")
    off = encoder.scheduled([LONG], None, 8)
    assert off.lengths is None and off.negative_embeds.shape[1] == 154 and not off.negative_embeds.any()
    empty = encoder.scheduled([LONG], None, 8, padding="empty")
    assert not empty.negative_embeds[0, :77].any()
    assert torch.equal(empty.negative_embeds[0, 77:], encoder.scheduled([""], None, 8).embeds[0])


def test_a_prompt_and_a_negative_prompt_of_different_lengths_run_in_calls_of_their_own():
    """``lengths`` (prompt 3 positions, negative prompt 6): the pipeline's [uncond; cond] rows run as two calls,
    each row cut to its own length, and the other subprompts at the prompt's; a plain image's rows too."""
    c = conditioning(2, [(1.0, 0.5, -0.25), (1.0,)])
    c.lengths = (3, 6)
    unet, inputs = RowUNet(), unet_inputs(c, guided=True)
    states, pooled = inputs["encoder_hidden_states"], inputs["added_cond_kwargs"]["text_embeds"]
    out = Composed(unet, Guided(7.0), lambda: c)(**inputs, return_dict=False)[0]
    assert unet.calls == [2, 2, 2]  # the negatives, the prompts, the first image's other two subprompts
    own = [row(unet, inputs, i, states[i, :6 if i < 2 else 3], pooled[i]) for i in range(4)]
    torch.testing.assert_close(out[[0, 1, 3]], torch.stack([own[0], own[1], own[3]]), rtol=1e-5, atol=1e-6)
    uncond = own[0]
    conds = [own[2], *(row(unet, inputs, 2, c.embeds[k, :3], c.pooled[k]) for k in (1, 2))]
    expected = uncond + sum(w * (cond - uncond) for w, cond in zip((1.0, 0.5, -0.25), conds, strict=True))
    torch.testing.assert_close(out[2], expected, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(own[3], row(unet, inputs, 3, states[3], pooled[3]))  # the cut changes the numbers


def test_unguided_the_negative_prompt_runs_at_its_own_length_beside_the_subprompts():
    c = conditioning(1, [(0.5, 1.5)])
    c.lengths = (3, 6)
    unet, inputs = RowUNet(), unet_inputs(c, guided=False)
    out = Composed(unet, Guided(0.8), lambda: c)(**inputs, return_dict=False)[0]
    assert unet.calls == [1, 1, 1]  # the pipeline's row, the other subprompt, the negative prompt
    uncond = row(unet, inputs, 0, c.negative_embeds[0, :6], c.negative_pooled[0])
    first, second = (row(unet, inputs, 0, c.embeds[k, :3], c.pooled[k]) for k in (0, 1))
    torch.testing.assert_close(out[0], uncond + 0.8 * (0.5 * (first - uncond) + 1.5 * (second - uncond)),
                               rtol=1e-5, atol=1e-6)


def test_the_padding_options_change_the_pixels_only_where_the_lengths_differ(base):
    """A prompt of two chunks with a negative prompt of one: each option is its own image; the reading that runs
    them apart is today's path for prompts of one length."""
    long = {"prompt": LONG, "negative_prompt": "blurry"}
    ran = {padding: image(base, **long, cond_padding=padding) for padding in ("off", "empty", "v0")}
    assert np.abs(ran["off"] - ran["empty"]).mean() > SEEN / 4
    assert np.abs(ran["off"] - ran["v0"]).mean() > SEEN / 4 and np.abs(ran["empty"] - ran["v0"]).mean() > SEEN / 4
    same = {"prompt": "a cat", "negative_prompt": "blurry"}
    plain = image(base, **same)
    assert all(np.array_equal(image(base, **same, cond_padding=p), plain) for p in ("empty", "v0"))
