"""SDXLRefiner: expert-ensemble latents from the base, and the hires-fix image pass at 1536x1536."""

from __future__ import annotations

import time

import numpy as np
import pytest
from PIL import Image

from deployments.support.errors import InvalidInput
from deployments.support.generation import GenerationRequest, RefineRequest, StageResult
from tests.helpers import pixels


def test_ensemble_latents_flow_base_to_refiner(base, refiner):
    handoff = base.generate(GenerationRequest(prompt="a red apple", width=128, height=128, steps=10, seed=3,
                                              batch_size=2, denoising_end=0.8))
    request = RefineRequest(prompt="a red apple", steps=10, denoising_start=0.8)
    result = refiner.refine_latents(request, handoff)
    images = result.images
    assert [i.size for i in images] == [(128, 128), (128, 128)]
    assert result.seeds == handoff.seeds and result.info["refiner_mode"] == "ensemble" and result.latents is None
    again = refiner.refine_latents(request, handoff).images
    assert np.array_equal(pixels(images[0]), pixels(again[0]))
    assert not np.array_equal(pixels(images[0]), pixels(images[1]))


def test_refiner_image_mode_changes_less_at_low_strength(refiner, astronaut):
    image = astronaut.resize((128, 128))
    low = pixels(refiner.refine_images(RefineRequest(seeds=[1], steps=10, strength=0.1), image).image)
    high = pixels(refiner.refine_images(RefineRequest(seeds=[1], steps=10, strength=0.9), image).image)
    same = pixels(refiner.refine_images(RefineRequest(seeds=[1], steps=10, strength=0.1), image).image)
    assert np.array_equal(low, same)
    assert not np.array_equal(low, high)


def test_each_mode_needs_its_input(refiner, base):
    image_only = StageResult(images=[Image.new("RGB", (64, 64))], seeds=[1])
    with pytest.raises(InvalidInput) as err:
        refiner.refine_latents(RefineRequest(), image_only)
    assert err.value.field == "latents"
    with pytest.raises(InvalidInput) as err:
        refiner.refine_images(RefineRequest(), StageResult(seeds=[1]))
    assert err.value.field == "seeds"


def test_warnings_travel_forward(refiner):
    earlier = StageResult(images=[Image.new("RGB", (64, 64))], seeds=[5], warnings=["LoRA 'x' not found, ignored"],
                          info={"model": "tiny"})
    result = refiner.refine_images(RefineRequest(steps=2, strength=0.5), earlier)
    assert result.warnings == ["LoRA 'x' not found, ignored"] and result.seeds == [5]
    assert result.info["model"] == "tiny" and result.info["refiner_mode"] == "image"


def test_hires_fix_yields_1536(base, upscaler, refiner):
    """The seed-000 plan on tiny models: 768 base -> x2 Real-ESRGAN -> refiner img2img at 1536, strength 0.35."""
    started = time.perf_counter()
    first = base.generate(GenerationRequest(prompt="landscape photo", width=768, height=768, steps=8, seed=42))
    upscaled = upscaler.upscale(first.images[0], "R-ESRGAN 2x+", 2)
    assert upscaled.image.size == (1536, 1536)
    final = refiner.refine_images(RefineRequest(prompt="landscape photo", steps=8, strength=0.35), upscaled).image
    elapsed = time.perf_counter() - started
    assert final.size == (1536, 1536)
    print(f"tiny hires fix 768 -> 1536: {elapsed:.1f}s")  # noqa: T201  (reported figure, read with -s)


def test_the_ensemble_runs_the_base_sampler_and_schedule(base, refiner):
    """Latents from a DPM++ 2M Karras base are variance-preserving, at a Karras noise level: the refiner must
    continue with the same sampler and schedule (it ran Euler, whatever the base ran)."""
    handoff = base.generate(GenerationRequest(prompt="a red apple", width=64, height=64, steps=10, seed=3,
                                              sampler="DPM++ 2M", schedule="Karras", denoising_end=0.8))
    assert handoff.info["sampler"] == "DPM++ 2M" and handoff.info["schedule"] == "Karras"
    refiner.refine_latents(RefineRequest(prompt="a red apple", steps=10, denoising_start=0.8), handoff)
    scheduler = refiner.pipe.scheduler
    assert type(scheduler).__name__ == "DPMSolverMultistepScheduler" and scheduler.config.use_karras_sigmas is True
    default = base.generate(GenerationRequest(prompt="a red apple", width=64, height=64, steps=10, seed=3,
                                              denoising_end=0.8))  # the base's default sampler, Euler a here
    refiner.refine_latents(RefineRequest(prompt="a red apple", steps=10, denoising_start=0.8), default)
    assert type(refiner.pipe.scheduler).__name__ == "EulerAncestralDiscreteScheduler"


def test_an_ensemble_with_another_sampler_than_the_base_is_refused(base, refiner):
    handoff = base.generate(GenerationRequest(prompt="p", width=64, height=64, steps=4, seed=3,
                                              sampler="DPM++ 2M Karras", denoising_end=0.8))
    with pytest.raises(InvalidInput) as e:
        refiner.refine_latents(RefineRequest(steps=4, sampler="Euler"), handoff)
    assert e.value.field == "sampler"
    with pytest.raises(InvalidInput) as e:
        refiner.refine_latents(RefineRequest(steps=4, schedule="Exponential"), handoff)
    assert e.value.field == "schedule"
    # The same sampler under another spelling, and the schedule its name implies, are the base's.
    assert refiner.refine_latents(RefineRequest(steps=4, sampler="dpm++_2m_karras", schedule="Automatic"),
                                  handoff).images


def test_the_ensemble_hand_off_continues_the_base_run(base, refiner, monkeypatch):
    """Both UNets replaced by the ideal denoiser of Gaussian latents x0 ~ N(0, 0.8²): with it, the base stopping at
    0.8 and the refiner finishing must land where the base alone lands. A DPM++ 2M Karras base finished by Euler
    was 17% off (its latents read too small by sqrt(1 + sigma²)); with the base's sampler it is within 1%."""
    import torch

    from deployments.support import fastpath

    spread = 0.8
    alphas = base.checkpoint().txt2img.scheduler.alphas_cumprod.double()

    def ideal(sample, timestep, *args, **kwargs):
        t = float(timestep.flatten()[0]) if torch.is_tensor(timestep) else float(timestep)
        lo, hi = int(np.floor(t)), min(int(np.ceil(t)), len(alphas) - 1)
        a = alphas[lo] + (alphas[hi] - alphas[lo]) * (t - lo)
        x = sample.double()
        x0 = a.sqrt() * spread**2 * x / (a * spread**2 + 1 - a)
        return (((x - a.sqrt() * x0) / (1 - a).sqrt()).to(sample.dtype),)

    captured = []

    def capture(_pipe, latents):
        captured.append(latents.float().clone())
        return [Image.new("RGB", (8, 8))] * len(latents)

    monkeypatch.setattr(base.checkpoint().txt2img.unet, "forward", ideal)
    monkeypatch.setattr(refiner.pipe.unet, "forward", ideal)
    monkeypatch.setattr(fastpath, "decode", capture)
    request = GenerationRequest(prompt="p", width=128, height=128, steps=30, seed=1, sampler="DPM++ 2M Karras")
    base.generate(request)
    handoff = base.generate(request.model_copy(update={"denoising_end": 0.8}))
    refiner.refine_latents(RefineRequest(prompt="p", steps=30, denoising_start=0.8), handoff)
    alone, ensemble = captured
    assert abs(float(alone.std()) - spread) < 0.05
    assert float((ensemble - alone).norm() / alone.norm()) < 0.01


def test_a_dpm_sde_refiner_follows_the_seeds(refiner, astronaut):
    """Its Brownian tree is seeded per image, as the base's is: image i of a batch is the one its seed gives alone."""
    images = [astronaut.resize((64, 64)), astronaut.resize((64, 64)).rotate(90)]
    request = RefineRequest(steps=6, strength=0.5, sampler="DPM++ SDE Karras")
    batch = refiner.refine_images(request, StageResult(images=images, seeds=[7, 8])).images
    for image, source, seed in zip(batch, images, [7, 8], strict=True):
        alone = refiner.refine_images(request, StageResult(images=[source], seeds=[seed])).images[0]
        assert np.abs(pixels(alone) - pixels(image)).max() <= 1
    again = refiner.refine_images(request, StageResult(images=images[:1], seeds=[7])).images[0]
    assert np.array_equal(pixels(again), pixels(refiner.refine_images(request, StageResult(
        images=images[:1], seeds=[7])).images[0]))


def test_a_schedule_warning_is_said_once_through_the_ensemble(base, refiner):
    handoff = base.generate(GenerationRequest(prompt="p", width=64, height=64, steps=4, seed=3, sampler="DDIM",
                                              schedule="Karras", denoising_end=0.8))
    result = refiner.refine_latents(RefineRequest(steps=4), handoff)
    assert result.warnings == ["scheduler 'Karras' does not apply to sampler 'DDIM': its own schedule ran"]


def test_ensembles_from_bases_of_different_samplers_never_share_a_batch():
    from deployments.sdxl_refiner import batch_key

    how = RefineRequest(steps=4)
    latents = np.zeros((1, 4, 8, 8), np.float32)
    handed = {name: StageResult(latents=latents, seeds=[1], info={"sampler": name, "schedule": schedule})
              for name, schedule in [("Euler", None), ("DPM++ 2M", "Karras")]}
    keys = {batch_key(how, source, ensemble=True) for source in handed.values()}
    assert len(keys) == 2


def _ensemble(base, refiner, prompt: str, refined: str | None = None, *, seed: int = 3, sampler: str = "Euler",
              steps: int = 10, switch: float = 0.5) -> np.ndarray:
    """An A1111 request's pixels: the base to ``switch`` on ``prompt``, the refiner on ``refined`` (the same by
    default) from there."""
    handoff = base.generate(GenerationRequest(prompt=prompt, width=64, height=64, steps=steps, seed=seed,
                                              sampler=sampler, denoising_end=switch, prompt_syntax="a1111"))
    request = RefineRequest(prompt=refined if refined is not None else prompt, steps=steps, denoising_start=switch,
                            prompt_syntax="a1111")
    return pixels(refiner.refine_latents(request, handoff).image)


def test_the_refiner_counts_prompt_editing_on_from_the_base(base, refiner):
    """A1111 switches models mid-run and its step counter goes on: of 10 Euler steps switched at 0.5, the base runs
    evaluations 0-4 and the refiner 5-9. An edit that switches in the base's part ([..:2]) is ``castle`` over
    the whole refiner part, and then the run equals a base on ``lighthouse`` handing off to a refiner on
    ``castle``; one that switches at its last evaluation ([..:9]) never reaches the refiner; one inside its part
    ([..:7]) changes the refined image against both."""
    lighthouse, castle = "a lighthouse", "a castle"
    early = _ensemble(base, refiner, "a [lighthouse:castle:4]")
    assert np.array_equal(early, _ensemble(base, refiner, lighthouse, castle))
    assert np.array_equal(_ensemble(base, refiner, lighthouse, "a [lighthouse:castle:2]"), early)
    assert np.array_equal(_ensemble(base, refiner, lighthouse, "a [lighthouse:castle:9]"),
                          _ensemble(base, refiner, lighthouse))
    inside = _ensemble(base, refiner, lighthouse, "a [lighthouse:castle:7]")
    assert not np.array_equal(inside, _ensemble(base, refiner, lighthouse))
    assert not np.array_equal(inside, early)
    assert np.array_equal(inside, _ensemble(base, refiner, lighthouse, "a [lighthouse:castle:7]"))


def test_the_refiner_swaps_the_text_at_the_step_a1111_does(base, refiner):
    """The swap of [lighthouse:castle:7] lands where A1111's counter puts it: evaluation 8, this pass's fourth loop
    iteration (the base ran 5; diffusers' img2img loop restarts at 0). The reference runs the refiner's pipeline
    by hand on ``lighthouse``'s embeddings, swapping in ``castle``'s after the third iteration."""
    import torch

    from deployments.support import fastpath
    from deployments.support.prompts import PromptEncoder
    from deployments.support.samplers import build_scheduler

    handoff = base.generate(GenerationRequest(prompt="a lighthouse", width=64, height=64, steps=10, seed=3,
                                              sampler="Euler", denoising_end=0.5, prompt_syntax="a1111"))
    served = pixels(refiner.refine_latents(RefineRequest(prompt="a [lighthouse:castle:7]", steps=10,
                                                         denoising_start=0.5, prompt_syntax="a1111"),
                                           handoff).image)
    pipe, encode = refiner.pipe, PromptEncoder(refiner.pipe)
    castle = encode(["a castle"], None, 10)

    def swap(pipe_, step, _timestep, kwargs):
        if step == 2:
            kwargs["prompt_embeds"] = torch.cat([castle["negative_prompt_embeds"], castle["prompt_embeds"]])
            kwargs["add_text_embeds"] = torch.cat([castle["negative_pooled_prompt_embeds"],
                                                   castle["pooled_prompt_embeds"]])
        return kwargs

    pipe.scheduler = build_scheduler("Euler", refiner.scheduler_config)
    latents = pipe(**encode(["a lighthouse"], None, 10), image=torch.from_numpy(handoff.latents),
                   denoising_start=0.5, num_inference_steps=10, guidance_scale=7.0,
                   generator=[torch.Generator("cpu").manual_seed(3)], callback_on_step_end=swap,
                   callback_on_step_end_tensor_inputs=["latents", "prompt_embeds", "add_text_embeds"],
                   output_type="latent").images
    assert np.array_equal(served, pixels(fastpath.decode(pipe, latents)[0]))


def test_a_second_order_refiner_counts_evaluations(base, refiner):
    """Heun evaluates twice a step: A1111's schedule of 6 steps runs over 12 evaluations, and diffusers' run is 11
    loop iterations (the last step evaluates once), of which the refiner from 0.5 runs the last 9, from evaluation
    2 on (it takes up the step the base stopped in). [..:0.25] switches after evaluation 3, inside the refiner's part
    (over 6 steps it would switch at 1, before it); [..:1] switches before it."""
    def run(refined: str | None = None) -> np.ndarray:
        return _ensemble(base, refiner, "a lighthouse", refined, sampler="Heun", steps=6)

    castle = run("a castle")
    assert np.array_equal(run("a [lighthouse:castle:1]"), castle)
    inside = run("a [lighthouse:castle:0.25]")
    assert not np.array_equal(inside, castle) and not np.array_equal(inside, run())


def test_batched_ensembles_keep_each_requests_schedule(base, refiner):
    """Requests whose refiner parts swap their texts at different steps, batched beside one that never swaps: each
    row follows its own schedule. Against batches of the same size (a batch of two multiplies in another order on
    CPU than one alone, within 1 of it, as for any refiner batch): a swap before the refiner's part is ``castle``'s
    row exactly, the batch mate's pixels are those it has beside a plain request, and a swap inside the part moves
    its own row."""
    from deployments.support.batching import outcome
    from deployments.support.generation import BatchItem

    sources = [base.generate(GenerationRequest(prompt="a lighthouse", width=64, height=64, steps=10, seed=seed,
                                               sampler="Euler", denoising_end=0.5, prompt_syntax="a1111"))
               for seed in (3, 4)]

    def request(prompt: str) -> RefineRequest:
        return RefineRequest(prompt=prompt, steps=10, denoising_start=0.5, prompt_syntax="a1111")

    def batch(first: str) -> list[np.ndarray]:
        items = [BatchItem(request(p), f"r{k}", source=s)
                 for k, (p, s) in enumerate(zip((first, "a lighthouse"), sources, strict=True))]
        return [pixels(outcome(r).image) for r in refiner.refine_batch(items, ensemble=True)]

    plain, inside, early, castle = (batch(p) for p in ("a lighthouse", "a [lighthouse:castle:7]",
                                                       "a [lighthouse:castle:2]", "a castle"))
    assert np.array_equal(early[0], castle[0])
    assert not np.array_equal(inside[0], plain[0]) and not np.array_equal(inside[0], castle[0])
    for mates in (inside, early, castle):
        assert np.array_equal(mates[1], plain[1])
    alone = pixels(refiner.refine_latents(request("a [lighthouse:castle:7]"), sources[0]).image)
    assert np.abs(inside[0] - alone).max() <= 1


def test_the_image_mode_says_it_reads_the_first_steps_text(refiner, astronaut):
    """A finished image has no A1111 step to count on from: its pass runs the first text, and says so."""
    image = StageResult(images=[astronaut.resize((64, 64))], seeds=[1])
    edited = refiner.refine_images(RefineRequest(prompt="a [lighthouse:castle:2]", steps=4, strength=0.5,
                                                 prompt_syntax="a1111"), image)
    plain = refiner.refine_images(RefineRequest(prompt="a lighthouse", steps=4, strength=0.5,
                                                prompt_syntax="a1111"), image)
    assert np.array_equal(pixels(edited.image), pixels(plain.image))
    assert edited.warnings == ["prompt editing and alternation: the refiner's image pass ran the text of the first "
                               "step (a finished image has no step of A1111's to count on from)"]
    assert plain.warnings == []


def test_an_euler_ensemble_churns_on_through_the_refiners_steps(base, refiner):
    """A1111's churn belongs to its one sampling run, which the refiner's steps continue: the refiner's Euler pass
    churns too (a churn of 0 is today's pass), and requests with other churn settings never share its batch."""
    from deployments.sdxl_refiner import batch_key
    from deployments.support.generation import Churn

    churn = Churn(s_churn=10.0)
    handoff = base.generate(GenerationRequest(prompt="a red apple", width=64, height=64, steps=10, seed=3,
                                              sampler="Euler", denoising_end=0.5, churn=churn))
    request = RefineRequest(prompt="a red apple", steps=10, denoising_start=0.5)
    today = pixels(refiner.refine_latents(request, handoff).image)
    off = request.model_copy(update={"churn": Churn()})
    assert np.array_equal(pixels(refiner.refine_latents(off, handoff).image), today)
    churned = request.model_copy(update={"churn": churn})
    image = pixels(refiner.refine_latents(churned, handoff).image)
    assert np.abs(image - today).mean() > 1.0
    assert np.array_equal(pixels(refiner.refine_latents(churned, handoff).image), image)
    assert batch_key(request, handoff, ensemble=True) != batch_key(churned, handoff, ensemble=True)


def test_an_ensembles_subprompts_follow_their_own_schedules(base, refiner):
    """AND on the refiner's steps: the second subprompt's edit goes on from the base's count as the first's does.
    Switched before the refiner's part it is ``castle`` there exactly; switched inside it, the image moves."""
    lighthouse = "a lighthouse AND a lighthouse :0.5"
    early = _ensemble(base, refiner, lighthouse, "a lighthouse AND a [lighthouse:castle:2] :0.5")
    assert np.array_equal(early, _ensemble(base, refiner, lighthouse, "a lighthouse AND a castle :0.5"))
    inside = _ensemble(base, refiner, lighthouse, "a lighthouse AND a [lighthouse:castle:7] :0.5")
    assert not np.array_equal(inside, _ensemble(base, refiner, lighthouse))
    assert not np.array_equal(inside, early)


@pytest.mark.parametrize(("sampler", "schedule"), [("Euler", None), ("DPM++ 2M", "Karras"), ("Heun", None),
                                                   ("DPM2", "Karras")])
def test_the_iterations_before_an_ensemble_are_those_diffusers_leaves_out(base, refiner, sampler, schedule):
    """``iterations_before`` repeats diffusers' img2img cut-off: the refiner's pipeline ran the whole run's
    iterations less those, for first- and second-order schedulers alike."""
    from deployments.sdxl_refiner import iterations_before

    handoff = base.generate(GenerationRequest(prompt="p", width=64, height=64, steps=7, seed=3, sampler=sampler,
                                              schedule=schedule, denoising_end=0.6))
    refiner.refine_latents(RefineRequest(prompt="p", steps=7, denoising_start=0.6), handoff)
    whole = len(refiner.pipe.scheduler.timesteps)
    before = iterations_before(sampler, refiner.scheduler_config, schedule, 7, 0.6)
    assert 0 < before < whole and whole - refiner.pipe._num_timesteps == before
