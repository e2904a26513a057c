"""Dynamic batching: which requests share a pipeline call, that each keeps its own pixels, and that a cancelled
item never takes its batch mates down."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest
from PIL import Image

from deployments.sdxl_base import batch_key
from deployments.support.batching import Batcher
from deployments.support.config import Batching
from deployments.support.errors import GenerationCancelled, InvalidInput
from deployments.support.generation import BatchItem, GenerationRequest, LatentHires, StageResult
from tests.helpers import pixels

SMALL = dict(prompt="a photo of a cat", width=128, height=128, steps=4, guidance_scale=5.0)


def request(**kw) -> GenerationRequest:
    return GenerationRequest(**{**SMALL, **kw})


def mad(a: Image.Image, b: Image.Image) -> float:
    return float(np.abs(pixels(a) - pixels(b)).mean())


def test_compatible_requests_share_a_key_and_incompatible_ones_do_not(astronaut):
    same = batch_key(request(seed=1, prompt="a dog"))
    assert same == batch_key(request(seed=2, prompt="a cat", batch_size=3))
    for other in (dict(width=136), dict(steps=5), dict(sampler="DDIM"), dict(guidance_scale=6.0),
                  dict(prompt="x <lora:style:0.5>"), dict(negative_prompt="blurry"), dict(denoising_end=0.8),
                  dict(init_image=astronaut)):
        assert batch_key(request(**other)) != same, other
    # An inpainting mask and an IP-Adapter reference belong to one request: those run alone.
    assert batch_key(request(init_image=astronaut, mask=Image.new("L", (64, 64), 255))) is None
    assert batch_key(request(ip_adapter_image=astronaut)) is None


def test_an_item_larger_than_1024_squared_weighs_what_it_covers():
    from deployments.sdxl_base import batch_weight
    from deployments.support.generation import LatentHires

    def weight(count: int = 1, **kw) -> int:
        return batch_weight(BatchItem(request(**kw), "r", count))

    assert weight(width=64, height=64) == weight(width=1024, height=1024) == 1
    assert weight(count=3, width=1024, height=1024) == 3
    assert weight(width=1536, height=1536) == 3 and weight(width=2048, height=2048) == 4
    hires = LatentHires(width=2048, height=2048, mode="Latent", strength=0.5, steps=4)
    assert weight(count=2, width=1024, height=1024, hires=hires) == 8  # its second pass sets its memory


def test_an_and_prompt_weighs_the_unet_rows_its_subprompts_add():
    """Under guidance a plain image runs two UNet rows a step; AND adds one per other subprompt (``Composed``), so
    three subprompts weigh twice a plain image. Without guidance (a scale of 1 or less) a plain image is one row and
    a composed one adds its negative prompt's too. Only the A1111 reading splits a prompt; the costliest pass counts."""
    from deployments.sdxl_base import batch_weight

    def weight(count: int = 1, **kw) -> int:
        return batch_weight(BatchItem(request(**{"width": 1024, "height": 1024, "prompt_syntax": "a1111", **kw}),
                                      "r", count))

    assert weight(prompt="a cat") == weight(prompt="a cat :1") == 1
    assert weight(prompt="a cat AND a dog AND a bird") == 2  # 4 rows against 2
    assert weight(prompt="a cat AND a dog") == 2 and weight(count=2, prompt="a cat AND a dog") == 3  # 1.5 each
    assert weight(prompt="a cat :2") == 1  # a weight alone: no row more under guidance
    assert weight(prompt="a cat :2", guidance_scale=1.0) == 2  # unguided: its negative prompt's row
    assert weight(prompt="a cat AND a dog", guidance_scale=1.0) == 3
    assert weight(prompt="a <lora:style:0.5> cat AND a dog AND a bird") == 2
    assert weight(prompt="a cat AND a dog AND a bird", prompt_syntax="plain") == 1  # text to the encoders
    assert weight(prompt=" AND ".join(["a"] * 20)) == 1  # refused before it runs, alone
    hires = LatentHires(width=2048, height=2048, mode="Latent", strength=0.5, steps=4, prompt="a cat AND a dog")
    assert weight(prompt="a cat", hires=hires) == 6  # 4 x 1.5: the second pass's prompt composes
    assert weight(prompt="a cat AND a dog AND a bird", hires=hires.model_copy(update={"prompt": None})) == 8


@pytest.mark.anyio
async def test_a_batch_of_and_prompts_holds_the_unet_rows_it_was_sized_for(monkeypatch):
    """``max_batch_size`` 4 (plain images): a three-subprompt request weighs 2, so it shares its batch with two
    plain ones, not three; one of nine rows an image (eight subprompts) runs alone."""
    from types import SimpleNamespace

    from ray import serve

    from deployments.sdxl_base import batch_weight

    replica = SimpleNamespace(_deployment_config=SimpleNamespace(max_ongoing_requests=16))
    monkeypatch.setattr(serve, "get_replica_context", lambda: replica)
    calls: list[list[str]] = []

    async def run(items: list[BatchItem]) -> list:
        calls.append([item.request_id for item in items])
        await asyncio.sleep(0.05)
        return [item.request_id for item in items]

    def item(name: str, prompt: str) -> BatchItem:
        return BatchItem(request(prompt=prompt, width=1024, height=1024, prompt_syntax="a1111"), name)

    batcher = Batcher(run, Batching(max_batch_size=4, batch_wait_timeout_s=0.2), size=batch_weight)
    items = [item("and", "a cat AND a dog AND a bird"), *(item(f"p{i}", "a cat") for i in range(3))]
    assert await asyncio.gather(*(batcher.submit("k", i) for i in items)) == ["and", "p0", "p1", "p2"]
    assert [sum(batch_weight(next(i for i in items if i.request_id == n)) for n in c) for c in calls] == [4, 1]
    calls.clear()
    eight = item("eight", " AND ".join(["a cat"] * 8))
    assert batch_weight(eight) == 5  # (2 + 7) / 2, rounded up: more than the batch holds
    assert await asyncio.gather(batcher.submit("k", eight), batcher.submit("k", item("p3", "a cat"))) == [
        "eight", "p3"]
    assert sorted(calls) == [["eight"], ["p3"]]


def test_each_item_of_a_batch_has_the_pixels_it_gets_alone(base):
    items = [BatchItem(request(seed=11, prompt="a red house"), "a"),
             BatchItem(request(seed=12, prompt="a blue boat", batch_size=2), "b", count=2),
             BatchItem(request(seed=13, prompt="a green tree"), "c")]
    outcomes = base.generate_batch(items)
    assert [o.seeds for o in outcomes] == [[11], [12, 13], [13]]
    assert [o.info["prompt"] for o in outcomes] == ["a red house", "a blue boat", "a green tree"]
    alone = [base.generate(item.request) for item in items]
    for result, own in zip(outcomes, alone, strict=True):
        for mine, theirs in zip(result.images, own.images, strict=True):
            assert mine.size == (128, 128)
            assert mad(mine, theirs) < 1.0  # < 1/255 of the range, mean absolute difference
    # Each item kept its own prompt: seed 13 of "a blue boat" is nearer its lone run than seed 13 of "a green tree"
    # (random tiny text encoders move pixels only a little, so compare rather than threshold).
    boat = outcomes[1].images[1]
    assert mad(boat, alone[1].images[1]) < mad(boat, alone[2].images[0])


def test_latents_and_img2img_batches_split_per_item(base, astronaut):
    items = [BatchItem(request(seed=s, denoising_end=0.8), str(s)) for s in (1, 2)]
    handed = base.generate_batch(items)
    assert [o.latents.shape for o in handed] == [(1, 4, 16, 16)] * 2
    alone = base.generate(items[1].request)
    assert np.abs(handed[1].latents - alone.latents).mean() < 1e-3
    grey = Image.new("RGB", (128, 128), (120, 120, 120))
    items = [BatchItem(request(seed=5, init_image=astronaut, strength=0.6), "x"),
             BatchItem(request(seed=5, init_image=grey, strength=0.6), "y")]
    a, b = base.generate_batch(items)
    assert mad(a.image, base.generate(items[0].request).image) < 1.0
    assert mad(a.image, b.image) > 1.0  # each item kept its own init image


def test_a_cancelled_item_leaves_its_batch_mates_untouched(base):
    steps = []

    def cancel_mate(step, _total):
        steps.append(step)
        if step == 1:
            base.cancellation.cancel("doomed")

    keep = BatchItem(request(seed=21, steps=6), "keep", on_progress=cancel_mate)
    doomed = BatchItem(request(seed=22, steps=6), "doomed")
    kept, gone = base.generate_batch([keep, doomed])
    assert isinstance(gone, GenerationCancelled)
    assert steps == [1, 2, 3, 4, 5, 6]
    assert mad(kept.image, base.generate(keep.request).image) < 1.0
    # When every item is cancelled the loop stops within one step.
    steps.clear()
    lone = BatchItem(request(seed=23, steps=6), "doomed", on_progress=lambda s, _t: steps.append(s)
                     or base.cancellation.cancel("doomed"))
    assert isinstance(base.generate_batch([lone])[0], GenerationCancelled)
    assert steps == [1]


def test_a_stopped_item_answers_with_its_image_as_it_stood_and_its_mate_runs_on(base):
    """A1111's /interrupt and /skip: the item stopped hands back its image at that step, not nothing, and not
    its finished image; its batch mate is untouched. With every item stopped, the loop ends at once."""
    steps = []

    def stop_mate(step, _total):
        steps.append(step)
        if step == 2:
            base.cancellation.stop("stopped")

    early: dict[int, bool] = {}
    keep = BatchItem(request(seed=41, steps=6), "keep", on_progress=lambda step, total: stop_mate(step, total)
                     or early.update({step: stopped.handed.done()}))
    stopped = BatchItem(request(seed=42, steps=6), "stopped")
    kept, partial = base.generate_batch([keep, stopped])
    assert steps == [1, 2, 3, 4, 5, 6]
    # Handed over as it stopped (its caller need not wait for the batch's end), and the same result the batch
    # returns for it at its end.
    assert early == {1: False, 2: False, 3: True, 4: True, 5: True, 6: True}
    assert stopped.handed.result() is partial and not keep.handed.done()
    assert mad(kept.image, base.generate(keep.request).image) < 1.0
    assert isinstance(partial, StageResult) and partial.stopped and partial.info["stopped_at"] == [2, 6]
    assert partial.seeds == [42] and partial.image.size == (128, 128)
    whole = base.generate(stopped.request).image
    assert mad(partial.image, whole) > 1.0  # four steps short of it
    steps.clear()
    lone = BatchItem(request(seed=42, steps=6), "alone", on_progress=lambda s, _t: steps.append(s)
                     or base.cancellation.stop("alone"))
    (alone,) = base.generate_batch([lone])
    assert steps == [1] and alone.info["stopped_at"] == [1, 6] and alone.image.size == (128, 128)
    assert "step" not in base.checkpoint().txt2img.scheduler.__dict__  # let go of: it held the batch's images
    # A hires pass stopped in its first pass answers at the first pass's size; a stopped base hands the refiner
    # images (it passes them on).
    hires = request(seed=43, steps=4, hires=LatentHires(width=192, height=192, strength=0.5, steps=2))
    first = base.generate_batch([BatchItem(hires, "h", on_progress=lambda s, _t: base.cancellation.stop("h"))])[0]
    assert first.info["stopped_at"] == [1, 6] and first.image.size == (128, 128)
    ensemble = request(seed=44, denoising_end=0.8)
    handed = base.generate_batch([BatchItem(ensemble, "e", on_progress=lambda s, _t: base.cancellation.stop("e"))])
    assert handed[0].latents is None and handed[0].image.size == (128, 128) and handed[0].stopped


def test_a_pass_stopped_as_it_begins_hands_on_the_earlier_stages_image(base):
    """A stop that came while an earlier stage ran (the upscaler of A1111's pixel hires fix) reaches the second
    pass at its first step: it hands the upscaled image on, not one step's blurred estimate; stopped later, it
    answers with its own estimate."""
    first = base.generate(request(seed=51, steps=4))
    up = first.image.resize((192, 192), Image.Resampling.LANCZOS)
    again = request(seed=51, steps=4, width=192, height=192, init_image=up, strength=0.5, exact_steps=True)

    def stop_at(step):
        return lambda at, _total: at == step and base.cancellation.stop("second")

    (handed,) = base.generate_batch([BatchItem(again, "second", source=first, on_progress=stop_at(1))])
    assert handed.info["stopped_at"][0] == 1 and mad(handed.image, up) == 0
    (later,) = base.generate_batch([BatchItem(again, "second", source=first, on_progress=stop_at(3))])
    assert later.info["stopped_at"][0] == 3 and later.image.size == (192, 192) and mad(later.image, up) > 1.0


def test_a_pass_over_an_earlier_stages_images_keeps_each_images_seed_and_size(base, astronaut):
    """A1111's pixel hires fix: one img2img item per upscaled image, sharing the request's id (its progress and
    cancel), each with its own seed and size; its pixels are those of the same img2img request alone."""
    from deployments.sdxl_base import passes_over

    grey = Image.new("RGB", (139, 136), (120, 120, 120))  # an upscaler's size need not be a multiple of 8
    upscaled = StageResult(images=[astronaut.resize((139, 136)), grey], seeds=[31, 32])
    passes = passes_over(request(strength=0.5), upscaled)
    assert [(p.width, p.height, p.seed, p.batch_size) for p in passes] == [(136, 136, 31, 1), (136, 136, 32, 1)]
    assert batch_key(passes[0]) == batch_key(passes[1])  # so they share a pipeline call
    done = base.generate_batch([BatchItem(p, "hires") for p in passes])
    for result, again in zip(done, passes, strict=True):
        assert result.image.size == (136, 136)
        assert mad(result.image, base.generate(again).image) < 1.0
    assert mad(done[0].image, done[1].image) > 1.0
    joined = upscaled.joined(done)
    assert joined.seeds == [31, 32] and [i.size for i in joined.images] == [(136, 136)] * 2
    assert joined.info["mode"] == "img2img"

    # A cancel of that id stops every item of it (though settling the first clears the flag); a batch mate of
    # another request runs on.
    def cancel(step, _total):
        if step == 1:
            base.cancellation.cancel("hires")

    mate = BatchItem(passes_over(request(strength=0.5), StageResult(images=[grey], seeds=[33]))[0], "mate",
                     on_progress=cancel)
    *gone, kept = base.generate_batch([*(BatchItem(p, "hires") for p in passes), mate])
    assert all(isinstance(o, GenerationCancelled) for o in gone) and isinstance(kept, StageResult)


@pytest.mark.anyio
async def test_the_items_of_one_request_fail_together_and_leave_nothing_behind(caplog):
    """``submit_all`` (one request's passes over several images): the first failure is the request's, and the items
    still running are cancelled; a cancel through the progress board leaves no unread exception either."""
    import gc

    from deployments.support.generation import Cancellation

    started, cancelled = [], []

    async def run(items: list[str]) -> list:
        started.append(items[0])
        if items[0] == "bad":
            return [InvalidInput("refused", field="x")]
        try:
            await asyncio.sleep(30)
        except asyncio.CancelledError:
            cancelled.append(items[0])
            raise
        return items

    batcher: Batcher[str] = Batcher(run, Batching())
    with pytest.raises(InvalidInput):
        await batcher.submit_all([(1, "slow"), (1, "bad"), (1, "later")])
    assert started == ["slow", "bad", "later"] and sorted(cancelled) == ["later", "slow"]
    cancellation = Cancellation()
    waiting = asyncio.ensure_future(cancellation.guard("r", batcher.submit_all([(1, "a"), (1, "b")])))
    await asyncio.sleep(0.05)
    cancellation.cancel("r")
    outcome = (await asyncio.gather(waiting, return_exceptions=True))[0]
    assert isinstance(outcome, GenerationCancelled)
    del waiting, outcome  # their tracebacks hold the frame that held the work: let the collector judge it
    await asyncio.sleep(0.05)
    gc.collect()
    assert sorted(cancelled) == ["a", "b", "later", "slow"]
    assert "never retrieved" not in caplog.text


def test_a_bad_item_fails_alone(base):
    good, bad = base.generate_batch([BatchItem(request(seed=1), "g"), BatchItem(request(width=130), "b")])
    assert isinstance(good, StageResult) and isinstance(bad, InvalidInput) and bad.field == "width"


@pytest.mark.anyio
async def test_batcher_groups_by_key_and_never_makes_a_request_wait_for_another_key(monkeypatch):
    from types import SimpleNamespace

    from ray import serve

    # Serve's batch queue reads its replica's max_ongoing_requests (to warn); here there is no replica.
    replica = SimpleNamespace(_deployment_config=SimpleNamespace(max_ongoing_requests=16))
    monkeypatch.setattr(serve, "get_replica_context", lambda: replica)
    calls: list[list[str]] = []

    async def run(items: list[str]) -> list:
        calls.append(items)
        await asyncio.sleep(0.05)
        return [ValueError(i) if i == "bad" else i.upper() for i in items]

    batcher = Batcher(run, Batching(max_batch_size=4, batch_wait_timeout_s=0.2))
    together = [batcher.submit("k", name) for name in ("a", "b", "c")]
    loop = asyncio.get_running_loop()
    started = loop.time()
    alone = await batcher.submit(None, "solo")  # no key: runs at once, waits for nobody
    assert alone == "SOLO" and loop.time() - started < 0.15
    results = await asyncio.gather(*together, batcher.submit("other", "bad"), return_exceptions=True)
    assert results[:3] == ["A", "B", "C"] and isinstance(results[3], ValueError)
    assert sorted(map(sorted, calls)) == [["a", "b", "c"], ["bad"], ["solo"]]
    batcher.configure(Batching(max_batch_size=2, batch_wait_timeout_s=0.05))
    calls.clear()
    assert await asyncio.gather(*(batcher.submit("k", x) for x in "wxyz")) == list("WXYZ")
    assert [len(c) for c in calls] == [2, 2]


def test_refiner_batches_keep_each_items_seeds_and_pixels(base, refiner):
    from deployments.sdxl_refiner import batch_key as refiner_key
    from deployments.support.generation import RefineRequest

    handed = [base.generate(request(seed=s, denoising_end=0.8)) for s in (31, 32)]
    how = RefineRequest(prompt="a photo of a cat", steps=4, denoising_start=0.8)
    assert refiner_key(how, handed[0], ensemble=True) == refiner_key(how, handed[1], ensemble=True)
    items = [BatchItem(how, f"r{i}", source=h) for i, h in enumerate(handed)]
    outcomes = refiner.refine_batch(items, ensemble=True)
    assert [o.seeds for o in outcomes] == [[31], [32]]
    for item, result in zip(items, outcomes, strict=True):
        assert mad(result.image, refiner.refine_latents(how, item.source).image) < 1.0
    images = RefineRequest(prompt="a photo", steps=4, strength=0.5)
    sources = [StageResult(images=[o.image], seeds=o.seeds) for o in outcomes]
    batch = refiner.refine_batch([BatchItem(images, f"i{i}", source=s) for i, s in enumerate(sources)],
                                 ensemble=False)
    assert mad(batch[1].image, refiner.refine_images(images, sources[1]).image) < 1.0


def test_a_cancelled_caller_stops_waiting_at_once_while_its_batch_mate_runs_on():
    """A cancel from the progress board (another thread) answers the cancelled request's caller immediately; the
    work it waited on, shared with a batch mate, is not disturbed."""
    import asyncio
    import threading

    from deployments.support.errors import GenerationCancelled
    from deployments.support.generation import Cancellation

    async def scenario() -> None:
        cancellation, release = Cancellation(), asyncio.Event()

        async def batch() -> str:
            await release.wait()
            return "images"

        a = asyncio.ensure_future(cancellation.guard("a", batch()))
        b = asyncio.ensure_future(cancellation.guard("b", batch()))
        await asyncio.sleep(0.05)
        threading.Thread(target=cancellation.cancel, args=("a",)).start()
        with pytest.raises(GenerationCancelled):
            await asyncio.wait_for(a, timeout=5)
        assert not b.done()
        release.set()
        assert await asyncio.wait_for(b, timeout=5) == "images"
        cancellation.cancel("c")  # cancelled before it reached the replica's queue
        with pytest.raises(GenerationCancelled):
            await asyncio.wait_for(cancellation.guard("c", asyncio.Event().wait()), timeout=5)

    asyncio.run(scenario())


def test_a_second_order_sampler_counts_each_step_once(base):
    """Heun calls the step callback twice a step (once on the last): progress and ``stopped_at`` count steps."""
    steps = []
    base.generate_batch([BatchItem(request(seed=61, steps=4, sampler="Heun"), "heun",
                                   on_progress=lambda at, total: steps.append((at, total)))])
    assert steps[-1] == (4, 4) and sorted({at for at, _ in steps}) == [1, 2, 3, 4]


def test_a_stop_keeps_each_images_clean_estimate_and_lets_go_of_the_scheduler():
    """What a stopped item keeps is the sampler's estimate of the clean latents for every one of its images (not
    the noisy latents, not its first image alone); once released, the scheduler is as it was."""
    import torch
    from diffusers import EulerDiscreteScheduler

    from deployments.support.generation import Cancellation, Partial

    cancellation = Cancellation()
    partial = Partial(cancellation, [BatchItem(None, "two", 2), BatchItem(None, "one", 1)], [2, 1])
    scheduler = EulerDiscreteScheduler()
    scheduler.set_timesteps(10)
    partial.watch(scheduler)
    out = scheduler.step(torch.randn(3, 4, 8, 8), scheduler.timesteps[0], torch.randn(3, 4, 8, 8))
    cancellation.stop("two")
    partial.check(out.prev_sample, 1, 10, [False, False])
    kept, step, total = partial.kept[0]
    assert (step, total) == (1, 10) and list(partial.kept) == [0]
    assert torch.equal(kept, out.pred_original_sample[0:2])
    partial.release()
    assert "step" not in scheduler.__dict__ and not partial.kept


def test_a_stopped_part_makes_the_joined_result_stopped_wherever_it_stands():
    """The passes of A1111's pixel hires fix are joined: one stopped pass, even the last, stops the whole."""
    whole, stopped = StageResult(images=[]), StageResult(images=[], info={"stopped_at": [2, 4]})
    joined = StageResult(images=[]).joined([whole, stopped])
    assert joined.stopped and joined.info["stopped_at"] == [2, 4]
    assert not StageResult(images=[]).joined([whole, whole]).stopped


def test_a_hires_fix_stopped_in_its_second_pass_answers_at_the_hires_size(base):
    hires = request(seed=43, steps=4, hires=LatentHires(width=192, height=192, strength=0.5, steps=2))
    (result,) = base.generate_batch([BatchItem(hires, "h2", on_progress=lambda at, _t: at == 5
                                               and base.cancellation.stop("h2"))])
    assert result.info["stopped_at"] == [5, 6] and result.image.size == (192, 192)


def test_a_stopped_inpainting_keeps_the_pixels_outside_its_mask(base, astronaut):
    init = astronaut.resize((128, 128))
    mask = Image.new("L", (128, 128), 0)
    mask.paste(255, (32, 32, 96, 96))
    asked = request(seed=2, init_image=init, mask=mask, mask_blur=0, strength=1.0, steps=6)
    (result,) = base.generate_batch([BatchItem(asked, "inpaint", on_progress=lambda at, _t: at == 2
                                               and base.cancellation.stop("inpaint"))])
    outside = np.asarray(mask) == 0
    assert result.info["stopped_at"] == [2, 6]
    assert np.abs(pixels(result.image)[outside] - pixels(init)[outside]).max() <= 1


def test_the_stages_after_a_stopped_one_hand_its_images_on_untouched():
    """After /interrupt in the first pass of A1111's hires fix (or before the refiner), the upscaler, the second
    base pass and the refiner run nothing: the first pass's images are the answer, as A1111 skips its hires pass."""
    from types import SimpleNamespace

    from deployments.sdxl_base import SDXLBase
    from deployments.sdxl_refiner import SDXLRefiner
    from deployments.support.generation import RefineRequest
    from deployments.upscaler import Upscaler

    stopped = StageResult(images=[Image.new("RGB", (64, 64))], seeds=[1], info={"stopped_at": [2, 8]})
    idle = SimpleNamespace()  # any use of the replica's model, batcher or metrics would raise here
    assert asyncio.run(Upscaler.func_or_class.upscale(idle, stopped, "R-ESRGAN 4x+", 2.0)) is stopped
    assert asyncio.run(SDXLBase.func_or_class.generate(idle, request(), "r", init=stopped)) is stopped
    refine = RefineRequest(prompt="p", steps=4, denoising_start=0.8)
    assert asyncio.run(SDXLRefiner.func_or_class._submit(idle, refine, stopped, "r", ensemble=True)) is stopped


def test_the_refiner_counts_a_second_order_samplers_steps_once(refiner):
    from deployments.support.generation import RefineRequest

    steps = []
    source = StageResult(images=[Image.new("RGB", (128, 128), (90, 120, 200))], seeds=[3])
    refiner.refine_batch([BatchItem(RefineRequest(prompt="p", steps=4, strength=1.0, sampler="Heun"), "heun",
                                    source=source, on_progress=lambda at, total: steps.append((at, total)))],
                         ensemble=False)
    assert steps[-1] == (4, 4) and sorted({at for at, _ in steps}) == [1, 2, 3, 4]


def test_an_item_handed_over_early_answers_before_its_batch_ends():
    """``first``: an item's caller takes the result its run hands over mid-batch (set from the inference thread)
    without waiting for the batch; when the batch answers first, the hand-over is dropped and a late one is
    refused quietly."""
    import asyncio
    import threading
    from concurrent.futures import Future

    from deployments.support.batching import first

    async def scenario() -> None:
        release, ended = asyncio.Event(), []

        async def batch(answer: str) -> str:
            try:
                await release.wait()
                return answer
            except asyncio.CancelledError:
                ended.append("dropped")
                raise

        handed: Future = Future()
        caller = asyncio.ensure_future(first(batch("at the end"), handed))
        await asyncio.sleep(0.05)
        threading.Thread(target=lambda: handed.set_running_or_notify_cancel() and handed.set_result("early")).start()
        assert await asyncio.wait_for(caller, timeout=5) == "early"
        assert ended == ["dropped"]  # its wait for the batch went (Serve leaves its place in the answer unset)

        late: Future = Future()
        release.set()
        assert await first(batch("at the end"), late) == "at the end"
        await asyncio.sleep(0.01)  # the dropped wait reaches the thread's future on the loop's next turn
        assert late.cancelled() and late.set_running_or_notify_cancel() is False
        assert await first(batch("alone"), None) == "alone"

    asyncio.run(scenario())


def test_a_stop_whose_caller_is_gone_leaves_its_batch_mate_running(base):
    """An item stopped after its caller stopped waiting (its hand-over cancelled) is not handed over: its mate
    runs on to its own image and the batch still answers the stopped item."""
    keep = BatchItem(request(seed=41, steps=6), "keep", on_progress=lambda at, _t: at == 2
                     and base.cancellation.stop("stopped"))
    stopped = BatchItem(request(seed=42, steps=6), "stopped")
    stopped.handed.cancel()
    kept, partial = base.generate_batch([keep, stopped])
    assert isinstance(kept, StageResult) and mad(kept.image, base.generate(keep.request).image) < 1.0
    assert isinstance(partial, StageResult) and partial.info["stopped_at"] == [2, 6]


def test_an_item_stopped_and_cancelled_at_once_is_cancelled_not_handed_over(base):
    """A stop that reaches an item already cancelled leaves it cancelled: nothing is handed over for it."""
    def both(at, _total):
        if at == 1:
            base.cancellation.cancel("x")  # the batch sees it from step 2 on
        if at == 2:
            base.cancellation.stop("x")

    keep = BatchItem(request(seed=45, steps=6), "keep", on_progress=both)
    x = BatchItem(request(seed=46, steps=6), "x")
    kept, gone = base.generate_batch([keep, x])
    assert not x.handed.done() and isinstance(gone, GenerationCancelled) and isinstance(kept, StageResult)


def test_a_stopped_item_keeps_its_own_prompt_and_its_batchs_model_and_sampler(base):
    keep = BatchItem(request(seed=47, steps=6, prompt="a red house"), "keep", on_progress=lambda at, _t: at == 2
                     and base.cancellation.stop("stopped"))
    stopped = BatchItem(request(seed=48, steps=6, prompt="a blue boat"), "stopped")
    kept, partial = base.generate_batch([keep, stopped])
    assert partial.info["stopped_at"] == [2, 6] and partial.info["prompt"] == "a blue boat"
    assert [partial.info[k] for k in ("model", "sampler")] == [kept.info[k] for k in ("model", "sampler")]


def test_a_stopped_refiner_item_is_handed_over_early_and_its_mate_runs_on(base, refiner):
    """The refiner answers /interrupt as the base does: the item stopped is handed over at once with the step it
    stopped at; an expert ensemble stopped at its first step answers with its own decoded image."""
    from deployments.support.generation import RefineRequest

    early: dict[int, bool] = {}

    def stop_mate(at, _total):
        if at == 2:
            refiner.cancellation.stop("stopped")
        early[at] = stopped.handed.done()

    how = RefineRequest(prompt="a photo", steps=4, strength=1.0)
    sources = [StageResult(images=[Image.new("RGB", (128, 128), c)], seeds=[s])
               for c, s in (((90, 120, 200), 1), ((200, 120, 90), 2))]
    keep = BatchItem(how, "keep", source=sources[0], on_progress=stop_mate)
    stopped = BatchItem(how, "stopped", source=sources[1])
    results = refiner.refine_batch([keep, stopped], ensemble=False)
    assert early == {1: False, 2: False, 3: True, 4: True}
    assert stopped.handed.result() is results[1] and results[1].info["stopped_at"] == [2, 4]
    assert mad(results[0].image, refiner.refine_images(how, sources[0]).image) < 1.0
    handed = base.generate(request(seed=49, denoising_end=0.8))
    latents = RefineRequest(prompt="a photo", steps=4, denoising_start=0.8)
    (result,) = refiner.refine_batch([BatchItem(latents, "e", source=handed,
                                                on_progress=lambda _a, _t: refiner.cancellation.stop("e"))],
                                     ensemble=True)
    assert result.info["stopped_at"][0] == 1 and len(result.images) == 1


def test_gathered_cancels_the_others_when_one_fails():
    from deployments.support.batching import gathered

    cancelled = []

    async def fails_fast() -> None:
        raise ValueError("refused")

    async def slow() -> None:
        try:
            await asyncio.sleep(30)
        except asyncio.CancelledError:
            cancelled.append("slow")
            raise

    async def scenario() -> None:
        with pytest.raises(ValueError, match="refused"):
            await gathered([fails_fast(), slow()])

    asyncio.run(scenario())
    assert cancelled == ["slow"]
