"""How a ControlNet unit's residuals enter the UNet: the extension's control modes, on diffusers' pipelines.

A1111's ControlNet extension (Mikubill/sd-webui-controlnet, ``scripts/hook.py``, ``UnetHook``) runs every unit's
ControlNet inside each UNet call, on that call's rows and text context, and then, per unit:

- "My prompt is more important" and "ControlNet is more important" (``soft_injection``) scale residual ``i`` by
  ``weight * 0.825 ** (12 - i)``: 13 weights for SD1.5's 13 residuals, of which SDXL keeps the first 10 for its 10
  (nine down, the middle block's last), so SDXL's middle block takes ``0.825 ** 3`` and its first down residual
  ``0.825 ** 12``. A canny unit takes the same soft weights in a hires fix's second pass whatever its mode
  (``high_res_fix_forced_soft_injection``).
- "ControlNet is more important" (``cfg_injection``) also zeroes the residuals of the unconditional rows (the
  negative prompt's), so that classifier-free guidance amplifies the control with the prompt.

diffusers' pipelines call ``pipe.controlnet`` once a step on the rows they give the UNet (``[uncond; cond]`` under
guidance) with one scale per unit (its weight, 0 outside its guidance range), and add what it returns to the UNet.
``Injected`` is that ``MultiControlNetModel`` (one per ControlNet pipeline, sharing the replica's ControlNets): it
runs each net as the base class does and then applies its unit's mode. diffusers' own ``guess_mode`` is not it: its
scales are ``logspace(-1, 0)`` over the residuals.

It also keeps the step's call (control images and scales) so that ``composable.Composed``, which runs AND's other
subprompts in UNet calls of their own, gets residuals computed on those rows with their own text, as the extension's
hooked UNet computes them in every call (``again``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from diffusers.models.controlnets.multicontrolnet import MultiControlNetModel

if TYPE_CHECKING:
    from deployments.support.control import ControlUnit

SOFT_BASE = 0.825  # the extension's soft injection: residual i weighs weight * SOFT_BASE ** (SOFT_TOP - i)
SOFT_TOP = 12


def soft_scales(count: int) -> list[float]:
    """The extension's soft weights (before the unit's weight) of a ControlNet's ``count`` residuals, the down
    blocks' in order and the middle block's last: ten for SDXL, ``0.825 ** 12`` up to ``0.825 ** 3``."""
    return [SOFT_BASE ** (SOFT_TOP - i) for i in range(count)]


@dataclass(frozen=True)
class Injection:
    """How one unit's residuals enter: with the soft weights, and on the conditional rows alone."""

    soft: bool = False
    cond_only: bool = False

    @classmethod
    def of(cls, unit: ControlUnit) -> Injection:
        forced = unit.hires_pass and unit.module == "canny"  # the extension: canny (and mlsd) in a hires fix
        return cls(soft=unit.control_mode != "balanced" or forced, cond_only=unit.control_mode == "control")


BALANCED = Injection()


def take_rows(value, index: torch.Tensor, rows: int):
    """``value``'s rows at ``index`` where it has one per call row (a tensor, or a list or dict of them: the time
    ids, IP-Adapter's image embeddings, control images); as it is otherwise (a scalar timestep, an attention scale)."""
    if isinstance(value, torch.Tensor):
        return value[index.to(value.device)] if value.ndim and value.shape[0] == rows else value
    if isinstance(value, list | tuple):
        return type(value)(take_rows(v, index, rows) for v in value)
    if isinstance(value, dict):
        return {k: take_rows(v, index, rows) for k, v in value.items()}
    return value


class Injected(MultiControlNetModel):
    """The units' ControlNets as diffusers' ``MultiControlNetModel`` (one unit too), each unit's residuals scaled and
    masked as its control mode says (``steering`` sets the modes for a run). Holds no weights of its own."""

    def __init__(self, nets: Sequence[torch.nn.Module]) -> None:
        super().__init__(list(nets))
        self.injections: list[Injection] = [BALANCED] * len(nets)
        self.guided: Callable[[], bool] = lambda: False  # the running pipeline's rows are [uncond; cond]
        self.last: dict[str, Any] | None = None  # the step's call, for ``again``

    def forward(self, sample: torch.Tensor, timestep, encoder_hidden_states: torch.Tensor, controlnet_cond: list,
                conditioning_scale: list[float], class_labels=None, timestep_cond=None, attention_mask=None,
                added_cond_kwargs: dict | None = None, cross_attention_kwargs: dict | None = None,
                guess_mode: bool = False, return_dict: bool = True):
        rows = sample.shape[0]
        uncond = torch.zeros(rows, dtype=torch.bool)
        if self.guided() and not guess_mode:  # guess mode passes the conditional rows alone
            uncond[:rows // 2] = True
        extra = dict(class_labels=class_labels, timestep_cond=timestep_cond, attention_mask=attention_mask,
                     cross_attention_kwargs=cross_attention_kwargs, guess_mode=guess_mode)
        self.last = dict(rows=rows, images=controlnet_cond, scales=conditioning_scale, extra=extra)
        return self.residuals(sample, timestep, encoder_hidden_states, controlnet_cond, conditioning_scale, uncond,
                              added_cond_kwargs, extra)

    def again(self, index: torch.Tensor, rows: int, sample: torch.Tensor, timestep,
              encoder_hidden_states: torch.Tensor, added_cond_kwargs: dict, uncond: Sequence[bool]):
        """The residuals of other UNet rows in this step: ``index`` picks, for each, the row of the step's call
        (``rows`` of them) whose control images it takes; ``sample`` (the UNet's, an inpainting UNet's extra
        channels dropped), timestep and text are its own. ``uncond`` marks the negative prompt's rows. None where
        the step's call cannot be matched row by row (guess mode: its call had the conditional rows alone)."""
        last = self.last
        if last is None or last["rows"] != rows:
            return None
        extra = {k: take_rows(v, index, rows) for k, v in last["extra"].items()}
        images = [take_rows(image, index, rows) for image in last["images"]]
        return self.residuals(sample, timestep, encoder_hidden_states, images, last["scales"],
                              torch.tensor(list(uncond), dtype=torch.bool), added_cond_kwargs, extra)

    def residuals(self, sample: torch.Tensor, timestep, states: torch.Tensor, images: list, scales: list[float],
                  uncond: torch.Tensor, added: dict | None, extra: dict) -> tuple[list[torch.Tensor] | None,
                                                                                   torch.Tensor | None]:
        """Every unit's residuals on these rows, each as its injection says, summed; (None, None) where no unit
        adds anything (a call of unconditional rows alone, every unit conditional-only): the UNet then runs
        without residuals, which is adding zeros."""
        rows = sample.shape[0]
        down: list[torch.Tensor] | None = None
        mid: torch.Tensor | None = None
        inputs = dict(sample=sample, timestep=timestep, encoder_hidden_states=states, added_cond_kwargs=added, **extra)
        for net, image, scale, injection in zip(self.nets, images, scales, self.injections, strict=True):
            # A conditional-only unit runs on those rows alone (as the extension evaluates it), zeros elsewhere.
            keep = (~uncond).nonzero().flatten() if injection.cond_only and bool(uncond.any()) else None
            if keep is not None and not len(keep):
                continue
            given = {**inputs, "controlnet_cond": image}
            if keep is not None:
                given = {k: take_rows(v, keep, rows) for k, v in given.items()}
            given["sample"] = given["sample"][:, :net.config.in_channels]  # an inpainting UNet's extra channels
            net_down, net_mid = net(**given, conditioning_scale=scale, return_dict=False)
            if injection.soft:
                weights = soft_scales(len(net_down) + 1)
                net_down = [d * w for d, w in zip(net_down, weights, strict=False)]
                net_mid = net_mid * weights[-1]
            if keep is not None:
                net_down = [_spread(d, keep, rows) for d in net_down]
                net_mid = _spread(net_mid, keep, rows)
            down = net_down if down is None else [a + b for a, b in zip(down, net_down, strict=True)]
            mid = net_mid if mid is None else mid + net_mid
        return down, mid


def _spread(residual: torch.Tensor, keep: torch.Tensor, rows: int) -> torch.Tensor:
    """``residual`` of the ``keep`` rows at their places among ``rows``, zeros elsewhere."""
    out = residual.new_zeros((rows, *residual.shape[1:]))
    out[keep.to(residual.device)] = residual
    return out


@contextmanager
def steering(pipe, units: list[ControlUnit]) -> Iterator[None]:
    """``pipe``'s ControlNets (an ``Injected``) with the control modes of ``units`` (the active ones, in its nets'
    order) for the block; balanced again however it ends."""
    nets = getattr(pipe, "controlnet", None)
    if not isinstance(nets, Injected):
        yield
        return
    if len(units) != len(nets.nets):
        raise ValueError(f"{len(units)} units for {len(nets.nets)} ControlNets")
    nets.injections = [Injection.of(u) for u in units]
    nets.guided = lambda: bool(pipe.do_classifier_free_guidance)
    try:
        yield
    finally:
        nets.injections, nets.guided, nets.last = [BALANCED] * len(nets.nets), (lambda: False), None
