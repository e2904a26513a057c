"""A1111's composable diffusion (``a AND b :0.5``) on an unchanged diffusers SDXL pipeline.

A1111 guides with ``uncond + cfg * sum_i w_i * (cond_i - uncond)``, one ``cond_i`` per subprompt. The pipeline
computes ``uncond + cfg * (cond - uncond)`` from a UNet call on ``[uncond; cond]``; ``Composed`` stands in for its
UNet during a call and answers that call with ``[uncond; uncond + sum_i w_i * (cond_i - uncond)]``, so that the
pipeline's own guidance (the formula is linear) gives A1111's. The pipeline's rows hold each image's first
subprompt (and follow its schedule through ``Conditioning.step_end``); the other subprompts run in a second UNet
call of their own, so that the rows of images without AND are computed exactly as without ``Composed``: a request
without AND batched beside one with AND keeps its pixels, and an image whose guidance is plain keeps its UNet
output untouched.

Without classifier-free guidance (diffusers runs none at ``guidance_scale`` <= 1, where A1111 still does) the
pipeline takes the UNet's output as it is: ``Composed`` then evaluates the negative prompt itself, for the images
that compose, and answers ``uncond + cfg * sum_i w_i * (cond_i - uncond)``, A1111's formula at that scale (its
time ids are the prompt's: on the refiner, the aesthetic score rather than the negative one). An image of one
subprompt at weight 1 is left as diffusers guides it, at any scale.

A prompt and a negative prompt of different lengths in chunks (``Conditioning.lengths``) run as A1111 1.10 runs them
by default (its ``pad_cond_uncond`` options off): in UNet calls of their own, each at its own length. The pipeline
concatenates them, so it holds both at the longer; ``Composed`` cuts each row back to its own before the UNet reads
it, and with ControlNet units computes each such call's residuals again on its rows at their own length, as the
extension computes them inside each UNet call (the pipeline's own ControlNet call read them at the longer).

The other subprompts run in calls of at most a guided call's rows (two an image), so that a request's memory stays
what its batch was sized for; on CUDA a call of one row runs as two, so that a compiled UNet (``fast.compile``),
warmed up on batches, does not compile again for a batch of one inside a request.

With ControlNet units, the other subprompts' rows get residuals of their own: the units' ControlNets run again on
those rows with their own text (``injection.Injected.again``), as A1111's extension runs them inside every UNet
call, the negative prompt's rows counted as unconditional (a "ControlNet is more important" unit adds nothing there).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch

from deployments.support.injection import Injected, take_rows
from deployments.support.prompts import Conditioning


class Composed:
    """A pipeline's UNet that composes each image's subprompts as A1111 does (see the module's docstring), reading
    which rows each image holds now from ``conditioning()`` (the running pass's). Everything but the call is the
    UNet's own (its config, dtype, adapters), so the pipeline reads it as its UNet."""

    def __init__(self, unet, pipe, conditioning: Callable[[], Conditioning | None]) -> None:
        self.unet, self.pipe, self.conditioning = unet, pipe, conditioning

    def __getattr__(self, name: str) -> Any:
        return getattr(self.unet, name)

    def __call__(self, sample: torch.Tensor, timestep, encoder_hidden_states: torch.Tensor, *args,
                 added_cond_kwargs: dict | None = None, return_dict: bool = True, **kwargs):
        conditioning = self.conditioning()
        if conditioning is not None and conditioning.lengths is not None:
            out = self._apart(conditioning, sample, timestep, encoder_hidden_states, args, added_cond_kwargs or {},
                              kwargs)
        else:
            out = self.unet(sample, timestep, encoder_hidden_states, *args, added_cond_kwargs=added_cond_kwargs,
                            return_dict=False, **kwargs)[0]
        if conditioning is not None and conditioning.composes:
            out = self._compose(conditioning, out, sample, timestep, encoder_hidden_states, args,
                                added_cond_kwargs or {}, kwargs)
        if return_dict:
            from diffusers.models.unets.unet_2d_condition import UNet2DConditionOutput

            return UNet2DConditionOutput(sample=out)
        return (out,)

    def _compose(self, conditioning: Conditioning, out: torch.Tensor, sample: torch.Tensor, timestep,
                 states: torch.Tensor, args: tuple, added: dict, kwargs: dict) -> torch.Tensor:
        if conditioning.applied is None or conditioning.weights is None:
            raise ValueError("the conditioning was never applied to the pipeline")
        images = len(conditioning.prompts)
        if out.shape[0] not in (images, 2 * images):
            raise ValueError(f"the UNet ran {out.shape[0]} rows for {images} images")
        guided = out.shape[0] == 2 * images  # [uncond; cond], the pipeline's order
        _, negatives, others = conditioning.applied
        cut = conditioning.lengths or (None, None)  # the positions a prompt's and a negative prompt's rows read
        # The second call's rows: each composing image's other subprompts, and its negative where the pipeline
        # ran none. ``source``: the pipeline's row whose latents, timestep and time ids it shares.
        source: list[int] = []
        embeds: list[torch.Tensor] = []
        pooled: list[torch.Tensor] = []
        negative: list[bool] = []
        for image, (weights, rows) in enumerate(zip(conditioning.weights, others, strict=True)):
            if weights == (1.0,):
                continue
            own = images * guided + image
            for row in rows:
                source.append(own)
                embeds.append(conditioning.embeds[row, :cut[0]])
                pooled.append(conditioning.pooled[row])
                negative.append(False)
            if not guided:
                source.append(own)
                embeds.append(conditioning.negative_embeds[negatives[image], :cut[1]])
                pooled.append(conditioning.negative_pooled[negatives[image]])
                negative.append(True)
        # In calls of at most a guided call's rows (two an image): what the batch was sized for (``max_batch_size``
        # counts images, each two rows under guidance); eight subprompts an image must not make one call of eight
        # times that memory.
        extra = out[:0]
        if source:
            extra = self._calls(source, embeds, pooled, negative, sample, timestep, states, args, added, kwargs,
                                out.shape[0], 2 * images)
        cfg = float(getattr(self.pipe, "guidance_scale", 1.0))
        composed = list(out[images:] if guided else out)
        at = 0
        for image, (weights, rows) in enumerate(zip(conditioning.weights, others, strict=True)):
            if weights == (1.0,):
                continue
            conds = [composed[image].float(), *(extra[at + k].float() for k in range(len(rows)))]
            at += len(rows)
            if guided:
                uncond = out[image].float()
                scale = 1.0  # the pipeline multiplies by cfg itself
            else:
                uncond = extra[at].float()
                at += 1
                scale = cfg
            total = sum(w * (c - uncond) for w, c in zip(weights, conds, strict=True))
            composed[image] = (uncond + scale * total).to(out.dtype)
        stacked = torch.stack(composed)
        return torch.cat([out[:images], stacked]) if guided else stacked


    def _apart(self, conditioning: Conditioning, sample: torch.Tensor, timestep, states: torch.Tensor, args: tuple,
               added: dict, kwargs: dict) -> torch.Tensor:
        """The pipeline's own call with its negative prompts' rows and its prompts' each at their own length (the
        pipeline holds both at the longer), in calls of their own, as A1111 runs a prompt and a negative prompt
        of different lengths."""
        rows, images = sample.shape[0], len(conditioning.prompts)
        if rows not in (images, 2 * images) or conditioning.lengths is None:
            raise ValueError(f"the UNet ran {rows} rows for {images} images")
        cond, uncond = conditioning.lengths
        length = [uncond] * (rows - images) + [cond] * images  # [uncond; cond] with guidance, cond without
        return self._calls(list(range(rows)), [states[i, :n] for i, n in enumerate(length)],
                           list(added["text_embeds"]), [i < rows - images for i in range(rows)], sample, timestep,
                           states, args, added, kwargs, rows, rows)

    def _calls(self, source: list[int], embeds: list[torch.Tensor], pooled: list[torch.Tensor], negative: list[bool],
               sample: torch.Tensor, timestep, states: torch.Tensor, args: tuple, added: dict, kwargs: dict,
               rows_in: int, most: int) -> torch.Tensor:
        """``_rows`` for every row, in calls of at most ``most`` rows that each hold embeddings of one length;
        their outputs in the rows' order."""
        by_length: dict[int, list[int]] = {}
        for i, embed in enumerate(embeds):
            by_length.setdefault(embed.shape[0], []).append(i)
        out: list[torch.Tensor] = [sample[:0]] * len(source)
        for members in by_length.values():
            for at in range(0, len(members), most):
                part = members[at:at + most]
                done = self._rows([source[i] for i in part], [embeds[i] for i in part], [pooled[i] for i in part],
                                  [negative[i] for i in part], sample, timestep, states, args, added, kwargs, rows_in)
                for i, row in zip(part, done, strict=True):
                    out[i] = row
        return torch.stack(out)

    def _rows(self, source: list[int], embeds: list[torch.Tensor], pooled: list[torch.Tensor], negative: list[bool],
              sample: torch.Tensor, timestep, states: torch.Tensor, args: tuple, added: dict, kwargs: dict,
              rows_in: int) -> torch.Tensor:
        """One UNet call on ``embeds`` and ``pooled``, each row with the latents, timestep and time ids of the
        pipeline's row ``source[i]`` (``negative[i]``: the negative prompt's), and the ControlNet residuals of its own
        text where units run. On CUDA a single row runs twice (one output kept): a compiled UNet, warmed up on
        batches, would otherwise compile again for a batch of one in the middle of a request."""
        pad = len(source) == 1 and sample.device.type == "cuda"
        if pad:
            source, embeds, pooled, negative = source * 2, embeds * 2, pooled * 2, negative * 2
        index = torch.tensor(source, device=sample.device)
        extra_added = {name: take_rows(value, index, rows_in) for name, value in added.items()}
        extra_added["text_embeds"] = torch.stack(pooled).to(added["text_embeds"].device, added["text_embeds"].dtype)
        extra_states = torch.stack(embeds).to(states.device, states.dtype)
        extra_kwargs = {k: take_rows(v, index, rows_in) for k, v in kwargs.items()}
        extra_timestep = take_rows(timestep, index, rows_in)
        nets = getattr(self.pipe, "controlnet", None)
        if isinstance(nets, Injected) and "mid_block_additional_residual" in kwargs:
            # The pipeline's residuals were computed on its rows' text (the first subprompt's, at the longer
            # length where a prompt and its negative differ): these rows get their own.
            residuals = nets.again(index, rows_in, sample[index], extra_timestep, extra_states, extra_added, negative)
            if residuals is not None:
                extra_kwargs["down_block_additional_residuals"], extra_kwargs["mid_block_additional_residual"] = \
                    residuals
        rows = self.unet(sample[index], extra_timestep, extra_states, *[take_rows(a, index, rows_in) for a in args],
                         added_cond_kwargs=extra_added, return_dict=False, **extra_kwargs)[0]
        return rows[:1] if pad else rows


@contextmanager
def composing(pipes: list, conditioning: Callable[[], Conditioning | None]) -> Iterator[None]:
    """Each of ``pipes`` with its UNet behind ``Composed`` for the block, and its own UNet back however the block
    ends (an error, ``/interrupt``). Set on the pipeline object alone, past its ``__setattr__``: its config and
    components' registration stay as they are."""
    held = [(pipe, pipe.unet) for pipe in {id(pipe): pipe for pipe in pipes}.values()]
    try:
        for pipe, unet in held:
            object.__setattr__(pipe, "unet", Composed(unet, pipe, conditioning))
        yield
    finally:
        for pipe, unet in held:
            object.__setattr__(pipe, "unet", unet)
