"""Automatic1111's request surface without Ray: its request models as A1111 clients fill them, the infotext written
and read back, and the size rules of the hires fix, img2img and the extras."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image
from pydantic import ValidationError

from deployments.support.imaging import cover_box, frame
from graphs.api.a1111_infotext import infotext, parse
from graphs.api.a1111_models import ExtrasBatchRequest, Img2ImgRequest, Txt2ImgRequest
from graphs.api.a1111_sizes import crop_box, hires_size, upscale_to

# What clients send when they replay a response's ``parameters`` or fill every field A1111 declares Optional.
NULLS = {"seed": None, "sampler_name": None, "scheduler": None, "batch_size": None, "n_iter": None, "steps": None,
         "cfg_scale": None, "width": None, "height": None, "restore_faces": None, "denoising_strength": None,
         "enable_hr": None, "hr_scale": None, "hr_upscaler": None, "hr_second_pass_steps": None,
         "refiner_checkpoint": None, "refiner_switch_at": None, "override_settings": None,
         "override_settings_restore_afterwards": None, "negative_prompt": None, "styles": None}


def test_a_null_field_takes_its_default():
    assert Txt2ImgRequest.model_validate({"prompt": "a fox", **NULLS}) == Txt2ImgRequest(prompt="a fox")
    edit = Img2ImgRequest.model_validate({"init_images": ["x"], "mask": None, "mask_blur": None,
                                          "inpainting_fill": None, "inpaint_full_res": None, **NULLS})
    assert edit == Img2ImgRequest(init_images=["x"]) and edit.denoising_strength == 0.75
    batch = ExtrasBatchRequest.model_validate({"imageList": [{"data": "x", "name": None}],
                                               "upscaler_2_visibility": None, "upscaling_resize": None})
    assert batch.imageList[0].name == "" and batch.upscaling_resize == 2.0


def test_a_required_field_stays_required_when_null():
    with pytest.raises(ValidationError, match="init_images"):
        Img2ImgRequest.model_validate({"init_images": None})


def test_refiner_switch_at_zero_is_accepted():
    assert Txt2ImgRequest(refiner_switch_at=0).refiner_switch_at == 0.0  # what clients send with no refiner


# --- sizes -------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize(("first", "scale", "resize", "cover", "size"), [
    ((512, 512), 2.0, (0, 0), (1024, 1024), (1024, 1024)),  # hr_scale alone
    ((512, 768), 0.0, (1000, 0), (1000, 1496), (1000, 1496)),  # the width; the height follows (1500, rounded down)
    ((512, 768), 1.0, (0, 1024), (680, 1024), (680, 1024)),  # the height; the width follows (682)
    ((64, 64), 2.0, (256, 128), (256, 256), (256, 128)),  # both, wider than the image: cover, crop the height
    ((128, 64), 2.0, (128, 128), (256, 128), (128, 128)),  # both, narrower: cover, crop the width
    ((64, 64), 2.0, (100, 100), (96, 96), (96, 96)),  # multiples of 8, as the latents need
])
def test_hires_size_follows_a1111(first, scale, resize, cover, size):
    target = hires_size(*first, scale, *resize)
    assert (target.cover, target.size) == (cover, size)
    assert target.cropped == (cover != size)


def test_the_hires_crop_box_is_the_centre_that_covers_the_target():
    target = hires_size(128, 64, 2.0, 128, 128)
    assert crop_box(target, 128, 64) == (32, 0, 96, 64)
    assert crop_box(hires_size(128, 64, 2.0, 0, 0), 128, 64) is None


def test_frame_crops_to_cover_and_fills_with_the_edges():
    image = Image.new("RGB", (100, 50), (0, 255, 0))
    image.paste((255, 0, 0), (0, 0, 25, 50))  # a red left quarter
    image.paste((0, 0, 255), (0, 0, 100, 5))  # a blue top strip
    assert cover_box(image.size, (50, 50)) == (25, 0, 75, 50)
    cropped = np.asarray(frame(image, 50, 50, "crop"))
    assert (cropped[25, 0] == (0, 255, 0)).all()  # the red quarter is cut away
    filled = np.asarray(frame(image, 60, 60, "fill"))  # fitted at 60x30, 15 rows above and below
    assert filled.shape == (60, 60, 3) and (filled[:15] == filled[15]).all() and (filled[45:] == filled[44]).all()
    assert filled[0, 30, 2] > 200 and filled[59, 30, 1] > 200  # the blue top, the green bottom, stretched outwards
    assert frame(Image.new("L", (100, 50)), 60, 60, "fill").mode == "L"  # a mask stays a mask


def test_upscale_to_a_size_covers_it_then_crops_or_not():
    assert upscale_to((128, 64), 128, 128, crop=True) == (None, 128, 128, (32, 0, 96, 64))
    assert upscale_to((128, 64), 128, 128, crop=False) == (2.0, None, None, None)  # 256x128, uncropped


# --- the infotext ------------------------------------------------------------------------------------------------

def test_the_infotext_written_here_reads_back_as_a1111_parses_it():
    request = Txt2ImgRequest(prompt="a fox,\nin the snow <lora:tiny-style:0.7>", negative_prompt="blurry", steps=3,
                             width=128, height=96, cfg_scale=8, scheduler="Karras")
    text = infotext(request, 1001, "tiny-sdxl-base", "DPM++ 2M",
                    {"Hires resize": "256x192", "Refiner": "a, b: c", "Face restoration": None})
    assert 'Refiner: "a, b: c"' in text and "Face restoration" not in text  # quoted as A1111 quotes
    parameters = parse(text)
    assert parameters["Prompt"] == "a fox,\nin the snow <lora:tiny-style:0.7>"
    assert parameters["Negative prompt"] == "blurry"
    assert {key: parameters[key] for key in ("Steps", "Sampler", "Schedule type", "CFG scale", "Seed", "Size-1",
                                             "Size-2", "Model", "Hires resize-1", "Hires resize-2", "Refiner")} == {
        "Steps": "3", "Sampler": "DPM++ 2M", "Schedule type": "Karras", "CFG scale": "8.0", "Seed": "1001",
        "Size-1": "128", "Size-2": "96", "Model": "tiny-sdxl-base", "Hires resize-1": "256", "Hires resize-2": "192",
        "Refiner": "a, b: c"}
    assert parameters["Clip skip"] == "1" and parameters["Hires sampler"] == "Use same sampler"  # A1111's defaults


def test_a1111s_own_infotext_and_a_bare_prompt_parse():
    a1111 = ("girl with a beret, (coquettish), detailed\nNegative prompt: ugly, [blurry]\n"
             "Steps: 20, Sampler: Euler a, CFG scale: 7, Seed: 965400086, Size: 512x512, Model hash: 45dee52b")
    parameters = parse(a1111)
    assert parameters["Prompt"] == "girl with a beret, (coquettish), detailed"
    assert parameters["Negative prompt"] == "ugly, [blurry]" and parameters["Model hash"] == "45dee52b"
    assert parameters["Size-1"] == parameters["Size-2"] == "512" and parameters["Seed"] == "965400086"
    bare = parse("just a prompt, no settings")  # fewer than three settings: the line is the prompt's
    assert bare["Prompt"] == "just a prompt, no settings" and "Steps" not in bare
    assert parse("")["Prompt"] == "" and parse("")["Negative prompt"] == ""


def test_progress_counts_the_steps_each_batch_really_runs():
    """A latent hires fix runs its second pass's steps after the first's: the replica reports both, so the
    progress of a request never passes 1 (A1111's ``progress`` is at most 1, a client's bar at most full)."""
    from graphs.api.a1111 import InFlight

    flight = InFlight("f", "c", 0.0, total_steps=20 * 2, request_ids=["a"], batches=2)
    assert flight.steps(None) == (0, 40)
    assert flight.steps((5, 20)) == (5, 40)
    assert flight.steps((25, 30)) == (25, 60)  # 20 steps, then 10 of the hires pass
    flight.request_ids.append("b")
    assert flight.steps((30, 30)) == (60, 60)


def test_an_infotext_parse_is_linear_in_its_text():
    """The text of an uploaded PNG is the client's: a long line with no colon made the settings pattern quadratic
    (80,000 characters took 20 s)."""
    from graphs.api import a1111_infotext
    from tests.test_body import finishes

    assert finishes(lambda: a1111_infotext.parse("a" * 80_000), 10)
    assert a1111_infotext.parse("a" * 80_000)["Prompt"] == "a" * 80_000
