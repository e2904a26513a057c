"""Sampler names -> diffusers schedulers, and the img2img step arithmetic: no model needed beyond a scheduler
config (the factory's, which, as a single-file checkpoint's may, lacks the keys DDIM and PNDM read)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from pydantic import TypeAdapter, ValidationError

from deployments.support.errors import InvalidInput, UnknownModel
from deployments.support.generation import GenerationRequest, LatentHires, RefineRequest, clean_estimate
from deployments.support.samplers import (
    MIN_STRENGTH,
    SAMPLERS,
    a1111_choice,
    build_scheduler,
    img2img_steps,
    resolve,
    split,
)


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
    "DPM++ 2M SDE Heun": ("DPMSolverMultistepScheduler", {"algorithm_type": "sde-dpmsolver++", "solver_type": "heun",
                                                          "solver_order": 2}),
    "DPM++ 3M SDE": ("DPMSolverMultistepScheduler", {"algorithm_type": "sde-dpmsolver++", "solver_order": 3,
                                                     "solver_type": "midpoint"}),
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


@pytest.mark.parametrize("name", ["DDIM", "PLMS", "PNDM", "LCM", "ddim"])
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


# A1111 1.10's schedulers (modules/sd_schedulers.py), name and label, and the DPM++ 2M config each makes, written
# out here: None where diffusers has no equivalent and the sampler's own schedule runs with a warning.
EXPECTED_SCHEDULES = {
    ("automatic", "Automatic"): {"use_karras_sigmas": False, "timestep_spacing": "leading"},
    ("uniform", "Uniform"): {"use_karras_sigmas": False, "timestep_spacing": "linspace"},
    ("karras", "Karras"): {"use_karras_sigmas": True},
    ("exponential", "Exponential"): {"use_exponential_sigmas": True, "use_karras_sigmas": False},
    ("polyexponential", "Polyexponential"): {"use_exponential_sigmas": True, "use_karras_sigmas": False},
    ("sgm_uniform", "SGM Uniform"): {"timestep_spacing": "trailing", "use_karras_sigmas": False},
    ("kl_optimal", "KL Optimal"): None,
    ("align_your_steps", "Align Your Steps"): None,
    ("simple", "Simple"): {"timestep_spacing": "trailing", "use_karras_sigmas": False},
    ("normal", "Normal"): {"timestep_spacing": "linspace", "use_karras_sigmas": False},
    ("ddim", "DDIM"): {"timestep_spacing": "leading", "steps_offset": 1, "use_karras_sigmas": False},
    ("beta", "Beta"): {"use_beta_sigmas": True, "use_karras_sigmas": False},
}


def test_the_expected_schedules_name_every_schedule():
    from deployments.support.samplers import SCHEDULES

    assert {(s.name, s.label) for s in SCHEDULES.values()} == set(EXPECTED_SCHEDULES)


@pytest.mark.parametrize(("name", "label"), list(EXPECTED_SCHEDULES))
def test_every_a1111_schedule_is_accepted_by_name_and_label_in_any_case(config, name, label):
    expected = EXPECTED_SCHEDULES[(name, label)]
    for spelling in (name, label, label.upper()):
        warnings: list[str] = []
        scheduler = build_scheduler("DPM++ 2M", config, spelling, warnings=warnings)
        if expected is None:
            assert warnings == [f"scheduler {spelling!r} has no diffusers equivalent: the sampler's own schedule "
                                "(Automatic) ran instead"]
            assert dict(scheduler.config) == dict(build_scheduler("DPM++ 2M", config).config)
        else:
            assert warnings == []
            assert {key: scheduler.config[key] for key in expected} == expected
        scheduler.set_timesteps(10)


@pytest.mark.parametrize(("schedule", "timesteps"), [
    ("uniform", [999, 888, 777, 666, 555, 444, 333, 222, 111, 0]),  # A1111: linspace(999, 0, n)
    ("sgm_uniform", [999, 899, 799, 699, 599, 499, 399, 299, 199, 99]),  # linspace(999, 0, n + 1)[:-1]
    ("ddim", [901, 801, 701, 601, 501, 401, 301, 201, 101, 1])])  # every 1000 // n from 1
def test_the_timestep_schedules_step_where_a1111s_do(config, schedule, timesteps):
    scheduler = build_scheduler("Euler", config, schedule)
    scheduler.set_timesteps(10)
    assert np.allclose(scheduler.timesteps.numpy(), timesteps, atol=0.5)


def test_an_unknown_scheduler_runs_the_samplers_own_with_a_warning_as_a1111_does(config):
    warnings: list[str] = []
    scheduler = build_scheduler("DPM++ 2M Karras", config, "Turbo", warnings=warnings)
    assert warnings == ["unknown scheduler 'Turbo' (GET /sdapi/v1/schedulers lists them): 'Karras' (from the "
                        "sampler name) ran"]
    assert scheduler.config.use_karras_sigmas is True


@pytest.mark.parametrize(("name", "sampler", "label"), [
    ("Euler a Karras", "Euler a", "Karras"), ("DPM++ 2M Exponential", "DPM++ 2M", "Exponential"),
    ("DPM++ SDE Karras", "DPM++ SDE", "Karras"), ("DPM++ 2M SGM Uniform", "DPM++ 2M", "SGM Uniform"),
    ("DPM++ 2M sgm_uniform", "DPM++ 2M", "SGM Uniform"), ("euler a karras", "Euler a", "Karras"),
    ("DPM++ 2M SDE Heun Karras", "DPM++ 2M SDE Heun", "Karras"), ("DPM++ 3M SDE", "DPM++ 3M SDE", None),
    ("dpm++_2m_karras", "DPM++ 2M", "Karras"), ("Euler a", "Euler a", None), ("DDIM", "DDIM", None),
    ("Restart", "Restart", None), ("DPM adaptive Karras", "DPM adaptive", "Karras")])
def test_a_schedule_label_ending_a_sampler_name_is_split_off_as_a1111_does(name, sampler, label):
    found, schedule = split(name)
    assert (found, schedule.label if schedule else None) == (sampler, label)


@pytest.mark.parametrize("name", ["Nope", "Nope Karras", "Karras", "Euler a Turbo", "DPM++ 2M  Karras"])
def test_a_name_that_is_no_sampler_stays_unknown_naming_the_field(name):
    with pytest.raises(UnknownModel) as e:
        resolve(name, "sampler_index")
    assert e.value.field == "sampler_index"


def test_euler_a_karras_steps_through_eulers_karras_sigmas(config):
    warnings: list[str] = []
    scheduler = build_scheduler("Euler a Karras", config, warnings=warnings)
    assert warnings == [] and type(scheduler).__name__ == "EulerAncestralDiscreteScheduler"
    scheduler.set_timesteps(10)
    karras = build_scheduler("Euler Karras", config)
    karras.set_timesteps(10)
    plain = build_scheduler("Euler a", config)
    plain.set_timesteps(10)
    assert np.allclose(scheduler.sigmas.numpy(), karras.sigmas.numpy())
    assert np.allclose(scheduler.timesteps.numpy(), karras.timesteps.numpy())
    assert not np.allclose(scheduler.sigmas.numpy(), plain.sigmas.numpy())
    # The explicit field wins over the name, as in A1111: Exponential sigmas, and Uniform plain spacing.
    exponential = build_scheduler("Euler a Karras", config, "Exponential")
    exponential.set_timesteps(10)
    assert not np.allclose(exponential.sigmas.numpy(), scheduler.sigmas.numpy())
    uniform = build_scheduler("Euler a Karras", config, "Uniform")
    uniform.set_timesteps(10)
    assert uniform.config.timestep_spacing == "linspace" and not hasattr(uniform, "schedule_source")


@pytest.mark.parametrize(("name", "ran", "cls_name"), [("Restart", "Heun", "HeunDiscreteScheduler"),
                                                       ("DPM adaptive", "DPM fast", "DPMSolverSinglestepScheduler"),
                                                       ("DDIM CFG++", "DDIM", "DDIMScheduler")])
def test_a1111_samplers_diffusers_lacks_run_the_nearest_with_a_warning(config, name, ran, cls_name):
    warnings: list[str] = []
    scheduler = build_scheduler(name, config, warnings=warnings)
    assert type(scheduler).__name__ == cls_name
    assert warnings == [f"sampler {name!r} has no diffusers equivalent: {ran!r} ran instead"]


@pytest.mark.parametrize("name", ["DPM++ 2M SDE Heun", "DPM++ 3M SDE", "DPM++ 3M SDE Exponential"])
def test_the_a1111_1_6_sde_samplers_step_to_the_end(config, name):
    import torch

    scheduler = build_scheduler(name, config)
    scheduler.set_timesteps(6)
    sample = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0)) * scheduler.init_noise_sigma
    for t in scheduler.timesteps:
        sample = scheduler.step(torch.zeros_like(sample), t, sample,
                                generator=torch.Generator().manual_seed(int(t)), return_dict=False)[0]
    assert torch.isfinite(sample).all()


# --- A1111's reading of sampler and scheduler ---------------------------------------------------------------------

@pytest.mark.parametrize(("name", "scheduler", "runs", "label"), [
    # "Automatic" (or none): each sampler's own schedule, as A1111 1.10's sampler table names it, and the infotext
    # names it too; a sampler naming none runs the model's sigmas evenly spaced, a timestep sampler strides from 1.
    ("DPM++ 2M", None, "Karras", "Karras"), ("DPM++ 2M", "Automatic", "Karras", "Karras"),
    ("DPM++ SDE", "automatic", "Karras", "Karras"), ("DPM2 a", None, "Karras", "Karras"),
    ("DPM++ 2M SDE", None, "Exponential", "Exponential"), ("DPM++ 3M SDE", None, "Exponential", "Exponential"),
    ("Euler a", None, "Uniform", "Automatic"), ("Euler", "Automatic", "Uniform", "Automatic"),
    ("DDIM", None, "DDIM", "Automatic"), ("UniPC", None, "DDIM", "Automatic"),
    ("DDIM CFG++", None, "DDIM", "Automatic"), ("Restart", None, "Karras", "Karras"),
    ("DPM++ 2M Automatic", None, "Karras", "Karras"),  # a name's own "Automatic" label is the sampler's own too
    ("DPM fast", None, None, "Automatic"), ("LCM", None, None, "Automatic"),
    # An explicit schedule wins, by its label; a labelled name is split.
    ("DPM++ 2M", "exponential", "Exponential", "Exponential"), ("Euler a", "karras", "Karras", "Karras"),
    ("DPM++ 2M Karras", None, "Karras", "Karras"), ("Euler a Karras", "Automatic", "Karras", "Karras"),
    ("DPM++ 2M Karras", "sgm_uniform", "SGM Uniform", "SGM Uniform")])
def test_a1111_reads_automatic_as_each_samplers_own_schedule(name, scheduler, runs, label):
    choice = a1111_choice(name, scheduler)
    assert (choice.schedule, choice.label, choice.warnings) == (runs, label, ())
    assert choice.sampler == split(name)[0]


def test_a1111_schedules_run_as_a1111_1_10_does(config):
    """DPM++ 2M under Automatic takes Karras sigmas (diffusers' default would not); Euler's are A1111's uniform."""
    karras = build_scheduler("DPM++ 2M", config, a1111_choice("DPM++ 2M", None).schedule)
    assert karras.config.use_karras_sigmas is True
    assert build_scheduler("DPM++ 2M", config).config.use_karras_sigmas is False  # the native routes' Automatic
    euler = build_scheduler("Euler", config, a1111_choice("Euler", "Automatic").schedule)
    euler.set_timesteps(10)
    assert np.allclose(euler.timesteps.numpy(), [999, 888, 777, 666, 555, 444, 333, 222, 111, 0], atol=0.5)


@pytest.mark.parametrize(("name", "scheduler", "runs", "warning"), [
    ("DPM++ 2M", "Turbo", "Karras", "unknown scheduler 'Turbo' (GET /sdapi/v1/schedulers lists them): the sampler's "
     "own schedule (Automatic) ran"),
    ("Euler", "KL Optimal", "Uniform", "scheduler 'KL Optimal' has no diffusers equivalent: the sampler's own "
     "schedule (Automatic) ran instead"),
    ("DPM++ 2M Exponential", "align_your_steps", "Exponential", "scheduler 'align_your_steps' has no diffusers "
     "equivalent: 'Exponential' (from the sampler name) ran instead"),
    ("Euler a Align Your Steps", None, "Uniform", "scheduler 'Align Your Steps' has no diffusers equivalent: the "
     "sampler's own schedule ran instead")])
def test_a1111_schedules_that_cannot_run_fall_back_with_a_warning(name, scheduler, runs, warning):
    choice = a1111_choice(name, scheduler)
    assert (choice.schedule, choice.warnings) == (runs, (warning,))
    assert choice.label == (runs if runs in ("Karras", "Exponential") else "Automatic")


def test_a1111_names_the_field_of_an_unknown_sampler():
    with pytest.raises(UnknownModel) as refused:
        a1111_choice("Euler b", None, "sampler_index")
    assert refused.value.field == "sampler_index"
