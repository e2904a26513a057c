"""Sampler names (Automatic1111's and seed 003's) mapped onto diffusers schedulers.

A scheduler is rebuilt from the pipeline's own scheduler config for each request, so switching samplers never
reloads weights and never leaks from one request into the next.
"""

from __future__ import annotations

import functools
import inspect
import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from deployments.support.errors import InvalidInput, UnknownModel

if TYPE_CHECKING:
    from deployments.support.generation import Churn


@dataclass(frozen=True)
class Sampler:
    cls_name: str
    options: dict = field(default_factory=dict)


# A1111 sampler name -> diffusers scheduler. "Karras" in the name (or scheduler="Karras") switches sigmas.
SAMPLERS: dict[str, Sampler] = {
    "Euler a": Sampler("EulerAncestralDiscreteScheduler"),
    "Euler": Sampler("EulerDiscreteScheduler"),
    "LMS": Sampler("LMSDiscreteScheduler"),
    "Heun": Sampler("HeunDiscreteScheduler"),
    "DPM2": Sampler("KDPM2DiscreteScheduler"),
    "DPM2 a": Sampler("KDPM2AncestralDiscreteScheduler"),
    "DPM++ 2S a": Sampler("DPMSolverSinglestepScheduler"),
    "DPM++ 2M": Sampler("DPMSolverMultistepScheduler"),
    "DPM++ SDE": Sampler("DPMSolverSDEScheduler"),
    "DPM++ 2M SDE": Sampler("DPMSolverMultistepScheduler", {"algorithm_type": "sde-dpmsolver++"}),
    # A1111 >= 1.6: k-diffusion's 2M SDE with its Heun solver type, and its third-order multistep SDE solver.
    "DPM++ 2M SDE Heun": Sampler("DPMSolverMultistepScheduler",
                                 {"algorithm_type": "sde-dpmsolver++", "solver_type": "heun"}),
    "DPM++ 3M SDE": Sampler("DPMSolverMultistepScheduler", {"algorithm_type": "sde-dpmsolver++", "solver_order": 3}),
    "DPM fast": Sampler("DPMSolverSinglestepScheduler"),
    "DDIM": Sampler("DDIMScheduler"),
    "PLMS": Sampler("PNDMScheduler"),
    "PNDM": Sampler("PNDMScheduler"),
    "UniPC": Sampler("UniPCMultistepScheduler"),
    "DEIS": Sampler("DEISMultistepScheduler"),
    "LCM": Sampler("LCMScheduler"),
}

# Seed 003 names.
SEED_003_ALIASES = {
    "euler_a": "Euler a",
    "euler": "Euler",
    "dpm++_2m": "DPM++ 2M",
    "dpm++_2m_karras": "DPM++ 2M Karras",
    "dpm++_sde_karras": "DPM++ SDE Karras",
    "ddim": "DDIM",
    "plms": "PLMS",
    "pndm": "PNDM",
    "lms": "LMS",
    "heun": "Heun",
    "unipc": "UniPC",
}

# A1111's own aliases (its /samplers lists them; clients of its first versions send them), the "_ka" ones for the
# Karras names A1111 listed before 1.9.
A1111_ALIASES = {
    "k_euler_a": "Euler a", "k_euler_ancestral": "Euler a", "k_euler": "Euler", "k_lms": "LMS", "k_heun": "Heun",
    "k_dpm_2": "DPM2", "k_dpm_2_a": "DPM2 a", "k_dpmpp_2s_a": "DPM++ 2S a", "k_dpmpp_2m": "DPM++ 2M",
    "k_dpmpp_sde": "DPM++ SDE", "k_dpmpp_2m_sde": "DPM++ 2M SDE", "k_dpmpp_2m_sde_heun": "DPM++ 2M SDE Heun",
    "k_dpmpp_3m_sde": "DPM++ 3M SDE", "k_dpm_fast": "DPM fast", "k_dpm_ad": "DPM adaptive", "restart": "Restart",
    "ddim_cfgpp": "DDIM CFG++", "k_lcm": "LCM",
    "k_lms_ka": "LMS Karras", "k_dpm_2_ka": "DPM2 Karras", "k_dpm_2_a_ka": "DPM2 a Karras",
    "k_dpmpp_2s_a_ka": "DPM++ 2S a Karras", "k_dpmpp_2m_ka": "DPM++ 2M Karras", "k_dpmpp_sde_ka": "DPM++ SDE Karras",
    "k_dpmpp_2m_sde_ka": "DPM++ 2M SDE Karras",
}

# Every alias, lower-cased, and the name it stands for.
ALIASES = {**SEED_003_ALIASES, **A1111_ALIASES}

# A1111 samplers diffusers has no solver for. A1111 runs its default sampler for a name it lacks; these run their
# nearest diffusers sampler instead, and the answer's warnings say so. Never listed: they do not run as themselves.
SUBSTITUTES = {
    "Restart": "Heun",  # Restart's steps are Heun steps; its periodic re-noising has no diffusers counterpart
    "DPM adaptive": "DPM fast",  # the same DPM-Solver, at a fixed step count instead of an error-controlled one
    # A1111 1.10's CFG++ re-noises with the unconditional prediction and reads cfg_scale / 12.5: diffusers' pipelines
    # hand a scheduler the guided prediction only. DDIM is its sampler with ordinary guidance.
    "DDIM CFG++": "DDIM",
}


@dataclass(frozen=True)
class Schedule:
    """One of A1111 1.10's schedulers (modules/sd_schedulers.py): its name and label, and the diffusers config
    options that make it, or None where diffusers has no equivalent."""
    name: str
    label: str
    options: dict | None
    aliases: tuple[str, ...] = ()
    default_rho: float = -1
    need_inner_model: bool = False


# A1111 >= 1.9 sends the sigma schedule separately, by name or label. Uniform and Normal space the timesteps evenly
# from the last to the first (k-diffusion's get_sigmas), diffusers' "linspace"; SGM Uniform leaves out the final one
# and Simple strides from the last, both diffusers' "trailing"; DDIM strides from timestep 1, diffusers' "leading"
# with steps_offset 1. Polyexponential at its default rho of 1 is the exponential schedule, sigma for sigma.
SCHEDULES = {s.label: s for s in (
    Schedule("automatic", "Automatic", {}),
    Schedule("uniform", "Uniform", {"timestep_spacing": "linspace"}, need_inner_model=True),
    Schedule("karras", "Karras", {"use_karras_sigmas": True}, default_rho=7.0),
    Schedule("exponential", "Exponential", {"use_exponential_sigmas": True}),
    Schedule("polyexponential", "Polyexponential", {"use_exponential_sigmas": True}, default_rho=1.0),
    Schedule("sgm_uniform", "SGM Uniform", {"timestep_spacing": "trailing"}, ("SGMUniform",), need_inner_model=True),
    Schedule("kl_optimal", "KL Optimal", None),
    Schedule("align_your_steps", "Align Your Steps", None),
    Schedule("simple", "Simple", {"timestep_spacing": "trailing"}, need_inner_model=True),
    Schedule("normal", "Normal", {"timestep_spacing": "linspace"}, need_inner_model=True),
    Schedule("ddim", "DDIM", {"timestep_spacing": "leading", "steps_offset": 1}, need_inner_model=True),
    Schedule("beta", "Beta", {"use_beta_sigmas": True}, need_inner_model=True),
)}

# Every spelling of a schedule, lower-cased: A1111 matches name, label and aliases exactly; clients vary the case.
_SCHEDULE_SPELLINGS = {spelling.lower(): s for s in SCHEDULES.values()
                       for spelling in (s.name, s.label, *s.aliases)}


def find_schedule(name: str | None) -> Schedule | None:
    """The A1111 schedule ``name`` (a name, label or alias, any case) stands for; None for none or an unknown one."""
    return _SCHEDULE_SPELLINGS.get(name.lower()) if name else None


# The least img2img strength that denoises one of SDXL's 1000 training timesteps; a smaller one would need a
# schedule longer than the model's, and the pipeline runs no step at all.
MIN_STRENGTH = 0.001

SIGMA_OPTIONS = ("use_karras_sigmas", "use_exponential_sigmas", "use_beta_sigmas")
# What an explicit schedule resets before its own options apply (a name's or the checkpoint's would linger).
SCHEDULE_OPTIONS = (*SIGMA_OPTIONS, "timestep_spacing", "steps_offset")

# Ancestral Euler takes no sigma options in diffusers; it runs on the sigmas (and timesteps) plain Euler computes
# for the schedule: its step reads nothing else, so that is A1111's "Euler a Karras".
_SIGMAS_FROM_EULER = {"Euler a"}

# The samplers Karras sigmas never reach (timestep samplers, in diffusers as in A1111): no "Karras" name listed.
_NO_KARRAS = {"DDIM", "PLMS", "PNDM", "LCM"}

# The hub SDXL base's scheduler_config.json values of keys an EulerDiscrete config may lack (the factory's does):
# without them DDIM would take diffusers' clip_sample=True, clipping every predicted x0 to [-1, 1] (SDXL latents
# reach about +-4), and set_alpha_to_one=True; PNDM would run its Runge-Kutta warm-up, more UNet calls than the steps
# counted; LCM would take set_alpha_to_one=True. A checkpoint's own value wins. (thresholding is False by default in
# every scheduler here.)
SDXL_SCHEDULER_DEFAULTS = {"clip_sample": False, "set_alpha_to_one": False, "skip_prk_steps": True,
                           "sample_max_value": 1.0}


def listed_samplers() -> list[str]:
    """The names /sdapi/v1/samplers lists: each sampler that runs as itself, then its Karras name where Karras
    sigmas reach it (as A1111 listed them before 1.9; any of A1111's schedule labels may follow a name too)."""
    return list(SAMPLERS) + [f"{name} Karras" for name in SAMPLERS if name not in _NO_KARRAS]


def sampler_names() -> list[str]:
    """Every name a client may send that runs as itself: the listed ones, then their aliases."""
    runs = set(listed_samplers())
    return listed_samplers() + [alias for alias, name in ALIASES.items() if name in runs]


def aliases_of(name: str) -> list[str]:
    """The aliases of a listed name."""
    return [alias for alias, target in ALIASES.items() if target == name]


def split(name: str, field: str = "sampler_name") -> tuple[str, Schedule | None]:
    """The A1111 sampler ``name`` stands for (an alias, a name with a schedule label after it as A1111 >= 1.9 reads
    it: "Euler a Karras", "DPM++ 2M SGM Uniform") and the schedule its spelling adds; an unknown name is an
    ``UnknownModel`` naming ``field``. Torch-free: the ingress checks job submits with it."""
    def known(spelling: str) -> str | None:
        if spelling in SAMPLERS or spelling in SUBSTITUTES:
            return spelling
        folded = spelling.lower()
        if folded in ALIASES:
            return ALIASES[folded]
        return next((n for n in (*SAMPLERS, *SUBSTITUTES) if n.lower() == folded), None)

    canonical, schedule = known(name), None
    if canonical is not None and canonical.endswith(" Karras"):  # an alias of a Karras name ("dpm++_2m_karras")
        canonical, schedule = canonical.removesuffix(" Karras"), SCHEDULES["Karras"]
    if canonical is None:
        # The longest label that ends the name: A1111 tries them in list order and so reads "DPM++ 2M SGM Uniform"
        # as "DPM++ 2M SGM" with Uniform, an unknown sampler.
        for spelling in sorted(_SCHEDULE_SPELLINGS, key=len, reverse=True):
            if name.lower().endswith(" " + spelling) and (found := known(name[:-len(spelling) - 1])):
                canonical, schedule = found, _SCHEDULE_SPELLINGS[spelling]
                break
    if canonical is None:
        raise UnknownModel(f"unknown sampler {name!r} (GET /sdapi/v1/samplers lists them)", field=field,
                           details={"choices": sampler_names()})
    return canonical, schedule


# A1111 1.10's samplers that evaluate the model twice a sampling step ("second_order" in its
# modules/sd_samplers_kdiffusion.py). It counts prompt editing's steps in evaluations: twice the steps for these.
SECOND_ORDER = frozenset({"Heun", "DPM2", "DPM2 a", "DPM++ 2S a", "DPM++ SDE", "Restart"})


def evaluations(name: str) -> int:
    """A1111's model evaluations per sampling step for sampler ``name`` as asked (Restart's, not its substitute's):
    prompt editing and alternation are scheduled over ``steps * evaluations(name)`` of them."""
    return 2 if split(name)[0] in SECOND_ORDER else 1


def resolve(name: str, field: str = "sampler_name") -> tuple[str, dict]:
    """The diffusers sampler ``name`` runs (see ``split``) and the options its spelling adds."""
    canonical, schedule = split(name, field)
    return SUBSTITUTES.get(canonical, canonical), dict(schedule.options or {}) if schedule else {}


def schedule_options(name: str, schedule: str | None) -> dict:
    """The schedule options sampler ``name`` under ``schedule`` runs with, as ``build_scheduler`` applies them: two
    requests with the same run the same sigmas."""
    explicit = find_schedule(schedule)
    if explicit is None or explicit.options is None or explicit.label == "Automatic":
        return resolve(name)[1]
    return dict(explicit.options)


# A1111 1.10's "Automatic", per sampler: the schedule a sampler names for itself (its ``scheduler`` option), which
# the infotext then names. A k-diffusion sampler naming none runs the model's sigmas evenly spaced (Uniform), and the
# timestep samplers stride from timestep 1 whatever the scheduler (DDIM); for both the infotext says "Automatic".
# Samplers not here (DPM fast, LCM, DEIS) run their diffusers default, as on every other route.
A1111_AUTOMATIC = {
    "DPM++ 2M": "Karras", "DPM++ SDE": "Karras", "DPM++ 2S a": "Karras", "DPM2": "Karras", "DPM2 a": "Karras",
    "DPM++ 2M SDE": "Exponential", "DPM++ 2M SDE Heun": "Exponential", "DPM++ 3M SDE": "Exponential",
    "Restart": "Karras",
}
_A1111_UNNAMED = {"Euler a": "Uniform", "Euler": "Uniform", "LMS": "Uniform", "Heun": "Uniform",
                  "DDIM": "DDIM", "DDIM CFG++": "DDIM", "PLMS": "DDIM", "UniPC": "DDIM"}


@dataclass(frozen=True)
class A1111Choice:
    """How A1111 1.10 reads a request's sampler and scheduler: the ``sampler`` (a labelled name split off its
    schedule), the ``schedule`` label the base runs (None: the sampler's diffusers default), the ``label`` its
    infotext names, and a warning for a scheduler that cannot run as itself."""
    sampler: str
    schedule: str | None
    label: str
    warnings: tuple[str, ...] = ()


def a1111_choice(name: str, scheduler: str | None, field: str = "sampler_name") -> A1111Choice:
    """A1111's sampler ``name`` and ``scheduler`` as A1111 1.10 runs them: an explicit schedule wins over one the
    name implies, and "Automatic" (or none, or a schedule diffusers lacks, with a warning) is the sampler's own
    schedule, ``A1111_AUTOMATIC``."""
    canonical, implied = split(name, field)
    explicit = find_schedule(scheduler)
    notes: list[str] = []
    fallback = f"{implied.label!r} (from the sampler name)" if implied else "the sampler's own schedule (Automatic)"
    if scheduler and explicit is None:  # A1111 reads a name it lacks as Automatic
        notes.append(f"unknown scheduler {scheduler!r} (GET /sdapi/v1/schedulers lists them): {fallback} ran")
    chosen = explicit if explicit is not None and explicit.label != "Automatic" else None
    if chosen is not None and chosen.options is None:
        notes.append(f"scheduler {scheduler!r} has no diffusers equivalent: {fallback} ran instead")
        chosen = None
    if chosen is None and implied is not None and implied.label != "Automatic":  # "DPM++ 2M Automatic" is its own
        chosen = implied
    if chosen is not None and chosen.options is None:
        notes.append(f"scheduler {chosen.label!r} has no diffusers equivalent: the sampler's own schedule ran "
                     "instead")
        chosen = None
    if chosen is not None:
        return A1111Choice(canonical, chosen.label, chosen.label, tuple(notes))
    own = A1111_AUTOMATIC.get(canonical)
    if own is not None:
        return A1111Choice(canonical, own, own, tuple(notes))
    return A1111Choice(canonical, _A1111_UNNAMED.get(canonical), "Automatic", tuple(notes))


def build_scheduler(name: str, base_config, schedule: str | None = None, *, seeds: list[int] | None = None,
                    warnings: list[str] | None = None, churn: Churn | None = None):
    """A fresh scheduler for ``name`` built from the pipeline's scheduler config. ``seeds``: one per image of the
    batch, for a scheduler that draws its noise from its own Brownian tree. ``warnings`` gets a line when the sampler
    or schedule asked for cannot run as itself, naming what ran instead. ``churn``: Euler's (``with_churn``); other
    samplers run without it (the caller warns where A1111 would have applied it)."""
    import diffusers

    notes: list[str] = warnings if warnings is not None else []
    asked, implied = split(name)
    canonical = SUBSTITUTES.get(asked, asked)
    if canonical != asked:
        notes.append(f"sampler {asked!r} has no diffusers equivalent: {canonical!r} ran instead")
    sampler = SAMPLERS[canonical]
    own = dict(sampler.options)
    options: dict = {}
    cls = getattr(diffusers, sampler.cls_name)
    accepted = set(inspect.signature(cls.__init__).parameters)
    if canonical in _SIGMAS_FROM_EULER:
        accepted |= set(SIGMA_OPTIONS)
    fallback = f"{implied.label!r} (from the sampler name)" if implied else "the sampler's own schedule (Automatic)"
    wanted, said = implied, implied.label if implied else None
    if schedule is not None:
        explicit = find_schedule(schedule)
        if explicit is None:  # A1111 runs the sampler's default sigmas for a scheduler name it lacks
            notes.append(f"unknown scheduler {schedule!r} (GET /sdapi/v1/schedulers lists them): {fallback} ran")
        elif explicit.options is None:
            notes.append(f"scheduler {schedule!r} has no diffusers equivalent: {fallback} ran instead")
        elif explicit.label != "Automatic":
            # An explicit schedule replaces the one a name implies ("DPM++ 2M Karras" with Exponential), as
            # A1111 >= 1.9 does; diffusers refuses two at once.
            wanted, said = explicit, schedule
    if wanted is not None:
        if wanted.options is None:
            notes.append(f"scheduler {wanted.label!r} has no diffusers equivalent: the sampler's own schedule ran "
                         "instead")
        elif set(wanted.options) <= accepted:
            own = {k: v for k, v in own.items() if k not in SCHEDULE_OPTIONS}
            options.update({k: False for k in SIGMA_OPTIONS if k in accepted})
            options.update(wanted.options)
        else:  # diffusers would drop the option with a log line only: say so in the result
            notes.append(f"scheduler {said!r} does not apply to sampler {name!r}: its own schedule ran")
    if seeds is not None and "noise_sampler_seed" in accepted:
        # DPM++ SDE draws from a Brownian tree seeded from the global RNG unless given seeds, never from the
        # pipeline's generators; a list makes one tree per image, so image i is the one its seed gives alone.
        options["noise_sampler_seed"] = list(seeds)
    defaults = {k: v for k, v in SDXL_SCHEDULER_DEFAULTS.items() if k in accepted}
    config = {**defaults, **dict(base_config)}
    sigmas = {k: options.pop(k) for k in SIGMA_OPTIONS if k in options and canonical in _SIGMAS_FROM_EULER}
    scheduler = cls.from_config(config, **{**own, **options})
    if any(sigmas.values()):
        _run_on_euler_sigmas(scheduler, diffusers.EulerDiscreteScheduler.from_config(config, **options, **sigmas))
    if churn is not None and churn.churns and canonical == "Euler":
        with_churn(scheduler, churn)
    return scheduler


def with_churn(scheduler, churn: Churn) -> None:
    """Bind ``churn`` into an Euler scheduler's ``step``, whose churn is k-diffusion's ``sample_euler``'s formula
    (gamma, sigma_hat, the noise ``s_noise`` scales) while the pipelines pass ``step`` only ``eta`` and
    ``generator``. A partial keeps the ``generator`` parameter the pipelines look for in its signature, so the
    churn's noise is drawn from each image's own generator, one image at a time (a batch mate's draws never move
    another's). A1111's ``s_tmax`` 0 means no limit. Unlike k-diffusion, which evaluates the model on the churned
    latents at sigma_hat, diffusers' step churns after the model ran at sigma and reads its prediction at sigma_hat:
    the same noise, added at the same steps, not A1111's pixels."""
    scheduler.step = functools.partial(scheduler.step, s_churn=churn.s_churn, s_tmin=churn.s_tmin,
                                       s_tmax=churn.s_tmax or math.inf, s_noise=churn.s_noise)


def _run_on_euler_sigmas(scheduler, euler) -> None:
    """Make ``scheduler`` step through the sigmas and timesteps ``euler`` sets for the same step count."""
    own = scheduler.set_timesteps

    def set_timesteps(num_inference_steps: int, device=None) -> None:
        own(num_inference_steps, device=device)
        euler.set_timesteps(num_inference_steps, device=device)
        scheduler.sigmas, scheduler.timesteps = euler.sigmas.clone(), euler.timesteps.clone()

    scheduler.set_timesteps = set_timesteps
    scheduler.schedule_source = euler  # what ran, for tests and reports


def img2img_steps(steps: int, strength: float, *, exact: bool = False, limit: int = 1000) -> tuple[int, int]:
    """The steps to ask diffusers for at this strength, and how many it runs (SDXL's img2img runs
    ``int(asked * strength)`` of them). Plain img2img runs ``int(steps * strength)`` as A1111 does, yet at least one
    where diffusers would run none and fail. ``exact`` (A1111's hires second pass) runs ``steps`` whatever the
    strength. ``limit``: the scheduler's ``num_train_timesteps``, which no schedule may exceed (some schedulers
    refuse it, the others repeat timesteps); a pass that would need more runs fewer steps."""
    wanted = steps if exact else 1
    asked = max(steps, math.ceil(wanted / strength))
    while asked < limit and int(asked * strength) < wanted:  # the float product may fall just short
        asked += 1
    while asked > steps and int((asked - 1) * strength) >= wanted:
        asked -= 1
    asked = min(asked, limit)
    runs = int(asked * strength)
    if runs < 1:
        raise InvalidInput(f"strength={strength} denoises less than one of {limit} timesteps: at least "
                           f"{1 / limit:g} is needed", field="strength")
    return asked, runs
