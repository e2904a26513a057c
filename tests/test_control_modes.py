"""The ControlNet extension's unit settings that change how a unit guides, on the tiny base: Pixel Perfect (the
preprocessor's resolution), the control modes (soft residual weights, the conditional rows alone), the hires fix's
second pass, AND's subprompts each with residuals of their own text, and the model list's A1111 hash."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest
import torch
from PIL import Image

from deployments.support.control import (
    ControlUnit,
    control_image,
    detect,
    pixel_perfect_resolution,
    second_pass,
)
from deployments.support.control_maps import frame_map
from deployments.support.generation import GenerationRequest
from deployments.support.injection import Injected, Injection, soft_scales, steering
from tests.helpers import pixels

SMALL = dict(prompt="a lighthouse", width=64, height=64, steps=4, guidance_scale=5.0, seed=5)


def gen(base, **kw) -> np.ndarray:
    return pixels(base.generate(GenerationRequest(**{**SMALL, **kw})).images[0])


def unit(image, **kw) -> ControlUnit:
    return ControlUnit(model="tiny-canny", image=image, **kw)


def squares(size: tuple[int, int] = (300, 200)) -> Image.Image:
    image = Image.new("RGB", size, (0, 0, 0))
    w, h = size
    image.paste((255, 255, 255), (w // 4, h // 4, 3 * w // 4, 3 * h // 4))
    image.paste((90, 90, 90), (w // 3, h // 3, w // 2, h // 2))
    return image


# --- Pixel Perfect -----------------------------------------------------------------------------------------------

def test_pixel_perfect_resolution_is_the_extensions():
    # The image's shorter side times the larger scale factor (covering the target), the smaller for Resize and Fill.
    assert pixel_perfect_resolution((1000, 500), 1024, 1024, "crop") == 1024
    assert pixel_perfect_resolution((1000, 500), 1024, 1024, "stretch") == 1024
    assert pixel_perfect_resolution((1000, 500), 1024, 1024, "fill") == 512
    assert pixel_perfect_resolution((300, 200), 64, 64, "crop") == 64
    assert pixel_perfect_resolution((300, 200), 64, 64, "fill") == 43  # 200 * 64 / 300 = 42.67
    assert pixel_perfect_resolution((1000, 1000), 1024, 512, "crop") == 1024
    # numpy's rounding, half to even: 2 * 1.25 = 2.5 -> 2
    assert pixel_perfect_resolution((4, 2), 5, 5, "fill") == 2


def test_pixel_perfect_runs_canny_at_its_resolution_on_both_passes():
    image = squares()
    perfect = unit(image, module="canny", pixel_perfect=True, resize_mode="fill")
    made = pixels(control_image(perfect, None, 64, 64))
    expected = pixels(frame_map(detect(image, "canny", 43), 64, 64, "fill"))
    assert np.array_equal(made, expected)
    # processor_res (512 by default) is not read: a map at 512 differs.
    at_default = pixels(control_image(unit(image, module="canny", resize_mode="fill"), None, 64, 64))
    assert np.abs(at_default - made).mean() > 0.3  # one-pixel lines both: few pixels, but not the same ones
    # A hires fix's second pass (96x96 here) keeps the first pass's resolution, as the extension preprocesses once;
    # computed at 96x96 it would be 64.
    second = second_pass([perfect], (64, 64))[0]
    assert (second.pixel_target, second.hires_pass, second.passes) == ((64, 64), True, "both")
    assert np.array_equal(pixels(control_image(second, None, 96, 96)),
                          pixels(frame_map(detect(image, "canny", 43), 96, 96, "fill")))
    assert not np.array_equal(pixels(control_image(second, None, 96, 96)),
                              pixels(frame_map(detect(image, "canny", 64), 96, 96, "fill")))
    # A unit without pixel perfect takes no target.
    assert second_pass([unit(image)], (64, 64))[0].pixel_target is None


def test_pixel_perfect_changes_the_image(base):
    image = squares()
    plain = gen(base, control=[unit(image, module="canny")])
    perfect = gen(base, control=[unit(image, module="canny", pixel_perfect=True)])
    assert np.abs(perfect - plain).mean() > 0.5
    # At the resolution it computes (64: 300x200 cropped to 64x64), the same pixels.
    assert np.array_equal(perfect, gen(base, control=[unit(image, module="canny", processor_res=64)]))


# --- control modes -----------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def call(base):
    """One ControlNet call's inputs on the tiny base, two rows: [uncond; cond] under guidance."""
    net = base.controls.models["tiny-canny"]
    gen_ = torch.Generator().manual_seed(3)
    dim = net.config.cross_attention_dim
    pooled = net.config.projection_class_embeddings_input_dim - 6 * net.config.addition_time_embed_dim
    return dict(sample=torch.randn(2, 4, 8, 8, generator=gen_), timestep=torch.tensor(500),
                encoder_hidden_states=torch.randn(2, 7, dim, generator=gen_),
                controlnet_cond=[torch.rand(2, 3, 64, 64, generator=gen_)], conditioning_scale=[0.8],
                added_cond_kwargs={"text_embeds": torch.randn(2, pooled, generator=gen_),
                                   "time_ids": torch.tensor([[64.0, 64, 0, 0, 64, 64]] * 2)})


def run(base, call, injection: Injection, guided: bool = True):
    nets = Injected([base.controls.models["tiny-canny"]])
    nets.injections, nets.guided = [injection], (lambda: guided)
    with torch.no_grad():
        return nets(**call, return_dict=False)


def test_soft_injection_weighs_each_residual_as_the_extension(base, call):
    # SDXL's ten residuals (nine down, the middle block's last) take the first ten of the extension's 13 weights.
    assert soft_scales(10) == [0.825 ** e for e in range(12, 2, -1)]
    assert soft_scales(10)[0] == pytest.approx(0.0995, abs=1e-4) and soft_scales(10)[-1] == pytest.approx(0.5615,
                                                                                                         abs=1e-4)
    down, mid = run(base, call, Injection())
    # Balanced is diffusers' own: the net's residuals at the unit's scale.
    with torch.no_grad():
        own = base.controls.models["tiny-canny"](**{**call, "controlnet_cond": call["controlnet_cond"][0],
                                                    "conditioning_scale": 0.8}, return_dict=False)
    for a, b in zip([*down, mid], [*own[0], own[1]], strict=True):
        assert torch.equal(a, b)
    soft_down, soft_mid = run(base, call, Injection(soft=True))
    assert len(down) == 9  # the tiny ControlNet has SDXL's layout
    residuals, soft = [*down, mid], [*soft_down, soft_mid]
    for i, (a, b) in enumerate(zip(residuals, soft, strict=True)):
        assert a.abs().max() > 0, i
        torch.testing.assert_close(b, a * 0.825 ** (12 - i))


def test_control_is_more_important_leaves_the_unconditional_rows_without_residuals(base, call):
    down, mid = run(base, call, Injection())
    only, only_mid = run(base, call, Injection(soft=True, cond_only=True))
    for i, (a, b) in enumerate(zip([*down, mid], [*only, only_mid], strict=True)):
        assert torch.count_nonzero(b[0]) == 0, i  # the negative prompt's row
        torch.testing.assert_close(b[1], a[1] * 0.825 ** (12 - i))  # the prompt's, computed alone
    # Without guidance every row is conditional.
    unguided = run(base, call, Injection(cond_only=True), guided=False)
    for a, b in zip([*down, mid], [*unguided[0], unguided[1]], strict=True):
        torch.testing.assert_close(a, b)


def test_the_modes_give_three_images(base):
    image = squares((64, 64))
    made = {mode: gen(base, control=[unit(image, control_mode=mode)]) for mode in ("balanced", "prompt", "control")}
    plain = gen(base)
    for mode, pixels_ in made.items():
        assert np.abs(pixels_ - plain).mean() > 0.5, mode
    assert np.abs(made["balanced"] - made["prompt"]).mean() > 0.5
    assert np.abs(made["balanced"] - made["control"]).mean() > 0.5
    assert np.abs(made["prompt"] - made["control"]).mean() > 0.5


def test_in_the_pipeline_control_mode_zeroes_the_unconditional_residuals(base):
    """The UNet's residuals in a real run: under guidance, rows [negative; prompt]; a "ControlNet is more important"
    unit adds nothing to the negative row, a balanced one does; a second unit's mode is its own."""
    image = squares((64, 64))
    unet = base.checkpoint().txt2img.unet
    seen: list[torch.Tensor] = []

    def record(_module, _args, kwargs):
        if kwargs.get("mid_block_additional_residual") is not None:
            seen.append(kwargs["mid_block_additional_residual"].detach().clone())

    hook = unet.register_forward_pre_hook(record, with_kwargs=True)
    try:
        gen(base, control=[unit(image, control_mode="control")])
        control = list(seen)
        seen.clear()
        gen(base, control=[unit(image)])
        balanced = list(seen)
        seen.clear()
        gen(base, control=[unit(image, control_mode="control"), unit(image, module="invert")])
        mixed = list(seen)
    finally:
        hook.remove()
    assert len(control) == len(balanced) == len(mixed) == SMALL["steps"]
    assert all(r.shape[0] == 2 for r in control)
    assert all(torch.count_nonzero(r[0]) == 0 and torch.count_nonzero(r[1]) > 0 for r in control)
    assert all(torch.count_nonzero(r[0]) > 0 for r in balanced + mixed)


def test_a_canny_unit_takes_the_soft_weights_in_a_hires_second_pass():
    image = squares((64, 64))
    assert Injection.of(unit(image, module="canny", hires_pass=True)) == Injection(soft=True)
    assert Injection.of(unit(image, module="canny")) == Injection()
    assert Injection.of(unit(image, module="invert", hires_pass=True)) == Injection()
    assert Injection.of(unit(image, control_mode="prompt")) == Injection(soft=True)
    assert Injection.of(unit(image, control_mode="control")) == Injection(soft=True, cond_only=True)


def test_steering_sets_the_modes_for_the_run_alone(base):
    image = squares((64, 64))
    pipe = base.controls.pipeline(base.checkpoint(), "txt2img", [unit(image)])
    nets = pipe.controlnet
    assert isinstance(nets, Injected)
    with steering(pipe, [unit(image, control_mode="control")]):
        assert nets.injections == [Injection(soft=True, cond_only=True)]
    assert nets.injections == [Injection()] and nets.last is None


# --- AND: each subprompt's own residuals -------------------------------------------------------------------------

def test_and_subprompts_get_residuals_of_their_own_text(base, monkeypatch):
    image = squares((64, 64))
    composed = dict(prompt="a lighthouse AND a storm at sea :0.7", prompt_syntax="a1111", control=[unit(image)])
    unet = base.checkpoint().txt2img.unet
    net = base.controls.models["tiny-canny"]
    calls: list[dict] = []
    images: list[torch.Tensor] = []

    def record(_module, args, kwargs):
        calls.append({"sample": args[0].clone(), "timestep": args[1], "states": args[2].clone(),
                      "added": {k: kwargs["added_cond_kwargs"][k].clone() for k in ("text_embeds", "time_ids")},
                      "down": [d.clone() for d in kwargs["down_block_additional_residuals"]],
                      "mid": kwargs["mid_block_additional_residual"].clone()})

    def control_input(_module, _args, kwargs):
        images.append(kwargs["controlnet_cond"].clone())

    hooks = [unet.register_forward_pre_hook(record, with_kwargs=True),
             net.register_forward_pre_hook(control_input, with_kwargs=True)]
    try:
        own = gen(base, **composed)
    finally:
        for hook in hooks:
            hook.remove()
    # Each step: the pipeline's call (negative and first subprompt), then the second subprompt's, one row.
    assert len(calls) == 2 * SMALL["steps"] and [c["sample"].shape[0] for c in calls[:2]] == [2, 1]
    pipeline, second = calls[0], calls[1]
    # Its residuals are the ControlNet's on its own row and text, at the unit's scale: computed here by hand.
    with torch.no_grad():
        down, mid = net(second["sample"], second["timestep"], encoder_hidden_states=second["states"],
                        controlnet_cond=images[0][1:], conditioning_scale=1.0,
                        added_cond_kwargs=second["added"], return_dict=False)
    for a, b in zip([*second["down"], second["mid"]], [*down, mid], strict=True):
        torch.testing.assert_close(a, b)
    # ... not the first subprompt's, which it shared before.
    assert not torch.allclose(second["mid"], pipeline["mid"][1:])
    # And the image is not the shared residuals' (``again`` declining: Composed then shares the pipeline's rows).
    monkeypatch.setattr(Injected, "again", lambda *args, **kwargs: None)
    shared = gen(base, **composed)
    assert np.abs(own - shared).mean() > 0.05


def test_a_prompt_and_a_negative_prompt_of_different_lengths_get_residuals_at_their_own(base):
    """A prompt of two chunks and a negative prompt of one run in UNet calls of their own (A1111's default): each
    call's residuals are the ControlNet's on its own text at its own length, as the extension computes them inside
    each call, not the pipeline's (computed on both at the longer)."""
    image = squares((64, 64))
    unet = base.checkpoint().txt2img.unet
    net = base.controls.models["tiny-canny"]
    calls: list[dict] = []
    pipeline: list[dict] = []

    def record(_module, args, kwargs):
        calls.append({"sample": args[0].clone(), "timestep": args[1], "states": args[2].clone(),
                      "added": {k: kwargs["added_cond_kwargs"][k].clone() for k in ("text_embeds", "time_ids")},
                      "mid": kwargs["mid_block_additional_residual"].clone()})

    def control_input(_module, _args, kwargs):
        pipeline.append({"image": kwargs["controlnet_cond"].clone(), "states": kwargs["encoder_hidden_states"]})

    hooks = [unet.register_forward_pre_hook(record, with_kwargs=True),
             net.register_forward_pre_hook(control_input, with_kwargs=True)]
    try:
        gen(base, prompt="a " * 100, negative_prompt="blurry", prompt_syntax="a1111", control=[unit(image)])
    finally:
        for hook in hooks:
            hook.remove()
    negative, prompt = calls[0], calls[1]  # the first step's two calls
    assert (negative["states"].shape[1], prompt["states"].shape[1]) == (77, 154)
    assert pipeline[0]["states"].shape[:2] == (2, 154)  # the pipeline's own ControlNet call: both at the longer
    for call, row in ((negative, 0), (prompt, 1)):
        with torch.no_grad():
            _, mid = net(call["sample"], call["timestep"], encoder_hidden_states=call["states"],
                         controlnet_cond=pipeline[0]["image"][row:row + 1], conditioning_scale=1.0,
                         added_cond_kwargs=call["added"], return_dict=False)
        torch.testing.assert_close(call["mid"], mid)
    # The negative prompt's call no longer reads the pipeline's residual row (its text padded to 154).
    with torch.no_grad():
        _, padded = net(negative["sample"], negative["timestep"], encoder_hidden_states=pipeline[0]["states"][:1],
                        controlnet_cond=pipeline[0]["image"][:1], conditioning_scale=1.0,
                        added_cond_kwargs=negative["added"], return_dict=False)
    assert not torch.allclose(negative["mid"], padded)


def test_and_without_guidance_counts_the_negative_rows_as_unconditional(base):
    """At cfg 1 the pipeline runs no negative rows: Composed runs them beside the other subprompts, and a
    "ControlNet is more important" unit adds nothing there."""
    image = squares((64, 64))
    unet = base.checkpoint().txt2img.unet
    extra: list[torch.Tensor] = []

    def record(_module, args, kwargs):
        extra.append(kwargs.get("mid_block_additional_residual"))

    hook = unet.register_forward_pre_hook(record, with_kwargs=True)
    try:
        gen(base, prompt="a lighthouse AND a storm :0.5", prompt_syntax="a1111", guidance_scale=1.0,
            control=[unit(image, control_mode="control")])
    finally:
        hook.remove()
    second = extra[1]  # [storm; negative]
    assert second is not None and second.shape[0] == 2
    assert torch.count_nonzero(second[0]) > 0 and torch.count_nonzero(second[1]) == 0


# --- the model list ----------------------------------------------------------------------------------------------

def test_model_hash_is_a1111s_old_hash(tmp_path, base, tiny):
    from deployments.support.checkpoints import model_hash

    slice_ = bytes(range(256)) * 256  # 64 KiB
    path = tmp_path / "weights.safetensors"
    path.write_bytes(b"\0" * 0x100000 + slice_ + b"after")
    assert model_hash(path) == hashlib.sha256(slice_).hexdigest()[:8]
    short = tmp_path / "short.safetensors"
    short.write_bytes(b"x" * 1000)
    assert model_hash(short) == hashlib.sha256(b"").hexdigest()[:8] == "e3b0c442"  # A1111 reads nothing there
    weights = tiny / "controlnet-canny" / "diffusion_pytorch_model.safetensors"
    assert base.controls.titles == [f"tiny-canny [{model_hash(weights)}]"]
    assert model_hash(weights) != "e3b0c442"
