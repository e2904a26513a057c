"""SDXLBase on the tiny model: reproducibility, LoRA isolation, IP-Adapter, inpainting, samplers, cancel."""

from __future__ import annotations

import threading

import numpy as np
import pytest
from PIL import Image

from deployments.support.errors import GenerationCancelled, InvalidInput, UnknownModel
from deployments.support.generation import GenerationRequest, LoraRef, parse_lora_tags
from deployments.support.samplers import sampler_names
from tests.helpers import pixels

SMALL = dict(prompt="a photo of a cat", width=128, height=128, steps=4, guidance_scale=5.0)


def gen(base, **kw):
    return base.generate(GenerationRequest(**{**SMALL, **kw}))


def test_same_seed_same_pixels_other_seed_differs(base):
    a, b, c = gen(base, seed=7), gen(base, seed=7), gen(base, seed=8)
    assert a.seeds == [7]
    assert np.array_equal(pixels(a.images[0]), pixels(b.images[0]))
    assert np.abs(pixels(a.images[0]) - pixels(c.images[0])).mean() > 1.0


def test_batch_returns_each_seed_and_each_reproduces(base):
    batch = gen(base, seed=100, batch_size=3)
    assert batch.seeds == [100, 101, 102]
    assert len(batch.images) == 3
    for seed, image in zip(batch.seeds, batch.images, strict=True):
        alone = gen(base, seed=seed).images[0]
        # Batched and single convolutions may round differently on CPU: allow one grey level.
        assert np.abs(pixels(alone) - pixels(image)).max() <= 2


def test_random_seed_is_returned_and_reproduces(base):
    first = gen(base, seed=-1)
    assert 0 <= first.seeds[0] < 2**32
    again = gen(base, seed=first.seeds[0])
    assert np.array_equal(pixels(first.images[0]), pixels(again.images[0]))


def test_lora_changes_output_weight_zero_equals_none(base):
    plain = pixels(gen(base, seed=3).images[0])
    styled = pixels(gen(base, seed=3, loras=[LoraRef(name="tiny-style", weight=1.0)]).images[0])
    zero = pixels(gen(base, seed=3, loras=[LoraRef(name="tiny-style", weight=0.0)]).images[0])
    assert np.abs(plain - styled).mean() > 1.0
    assert np.array_equal(plain, zero)
    # After a LoRA request the next plain one is unaffected.
    assert np.array_equal(plain, pixels(gen(base, seed=3).images[0]))


def test_lora_tag_in_prompt_is_applied_and_stripped(base):
    plain = pixels(gen(base, seed=4).images[0])
    tagged = gen(base, seed=4, prompt="a photo of a cat <lora:tiny-detail:0.8>")
    assert tagged.info["prompt"] == "a photo of a cat"
    assert tagged.info["loras"] == {"tiny-detail": 0.8}
    assert np.abs(plain - pixels(tagged.images[0])).mean() > 1.0
    unknown = gen(base, seed=4, prompt="a photo of a cat <lora:nope:1>")
    assert any("nope" in w for w in unknown.warnings)
    assert np.array_equal(plain, pixels(unknown.images[0]))


def test_explicit_unknown_lora_is_refused(base):
    with pytest.raises(UnknownModel) as e:
        gen(base, loras=[LoraRef(name="../../etc/passwd")])
    assert e.value.field == "loras"


def test_concurrent_request_without_lora_is_unaffected(base):
    plain = pixels(gen(base, seed=5).images[0])
    results: dict[str, np.ndarray] = {}

    def run(key, **kw):
        results[key] = pixels(gen(base, seed=5, **kw).images[0])

    threads = [threading.Thread(target=run, args=("lora",), kwargs={"loras": [LoraRef(name="tiny-style")]})]
    threads += [threading.Thread(target=run, args=(f"plain{i}",)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert np.array_equal(results["plain0"], plain)
    assert np.array_equal(results["plain1"], plain)
    assert np.abs(results["lora"] - plain).mean() > 1.0


def test_parse_lora_tags():
    text, refs = parse_lora_tags("anime girl, <lora:animeScreencap_v14:0.7> <lora:mangaCleanLineart_v1>")
    assert text == "anime girl"
    assert [(r.name, r.weight) for r in refs] == [("animeScreencap_v14", 0.7), ("mangaCleanLineart_v1", 1.0)]


def test_ip_adapter_scale_changes_output(base, astronaut):
    photo = astronaut.resize((64, 64))
    none = pixels(gen(base, seed=9).images[0])
    low = pixels(gen(base, seed=9, ip_adapter_image=photo, ip_adapter_scale=0.0).images[0])
    high = pixels(gen(base, seed=9, ip_adapter_image=photo, ip_adapter_scale=1.0).images[0])
    assert np.array_equal(none, low)  # scale 0 is exactly no adapter
    assert np.abs(high - none).mean() > 1.0


def test_img2img_depends_on_the_init_image_less_as_strength_rises(base, astronaut):
    a = astronaut.resize((128, 128))
    b = Image.new("RGB", (128, 128), (20, 120, 220))

    def spread(strength):
        out_a = pixels(gen(base, seed=1, init_image=a, strength=strength).images[0])
        out_b = pixels(gen(base, seed=1, init_image=b, strength=strength).images[0])
        return np.abs(out_a - out_b).mean()

    low, high = spread(0.3), spread(1.0)
    assert low > 5.0  # the init image shapes a low-strength result
    assert high < low / 2  # at full strength the noise dominates


def test_inpainting_keeps_pixels_outside_the_mask(base, astronaut):
    init = astronaut.resize((128, 128))
    mask = Image.new("L", (128, 128), 0)
    mask.paste(255, (32, 32, 96, 96))
    result = gen(base, seed=2, init_image=init, mask=mask, mask_blur=0, strength=1.0)
    out, src = pixels(result.images[0]), pixels(init)
    outside = np.asarray(mask) == 0
    assert result.info["mode"] == "inpaint"
    assert np.abs(out[outside] - src[outside]).max() <= 1
    assert np.abs(out[~outside] - src[~outside]).mean() > 5.0


def test_mask_blur_feathers_the_edge_and_keeps_far_pixels(base, astronaut):
    """A blurred mask repaints a little past its edge (the generation fades into the photo there); pixels farther
    than the blur reaches (24 px at radius 8) are still the init image's."""
    init = astronaut.resize((128, 128))
    mask = Image.new("L", (128, 128), 0)
    mask.paste(255, (32, 32, 96, 96))
    ring = np.zeros((128, 128), bool)
    ring[28:100, 28:100] = True
    ring[32:96, 32:96] = False  # the 4 pixels just outside the mask
    far = np.ones((128, 128), bool)
    far[8:120, 8:120] = False  # 24 pixels or more from the mask
    src = pixels(init)
    sharp, feathered = (pixels(gen(base, seed=2, init_image=init, mask=mask, mask_blur=blur, strength=1.0).images[0])
                        for blur in (0, 8))
    assert np.abs(sharp[ring] - src[ring]).max() <= 1
    assert np.abs(feathered[ring] - src[ring]).mean() > 10.0
    assert np.abs(feathered[far] - src[far]).max() <= 1


def test_style_transfer_is_img2img_with_a_style_image(base, astronaut):
    content = astronaut.resize((128, 128))
    style = Image.new("RGB", (64, 64), (200, 30, 30))
    plain = pixels(gen(base, seed=6, init_image=content, strength=0.6).images[0])
    styled = pixels(gen(base, seed=6, init_image=content, strength=0.6, ip_adapter_image=style,
                        ip_adapter_scale=1.0).images[0])
    assert np.abs(plain - styled).mean() > 0.5


@pytest.mark.parametrize("name", ["Euler a", "DPM++ 2M Karras", "DPM++ SDE Karras", "DDIM", "UniPC", "Heun",
                                  "LMS", "PNDM", "euler_a", "dpm++_2m", "ddim", "plms"])
def test_samplers_switch_per_request(base, name):
    result = gen(base, seed=11, sampler=name)
    assert result.images[0].size == (128, 128)
    assert np.isfinite(pixels(result.images[0])).all()


def test_samplers_differ_and_do_not_leak(base):
    euler_a = pixels(gen(base, seed=12, sampler="Euler a").images[0])
    ddim = pixels(gen(base, seed=12, sampler="DDIM").images[0])
    assert np.abs(euler_a - ddim).mean() > 1.0
    assert np.array_equal(euler_a, pixels(gen(base, seed=12, sampler="Euler a").images[0]))
    assert "DPM++ 2M Karras" in sampler_names()


@pytest.mark.parametrize("name", ["DPM++ SDE", "DPM++ SDE Karras", "dpm++_sde_karras"])
def test_dpm_sde_follows_the_seed_of_each_image(base, name):
    """DPM++ SDE draws its noise from a Brownian tree, not from the pipeline's generators: seeded per image, a seed
    gives its image again, alone or in a batch (unseeded, the same seed twice differed by up to 210 levels)."""
    small = dict(width=64, height=64, sampler=name)
    once, twice = gen(base, seed=7, **small), gen(base, seed=7, **small)
    assert np.array_equal(pixels(once.images[0]), pixels(twice.images[0]))
    batch = gen(base, seed=7, batch_size=2, **small)
    assert batch.seeds == [7, 8]
    alone = [once, gen(base, seed=8, **small)]
    for image, single in zip(batch.images, alone, strict=True):
        assert np.abs(pixels(image) - pixels(single.images[0])).max() <= 1  # batched convolutions round apart
    assert np.abs(pixels(batch.images[0]) - pixels(batch.images[1])).mean() > 1.0


def test_a_schedule_the_sampler_ignores_is_reported(base):
    """DDIM takes no sigma schedule (in diffusers as in A1111): with Karras it runs its own, and the result says so.
    Euler a with Karras runs Karras sigmas (those plain Euler computes), with no warning."""
    ignored = gen(base, seed=5, width=64, height=64, sampler="DDIM", schedule="Karras")
    assert ignored.warnings == ["scheduler 'Karras' does not apply to sampler 'DDIM': its own schedule ran"]
    plain = gen(base, seed=5, width=64, height=64, sampler="DDIM", schedule="Automatic")
    assert plain.warnings == []
    assert np.array_equal(pixels(ignored.images[0]), pixels(plain.images[0]))
    assert gen(base, seed=5, width=64, height=64, sampler="DPM++ 2M", schedule="Karras").warnings == []
    assert gen(base, seed=5, width=64, height=64, sampler="Euler a", schedule="Karras").warnings == []


def test_the_hires_second_pass_runs_its_own_steps_whatever_the_strength(base, monkeypatch):
    """A1111 runs hr_second_pass_steps at any denoising strength (it ran int(steps x strength): 6 of 20 at 0.3)."""
    from deployments.support.generation import LatentHires

    unet = base.checkpoint().txt2img.unet
    sizes = []
    original = unet.forward
    monkeypatch.setattr(unet, "forward", lambda sample, *a, **k: sizes.append(sample.shape[-1]) or original(sample,
                                                                                                          *a, **k))
    seen = []
    hires = LatentHires(width=128, height=128, steps=5, strength=0.3)
    base.generate(GenerationRequest(**{**SMALL, "width": 64, "height": 64, "steps": 3}, seed=1, hires=hires),
                  on_progress=lambda s, t: seen.append((s, t)))
    assert sizes == [8] * 3 + [16] * 5  # latents: 64 / 8, then 128 / 8
    assert seen == [(i, 8) for i in range(1, 9)]


def test_img2img_with_exact_steps_runs_them_whatever_the_strength(base, astronaut, monkeypatch):
    """The pixel hires fix's second pass (A1111 runs hr_second_pass_steps at any strength); plain img2img keeps
    A1111's int(steps x strength)."""
    unet = base.checkpoint().img2img.unet
    calls = []
    original = unet.forward
    monkeypatch.setattr(unet, "forward", lambda *a, **k: calls.append(1) or original(*a, **k))
    for exact, expected in ((True, 5), (False, 1)):
        calls.clear()
        base.generate(GenerationRequest(**{**SMALL, "width": 64, "height": 64, "steps": 5}, seed=1, strength=0.3,
                                        init_image=astronaut.resize((64, 64)), exact_steps=exact))
        assert len(calls) == expected


def test_a_hires_pass_past_the_schedule_runs_what_fits_and_says_so(base):
    """20 steps at strength 0.01 would need a 2000-step schedule over SDXL's 1000 timesteps: 10 run."""
    from deployments.support.generation import LatentHires

    seen = []
    hires = LatentHires(width=128, height=128, steps=20, strength=0.01)
    result = base.generate(GenerationRequest(**{**SMALL, "width": 64, "height": 64, "steps": 2}, seed=1, hires=hires),
                           on_progress=lambda s, t: seen.append((s, t)))
    assert seen[-1] == (12, 12)
    assert result.warnings == ["hires: 10 of 20 second-pass steps ran: at strength 0.01 more would exceed the "
                               "schedule's 1000 timesteps"]


def test_img2img_at_a_strength_where_the_step_arithmetic_rounds_to_zero(base, astronaut):
    """765 x (1/765) is just under 1 in floats: the pass asked for 765 steps, ran none, and diffusers failed."""
    seen = []
    request = GenerationRequest(**{**SMALL, "width": 64, "height": 64}, seed=1, init_image=astronaut.resize((64, 64)),
                                strength=1 / 765)
    result = base.generate(request, on_progress=lambda s, t: seen.append((s, t)))
    assert result.images[0].size == (64, 64) and seen == [(1, 1)]  # one step, at the lowest noise level


@pytest.mark.parametrize("name", ["Warp drive", "Euler a Sideways", "Karras"])
def test_unknown_sampler_names_the_field(base, name):
    """A name that is no sampler, with or without one of A1111's schedule labels after it, is refused naming the
    field (a label after a sampler's name is read as A1111 >= 1.9 reads it: "Euler a Karras" runs)."""
    with pytest.raises(UnknownModel) as e:
        gen(base, sampler=name)
    assert e.value.field == "sampler_name"
    assert name not in sampler_names()


@pytest.mark.parametrize("width,height,field", [(130, 128, "width"), (128, 100, "height")])
def test_sizes_must_be_multiples_of_8(base, width, height, field):
    with pytest.raises(InvalidInput) as e:
        gen(base, width=width, height=height)
    assert e.value.field == field


def test_progress_is_reported_per_step_and_cancel_stops_between_steps(base):
    seen = []
    base.generate(GenerationRequest(**{**SMALL, "steps": 5}), on_progress=lambda s, t: seen.append((s, t)))
    assert seen == [(i, 5) for i in range(1, 6)]
    # PLMS evaluates its first timestep twice (6 calls for 5 steps): progress still ends at 5 of 5, never past it
    # (a job's percentage over 100 failed its own view's schema).
    seen.clear()
    base.generate(GenerationRequest(**{**SMALL, "steps": 5}, sampler="PLMS"), on_progress=lambda s, t: seen.append(
        (s, t)))
    assert seen == [(1, 5), (2, 5), (3, 5), (4, 5), (5, 5), (5, 5)]

    steps_run = []

    def cancel_at_two(step, total):
        steps_run.append(step)
        if step == 2:
            base.cancellation.cancel("job-1")

    with pytest.raises(GenerationCancelled):
        base.generate(GenerationRequest(**{**SMALL, "steps": 10}), request_id="job-1", on_progress=cancel_at_two)
    assert steps_run == [1, 2]
    # The flag belonged to that request only: the next one with the same id runs to the end.
    assert base.generate(GenerationRequest(**SMALL), request_id="job-1").images


def test_latents_for_the_refiner_skip_the_decode(base, monkeypatch):
    calls = []
    vae = base.checkpoint().txt2img.vae
    original = vae.decode
    monkeypatch.setattr(vae, "decode", lambda *a, **k: calls.append(1) or original(*a, **k))
    result = gen(base, seed=1, denoising_end=0.8, batch_size=2)
    assert result.images == [] and calls == []
    assert result.latents.shape == (2, 4, 16, 16)  # the VAE's x8 scale


def test_gpu_oom_is_retryable_and_repeated_ooms_fail_health(base, monkeypatch):
    """PyTorch's own out-of-memory error, and cuBLAS's and cuDNN's (plain RuntimeErrors: their workspaces are
    allocated outside PyTorch's allocator), are one retryable GPU_OOM; any other RuntimeError stays what it is."""
    import torch

    from deployments.support.errors import GpuOutOfMemory

    errors = iter([torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 8.00 GiB"),
                   RuntimeError("CUDA error: CUBLAS_STATUS_ALLOC_FAILED when calling `cublasCreate(handle)`"),
                   RuntimeError("cuDNN error: CUDNN_STATUS_ALLOC_FAILED"),
                   RuntimeError("expected m1 and m2 to have the same dtype")])

    def out_of_memory(**_kwargs):
        raise next(errors)

    monkeypatch.setattr(base, "_run", lambda *a, **k: out_of_memory())
    for attempt in range(3):
        assert base.healthy()
        with pytest.raises(GpuOutOfMemory) as e:
            gen(base)
        assert e.value.code == "GPU_OOM" and base.oom.consecutive == attempt + 1
    assert not base.healthy()
    with pytest.raises(RuntimeError, match="same dtype"):
        gen(base)
    assert base.oom.consecutive == 3
    monkeypatch.undo()
    gen(base)  # a success resets the count
    assert base.healthy() and base.oom.consecutive == 0


def test_cancel_flags_of_requests_that_never_ran_expire(monkeypatch):
    from deployments.support import generation

    cancellation = generation.Cancellation()
    clock = [1000.0]
    monkeypatch.setattr(generation.time, "monotonic", lambda: clock[0])
    cancellation.cancel("never-started")
    clock[0] += generation.CANCEL_TTL_S + 1
    cancellation.cancel("another")
    assert list(cancellation._cancelled) == ["another"]


@pytest.mark.anyio
async def test_a_failed_pass_stops_the_other_passes_of_its_request(tiny):
    """A pass over several images (A1111's pixel hires fix) is one item per image, in batches by size. When one
    batch fails, the request is flagged: its pass in a batch of another size stops at its first step instead of
    running to the end for an answer nobody will read."""
    from deployments.sdxl_base import SDXLBase
    from deployments.support.generation import StageResult

    shell = SDXLBase.func_or_class
    base = shell.__new__(shell)
    await base.__init__({"model": {"source": str(tiny / "sdxl-base")}})  # Serve awaits the constructor
    original, outcomes = base.model.generate_batch, []

    def generate_batch(items):
        if items[0].request.width == 64:
            raise RuntimeError("this batch failed")
        outcomes.append(original(items))
        return outcomes[-1]

    base.model.generate_batch = generate_batch
    init = StageResult(images=[Image.new("RGB", (64, 64), (90, 90, 90)), Image.new("RGB", (96, 96), (20, 20, 20))],
                       seeds=[1, 2])
    request = GenerationRequest(**{**SMALL, "steps": 20, "strength": 0.5})
    with pytest.raises(RuntimeError, match="this batch failed"):
        await base.generate(request, request_id="hires", init=init)
    # The inference thread runs its calls in order: once this one has run, the other batch has either run (and
    # stopped at its first step) or, still queued when the request failed, was withdrawn and never ran.
    await base.thread.run(lambda: None)
    assert outcomes == [] or [type(o) for [o] in outcomes] == [GenerationCancelled]


def test_euler_churn_off_is_todays_image_and_on_is_deterministic(base):
    """s_churn 0 (and the defaults of the other three) is no churn: the very pixels of a request without one. Above
    0 Euler adds noise from each image's own generator: the same seed gives the same pixels, another image."""
    from deployments.support.generation import Churn

    euler = dict(sampler="Euler", seed=7)
    today = pixels(gen(base, **euler).images[0])
    assert np.array_equal(pixels(gen(base, **euler, churn=Churn()).images[0]), today)
    assert np.array_equal(pixels(gen(base, **euler, churn=Churn(s_tmin=1.0, s_noise=0.5)).images[0]), today)
    churned = pixels(gen(base, **euler, churn=Churn(s_churn=10.0)).images[0])
    assert np.abs(churned - today).mean() > 1.0
    assert np.array_equal(pixels(gen(base, **euler, churn=Churn(s_churn=10.0)).images[0]), churned)
    quieter = pixels(gen(base, **euler, churn=Churn(s_churn=10.0, s_noise=0.5)).images[0])
    assert not np.array_equal(quieter, churned) and not np.array_equal(quieter, today)


def test_euler_churn_only_within_its_sigma_window(base):
    """[s_tmin, s_tmax] bounds the sigmas churned: a window below SDXL's least sigma (about 0.03) churns none and
    gives today's image; one holding some of the steps' sigmas churns those alone."""
    from deployments.support.generation import Churn
    from deployments.support.samplers import build_scheduler

    euler = dict(sampler="Euler", seed=7)
    today = pixels(gen(base, **euler).images[0])
    assert np.array_equal(pixels(gen(base, **euler, churn=Churn(s_churn=10.0, s_tmax=0.01)).images[0]), today)
    scheduler = build_scheduler("Euler", base.checkpoint().scheduler_config)
    scheduler.set_timesteps(SMALL["steps"])
    sigmas = [float(s) for s in scheduler.sigmas[:-1]]
    low = sorted(sigmas)[1]  # the two least sigmas of the run: churned; the larger ones not
    assert any(s > low for s in sigmas)
    window = pixels(gen(base, **euler, churn=Churn(s_churn=10.0, s_tmax=low)).images[0])
    everywhere = pixels(gen(base, **euler, churn=Churn(s_churn=10.0)).images[0])
    assert not np.array_equal(window, today) and not np.array_equal(window, everywhere)


def test_euler_churn_draws_each_images_noise_from_its_own_seed(base):
    """In a batch, image i is the one its seed gives alone (within the batch's rounding): the churn's noise is
    drawn from its own generator, never a batch mate's."""
    from deployments.sdxl_base import batch_key
    from deployments.support.generation import Churn

    churn = Churn(s_churn=10.0)
    batch = gen(base, sampler="Euler", seed=100, batch_size=2, churn=churn).images
    plain = gen(base, sampler="Euler", seed=101).images[0]
    for seed, image in zip((100, 101), batch, strict=True):
        alone = gen(base, sampler="Euler", seed=seed, churn=churn).images[0]
        assert np.abs(pixels(alone) - pixels(image)).max() <= 2
    assert np.abs(pixels(batch[1]) - pixels(plain)).max() > 2
    # Requests with other churn settings never share a pipeline call.
    keys = {batch_key(GenerationRequest(**SMALL, sampler="Euler", churn=c))
            for c in (None, churn, Churn(s_churn=10.0, s_noise=0.5))}
    assert len(keys) == 3


def test_churn_is_bounded_and_other_samplers_run_without_it(base):
    """A1111's slider bounds, refused naming the field; a sampler other than Euler takes no churn here."""
    from pydantic import ValidationError

    from deployments.support.generation import Churn

    for field, value in (("s_churn", 101.0), ("s_tmin", -1.0), ("s_tmax", 1000.0), ("s_noise", 1.2)):
        with pytest.raises(ValidationError) as refusal:
            Churn(**{field: value})
        assert refusal.value.errors()[0]["loc"] == (field,)
    heun = pixels(gen(base, sampler="Heun", seed=7).images[0])
    assert np.array_equal(pixels(gen(base, sampler="Heun", seed=7, churn=Churn(s_churn=10.0)).images[0]), heun)
