"""Sampler names (Automatic1111's and seed 003's) mapped onto diffusers schedulers.

A scheduler is rebuilt from the pipeline's own scheduler config for each request, so switching samplers never
reloads weights and never leaks from one request into the next.
"""

from __future__ import annotations

import inspect
import math
from dataclasses import dataclass, field

from deployments.support.errors import InvalidInput, UnknownModel


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
    "DPM fast": Sampler("DPMSolverSinglestepScheduler"),
    "DDIM": Sampler("DDIMScheduler"),
    "PLMS": Sampler("PNDMScheduler"),
    "PNDM": Sampler("PNDMScheduler"),
    "UniPC": Sampler("UniPCMultistepScheduler"),
    "DEIS": Sampler("DEISMultistepScheduler"),
    "LCM": Sampler("LCMScheduler"),
}

# Seed 003 names.
ALIASES = {
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

# A1111 >= 1.9 sends the sigma schedule separately.
SCHEDULES = {
    "Automatic": {},
    "Uniform": {},
    "Karras": {"use_karras_sigmas": True},
    "Exponential": {"use_exponential_sigmas": True},
    "Beta": {"use_beta_sigmas": True},
}


# The least img2img strength that denoises one of SDXL's 1000 training timesteps; a smaller one would need a
# schedule longer than the model's, and the pipeline runs no step at all.
MIN_STRENGTH = 0.001

SIGMA_OPTIONS = ("use_karras_sigmas", "use_exponential_sigmas", "use_beta_sigmas")

_NO_KARRAS = {"Euler a", "Euler", "DDIM", "PLMS", "PNDM", "UniPC", "LCM", "DEIS"}

# The hub SDXL base's scheduler_config.json values of keys an EulerDiscrete config may lack (the factory's does):
# without them DDIM would take diffusers' clip_sample=True, clipping every predicted x0 to [-1, 1] (SDXL latents
# reach about +-4), and set_alpha_to_one=True; PNDM would run its Runge-Kutta warm-up, more UNet calls than the steps
# counted; LCM would take set_alpha_to_one=True. A checkpoint's own value wins. (thresholding is False by default in
# every scheduler here.)
SDXL_SCHEDULER_DEFAULTS = {"clip_sample": False, "set_alpha_to_one": False, "skip_prk_steps": True,
                           "sample_max_value": 1.0}


def sampler_names() -> list[str]:
    """Every name a client may send, A1111 spelling first."""
    karras = [f"{name} Karras" for name in SAMPLERS if name not in _NO_KARRAS]
    return list(SAMPLERS) + karras + list(ALIASES)


def resolve(name: str, field: str = "sampler_name") -> tuple[str, dict]:
    """The A1111 sampler ``name`` stands for (an alias, a Karras spelling) and the options its spelling adds; an
    unknown name is an ``UnknownModel`` naming ``field``. Torch-free: the ingress checks job submits with it."""
    canonical = ALIASES.get(name.lower(), name) if name not in SAMPLERS else name
    options: dict = {}
    plain = canonical.removesuffix(" Karras")
    # A Karras name of a sampler whose A1111 spelling has none would run unchanged under it: unknown.
    if canonical not in SAMPLERS and plain != canonical and plain in SAMPLERS and plain not in _NO_KARRAS:
        canonical = plain
        options["use_karras_sigmas"] = True
    if canonical not in SAMPLERS:
        raise UnknownModel(f"unknown sampler {name!r} (GET /sdapi/v1/samplers lists them)", field=field,
                           details={"choices": sampler_names()})
    return canonical, options


def build_scheduler(name: str, base_config, schedule: str | None = None, *, seeds: list[int] | None = None,
                    warnings: list[str] | None = None):
    """A fresh scheduler for ``name`` built from the pipeline's scheduler config. ``seeds``: one per image of the
    batch, for a scheduler that draws its noise from its own Brownian tree. ``warnings`` gets a line when the
    schedule cannot apply to this sampler."""
    import diffusers

    canonical, options = resolve(name)
    sampler = SAMPLERS[canonical]
    own = dict(sampler.options)
    cls = getattr(diffusers, sampler.cls_name)
    accepted = set(inspect.signature(cls.__init__).parameters)
    if schedule is not None:
        if schedule not in SCHEDULES:
            choices = {"choices": list(SCHEDULES)}
            raise UnknownModel(f"unknown scheduler {schedule!r}", field="scheduler", details=choices)
        wanted = SCHEDULES[schedule]
        if set(wanted) <= accepted:
            if schedule != "Automatic":
                # An explicit schedule replaces the one a name implies ("DPM++ 2M Karras" with Exponential), as
                # A1111 >= 1.9 does; diffusers refuses two at once.
                own = {k: v for k, v in own.items() if k not in SIGMA_OPTIONS}
                options.update({k: False for k in SIGMA_OPTIONS if k in accepted})
            options.update(wanted)
        elif warnings is not None:  # diffusers would drop the option with a log line only: say so in the result
            warnings.append(f"scheduler {schedule!r} does not apply to sampler {name!r}: its own schedule ran")
    if seeds is not None and "noise_sampler_seed" in accepted:
        # DPM++ SDE draws from a Brownian tree seeded from the global RNG unless given seeds, never from the
        # pipeline's generators; a list makes one tree per image, so image i is the one its seed gives alone.
        options["noise_sampler_seed"] = list(seeds)
    defaults = {k: v for k, v in SDXL_SCHEDULER_DEFAULTS.items() if k in accepted}
    return cls.from_config({**defaults, **dict(base_config)}, **{**own, **options})


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
