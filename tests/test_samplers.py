"""Sampler names -> diffusers schedulers, and the img2img step arithmetic: no model needed beyond a scheduler
config (the factory's, which, as a single-file checkpoint's may, lacks the keys DDIM and PNDM read)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from pydantic import TypeAdapter, ValidationError

from deployments.support.errors import InvalidInput
from deployments.support.generation import GenerationRequest, LatentHires, RefineRequest, clean_estimate
from deployments.support.samplers import MIN_STRENGTH, SAMPLERS, build_scheduler, img2img_steps


@pytest.fixture(scope="module")
def config(tiny) -> dict:
    return json.loads((tiny / "sdxl-base" / "scheduler" / "scheduler_config.json").read_text())


# Each A1111 sampler's diffusers scheduler and the config values that make it that sampler, written out here (not
# read from SAMPLERS): "DPM++ 2M SDE" without its algorithm type would run as plain DPM++ 2M.
EXPECTED_SCHEDULERS = {
    "Euler a": ("EulerAncestralDiscreteScheduler", {}),
    "Euler": ("EulerDiscreteScheduler", {}),
    "LMS": ("LMSDiscreteScheduler", {}),
    "Heun": ("HeunDiscreteScheduler", {}),
    "DPM2": ("KDPM2DiscreteScheduler", {}),
    "DPM2 a": ("KDPM2AncestralDiscreteScheduler", {}),
    "DPM++ 2S a": ("DPMSolverSinglestepScheduler", {}),
    "DPM++ 2M": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++"}),
    "DPM++ SDE": ("DPMSolverSDEScheduler", {}),
    "DPM++ 2M SDE": ("DPMSolverMultistepScheduler", {"algorithm_type": "sde-dpmsolver++"}),
    "DPM fast": ("DPMSolverSinglestepScheduler", {}),
    "DDIM": ("DDIMScheduler", {}),
    "PLMS": ("PNDMScheduler", {}),
    "PNDM": ("PNDMScheduler", {}),
    "UniPC": ("UniPCMultistepScheduler", {}),
    "DEIS": ("DEISMultistepScheduler", {}),
    "LCM": ("LCMScheduler", {}),
}


def test_the_expected_table_names_every_sampler():
    assert set(EXPECTED_SCHEDULERS) == set(SAMPLERS)


@pytest.mark.parametrize("name", list(EXPECTED_SCHEDULERS))
def test_each_sampler_builds_its_scheduler_with_its_options(config, name):
    cls_name, options = EXPECTED_SCHEDULERS[name]
    scheduler = build_scheduler(name, config)
    assert type(scheduler).__name__ == cls_name
    assert {key: scheduler.config[key] for key in options} == options


def test_the_factory_config_lacks_the_keys_that_ddim_reads(config):
    """The premise of the next test: diffusers' defaults would decide these."""
    assert not {"clip_sample", "set_alpha_to_one", "skip_prk_steps"} & set(config)


def test_ddim_pndm_and_lcm_take_sdxl_values_for_keys_the_checkpoint_lacks(config):
    ddim = build_scheduler("DDIM", config).config
    # diffusers' own defaults are True: every predicted x0 clipped to [-1, 1], which SDXL latents exceed
    assert ddim.clip_sample is False and ddim.set_alpha_to_one is False and ddim.thresholding is False
    for name in ("PLMS", "PNDM"):  # no Runge-Kutta warm-up: one UNet call per step counted
        scheduler = build_scheduler(name, config)
        assert scheduler.config.skip_prk_steps is True
        scheduler.set_timesteps(10)
        assert len(scheduler.timesteps) == 11  # one step repeated, as PLMS starts; with the warm-up 19
    assert build_scheduler("LCM", config).config.set_alpha_to_one is False
    # A checkpoint that says otherwise is obeyed.
    assert build_scheduler("DDIM", {**config, "clip_sample": True}).config.clip_sample is True


def test_dpm_sde_gets_one_brownian_tree_seed_per_image(config):
    assert build_scheduler("DPM++ SDE Karras", config, seeds=[7, 8]).noise_sampler_seed == [7, 8]
    assert build_scheduler("dpm++_sde_karras", config, seeds=[3]).noise_sampler_seed == [3]
    assert not hasattr(build_scheduler("Euler a", config, seeds=[7]), "noise_sampler_seed")  # it uses generators


@pytest.mark.parametrize("name", ["Euler a", "DDIM", "PLMS", "PNDM", "LCM", "euler_a"])
@pytest.mark.parametrize("schedule", ["Karras", "Exponential", "Beta"])
def test_a_schedule_the_sampler_cannot_take_is_a_warning(config, name, schedule):
    warnings: list[str] = []
    build_scheduler(name, config, schedule, warnings=warnings)
    assert warnings == [f"scheduler {schedule!r} does not apply to sampler {name!r}: its own schedule ran"]


@pytest.mark.parametrize("name", ["Euler a", "DDIM", "DPM++ 2M"])
@pytest.mark.parametrize("schedule", ["Automatic", "Uniform", None])
def test_the_default_schedule_never_warns(config, name, schedule):
    warnings: list[str] = []
    build_scheduler(name, config, schedule, warnings=warnings)
    assert warnings == []


def test_a_schedule_the_sampler_takes_applies_without_a_warning(config):
    warnings: list[str] = []
    scheduler = build_scheduler("DPM++ 2M", config, "Karras", warnings=warnings)
    assert warnings == [] and scheduler.config.use_karras_sigmas is True
    scheduler.set_timesteps(20)
    uniform = build_scheduler("DPM++ 2M", config, "Automatic")
    uniform.set_timesteps(20)
    assert not np.allclose(scheduler.sigmas.numpy(), uniform.sigmas.numpy())


@pytest.mark.parametrize(("schedule", "karras", "exponential"), [
    ("Automatic", True, False), (None, True, False), ("Exponential", False, True), ("Uniform", False, False),
    ("Karras", True, False)])
def test_an_explicit_schedule_replaces_the_one_a_sampler_name_implies(config, schedule, karras, exponential):
    """A1111 >= 1.9 clients send "DPM++ 2M Karras" with a scheduler of their own: that one runs (diffusers refused
    the two together, a 500)."""
    scheduler = build_scheduler("DPM++ 2M Karras", config, schedule)
    assert scheduler.config.use_karras_sigmas is karras
    assert bool(scheduler.config.get("use_exponential_sigmas")) is exponential
    scheduler.set_timesteps(10)


@pytest.mark.parametrize(("steps", "strength", "asked"), [(20, 0.7, 29), (20, 0.3, 67), (10, 0.5, 20), (4, 0.6, 7),
                                                          (30, 1.0, 30), (7, 0.7, 10)])
def test_the_hires_second_pass_runs_exactly_its_steps(steps, strength, asked):
    """A1111 runs ``hr_second_pass_steps`` whatever the strength: diffusers is asked for steps / strength."""
    assert img2img_steps(steps, strength, exact=True) == (asked, steps)
    assert int(asked * strength) == steps  # what SDXL's img2img pipeline then runs


def test_exact_steps_hold_at_every_count_and_strength():
    for strength in np.linspace(0.01, 1.0, 397):
        for steps in range(1, 151):
            asked, runs = img2img_steps(steps, float(strength), exact=True)
            assert int(asked * float(strength)) == runs
            assert runs == steps or asked == 1000, (steps, strength)  # fewer only where 1000 timesteps end it
            assert asked == steps or int((asked - 1) * float(strength)) < steps  # the shortest schedule


def test_a_plain_img2img_pass_runs_its_share_of_the_steps_and_at_least_one():
    assert img2img_steps(30, 0.75) == (30, 22)  # A1111's int(steps x strength)
    assert img2img_steps(4, 0.1) == (10, 1)
    # 765 x (1/765) is 0.99999... in floats: asking ceil(1 / strength) would run none, and diffusers fails
    assert img2img_steps(4, 1 / 765) == (766, 1)
    for strength in np.unique(np.concatenate([np.linspace(MIN_STRENGTH, 1, 20001), 1 / np.arange(1, 1001)])):
        for steps in (1, 4, 30, 150):
            asked, runs = img2img_steps(steps, float(strength))
            assert 1 <= runs == int(asked * float(strength)) and asked <= 1000, (steps, strength)


def test_a_strength_below_one_timestep_is_refused_by_name():
    with pytest.raises(InvalidInput) as e:
        img2img_steps(20, 0.0009)
    assert e.value.field == "strength"
    assert img2img_steps(20, 0.001) == (1000, 1)
    with pytest.raises(InvalidInput):  # a checkpoint trained on fewer timesteps needs a larger strength
        img2img_steps(20, 0.002, limit=400)


@pytest.mark.parametrize("model", [GenerationRequest, RefineRequest])
def test_requests_bound_the_strength(model):
    with pytest.raises(ValidationError) as e:
        model(strength=0.0005)
    assert e.value.errors()[0]["loc"] == ("strength",)
    assert model(strength=MIN_STRENGTH).strength == MIN_STRENGTH
    with pytest.raises(ValidationError):
        LatentHires(width=128, height=128, strength=0.0005)


def test_the_api_bounds_the_strength():
    from graphs.api.a1111_models import Img2ImgRequest
    from graphs.api.fields import Strength

    with pytest.raises(ValidationError):
        TypeAdapter(Strength).validate_python(0.0005)
    assert TypeAdapter(Strength).validate_python(0.001) == 0.001
    with pytest.raises(ValidationError) as e:
        Img2ImgRequest(init_images=["x"], denoising_strength=0.0005)
    assert e.value.errors()[0]["loc"] == ("denoising_strength",)


def test_a_hires_pass_that_would_outrun_the_schedule_runs_what_fits():
    assert img2img_steps(20, 0.01, exact=True) == (1000, 10)  # 2000 asked would repeat or refuse timesteps


@pytest.mark.parametrize("name", sorted(SAMPLERS))
def test_a_stopped_request_decodes_each_samplers_estimate_of_the_clean_latents(config, name):
    """What A1111's /interrupt hands back (``Partial``): the sampler's clean estimate, which equals the clean
    latents when the model predicts the noise exactly (worked out from the noise for the samplers that make
    none)."""
    import torch

    scheduler = build_scheduler(name, config, seeds=[1])
    scheduler.set_timesteps(10)
    clean, noise = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(1)), torch.randn(1, 4, 8, 8)
    t = scheduler.timesteps[0]
    noisy = scheduler.add_noise(clean, noise, t.reshape(1))
    estimate = clean_estimate(scheduler, scheduler.step(noise, t, noisy, return_dict=False), noise, t, noisy)
    # LCM's boundary scalings leave a trace of the noisy input at the first step
    assert float((estimate - clean).abs().mean()) < (0.05 if name == "LCM" else 1e-3), name
