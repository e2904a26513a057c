"""ControlNet on the tiny base: a unit's effect, its scale and guidance range, preprocessing, several units, the
image-to-image fallback to the init image, and what is refused (naming the field)."""

from __future__ import annotations

import cv2
import numpy as np
import pytest
import torch
from PIL import Image
from pydantic import ValidationError

from deployments.sdxl_base import batch_key
from deployments.support.control import MAX_MAP_PIXELS, ControlUnit, at_resolution, control_image, detect, resolution
from deployments.support.control_maps import frame_map
from deployments.support.errors import InvalidInput, UnknownModel
from deployments.support.generation import GenerationRequest
from tests.helpers import centre_square, pixels

SMALL = dict(prompt="a lighthouse", width=64, height=64, steps=4, guidance_scale=5.0, seed=5)


def gen(base, **kw) -> np.ndarray:
    return pixels(base.generate(GenerationRequest(**{**SMALL, **kw})).images[0])


def unit(image, **kw) -> ControlUnit:
    return ControlUnit(model="tiny-canny", image=image, **kw)


def test_a_unit_changes_the_image_and_scale_zero_leaves_it(base, astronaut):
    plain = gen(base)
    controlled = gen(base, control=[unit(astronaut)])
    assert np.abs(controlled - plain).mean() > 1.0
    # At scale 0 the residuals are zeros added to the UNet's: the pixels of no control at all.
    assert np.abs(gen(base, control=[unit(astronaut, conditioning_scale=0.0)]) - plain).max() <= 1
    # The control image matters, not just the ControlNet's pass: another image, other pixels.
    other = gen(base, control=[unit(Image.new("RGB", (64, 64), (255, 255, 255)))])
    assert np.abs(other - controlled).mean() > 0.5
    # And the next plain request is untouched by the ControlNet pipeline before it.
    assert np.array_equal(gen(base), plain)


def test_guidance_end_cuts_the_unit_short(base, astronaut):
    plain, full = gen(base), gen(base, control=[unit(astronaut)])
    half = gen(base, control=[unit(astronaut, guidance_end=0.5)])
    assert np.abs(half - full).mean() > 0.5
    assert np.abs(half - plain).mean() > 0.5  # it ran for the first half
    # A range that holds no step is no control.
    assert np.abs(gen(base, control=[unit(astronaut, guidance_start=0.0, guidance_end=0.0)]) - plain).max() <= 1


def test_canny_is_opencv_canny_on_the_image_at_processor_res(astronaut):
    edges = detect(astronaut, "canny", 256, 50, 150)
    resized = cv2.resize(np.asarray(astronaut), (256, 256), interpolation=cv2.INTER_AREA)  # 512² in, shorter side 256
    expected = cv2.Canny(resized, 50, 150)
    assert edges.size == (256, 256) and edges.mode == "RGB"
    assert np.array_equal(np.asarray(edges)[..., 0], expected)
    assert set(np.unique(expected)) == {0, 255}  # edges found: the comparison is not of two blank maps
    # At the generation size, framed by the resize mode as the extension frames a map: canny's stretched to 96x64,
    # still binary.
    framed = control_image(unit(astronaut, module="canny", processor_res=256, threshold_a=50, threshold_b=150,
                                resize_mode="stretch"), None, 96, 64)
    assert framed.size == (96, 64)
    assert np.array_equal(pixels(framed), pixels(frame_map(edges, 96, 64, "stretch")))
    assert set(np.unique(pixels(framed))) == {0, 255}


def test_at_resolution_keeps_the_aspect_and_invert_inverts(astronaut):
    wide = astronaut.resize((300, 200))
    assert at_resolution(wide, 100).size == (150, 100)
    assert np.array_equal(pixels(detect(wide, "invert")), 255 - pixels(wide))
    assert np.array_equal(pixels(detect(wide, "none")), pixels(wide))


def test_canny_unit_differs_from_the_raw_image(base, astronaut):
    raw = gen(base, control=[unit(astronaut)])
    edges = gen(base, control=[unit(astronaut, module="canny")])
    assert np.abs(raw - edges).mean() > 0.5


def test_several_units(base, astronaut):
    one = gen(base, control=[unit(astronaut)])
    two = gen(base, control=[unit(astronaut), unit(astronaut, module="invert")])
    assert np.abs(two - one).mean() > 0.5
    # A second unit at scale 0 adds nothing to the first.
    assert np.abs(gen(base, control=[unit(astronaut), unit(astronaut, module="invert", conditioning_scale=0.0)])
                  - one).max() <= 1


def test_img2img_unit_without_image_uses_the_init_image(base, astronaut):
    edit = dict(init_image=astronaut, strength=0.6)
    plain = gen(base, **edit)
    implicit = gen(base, **edit, control=[ControlUnit(model="tiny-canny")])
    # The init image as the base sizes it (Lanczos) is the unit's map, already at the generation size.
    explicit = gen(base, **edit, control=[unit(astronaut.resize((64, 64), Image.Resampling.LANCZOS))])
    assert np.abs(implicit - plain).mean() > 1.0
    assert np.array_equal(implicit, explicit)


def test_inpainting_with_a_unit_keeps_the_unmasked_pixels(base, astronaut):
    init = astronaut.resize((64, 64))
    edit = dict(init_image=init, mask=centre_square(), mask_blur=0, strength=0.9)
    plain, controlled = gen(base, **edit), gen(base, **edit, control=[unit(astronaut)])
    assert np.abs(controlled[16:48, 16:48] - plain[16:48, 16:48]).mean() > 1.0
    assert np.array_equal(controlled[:8], pixels(init)[:8])


def test_unknown_model_and_missing_image_are_refused_naming_the_field(base, astronaut):
    with pytest.raises(UnknownModel) as e:
        gen(base, control=[unit(astronaut), ControlUnit(model="nope", image=astronaut)])
    assert e.value.field == "control[1].model"
    assert e.value.details["choices"] == ["tiny-canny"]
    with pytest.raises(InvalidInput) as e:
        gen(base, control=[ControlUnit(model="tiny-canny")])
    assert e.value.field == "control[0].image"
    with pytest.raises(InvalidInput) as e:
        gen(base, init_image=astronaut, denoising_end=0.8, control=[unit(astronaut)])
    assert e.value.field == "control"


def test_unit_bounds():
    with pytest.raises(ValidationError, match="guidance_start"):
        ControlUnit(model="tiny-canny", guidance_start=0.6, guidance_end=0.4)
    with pytest.raises(ValidationError):
        ControlUnit(model="tiny-canny", module="depth")  # type: ignore[arg-type]
    with pytest.raises(ValidationError):
        GenerationRequest(control=[ControlUnit(model="tiny-canny")] * 5)


def test_control_requests_run_alone(astronaut):
    assert batch_key(GenerationRequest(**SMALL, control=[unit(astronaut)])) is None
    assert batch_key(GenerationRequest(**SMALL)) is not None


def test_latent_hires_runs_its_second_pass_without_control(base, astronaut):
    from deployments.support.generation import LatentHires

    result = base.generate(GenerationRequest(**SMALL, control=[unit(astronaut)],
                                             hires=LatentHires(width=96, height=96, steps=2, strength=0.5)))
    assert result.images[0].size == (96, 96)
    assert any("Latent hires" in w for w in result.warnings)


def test_describe_lists_the_controlnets(base):
    assert base.describe()["controlnets"] == ["tiny-canny"]
    assert base.fingerprint()["controlnet:tiny-canny"]


def test_the_refiners_handoff_carries_the_control(base, astronaut):
    plain = base.generate(GenerationRequest(**SMALL, denoising_end=0.5))
    handed = base.generate(GenerationRequest(**SMALL, denoising_end=0.5, control=[unit(astronaut)]))
    assert handed.latents is not None and handed.latents.shape == plain.latents.shape == (1, 4, 8, 8)
    assert np.abs(handed.latents - plain.latents).mean() > 1e-3


def test_tiling_pads_the_controlnet_circularly_for_the_run_alone(base, astronaut):
    flat = gen(base, control=[unit(astronaut)])
    tiled = gen(base, control=[unit(astronaut)], tiling=True)
    assert np.abs(tiled - flat).mean() > 0.5
    net = base.controls.models["tiny-canny"]
    assert {conv.padding_mode for conv in net.modules() if isinstance(conv, torch.nn.Conv2d)} == {"zeros"}


def test_the_loader_refuses_pickled_and_single_file_controlnets(tmp_path, tiny):
    from deployments.support.errors import ModelLoadError, UnsafeWeights
    from deployments.weights import loader

    pickled = tmp_path / "pickled"
    pickled.mkdir()
    (pickled / "config.json").write_text((tiny / "controlnet-canny" / "config.json").read_text())
    (pickled / "diffusion_pytorch_model.bin").write_bytes(b"\x80\x04pickle")
    with pytest.raises(UnsafeWeights):
        loader.load_controlnet(str(pickled), torch.float32, name="canny")
    with pytest.raises(ModelLoadError) as e:
        loader.load_controlnet(str(tiny / "controlnet-canny" / "diffusion_pytorch_model.safetensors"), torch.float32,
                               name="canny")
    assert e.value.field == "controlnets.canny"
    net = loader.load_controlnet(str(tiny / "controlnet-canny"), torch.float32)
    assert net.config.block_out_channels == [16, 32, 64]  # the tiny base UNet's encoder


def test_a_unit_with_and_prompts_and_an_edits_variation_seed(base, astronaut):
    """The ControlNet pipelines take the other per-request machinery as the plain ones do: A1111's AND (the UNet
    that composes subprompts gets the ControlNet's residuals, row by row) and an edit's variation seed."""
    composed = dict(prompt="a lighthouse AND a storm :0.5", prompt_syntax="a1111")
    plain, controlled = gen(base, **composed), gen(base, **composed, control=[unit(astronaut)])
    assert np.abs(controlled - plain).mean() > 1.0
    assert np.abs(gen(base, **composed, control=[unit(astronaut, conditioning_scale=0.0)]) - plain).max() <= 1
    edit = dict(init_image=astronaut, strength=0.6, subseed=9, subseed_strength=0.5)
    varied, varied_controlled = gen(base, **edit), gen(base, **edit, control=[ControlUnit(model="tiny-canny")])
    assert np.abs(varied_controlled - varied).mean() > 1.0
    assert not np.array_equal(varied_controlled, gen(base, init_image=astronaut, strength=0.6,
                                                     control=[ControlUnit(model="tiny-canny")]))


def test_prompt_editing_switches_on_the_controlnet_pipelines_too(base, astronaut):
    """The ControlNet pipelines take the per-step prompt swaps as the plain ones do: a switch inside the run gives
    neither text's image (as tests/test_prompts.py reads it: 0.01 mean grey levels at least), one before the first
    step is the second text's to the bit."""
    def controlled(prompt: str) -> np.ndarray:
        return gen(base, prompt=prompt, prompt_syntax="a1111", guidance_scale=12.0, control=[unit(astronaut)])

    switched = controlled("a [storm:lighthouse:1]")
    for alone in ("a storm", "a lighthouse"):
        assert np.abs(switched - controlled(alone)).mean() > 0.01, alone
    assert np.array_equal(controlled("a [storm:lighthouse:0]"), controlled("a lighthouse"))


def test_an_elongated_image_is_refused_before_a_preprocessor_runs_and_pixel_perfect_is_capped(base):
    """The shorter side sets the scale: a 3000 x 20 strip at 512 would make a 76800 x 512 map (tens of GB of a
    network's activations), refused naming the field; the same strip at 64 runs. Pixel Perfect stops at the sliders'
    2048 however small the image is against the generation size."""
    strip = Image.new("RGB", (3000, 20), "white")
    models = base.controls.preprocessors
    for module in ("canny", "lineart_standard", "lineart_realistic", "openpose"):
        with pytest.raises(InvalidInput) as refused:
            detect(strip, module, 512, estimators=models, field="controlnet_input_images[0]")
        assert refused.value.field == "controlnet_input_images[0]" and "76800x512" in refused.value.message
    assert MAX_MAP_PIXELS >= 9600 * 64 and detect(strip, "canny", 64).size == (9600, 64)
    # A strip taller than 184 times its width: the pose network's one scale (184 px high) rounds its width to 0,
    # where the extension's OpenCV call fails; here the map is made.
    assert detect(Image.new("RGB", (1, 200)), "openpose", 64, estimators=models).size == (64, 12800)
    tiny = unit(Image.new("RGB", (8, 8)), module="canny", pixel_perfect=True)
    assert resolution(tiny, tiny.image, 4096, 4096) == 2048
