"""The graph layer for Automatic1111's routes: the ingress and the model deployments on the tiny models, in-process
with Serve's local testing mode (no cluster, no HTTP), the routes called through the ingress handle. The base's
default sampler is DDIM here, not the config's Euler a, so that what a request that names none reports can be told
apart from a hard-coded name."""

from __future__ import annotations

import base64
import json

import numpy as np
import pytest
import yaml
from PIL import Image
from pydantic import ValidationError
from starlette.requests import Request

from deployments.support.errors import InvalidInput
from deployments.support.imaging import exif_comment
from deployments.support.model_free import MODULES as MODEL_FREE
from graphs.api.a1111_infotext import parse
from graphs.api.a1111_models import (
    ExtrasBatchRequest,
    ExtrasRequest,
    Img2ImgRequest,
    InterrogateRequest,
    OptionsRequest,
    PngInfoRequest,
    Txt2ImgRequest,
)
from graphs.api.errors import status_of
from tests.conftest import ROOT
from tests.helpers import b64, decode_b64, pixels, refused

DEFAULT_SAMPLER = "DDIM"
SMALL = {"prompt": "a lighthouse", "width": 64, "height": 64, "steps": 2, "seed": 5}


@pytest.fixture(scope="module")
def ingress(tiny, tmp_path_factory):
    from ray import serve

    import graphs.app
    from graphs.app import build_app

    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("TINY_MODELS", str(tiny))
        patch.setenv("JOBS_DATA_DIR", str(tmp_path_factory.mktemp("a1111-graph-jobs")))
        patch.setenv("MODEL_CACHE_DIR", str(tmp_path_factory.mktemp("a1111-graph-hashes")))  # never the user's
        args = yaml.safe_load((ROOT / "configs" / "cpu.yaml").read_text())["applications"][0]["args"]
        args["base"]["default_sampler"] = DEFAULT_SAMPLER
        # Another in-process application of this pytest process gets a fresh copy of the FastAPI app (see
        # tests/test_safety_graph.py): Serve's ingress keeps the one the first run tied to its live replica.
        original = graphs.app.Ingress.func_or_class.__bases__[0]
        patch.setattr(graphs.app, "Ingress", graphs.app.Ingress.options(
            func_or_class=serve.ingress(graphs.app.app)(original)))
        yield serve.run(build_app(args), name="a1111-graph-test", _local_testing_mode=True)


def caller() -> Request:
    """The HTTP request a route reads its client from."""
    return Request({"type": "http", "method": "POST", "path": "/", "headers": [], "client": ("graph-test", 1)})


def answer(response) -> dict:
    """A route's JSON answer, ``info`` parsed."""
    body = json.loads(response.body)
    if isinstance(body.get("info"), str):
        body["info"] = json.loads(body["info"])
    return body


def txt2img(ingress, **fields) -> dict:
    return answer(ingress.txt2img.remote(Txt2ImgRequest(**{**SMALL, **fields}), caller()).result())


def test_no_sampler_named_reports_the_default_that_ran(ingress):
    body = txt2img(ingress)
    assert body["info"]["sampler_name"] == DEFAULT_SAMPLER
    assert f"Sampler: {DEFAULT_SAMPLER}," in decode_b64(body["images"][0]).info["parameters"]
    named = txt2img(ingress, sampler_name=DEFAULT_SAMPLER)
    assert named["images"] == body["images"]  # the default is what ran


def test_sampler_index_is_the_sampler_when_sampler_name_is_absent(ingress):
    older = txt2img(ingress, sampler_index="Euler")
    assert older["info"]["sampler_name"] == "Euler"
    assert "Sampler: Euler," in decode_b64(older["images"][0]).info["parameters"]
    euler = decode_b64(txt2img(ingress, sampler_name="Euler")["images"][0])
    assert np.array_equal(pixels(decode_b64(older["images"][0])), pixels(euler))
    assert txt2img(ingress, sampler_name="Euler", sampler_index="DDIM")["info"]["sampler_name"] == "Euler"


def test_numbers_and_sizes_are_read_as_a1111_reads_them(ingress):
    """A1111 (pydantic 1) truncates a number with a fraction sent for a whole one (a client's ``steps / 2``), and
    makes a side that is no multiple of 8 at the multiple below it (an eighth of it is the latents' size)."""
    request = Txt2ImgRequest.model_validate({**SMALL, "width": 70, "height": 79.5, "steps": 2.7, "seed": 5.9})
    assert (request.width, request.height, request.steps, request.seed) == (64, 72, 2, 5)
    body = answer(ingress.txt2img.remote(request, caller()).result())
    assert decode_b64(body["images"][0]).size == (64, 72) and body["info"]["steps"] == 2
    for bad in ({"width": float("nan")}, {"steps": float("inf")}, {"width": 60}):
        with pytest.raises(ValueError, match="width|steps"):  # still a 422 naming the field, never a 500
            Txt2ImgRequest.model_validate({**SMALL, **bad})


def test_scripts_are_treated_as_a1111_treats_them(ingress):
    """A1111's own always-on scripts (matched by title, any case) are accepted and not applied, with a warning;
    an extension's script or a named script, none being installed here, is refused naming its field, as A1111
    refuses one it lacks, before anything runs."""
    body = txt2img(ingress, alwayson_scripts={"Refiner": {"args": [False, "", 0.8]}, "seed": {"args": []}})
    assert [w for w in body["info"]["warnings"] if "script" in w] == [
        "A1111's 'Refiner' script is not applied here: its arguments were ignored",
        "A1111's 'seed' script is not applied here: its arguments were ignored"]
    assert "script" not in " ".join(txt2img(ingress, alwayson_scripts={}, script_args=[])["info"]["warnings"])
    other = refused(lambda: txt2img(ingress, alwayson_scripts={"ADetailer": {"args": [True]}}))
    assert (other.code, status_of(other), other.details["field"]) == (
        "INVALID_INPUT", 422, "alwayson_scripts.ADetailer")
    assert refused(lambda: txt2img(ingress, script_name="x/y/z plot")).details["field"] == "script_name"
    assert "script" not in " ".join(txt2img(ingress, script_name="")["info"]["warnings"])  # A1111's "no script"


@pytest.mark.parametrize("script", ["Refiner", "Seed", "Sampler", "Comments", "Hypertile", "Extra options",
                                    "Soft Inpainting"])
def test_each_of_a1111s_own_scripts_is_accepted_with_its_warning(ingress, script):
    warnings = txt2img(ingress, alwayson_scripts={script: {"args": []}})["info"]["warnings"]
    assert [w for w in warnings if "script" in w] == [
        f"A1111's {script!r} script is not applied here: its arguments were ignored"]


def test_an_unknown_sampler_runs_the_default_as_in_a1111_with_a_warning_naming_its_field(ingress):
    default = txt2img(ingress)
    for field in ("sampler_index", "sampler_name"):
        body = txt2img(ingress, **{field: "k_no_such_sampler"})
        assert same_pixels(body, default) and body["info"]["sampler_name"] == DEFAULT_SAMPLER
        assert body["info"]["warnings"] == [f"{field}: unknown sampler 'k_no_such_sampler' (GET /sdapi/v1/samplers "
                                            f"lists them): {DEFAULT_SAMPLER} ran instead"]


def test_a1111s_sampler_aliases_are_listed_and_run_their_sampler(ingress):
    listed = {s["name"]: s["aliases"] for s in ingress.samplers.remote().result()}
    assert listed["Euler a"] == ["euler_a", "k_euler_a", "k_euler_ancestral"]
    assert "k_dpmpp_2m_ka" in listed["DPM++ 2M Karras"] and "euler_a" not in listed  # an alias is not a name
    assert "Restart" not in listed  # it runs Heun's steps: not itself
    for alias, name in (("k_euler_a", "Euler a"), ("k_dpmpp_2m_ka", "DPM++ 2M Karras")):
        assert same_pixels(txt2img(ingress, sampler_name=alias), txt2img(ingress, sampler_name=name))
        assert txt2img(ingress, sampler_name=alias)["info"]["warnings"] == []


def test_refiner_switch_at_zero_is_ignored_without_a_refiner_and_refused_with_one(ingress):
    assert txt2img(ingress, refiner_switch_at=0)["images"] == txt2img(ingress)["images"]
    error = refused(lambda: txt2img(ingress, refiner_checkpoint="tiny-sdxl-refiner", refiner_switch_at=0))
    assert isinstance(error, InvalidInput) and error.details["field"] == "refiner_switch_at"


@pytest.mark.parametrize("upscaler", ["Latent", "Lanczos"])
def test_hires_resize_sets_the_size_instead_of_hr_scale(ingress, upscaler):
    hires = {"enable_hr": True, "hr_upscaler": upscaler, "denoising_strength": 0.5, "hr_second_pass_steps": 2}
    both = txt2img(ingress, **hires, hr_scale=0, hr_resize_x=128, hr_resize_y=96)  # cover 128x128, crop the height
    image = decode_b64(both["images"][0])
    assert image.size == (128, 96) and both["info"]["width"] == 128 and both["info"]["height"] == 96
    assert "Hires resize: 128x96," in image.info["parameters"] and "Hires upscale:" not in image.info["parameters"]
    one = txt2img(ingress, **hires, hr_scale=1, width=128, hr_resize_y=128)  # the width follows the aspect ratio
    assert decode_b64(one["images"][0]).size == (256, 128)
    error = refused(lambda: txt2img(ingress, **hires, hr_resize_x=4096, hr_resize_y=4096))
    assert isinstance(error, InvalidInput) and error.details["field"] == "hr_resize_x"


def test_an_unknown_hires_upscaler_is_refused_by_its_field_before_the_base_runs(ingress):
    hires = {"enable_hr": True, "hr_scale": 2, "denoising_strength": 0.5, "hr_second_pass_steps": 1}
    items = ingress.models.remote().result()["base"]["batching"]["items"]
    error = refused(lambda: txt2img(ingress, **hires, hr_upscaler="Nope"))
    assert ingress.models.remote().result()["base"]["batching"]["items"] == items  # no base pass was wasted
    assert (error.code, status_of(error), error.details["field"]) == ("UNKNOWN_MODEL", 422, "hr_upscaler")
    fallback = txt2img(ingress, **hires, hr_upscaler="SwinIR 4x", seed=6)  # A1111's name, its model not loaded here
    assert decode_b64(fallback["images"][0]).size == (128, 128)
    assert "upscaler 'SwinIR 4x' is not loaded; Lanczos used instead" in fallback["info"]["warnings"]


# A1111's built-in neural upscalers as it lists them (and webuiapi's Upscaler / HiResUpscaler enums hard-code them):
# a model not downloaded yet by its model_name, a downloaded one by its file's stem. Not loaded here: each falls back.
A1111_UPSCALERS = [
    "SwinIR 4x", "SwinIR_4x", "ScuNET GAN", "ScuNET", "ScuNET PSNR", "BSRGAN", "BSRGAN 4x", "LDSR", "ESRGAN_4x",
    "R-ESRGAN 4x+ Anime6B", "R-ESRGAN General 4xV3", "R-ESRGAN General WDN 4xV3", "R-ESRGAN AnimeVideo",
    "DAT x2", "DAT x3", "DAT x4",
]


@pytest.mark.parametrize("name", A1111_UPSCALERS)
def test_every_a1111_builtin_upscaler_falls_back_to_lanczos_on_hires_and_extras(ingress, name):
    warning = f"upscaler {name!r} is not loaded; Lanczos used instead"
    hires = txt2img(ingress, enable_hr=True, hr_upscaler=name, hr_scale=1.5, denoising_strength=0.5,
                    hr_second_pass_steps=1, steps=1)
    assert decode_b64(hires["images"][0]).size == (96, 96) and warning in hires["info"]["warnings"]
    single = ExtrasRequest(image=b64(bands()), upscaler_1=name, upscaling_resize=2)
    lanczos = ExtrasRequest(image=b64(bands()), upscaler_1="Lanczos", upscaling_resize=2)
    upscaled = decode_b64(answer(ingress.extra_single_image.remote(single).result())["image"])
    assert np.array_equal(pixels(upscaled),
                          pixels(decode_b64(answer(ingress.extra_single_image.remote(lanczos).result())["image"])))


def test_hires_with_upscaler_none_resizes_with_lanczos_and_runs_the_second_pass(ingress):
    """A1111's hires fix resizes the first pass with Lanczos when ``hr_upscaler`` is "None"
    (``images.resize_image``), then runs the second pass at that size, as with "Lanczos"."""
    hires = {"enable_hr": True, "hr_scale": 1.5, "denoising_strength": 0.5, "hr_second_pass_steps": 1}
    none = txt2img(ingress, **hires, hr_upscaler="None")
    image = decode_b64(none["images"][0])
    assert image.size == (96, 96) and (none["info"]["width"], none["info"]["height"]) == (96, 96)
    assert "Hires upscaler: None" in image.info["parameters"] and not none["info"]["warnings"]
    lanczos = decode_b64(txt2img(ingress, **hires, hr_upscaler="Lanczos")["images"][0])
    assert np.array_equal(pixels(image), pixels(lanczos))


def test_the_pixel_hires_fix_runs_its_own_prompt_sampler_and_checkpoint_as_a1111_names_them(ingress):
    hires = {"enable_hr": True, "hr_scale": 1.5, "denoising_strength": 0.6, "hr_second_pass_steps": 2,
             "hr_upscaler": "Lanczos"}
    plain = txt2img(ingress, **hires)
    settings = parse(plain["info"]["infotexts"][0])
    assert (settings["Hires prompt"], settings["Hires sampler"], settings["Hires checkpoint"]) == (
        "", "Use same sampler", "Use same checkpoint")  # not written: A1111's reader fills its defaults
    # Naming the first pass's values is the same request.
    same = txt2img(ingress, **hires, hr_prompt=SMALL["prompt"], hr_sampler_name=DEFAULT_SAMPLER,
                   hr_checkpoint_name="tiny-sdxl-base", hr_scheduler="Use same scheduler")
    assert same_pixels(same, plain) and same["info"]["infotexts"] == plain["info"]["infotexts"]
    for fields, key, written in (({"hr_prompt": "a castle, at night"}, "Hires prompt", "a castle, at night"),
                                 ({"hr_negative_prompt": "fog"}, "Hires negative prompt", "fog"),
                                 ({"hr_sampler_name": "Euler"}, "Hires sampler", "Euler"),
                                 ({"hr_sampler_name": "Euler", "hr_scheduler": "Karras"}, "Hires schedule type",
                                  "Karras"),
                                 ({"hr_checkpoint_name": "tiny-sdxl-base-b"}, "Hires checkpoint", "tiny-sdxl-base-b")):
        body = txt2img(ingress, **hires, **fields)
        assert not same_pixels(body, plain), fields
        assert body["info"]["warnings"] == [], fields
        assert parse(decode_b64(body["images"][0]).info["parameters"])[key] == written
    # Only the second pass changed: the first pass of a hires prompt is the plain one's.
    first = txt2img(ingress, **{**hires, "enable_hr": False})
    assert parse(first["info"]["infotexts"][0])["Seed"] == settings["Seed"]
    error = refused(lambda: txt2img(ingress, **hires, hr_checkpoint_name="no-such-model"))
    assert (status_of(error), error.details["field"]) == (422, "hr_checkpoint_name")
    error = refused(lambda: txt2img(ingress, **hires, hr_sampler_name="No Such Sampler"))
    assert (status_of(error), error.details["field"]) == (422, "hr_sampler_name")


def test_the_latent_hires_fix_runs_its_own_prompts_and_sampler_and_names_the_checkpoint_it_cannot(ingress):
    latent = {"enable_hr": True, "hr_scale": 1.5, "hr_second_pass_steps": 2, "hr_upscaler": "Latent",
              "denoising_strength": 0.6}
    plain = txt2img(ingress, **latent)
    for fields, key, written in (({"hr_prompt": "a castle, at night"}, "Hires prompt", "a castle, at night"),
                                 ({"hr_negative_prompt": "fog"}, "Hires negative prompt", "fog"),
                                 ({"hr_sampler_name": "Euler"}, "Hires sampler", "Euler")):
        body = txt2img(ingress, **latent, **fields)
        assert not same_pixels(body, plain) and body["info"]["warnings"] == [], fields
        assert parse(body["info"]["infotexts"][0])[key] == written
    # The hires prompt is read with A1111's syntax, its editing scheduled over the second pass.
    longer = {**latent, "hr_second_pass_steps": 6}
    edited = txt2img(ingress, **longer, hr_prompt="a [castle:lighthouse:1.5]")
    assert not same_pixels(edited, txt2img(ingress, **longer, hr_prompt="a castle"))
    body = txt2img(ingress, **latent, hr_checkpoint_name="tiny-sdxl-base-b")
    assert body["info"]["warnings"] == ["hr_checkpoint_name is not applied here: the image was made without it"]
    assert same_pixels(body, plain) and "Hires checkpoint" not in body["info"]["infotexts"][0]


def test_the_infotext_names_the_deployed_face_restorer(ingress):
    """A1111 writes its face restoration model in the infotext; here that is the one /face-restorers lists (the CPU
    config deploys a RestoreFormer), not a hard-coded CodeFormer."""
    (deployed,) = [item["name"] for item in ingress.face_restorers.remote().result()]
    body = txt2img(ingress, restore_faces=True)
    assert deployed == "RestoreFormer"
    for text in (decode_b64(body["images"][0]).info["parameters"], body["info"]["infotexts"][0]):
        assert f"Face restoration: {deployed}" in text and "CodeFormer" not in text


# --- img2img -------------------------------------------------------------------------------------------------------

def img2img(ingress, **fields) -> dict:
    request = Img2ImgRequest(**{**SMALL, "denoising_strength": 0.5, **fields})
    return answer(ingress.img2img.remote(request, caller()).result())


def bands() -> Image.Image:
    """128x64: a red quarter, a green half, a blue quarter, left to right, over a black strip 8 high."""
    image = Image.new("RGB", (128, 64), (0, 255, 0))
    image.paste((255, 0, 0), (0, 0, 32, 64))
    image.paste((0, 0, 255), (96, 0, 128, 64))
    image.paste((0, 0, 0), (0, 56, 128, 64))
    return image


# Inpainting of the whole picture that repaints nothing: the answer is the init image as framed. ("Only masked",
# A1111's API default, would run image-to-image over the whole image with a blank mask.)
KEEP_ALL = {"mask": b64(Image.new("L", (128, 64), 0)), "mask_blur": 0, "inpaint_full_res": False}
RED, GREEN, BLACK = (255, 0, 0), (0, 255, 0), (0, 0, 0)


@pytest.mark.parametrize(("mode", "left", "low"), [
    (0, RED, GREEN),  # stretched: all four bands, the strip still 8 high
    (3, RED, GREEN),  # "just resize (latent upscale)": as 0
    (1, GREEN, GREEN),  # scaled to cover 64x64 (128x64 already does), its centre kept: the green half
    (2, RED, BLACK),  # scaled to fit (64x32), centred, its top and bottom rows stretched over the borders
])
def test_resize_mode_frames_the_init_image(ingress, mode, left, low):
    body = img2img(ingress, init_images=[b64(bands())], resize_mode=mode, **KEEP_ALL)
    out = pixels(decode_b64(body["images"][0]))
    assert out.shape == (64, 64, 3)
    assert np.abs(out[32, 2] - left).max() < 40 and np.abs(out[52, 32] - low).max() < 40
    if mode == 2:
        assert np.array_equal(out[0], out[16]) and np.array_equal(out[63], out[47])


def test_inpainting_mask_invert_repaints_the_black_area(ingress, astronaut):
    init = astronaut.resize((64, 64))
    mask = Image.new("L", (64, 64), 0)
    mask.paste(255, (0, 0, 32, 64))  # white left
    original = pixels(init)
    for invert, kept in ((0, slice(32, 64)), (1, slice(0, 32))):
        body = img2img(ingress, init_images=[b64(init)], mask=b64(mask), mask_blur=0, denoising_strength=1.0,
                       inpainting_mask_invert=invert)
        out = pixels(decode_b64(body["images"][0]))
        assert np.abs(out[:, kept] - original[:, kept]).max() <= 1, invert
        repainted = slice(0, 32) if invert == 0 else slice(32, 64)
        assert np.abs(out[:, repainted] - original[:, repainted]).mean() > 5, invert


def test_several_init_images_start_one_image_each(ingress):
    red, blue = Image.new("RGB", (64, 64), (255, 0, 0)), Image.new("RGB", (64, 64), (0, 0, 255))
    # A1111 makes one image of each: a batch of 4 over two init images is a batch of 2.
    body = img2img(ingress, init_images=[b64(red), b64(blue)], batch_size=4, n_iter=2,
                   mask=b64(Image.new("L", (64, 64))), mask_blur=0, inpaint_full_res=False)
    colours = [tuple(pixels(decode_b64(data))[32, 32]) for data in body["images"]]
    assert colours == [(255, 0, 0), (0, 0, 255), (255, 0, 0), (0, 0, 255)]
    assert body["info"]["all_seeds"] == [5, 6, 7, 8] and body["info"]["batch_size"] == 2
    # Without a mask the passes batch; each image is what its own init image and seed give alone.
    both = img2img(ingress, init_images=[b64(red), b64(blue)], batch_size=2)
    alone = img2img(ingress, init_images=[b64(blue)], seed=6)
    assert np.abs(pixels(decode_b64(both["images"][1])) - pixels(decode_b64(alone["images"][0]))).mean() < 1.0
    error = refused(lambda: img2img(ingress, init_images=[b64(red), b64(blue)], batch_size=1))
    assert error.details["field"] == "init_images"


# --- inpainting: "Only masked" (A1111's inpaint_full_res, its API's default) --------------------------------------

def rect_mask(size: tuple[int, int], box: tuple[int, int, int, int]) -> Image.Image:
    mask = Image.new("L", size, 0)
    mask.paste(255, box)
    return mask


def test_only_masked_answers_at_the_upload_size_keeping_every_pixel_outside_the_mask(ingress, astronaut):
    init = astronaut.resize((96, 80))
    mask = rect_mask((96, 80), (70, 56, 92, 76))  # the bottom right corner
    body = img2img(ingress, init_images=[b64(init)], mask=b64(mask), mask_blur=0, inpaint_full_res_padding=8,
                   denoising_strength=1.0)
    out, src = pixels(decode_b64(body["images"][0])), pixels(init)
    inside = np.asarray(mask) > 0
    assert out.shape == (80, 96, 3)
    assert np.array_equal(out[~inside], src[~inside])
    assert np.abs(out[inside] - src[inside]).mean() > 5.0
    # As A1111 reports it: the size it inpainted at, the area and its padding; no blur (0), none written.
    text = body["info"]["infotexts"][0]
    read = parse(text)
    assert (read["Inpaint area"], read["Masked area padding"], read["Size-1"], read["Size-2"]) == (
        "Only masked", "8", "64", "64")
    assert "Mask blur" not in text and "Mask mode" not in text
    assert (body["info"]["width"], body["info"]["height"]) == (64, 64)
    assert body["info"]["extra_generation_params"]["Inpaint area"] == "Only masked"
    # The whole picture, asked for: the upload at width x height, and no inpaint area written.
    whole = img2img(ingress, init_images=[b64(init)], mask=b64(mask), mask_blur=0, inpaint_full_res=False)
    assert decode_b64(whole["images"][0]).size == (64, 64)
    assert parse(whole["info"]["infotexts"][0])["Inpaint area"] == "Whole picture"  # the reader's default


def test_only_masked_over_several_init_images_answers_each_at_its_size(ingress, astronaut):
    first, second = astronaut.resize((96, 80)), astronaut.resize((96, 80)).transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    mask = rect_mask((96, 80), (4, 4, 30, 24))
    body = img2img(ingress, init_images=[b64(first), b64(second)], mask=b64(mask), mask_blur=0, batch_size=2)
    inside = np.asarray(mask) > 0
    for data, src in zip(body["images"], (first, second), strict=True):
        out = pixels(decode_b64(data))
        assert out.shape == (80, 96, 3) and np.array_equal(out[~inside], pixels(src)[~inside])
    assert body["info"]["all_seeds"] == [5, 6]


def test_a_blank_mask_only_masked_is_image_to_image_of_the_whole(ingress, astronaut):
    init = b64(astronaut.resize((96, 80)))
    body = img2img(ingress, init_images=[init], mask=b64(Image.new("L", (96, 80))))
    assert decode_b64(body["images"][0]).size == (64, 64)
    assert same_pixels(body, img2img(ingress, init_images=[init]))  # as A1111 falls back: no mask at all
    assert any("mask is blank" in w for w in body["info"]["warnings"])
    read = parse(body["info"]["infotexts"][0])  # A1111 writes the blur before it finds the mask blank
    assert (read["Inpaint area"], read["Mask blur"]) == ("Whole picture", "4")


def test_a_mask_blank_once_blurred_only_masked_is_image_to_image_and_written_so(ingress, astronaut):
    """One pixel of 1 under a blur of 4 is not blank, but is once blurred: the ingress decides as the base does, so
    the answer is image-to-image of the whole and its infotext says so (A1111 has written the blur and the mask mode
    by then, and no inpaint area, padding or masked content)."""
    init = b64(astronaut.resize((96, 80)))
    mask = Image.new("L", (96, 80), 255)
    mask.putpixel((50, 40), 254)  # inverted: one pixel of 1
    body = img2img(ingress, init_images=[init], mask=b64(mask), inpainting_mask_invert=1, inpaint_full_res_padding=8)
    assert decode_b64(body["images"][0]).size == (64, 64)
    assert same_pixels(body, img2img(ingress, init_images=[init]))
    assert any("blank once blurred" in w for w in body["info"]["warnings"])
    assert not any(w.startswith("inpaint_area") for w in body["info"]["warnings"])  # the base had nothing to drop
    text = body["info"]["infotexts"][0]
    assert (parse(text)["Mask blur"], parse(text)["Mask mode"]) == ("4", "Inpaint not masked")
    assert not any(key in text for key in ("Inpaint area", "Masked area padding", "Masked content"))
    assert "Inpaint area" not in body["info"]["extra_generation_params"]


def test_the_mask_blur_each_way_and_the_mask_mode_are_written_as_a1111_writes_them(ingress):
    edit = {"init_images": [b64(bands())], "mask": b64(rect_mask((128, 64), (32, 16, 96, 48))),
            "inpaint_full_res": False, "denoising_strength": 1.0}
    apart = img2img(ingress, **edit, mask_blur_x=2, mask_blur_y=6, inpainting_mask_invert=1)
    assert "Mask blur" not in apart["info"]["infotexts"][0]  # A1111's mask_blur is None when they differ
    assert apart["info"]["extra_generation_params"]["Mask blur"] is None
    assert parse(apart["info"]["infotexts"][0])["Mask mode"] == "Inpaint not masked"
    both = img2img(ingress, **edit, mask_blur=3, mask_blur_x=2, mask_blur_y=6)  # mask_blur sets both
    assert parse(both["info"]["infotexts"][0])["Mask blur"] == "3"
    assert same_pixels(both, img2img(ingress, **edit, mask_blur_x=3, mask_blur_y=3))
    assert not same_pixels(both, img2img(ingress, **edit, mask_blur_x=3, mask_blur_y=0))


def test_faces_are_restored_before_the_inpainting_is_pasted_back(ingress, astronaut):
    """A1111 restores the faces of what it inpainted, then pastes it: the astronaut's face, far from the mask, stays
    as it was (restored after the paste, it would change)."""
    edit = {"init_images": [b64(astronaut)], "mask": b64(rect_mask((512, 512), (400, 430, 470, 490))),
            "mask_blur": 0}
    restored = img2img(ingress, **edit, restore_faces=True)
    assert decode_b64(restored["images"][0]).size == (512, 512)
    # The inpainted region holds no face: nothing restored, the image is the one made without restoration (at 512
    # both carry the invisible watermark, so the pixels outside the mask are not the upload's to the bit).
    assert same_pixels(restored, img2img(ingress, **edit))
    assert "no face detected: image unchanged" in restored["info"]["warnings"]
    assert parse(restored["info"]["infotexts"][0])["Face restoration"] == "RestoreFormer"


def test_only_masked_cuts_a_controlnet_units_image_as_the_init_image(ingress, astronaut):
    """The extension cuts a unit's image to the region as it cuts the init image (inpaint_crop_input_image, true by
    default): a unit given the init image is a unit without an image, unless it asks not to be cut."""
    init = b64(astronaut.resize((128, 96)))
    edit = {"init_images": [init], "mask": b64(rect_mask((128, 96), (90, 10, 120, 40))), "mask_blur": 0}
    unit = {"module": "none", "model": "tiny-canny"}
    implicit = img2img(ingress, **edit, alwayson_scripts=controlnet(unit))
    assert same_pixels(img2img(ingress, **edit, alwayson_scripts=controlnet({**unit, "image": init})), implicit)
    whole = img2img(ingress, **edit, alwayson_scripts=controlnet({**unit, "image": init,
                                                                  "inpaint_crop_input_image": False}))
    assert not same_pixels(whole, implicit)


# --- extras --------------------------------------------------------------------------------------------------------

def test_extras_upscale_to_a_size_covers_and_crops_as_a1111(ingress):
    to_square = {"image": b64(bands()), "resize_mode": 1, "upscaling_resize_w": 128, "upscaling_resize_h": 128,
                 "upscaler_1": "Lanczos"}
    single = answer(ingress.extra_single_image.remote(ExtrasRequest(**to_square)).result())
    cropped = pixels(decode_b64(single["image"]))
    assert cropped.shape == (128, 128, 3)
    assert np.abs(cropped[64, 2] - GREEN).max() < 40 and np.abs(cropped[64, 125] - GREEN).max() < 40  # no red, blue
    whole = ExtrasBatchRequest(**{**to_square, "image": "", "upscaling_crop": False,
                                  "imageList": [{"data": b64(bands()), "name": "a"}]})
    (uncropped,) = answer(ingress.extra_batch_images.remote(whole).result())["images"]
    assert decode_b64(uncropped).size == (256, 128)  # scaled by max(128/128, 128/64), kept whole


def test_extras_without_a_first_upscaler_upscale_nothing_and_blend_nothing(ingress):
    """A1111 returns early when ``upscaler_1`` is "None": a second upscaler has nothing to blend with (blending its
    twice-as-large image with the unscaled one used to fail as a 500)."""
    body = ExtrasRequest(image=b64(bands()), upscaler_2="Lanczos", extras_upscaler_2_visibility=0.5)
    single = answer(ingress.extra_single_image.remote(body).result())
    assert np.array_equal(pixels(decode_b64(single["image"])), pixels(bands()))


@pytest.mark.parametrize(("fields", "field"), [
    ({"upscaler_1": "Nope"}, "upscaler_1"),
    ({"upscaler_1": "Lanczos", "upscaler_2": "Nope", "extras_upscaler_2_visibility": 0.5}, "upscaler_2"),
])
def test_an_unknown_extras_upscaler_is_refused_by_its_field(ingress, fields, field):
    single = ExtrasRequest(image=b64(bands()), **fields)
    batch = ExtrasBatchRequest(**fields, imageList=[{"data": b64(bands()), "name": "a"}])
    for error in (refused(lambda: ingress.extra_single_image.remote(single).result()),
                  refused(lambda: ingress.extra_batch_images.remote(batch).result())):
        assert (error.code, status_of(error), error.details["field"]) == ("UNKNOWN_MODEL", 422, field)
    fallback = ExtrasRequest(image=b64(bands()), **{**fields, field: "ScuNET GAN"})  # falls back to Lanczos
    assert decode_b64(answer(ingress.extra_single_image.remote(fallback).result())["image"]).size == (256, 128)


def test_upscaler_names_a_request_does_not_use_are_not_checked(ingress):
    """As A1111 ignores them: ``hr_upscaler`` without ``enable_hr``, and ``upscaler_2`` when nothing blends it in
    (no visibility, or no first upscaler)."""
    assert decode_b64(txt2img(ingress, enable_hr=False, hr_upscaler="Nope")["images"][0]).size == (64, 64)
    image = b64(bands())
    alone = answer(ingress.extra_single_image.remote(ExtrasRequest(image=image, upscaler_1="Lanczos")).result())
    for fields in ({"upscaler_1": "Lanczos", "extras_upscaler_2_visibility": 0},
                   {"upscaler_1": "None", "extras_upscaler_2_visibility": 0.5}):
        unused = ExtrasRequest(image=image, upscaler_2="Nope", **fields)
        out = decode_b64(answer(ingress.extra_single_image.remote(unused).result())["image"])
        expected = decode_b64(alone["image"]) if fields["upscaler_1"] == "Lanczos" else bands()
        assert out.size == expected.size and np.abs(pixels(out) - pixels(expected)).mean() < 1.0, fields


def test_png_info_parses_the_infotext_of_an_image_made_here(ingress):
    made = txt2img(ingress, negative_prompt="blurry", sampler_name="Euler")
    read = ingress.png_info.remote(PngInfoRequest(image=made["images"][0])).result()
    assert read["info"] == made["info"]["infotexts"][0]
    parameters = read["parameters"]
    keys = ("Prompt", "Negative prompt", "Sampler", "Steps", "Seed", "Size-1", "Size-2")
    assert [parameters[key] for key in keys] == ["a lighthouse", "blurry", "Euler", "2", "5", "64", "64"]


# --- the answers' file format: samples_format, jpeg_quality, webp_lossless ------------------------------------------

@pytest.fixture
def options(ingress):
    """Sets A1111 options through the route; A1111's defaults again after the test (the job store, and with it the
    options, is the module's)."""
    def set_options(**values) -> None:
        ingress.set_options.remote(OptionsRequest(**values)).result()

    yield set_options
    set_options(samples_format="png", jpeg_quality=80, webp_lossless=False, return_grid=True)


def file_of(data: str) -> bytes:
    return base64.b64decode(data)


@pytest.mark.parametrize(("samples_format", "fmt"), [("jpg", "JPEG"), ("jpeg", "JPEG"), ("webp", "WEBP")])
def test_txt2img_and_img2img_answer_in_the_saved_format_with_the_infotext_as_exif(ingress, options, samples_format,
                                                                                  fmt):
    png = txt2img(ingress, seed=41)
    options(samples_format=samples_format)
    assert ingress.get_options.remote().result()["samples_format"] == samples_format
    made = txt2img(ingress, seed=41)
    image = decode_b64(made["images"][0])
    assert (image.format, image.size) == (fmt, (64, 64))
    text = decode_b64(png["images"][0]).info["parameters"]
    assert exif_comment(image) == text == made["info"]["infotexts"][0]  # as the PNG's chunk, for the same seed
    read = ingress.png_info.remote(PngInfoRequest(image=made["images"][0])).result()
    assert read["info"] == text and read["items"] == {"exif comment": text}  # A1111's reader names it so
    assert [read["parameters"][key] for key in ("Prompt", "Seed", "Size-1")] == ["a lighthouse", "41", "64"]
    edit = img2img(ingress, init_images=[b64(bands().resize((64, 64)))])
    edited = decode_b64(edit["images"][0])
    assert edited.format == fmt and exif_comment(edited) == edit["info"]["infotexts"][0]
    options(samples_format="png")
    again = decode_b64(txt2img(ingress, seed=41)["images"][0])
    assert again.format == "PNG" and again.info["parameters"] == text


def test_the_extras_answer_in_the_saved_format(ingress, options):
    single = ExtrasRequest(image=b64(bands()), upscaler_1="Lanczos")
    batch = ExtrasBatchRequest(upscaler_1="Lanczos", imageList=[{"data": b64(bands()), "name": "a"}])
    blend = ExtrasRequest(image=b64(bands()), upscaler_1="Lanczos", upscaler_2="Nearest",
                          extras_upscaler_2_visibility=0.5)  # encoded by the Provenance deployment
    for samples_format, fmt in (("jpg", "JPEG"), ("webp", "WEBP"), ("png", "PNG")):
        options(samples_format=samples_format)
        for image in (answer(ingress.extra_single_image.remote(single).result())["image"],
                      answer(ingress.extra_batch_images.remote(batch).result())["images"][0],
                      answer(ingress.extra_single_image.remote(blend).result())["image"]):
            assert (decode_b64(image).format, decode_b64(image).size) == (fmt, (256, 128)), samples_format


def test_jpeg_quality_and_webp_lossless_shape_the_answer(ingress, options):
    options(samples_format="jpg", jpeg_quality=20)
    low = file_of(txt2img(ingress, seed=43)["images"][0])
    options(jpeg_quality=95)
    high = file_of(txt2img(ingress, seed=43)["images"][0])
    assert len(low) < len(high)
    reported = ingress.get_options.remote().result()
    assert (reported["samples_format"], reported["jpeg_quality"], reported["webp_lossless"]) == ("jpg", 95, False)
    options(samples_format="png")
    png = decode_b64(txt2img(ingress, seed=43)["images"][0])
    options(samples_format="webp", webp_lossless=True)
    assert ingress.get_options.remote().result()["webp_lossless"] is True
    lossless = decode_b64(txt2img(ingress, seed=43)["images"][0])
    assert lossless.format == "WEBP" and np.array_equal(pixels(lossless.convert("RGB")), pixels(png.convert("RGB")))


def test_save_images_answers_a1111s_grid_first_and_return_grid_turns_it_off(ingress, options):
    alone = txt2img(ingress, seed=61, batch_size=3)
    made = txt2img(ingress, seed=61, batch_size=3, save_images=True)
    info = made["info"]
    assert len(made["images"]) == 4 and info["index_of_first_image"] == 1 and info["all_seeds"] == [61, 62, 63]
    grid = decode_b64(made["images"][0])
    # A1111's layout of three: two rows of two, filled row by row, the empty cell left white.
    assert grid.size == (128, 128) and grid.info["parameters"] == info["infotexts"][0] == info["infotexts"][1]
    # Each cell is its image (the grid carries a watermark of its own over them, a few levels at most).
    tiles = [pixels(decode_b64(image)).astype(int) for image in alone["images"]]
    for i, (x, y) in enumerate([(0, 0), (64, 0), (0, 64)]):
        cell = pixels(grid.crop((x, y, x + 64, y + 64))).astype(int)
        distances = [np.abs(cell - tile).mean() for tile in tiles]
        assert distances[i] < 4 and distances[i] == min(distances), (i, distances)
    assert pixels(grid.crop((64, 64, 128, 128))).mean() > 250
    assert [pixels(decode_b64(i)).tolist() for i in made["images"][1:]] == \
        [pixels(decode_b64(i)).tolist() for i in alone["images"]]
    one = txt2img(ingress, seed=61, save_images=True)  # A1111's grid_only_if_multiple: no grid of one image
    assert len(one["images"]) == 1 and one["info"]["index_of_first_image"] == 0
    # As A1111 reads it while the request's override_settings hold; and none is made for an answer without images.
    overridden = txt2img(ingress, seed=61, batch_size=3, save_images=True, override_settings={"return_grid": False})
    assert len(overridden["images"]) == 3 and overridden["info"]["index_of_first_image"] == 0
    unsent = txt2img(ingress, seed=61, batch_size=3, save_images=True, send_images=False)
    assert unsent["images"] == [] and unsent["info"]["index_of_first_image"] == 0
    options(return_grid=False)
    assert ingress.get_options.remote().result()["return_grid"] is False
    off = txt2img(ingress, seed=61, batch_size=3, save_images=True)
    assert len(off["images"]) == 3 and off["info"]["index_of_first_image"] == 0 and not off["info"]["cached"]


def test_a_grid_of_several_batches_in_the_saved_format(ingress, options):
    options(samples_format="jpg")
    made = txt2img(ingress, seed=71, n_iter=2, save_images=True)
    grid = decode_b64(made["images"][0])
    assert (grid.format, grid.size, len(made["images"])) == ("JPEG", (128, 64), 3)  # one row of two
    assert exif_comment(grid) == made["info"]["infotexts"][0]


def test_options_out_of_a1111s_bounds_are_refused():
    for fields in ({"jpeg_quality": 0}, {"jpeg_quality": 101}, {"samples_format": "tiff"}):
        with pytest.raises(ValidationError, match=next(iter(fields))):
            OptionsRequest(**fields)


# --- the routes that do nothing here, and interrogate --------------------------------------------------------------

def test_checkpoint_and_vae_actions_answer_empty(ingress):
    for route in ("unload_checkpoint", "reload_checkpoint", "refresh_vae"):
        assert getattr(ingress, route).remote().result() == {}, route


def test_interrogate_answers_the_captioners_caption(ingress, tiny, astronaut):
    """A1111's "clip" interrogator (its default): the Captioner's caption of the decoded image, its configured
    bounds applied; a data URI is read as plain base64 is."""
    from deployments.captioner import BlipCaptioner
    from deployments.support.config import CaptionerConfig

    image = astronaut.resize((96, 96))
    body = ingress.interrogate.remote(InterrogateRequest(image=b64(image))).result()
    expected = BlipCaptioner(CaptionerConfig(model=str(tiny / "captioner"))).caption(image)
    assert body == {"caption": expected} and len(expected.split()) >= 5
    uri = ingress.interrogate.remote(InterrogateRequest(image=f"data:image/png;base64,{b64(image)}", model="clip"))
    assert uri.result() == body


@pytest.mark.parametrize("model", ["deepdanbooru", "CLIP", "blip", ""])
def test_interrogators_not_deployed_are_refused_naming_model(ingress, model):
    """A1111's DeepDanbooru is not deployed here, and its names are case-sensitive: a 422 naming model, checked
    before the image is decoded (A1111 answers a 404 "Model not found" for a name it lacks)."""
    error = refused(lambda: ingress.interrogate.remote(InterrogateRequest(image="not base64!", model=model)).result())
    assert (error.code, status_of(error), error.details["field"]) == ("UNKNOWN_MODEL", 422, "model")
    assert repr(model) in error.message and "'clip'" in error.message


@pytest.mark.parametrize("image", ["", "bm90IGFuIGltYWdl", "data:image/png;base64"])
def test_an_image_that_cannot_be_read_is_refused_naming_image(ingress, image):
    error = refused(lambda: ingress.interrogate.remote(InterrogateRequest(image=image)).result())
    assert (error.code, status_of(error), error.details["field"]) == ("INVALID_IMAGE", 400, "image")


def same_pixels(a: dict, b: dict) -> bool:
    """Whether two answers' first images are the same pixels (their infotexts name what was asked)."""
    return np.array_equal(pixels(decode_b64(a["images"][0])), pixels(decode_b64(b["images"][0])))


def test_every_a1111_scheduler_is_accepted_and_listed(ingress):
    """SillyTavern sends scheduler "normal" with every generation: it was a 422."""
    listed = ingress.schedulers.remote().result()
    assert [(s["name"], s["label"]) for s in listed] == [
        ("automatic", "Automatic"), ("uniform", "Uniform"), ("karras", "Karras"), ("exponential", "Exponential"),
        ("polyexponential", "Polyexponential"), ("sgm_uniform", "SGM Uniform"), ("kl_optimal", "KL Optimal"),
        ("align_your_steps", "Align Your Steps"), ("simple", "Simple"), ("normal", "Normal"), ("ddim", "DDIM"),
        ("beta", "Beta")]
    for s in listed:
        body = txt2img(ingress, sampler_name="DPM++ 2M", scheduler=s["name"])
        assert len(body["images"]) == 1
        fallback = s["name"] in ("kl_optimal", "align_your_steps")
        assert bool(body["info"]["warnings"]) is fallback, s
    warned = txt2img(ingress, sampler_name="DPM++ 2M", scheduler="KL Optimal")["info"]["warnings"]
    assert warned == ["scheduler 'KL Optimal' has no diffusers equivalent: the sampler's own schedule (Automatic) "
                      "ran instead"]


def test_an_unknown_scheduler_runs_the_samplers_own_with_a_warning(ingress):
    body = txt2img(ingress, sampler_name="Euler", scheduler="Turbo")
    assert body["info"]["warnings"] == ["unknown scheduler 'Turbo' (GET /sdapi/v1/schedulers lists them): the "
                                        "sampler's own schedule (Automatic) ran"]
    assert same_pixels(body, txt2img(ingress, sampler_name="Euler"))


@pytest.mark.parametrize(("name", "sampler", "schedule"), [
    ("Euler a Karras", "Euler a", "Karras"), ("DPM++ 2M Exponential", "DPM++ 2M", "Exponential"),
    ("DPM++ SDE Karras", "DPM++ SDE", "Karras"), ("DPM++ 2M SDE Heun", "DPM++ 2M SDE Heun", "Exponential"),
    ("DPM++ 3M SDE", "DPM++ 3M SDE", "Exponential"), ("Euler a", "Euler a", "Automatic")])
def test_a1111_1_9_sampler_names_run_split_as_a1111_reports_them(ingress, name, sampler, schedule):
    """A labelled name is its sampler and schedule, as A1111 >= 1.9 reports them in info and the infotext; a name
    alone runs and names the sampler's own schedule."""
    body = txt2img(ingress, sampler_name=name)
    assert body["info"]["sampler_name"] == sampler and body["info"]["warnings"] == []
    written = parse(body["info"]["infotexts"][0])
    assert (written["Sampler"], written["Schedule type"]) == (sampler, schedule)
    assert len(body["images"]) == 1


def test_a1111_automatic_runs_the_samplers_own_schedule(ingress):
    """In A1111 1.10, DPM++ 2M under Automatic runs Karras sigmas: the same image as naming Karras."""
    automatic = txt2img(ingress, sampler_name="DPM++ 2M", steps=4)
    assert same_pixels(automatic, txt2img(ingress, sampler_name="DPM++ 2M", scheduler="Karras", steps=4))
    assert not same_pixels(automatic, txt2img(ingress, sampler_name="DPM++ 2M", scheduler="Uniform", steps=4))


def test_euler_a_karras_is_euler_a_with_karras(ingress):
    named = txt2img(ingress, sampler_name="Euler a Karras", steps=4)  # at 2 the tiny model's pixels do not tell
    assert same_pixels(named, txt2img(ingress, sampler_name="Euler a", scheduler="Karras", steps=4))
    assert not same_pixels(named, txt2img(ingress, sampler_name="Euler a", steps=4))


def test_restart_runs_heun_with_a_warning(ingress):
    body = txt2img(ingress, sampler_name="Restart")
    assert body["info"]["warnings"] == ["sampler 'Restart' has no diffusers equivalent: 'Heun' ran instead"]
    assert same_pixels(body, txt2img(ingress, sampler_name="Heun", scheduler="Karras"))  # Restart's own schedule


def test_a_sampler_name_with_a_label_but_no_sampler_runs_the_default(ingress):
    body = txt2img(ingress, sampler_name="Nope Karras")
    assert body["info"]["sampler_name"] == DEFAULT_SAMPLER and "unknown sampler 'Nope Karras'" in body["info"][
        "warnings"][0]


def test_prompts_are_read_with_a1111s_syntax(ingress):
    """Emphasis reaches the text encoders as a weight (not as brackets and digits), a weight of 1 is no weight, and
    prompt editing switches the prompt during sampling; the prompt in the infotext stays as the client wrote it."""
    def made(prompt: str, steps: int = 2) -> tuple[dict, np.ndarray]:  # the files differ by their infotexts
        body = txt2img(ingress, prompt=prompt, cfg_scale=12, steps=steps)
        return body, pixels(decode_b64(body["images"][0]))

    _, word = made("a lighthouse")
    assert np.array_equal(made("a (lighthouse:1)")[1], word)
    assert np.abs(made("a (lighthouse:1.4)")[1] - word).mean() > 0.3  # 0.81 measured
    # Over 4 steps A1111 runs the first text for three evaluations (it counts them from 0), the second for one.
    edited, switched = made("a [lighthouse:castle:0.5]", steps=4)
    assert not np.array_equal(switched, made("a lighthouse", 4)[1])
    assert not np.array_equal(switched, made("a castle", 4)[1])
    assert not any("prompt editing" in w for w in edited["info"]["warnings"])
    assert edited["info"]["prompt"] == "a [lighthouse:castle:0.5]"
    assert decode_b64(edited["images"][0]).info["parameters"].startswith("a [lighthouse:castle:0.5]\n")


# --- A1111's other fields: applied, or named in the warnings ------------------------------------------------------

def test_send_images_false_answers_without_images(ingress):
    body = txt2img(ingress, seed=5, send_images=False)
    assert body["images"] == [] and body["info"]["all_seeds"] == [5]


def test_disable_extra_networks_runs_the_prompt_without_its_lora(ingress):
    tagged = {"prompt": "a fox <lora:tiny-style:1.5>", "seed": 3, "steps": 3}
    disabled = txt2img(ingress, **tagged, disable_extra_networks=True)
    assert same_pixels(disabled, txt2img(ingress, **{**tagged, "prompt": "a fox"}))
    assert not same_pixels(disabled, txt2img(ingress, **tagged))


def test_a1111_fields_not_applied_are_named_in_the_warnings(ingress):
    webuiapi = {"styles": [], "subseed": -1, "subseed_strength": 0.0, "seed_resize_from_h": 0, "seed_resize_from_w": 0,
                "tiling": False, "s_churn": 0, "hr_sampler_name": "", "hr_prompt": "", "save_images": True}
    assert txt2img(ingress, **webuiapi)["info"]["warnings"] == []  # a client's defaults say nothing
    body = txt2img(ingress, enable_hr=True, hr_scale=1.5, hr_upscaler="Latent",
                   hr_checkpoint_name="tiny-sdxl-base-b", hr_sampler_name="Use same sampler")
    assert body["info"]["warnings"] == ["hr_checkpoint_name is not applied here: the image was made without it"]
    # An edit applies its variation seed, seed resize and noise multiplier (image_cfg_scale: no InstructPix2Pix).
    edited = img2img(ingress, init_images=[b64(bands())], initial_noise_multiplier=1.2, image_cfg_scale=1.5,
                     subseed=9, subseed_strength=0.4, seed_resize_from_w=64, seed_resize_from_h=64, tiling=True)
    assert edited["info"]["warnings"] == []
    written = parse(edited["info"]["infotexts"][0])
    assert (written["Variation seed"], written["Variation seed strength"]) == ("9", "0.4")
    assert (written["Noise multiplier"], written["Seed resize from-1"], written["Tiling"]) == ("1.2", "64", "True")
    assert edited["info"]["subseed_strength"] == 0.4 and edited["info"]["seed_resize_from_w"] == 64


def test_variation_seeds_mix_toward_the_subseeds_image_and_are_reported_as_a1111(ingress):
    varied = txt2img(ingress, seed=5, subseed=9, subseed_strength=1.0, batch_size=2, n_iter=2)
    info = varied["info"]
    assert info["all_seeds"] == [5, 5, 5, 5] and info["all_subseeds"] == [9, 10, 11, 12]
    assert info["seed"] == 5 and info["subseed"] == 9 and info["subseed_strength"] == 1.0
    assert info["warnings"] == []
    # Strength 1 is the variation seed's own image (DDIM here draws no noise after the first).
    assert same_pixels(txt2img(ingress, seed=5, subseed=9, subseed_strength=1.0), txt2img(ingress, seed=9))
    assert "Variation seed: 10, Variation seed strength: 1.0" in info["infotexts"][1]
    assert parse(info["infotexts"][3])["Variation seed"] == "12"
    plain = txt2img(ingress, seed=5, subseed=9, subseed_strength=0.0)
    assert same_pixels(plain, txt2img(ingress, seed=5))
    assert "Variation seed" not in plain["info"]["infotexts"][0] and plain["info"]["all_subseeds"] == [9]
    half = txt2img(ingress, seed=5, subseed=9, subseed_strength=0.5)
    assert not same_pixels(half, plain) and not same_pixels(half, txt2img(ingress, seed=9))


def test_img2img_takes_variation_seeds_and_the_noise_multiplier_as_a1111(ingress):
    edit = {"init_images": [b64(bands())], "denoising_strength": 1.0}
    plain = img2img(ingress, **edit)
    varied = img2img(ingress, **edit, subseed=9, subseed_strength=1.0, n_iter=2)
    assert varied["info"]["all_seeds"] == [5, 5] and varied["info"]["all_subseeds"] == [9, 10]
    assert "Variation seed: 10, Variation seed strength: 1.0" in varied["info"]["infotexts"][1]
    assert same_pixels(varied, img2img(ingress, **edit, seed=9)) and not same_pixels(varied, plain)
    assert same_pixels(img2img(ingress, **edit, subseed=9, subseed_strength=0.0), plain)
    # The noise multiplier: the field, else the saved option (A1111's), named in the infotext unless 1.
    assert same_pixels(img2img(ingress, **edit, initial_noise_multiplier=1.0), plain)
    scaled = img2img(ingress, **edit, initial_noise_multiplier=0.7)
    assert not same_pixels(scaled, plain) and parse(scaled["info"]["infotexts"][0])["Noise multiplier"] == "0.7"
    assert "Noise multiplier" not in plain["info"]["infotexts"][0]
    # An override changes nothing, as in A1111 (its img2img reads the option before the overrides hold).
    overridden = img2img(ingress, **edit, override_settings={"initial_noise_multiplier": 0.7})
    assert same_pixels(overridden, plain) and overridden["info"]["warnings"] == []
    from graphs.api.a1111_models import OptionsRequest

    try:
        ingress.set_options.remote(OptionsRequest(initial_noise_multiplier=0.7)).result()
        assert ingress.get_options.remote().result()["initial_noise_multiplier"] == 0.7
        saved = img2img(ingress, **edit)
        assert same_pixels(saved, scaled) and not saved["info"]["cached"]  # the option is part of the cache key
        assert same_pixels(img2img(ingress, **edit, initial_noise_multiplier=1.0), plain)  # the field wins
        # A1111's txt2img never reads the option: it changes nothing there, and nothing is said.
        drawn = txt2img(ingress)
        assert same_pixels(drawn, txt2img(ingress, seed=5)) and drawn["info"]["warnings"] == []
    finally:
        ingress.set_options.remote(OptionsRequest(initial_noise_multiplier=1.0)).result()
    with pytest.raises(ValidationError):
        OptionsRequest(initial_noise_multiplier=9)


def test_seed_resize_and_tiling_are_applied_and_written_in_the_infotext(ingress):
    own = txt2img(ingress, seed_resize_from_w=64, seed_resize_from_h=64)
    assert same_pixels(own, txt2img(ingress))  # the image's own size: the same noise
    assert "Seed resize from: 64x64" in own["info"]["infotexts"][0]
    assert own["info"]["seed_resize_from_w"] == 64 and own["info"]["seed_resize_from_h"] == 64
    assert not same_pixels(txt2img(ingress, seed_resize_from_w=128, seed_resize_from_h=96), own)
    tiled = txt2img(ingress, tiling=True)
    assert "Tiling: True" in tiled["info"]["infotexts"][0] and tiled["info"]["warnings"] == []
    assert not same_pixels(tiled, own)
    assert parse(tiled["info"]["infotexts"][0])["Tiling"] == "True"


def test_saved_styles_merge_into_the_prompts_that_run_and_the_answer_keeps_the_prompt_asked(ingress):
    # configs/cpu.yaml serves configs/styles.csv: "cinematic" wraps the prompt, "high detail" is appended.
    styles = {s["name"]: s for s in ingress.prompt_styles.remote().result()}
    assert {"cinematic", "watercolour", "high detail"} <= set(styles)
    styled = txt2img(ingress, prompt="a fox", styles=["cinematic", "high detail"])
    ran = styles["cinematic"]["prompt"].replace("{prompt}", "a fox") + ", " + styles["high detail"]["prompt"]
    negative = styles["cinematic"]["negative_prompt"] + ", " + styles["high detail"]["negative_prompt"]
    assert same_pixels(styled, txt2img(ingress, prompt=ran, negative_prompt=negative))
    assert not same_pixels(styled, txt2img(ingress, prompt="a fox"))
    info = styled["info"]
    assert (info["prompt"], info["all_prompts"], info["styles"]) == ("a fox", [ran], ["cinematic", "high detail"])
    assert info["all_negative_prompts"] == [negative] and info["warnings"] == []
    assert decode_b64(styled["images"][0]).info["parameters"].startswith(f"{ran}\nNegative prompt: {negative}\n")
    assert styled["parameters"]["prompt"] == "a fox"  # the request as sent
    unknown = txt2img(ingress, prompt="a fox", styles=["no such style"])
    assert same_pixels(unknown, txt2img(ingress, prompt="a fox"))
    assert unknown["info"]["warnings"] == ["styles: no style is named 'no such style' (GET /sdapi/v1/prompt-styles); "
                                           "it was not applied"]


def test_include_init_images_echoes_the_uploads_in_parameters(ingress):
    upload = b64(bands())
    assert "init_images" not in img2img(ingress, init_images=[upload])["parameters"]
    assert img2img(ingress, init_images=[upload], include_init_images=True)["parameters"]["init_images"] == [upload]


def test_extras_html_info_says_when_no_face_was_restored(ingress, astronaut):
    """A client (the page's faces tool) tells an image left unchanged from one restored by ``html_info``."""
    faceless = ExtrasRequest(image=b64(bands()), upscaler_1="None", codeformer_visibility=1.0)
    assert answer(ingress.extra_single_image.remote(faceless).result())["html_info"] == (
        "<p>no face detected: image unchanged</p>")
    portrait = ExtrasRequest(image=b64(astronaut.resize((256, 256))), upscaler_1="None", codeformer_visibility=1.0)
    assert answer(ingress.extra_single_image.remote(portrait).result())["html_info"] == ""
    batch = ExtrasBatchRequest(upscaler_1="None", codeformer_visibility=1.0,
                               imageList=[{"data": b64(astronaut.resize((256, 256))), "name": "a"},
                                          {"data": b64(bands()), "name": "b"}])
    assert answer(ingress.extra_batch_images.remote(batch).result())["html_info"] == (
        "<p>image 1: no face detected: image unchanged</p>")


def test_info_has_a1111s_keys_and_the_infotext_names_the_model_hash(ingress):
    body = txt2img(ingress, batch_size=2, restore_faces=True)
    info = body["info"]
    listed = {m["model_name"]: m["hash"] for m in ingress.sd_models.remote().result()}
    assert info["sd_model_hash"] == listed["tiny-sdxl-base"] and len(info["sd_model_hash"]) == 10
    assert info["index_of_first_image"] == 0 and len(body["images"]) == 2  # no grid: the first image is first
    assert info["face_restoration_model"] == "RestoreFormer" and info["clip_skip"] == 1
    assert info["extra_generation_params"]["Model hash"] == info["sd_model_hash"]
    assert parse(info["infotexts"][0])["Model hash"] == info["sd_model_hash"]


def test_options_report_the_settings_that_run_and_take_a_round_trip(ingress):
    from graphs.api.a1111_models import OptionsRequest

    options = ingress.get_options.remote().result()
    assert options["randn_source"] == "CPU" and options["sd_vae"] == "Automatic"  # what runs here
    assert options["CLIP_stop_at_last_layers"] == 1 and options["eta_noise_seed_delta"] == 0
    assert len(options["sd_checkpoint_hash"]) == 64 and options["sd_model_checkpoint"].startswith("tiny-sdxl-base [")
    # open-webui posts back what it read: it is accepted, and changes nothing that would change an image.
    assert ingress.set_options.remote(OptionsRequest(**options)).result() == {}
    assert ingress.get_options.remote().result() == options
    overridden = txt2img(ingress, override_settings=options)
    assert overridden["info"]["warnings"] == [] and same_pixels(overridden, txt2img(ingress))


def test_the_refiner_listed_in_sd_models_is_refused_as_a_base_saying_where_it_goes(ingress):
    from graphs.api.a1111_models import OptionsRequest

    titles = [m["title"] for m in ingress.sd_models.remote().result()]
    refiner = next(t for t in titles if t.startswith("tiny-sdxl-refiner"))
    error = refused(lambda: ingress.set_options.remote(OptionsRequest(sd_model_checkpoint=refiner)).result())
    assert (status_of(error), error.details["field"]) == (422, "sd_model_checkpoint")
    assert "is the refiner" in error.message and "refiner_checkpoint" in error.message


def test_the_img2img_infotext_names_its_strength_and_an_inpaintings_mask_blur(ingress):
    edited = img2img(ingress, init_images=[b64(bands())], denoising_strength=0.4)
    assert parse(edited["info"]["infotexts"][0])["Denoising strength"] == "0.4"
    assert "Mask blur" not in edited["info"]["infotexts"][0]
    inpainted = img2img(ingress, init_images=[b64(bands())], mask=b64(Image.new("L", (64, 64), 255)), mask_blur=2)
    assert parse(inpainted["info"]["infotexts"][0])["Mask blur"] == "2"


def test_eta_runs_ddim_stochastic_and_is_named_where_a_sampler_cannot_take_it(ingress):
    plain = txt2img(ingress, sampler_name="DDIM", steps=3)
    assert same_pixels(txt2img(ingress, sampler_name="DDIM", steps=3, eta=0.0), plain)
    noisy = txt2img(ingress, sampler_name="DDIM", steps=3, eta=1.0)  # webuiapi's default eta
    assert not same_pixels(noisy, plain) and noisy["info"]["warnings"] == []
    assert same_pixels(noisy, txt2img(ingress, sampler_name="DDIM", steps=3, eta=1.0))  # the seed's noise
    assert parse(noisy["info"]["infotexts"][0])["Eta DDIM"] == "1.0"
    assert "Eta DDIM" not in plain["info"]["infotexts"][0]
    assert txt2img(ingress, sampler_name="Euler a", eta=1.0)["info"]["warnings"] == []
    assert txt2img(ingress, sampler_name="Euler a", eta=0.5)["info"]["warnings"] == [
        "eta=0.5 is not applied to Euler a: it ran at A1111's default eta of 1"]
    assert same_pixels(txt2img(ingress, sampler_name="Euler", eta=0.3), txt2img(ingress, sampler_name="Euler"))


def test_the_hires_second_pass_fields_are_checked_and_read_as_a1111_reads_them(ingress):
    pixel = {"enable_hr": True, "hr_scale": 1.5, "hr_second_pass_steps": 4, "hr_upscaler": "Lanczos",
             "denoising_strength": 0.6}
    latent = {**pixel, "hr_upscaler": "Latent"}
    # Its prompt editing counts on from the first pass, as on the latent path: [castle:boat:0.5] is boat throughout.
    for hires in (pixel, latent):
        assert same_pixels(txt2img(ingress, **hires, hr_prompt="a [castle:boat:0.5]"),
                           txt2img(ingress, **hires, hr_prompt="a boat")), hires["hr_upscaler"]
    # A prompt it cannot read is refused before the first pass, naming its own field.
    error = refused(lambda: txt2img(ingress, **pixel, hr_prompt="(" * 40 + "x"))
    assert (status_of(error), error.details["field"]) == (422, "hr_prompt")
    # An unknown first-pass sampler fell back to the default: an hr_scheduler alone reads that one.
    body = txt2img(ingress, **pixel, sampler_name="bogus", hr_scheduler="Karras")
    assert body["info"]["sampler_name"] == DEFAULT_SAMPLER
    # LoRA tags: removed with disable_extra_networks; a latent pass cannot apply its own, and says so.
    tagged = "a boat <lora:nope:1>"
    assert txt2img(ingress, **pixel, hr_prompt=tagged, disable_extra_networks=True)["info"]["warnings"] == []
    assert txt2img(ingress, **latent, hr_prompt=tagged)["info"]["warnings"] == [
        "hr_prompt: its <lora:...> tags are not applied by a Latent hires fix, one base call with the first pass's "
        "LoRAs (a pixel hires fix applies them)"]
    # Variation seeds vary both passes of a pixel hires fix, as A1111's: at strength 1 it is the variation seed's
    # own hires image.
    varied = txt2img(ingress, **pixel, subseed=3, subseed_strength=1.0)
    assert varied["info"]["warnings"] == []
    assert same_pixels(varied, txt2img(ingress, **pixel, seed=3))
    assert not same_pixels(varied, txt2img(ingress, **pixel))


def test_a_style_that_takes_a_prompt_past_its_limit_is_a_422_naming_styles(ingress):
    error = refused(lambda: txt2img(ingress, prompt="a" * 9990, styles=["cinematic"]))
    assert (status_of(error), error.details["field"]) == (422, "styles")


def test_the_refiner_follows_prompt_editing_on_from_the_base(ingress):
    """A1111's step counter goes on across the refiner switch: of 4 steps switched at 0.5, the base runs
    evaluations 0-1 and the refiner 2-3, so [lighthouse:castle:2] is ``lighthouse`` over the base's part and
    swaps inside the refiner's, which reads the schedule and says nothing of it. (Before, the refiner ran
    ``lighthouse`` throughout: these pixels were the plain prompt's.)"""
    refined = {"refiner_checkpoint": "tiny-sdxl-refiner", "refiner_switch_at": 0.5, "steps": 4,
               "sampler_name": "Euler"}
    plain = txt2img(ingress, **refined, prompt="a lighthouse")
    edited = txt2img(ingress, **refined, prompt="a [lighthouse:castle:2]")
    assert plain["info"]["warnings"] == [] and edited["info"]["warnings"] == []
    assert not same_pixels(edited, plain)
    assert same_pixels(edited, txt2img(ingress, **refined, prompt="a [lighthouse:castle:2]"))
    assert same_pixels(txt2img(ingress, **refined, prompt="a [lighthouse:castle:3]"), plain)  # never reached
    composed = txt2img(ingress, **refined, prompt="a lighthouse AND a [lighthouse:castle:2] :0.5")
    assert composed["info"]["warnings"] == []
    assert not same_pixels(composed, txt2img(ingress, **refined, prompt="a lighthouse AND a lighthouse :0.5"))


def test_a_saved_churn_option_changes_eulers_pixels_and_comes_before_the_field_as_in_a1111(ingress):
    """``POST /options`` s_churn is read while each later request runs, as A1111 1.10's Euler reads its option: the
    image churned by it, whether or not the request sets its own field (an option other than its default comes
    first); an ``override_settings`` value at the default gives the field back. ``GET /options`` reports it."""
    euler = {"sampler_name": "Euler", "seed": 5, "steps": 4}
    today, churned = txt2img(ingress, **euler), txt2img(ingress, **euler, s_churn=10)
    field = txt2img(ingress, **euler, s_churn=1)  # a churn of 1 / 4 a step; 10 / 4 is capped at sqrt(2) - 1
    assert not same_pixels(churned, today) and not same_pixels(field, churned)
    try:
        ingress.set_options.remote(OptionsRequest(s_churn=10)).result()
        assert ingress.get_options.remote().result()["s_churn"] == 10
        saved = txt2img(ingress, **euler)
        assert same_pixels(saved, churned) and not saved["info"]["cached"]  # the option is part of the cache key
        assert parse(saved["info"]["infotexts"][0])["Sigma churn"] == "10.0"
        assert same_pixels(txt2img(ingress, **euler, s_churn=1), churned)
        assert same_pixels(txt2img(ingress, **euler, s_churn=1, override_settings={"s_churn": 0}), field)
        assert same_pixels(txt2img(ingress, **euler, override_settings={"s_churn": 0}), today)
    finally:
        ingress.set_options.remote(OptionsRequest(s_churn=0)).result()
    assert same_pixels(txt2img(ingress, **euler, s_churn=1), field)
    with pytest.raises(ValidationError, match="s_churn"):
        OptionsRequest(s_churn=101)


def test_saved_pad_cond_uncond_changes_the_pixels_of_a_prompt_longer_than_its_negative(ingress):
    """A prompt of two chunks with a negative prompt of one run apart (A1111's default); with pad_cond_uncond saved,
    the negative prompt is padded with the empty prompt instead, another image. Prompts of one length: the same."""
    long = {"prompt": "a " * 100, "negative_prompt": "blurry", "seed": 5}
    short = {"prompt": "a lighthouse", "negative_prompt": "blurry", "seed": 5}
    apart, plain = txt2img(ingress, **long), txt2img(ingress, **short)
    try:
        ingress.set_options.remote(OptionsRequest(pad_cond_uncond=True)).result()
        padded = txt2img(ingress, **long)
        assert not same_pixels(padded, apart) and not padded["info"]["cached"]
        assert same_pixels(txt2img(ingress, **long, override_settings={"pad_cond_uncond": False}), apart)
        assert same_pixels(txt2img(ingress, **short), plain)
    finally:
        ingress.set_options.remote(OptionsRequest(pad_cond_uncond=False)).result()


def test_euler_takes_s_churn_from_the_field_or_the_override(ingress):
    """A1111's s_churn (and its window and noise scale) runs on Euler, from the request field or, winning over it
    when not at its default, the ``override_settings`` key (A1111 1.10 reads its option first); the infotext names
    them as A1111 does. Samplers whose A1111 function takes them and that run without them here say so; the others
    (DDIM takes none in A1111 either) say nothing. Values past A1111's bounds are refused naming their field."""
    euler = {"sampler_name": "Euler", "seed": 5, "steps": 4}
    today = txt2img(ingress, **euler)
    churned = txt2img(ingress, **euler, s_churn=10)
    assert not same_pixels(churned, today) and churned["info"]["warnings"] == []
    assert "Sigma churn: 10.0" in churned["info"]["infotexts"][0]
    assert same_pixels(txt2img(ingress, **euler, override_settings={"s_churn": 10}), churned)
    assert same_pixels(txt2img(ingress, **euler, s_churn=3, override_settings={"s_churn": 10}), churned)
    assert same_pixels(txt2img(ingress, **euler, s_churn=0), today)
    assert same_pixels(txt2img(ingress, **euler, s_churn=10, s_tmax=0.01), today)  # no sigma in its window
    edit = {**euler, "init_images": [b64(bands())], "denoising_strength": 0.6}
    assert not same_pixels(img2img(ingress, **edit, s_churn=10), img2img(ingress, **edit))
    assert txt2img(ingress, sampler_name="Heun", steps=2, s_churn=10)["info"]["warnings"] == [
        "s_churn is not applied to Heun here: the image was made without it"]
    assert txt2img(ingress, sampler_name="Euler a", steps=2, override_settings={"s_noise": 0.5})["info"][
        "warnings"] == ["s_noise is not applied to Euler a here: the image was made without it"]
    assert txt2img(ingress, steps=2, s_churn=10)["info"]["warnings"] == []  # DDIM
    for fields, where in (({"s_churn": 101}, "s_churn"), ({"s_noise": 1.2}, "s_noise"),
                          ({"override_settings": {"s_tmax": 1000}}, "override_settings.s_tmax"),
                          ({"override_settings": {"s_churn": "lots"}}, "override_settings.s_churn")):
        if where.startswith("override"):
            error = refused(lambda fields=fields: txt2img(ingress, **euler, **fields))
            assert (status_of(error), error.details["field"]) == (422, where)
        else:
            with pytest.raises(ValidationError) as refusal:
                Txt2ImgRequest(**fields)
            assert refusal.value.errors()[0]["loc"] == (where,)


def test_style_names_are_bounded():
    from pydantic import ValidationError

    for styles, where in ((["x" * 257], ("styles", 0)), (["cinematic"] * 65, ("styles",))):
        with pytest.raises(ValidationError) as refusal:  # the body's 422 names this place
            Txt2ImgRequest(prompt="a fox", styles=styles)
        assert refusal.value.errors()[0]["loc"] == where


# --- the ControlNet extension (graphs/api/a1111_controlnet.py, graphs/api/controlnet.py) ---------------------------

def edges_photo() -> Image.Image:
    """64x64: a white square on black, edges a canny map finds."""
    image = Image.new("RGB", (64, 64), (0, 0, 0))
    image.paste((255, 255, 255), (16, 16, 48, 48))
    return image


def controlnet(*units, key: str = "ControlNet") -> dict:
    return {key: {"args": list(units)}}


def test_a_controlnet_unit_changes_the_image_and_writes_the_extensions_infotext(ingress):
    plain = txt2img(ingress)
    unit = {"enabled": True, "module": "canny", "model": "tiny-canny [0123abcd]", "weight": 1.0,
            "image": b64(edges_photo()), "resize_mode": "Just Resize", "processor_res": 64, "threshold_a": 100,
            "threshold_b": 200}
    body = txt2img(ingress, alwayson_scripts=controlnet(unit, key="controlnet"))  # the key in any case
    made, before = pixels(decode_b64(body["images"][0])), pixels(decode_b64(plain["images"][0]))
    assert np.abs(made - before).mean() > 1.0
    text = decode_b64(body["images"][0]).info["parameters"]
    assert ('ControlNet 0: "Module: canny, Model: tiny-canny [0123abcd], Weight: 1.0, Resize Mode: Just Resize, '
            'Processor Res: 64, Threshold A: 100.0, Threshold B: 200.0, Guidance Start: 0.0, Guidance End: 1.0, '
            'Pixel Perfect: False, Control Mode: Balanced"') in text
    assert parse(text)["ControlNet 0"].startswith("Module: canny, Model: tiny-canny")
    assert not [w for w in body["info"]["warnings"] if "ControlNet" in w or "script" in w]
    # Weight 0: the image of no control; a disabled unit and a unit of model "None" are ignored.
    zero = txt2img(ingress, alwayson_scripts=controlnet({**unit, "weight": 0}))
    assert np.abs(pixels(decode_b64(zero["images"][0])) - before).max() <= 1
    ignored = txt2img(ingress, alwayson_scripts=controlnet({**unit, "enabled": False},
                                                           {**unit, "model": "None"}))
    assert ignored["images"] == plain["images"]
    assert "ControlNet 0" not in decode_b64(ignored["images"][0]).info["parameters"]
    assert any("args[1]: no ControlNet model" in w for w in ignored["info"]["warnings"])


def test_controlnet_units_the_older_spellings_and_several_units(ingress):
    unit = {"module": "none", "model": "tiny-canny", "image": b64(edges_photo())}  # enabled by default
    one = txt2img(ingress, alwayson_scripts=controlnet(unit))
    older = txt2img(ingress, alwayson_scripts=controlnet({"module": "none", "model": "tiny-canny",
                                                          "input_image": "data:image/png;base64,"
                                                          + b64(edges_photo()), "guidance": 1.0}))
    assert older["images"] == one["images"]
    two = txt2img(ingress, alwayson_scripts=controlnet(unit, {**unit, "module": "invert", "control_mode": 2,
                                                              "pixel_perfect": True}))
    assert np.abs(pixels(decode_b64(two["images"][0])) - pixels(decode_b64(one["images"][0]))).mean() > 0.5
    text = decode_b64(two["images"][0]).info["parameters"]
    assert "ControlNet 0: " in text and "ControlNet 1: " in text
    # The extension's control mode and Pixel Perfect run here: nothing to warn of.
    assert not [w for w in two["info"]["warnings"] if "control_mode" in w or "pixel_perfect" in w]


def test_controlnet_units_are_refused_naming_their_field(ingress):
    good = {"module": "canny", "model": "tiny-canny", "image": b64(edges_photo())}
    cases = [({**good, "model": "depth-xl"}, "UNKNOWN_MODEL", 422, "args[0].model"),
             ({**good, "module": "depth_zoe"}, "UNKNOWN_MODEL", 422, "args[0].module"),
             ({**good, "image": "not an image"}, "INVALID_IMAGE", 400, "args[0].image"),
             ({**good, "image": None}, "INVALID_INPUT", 422, "args[0].image"),  # txt2img: no init image to use
             ({**good, "weight": 3}, "INVALID_INPUT", 422, "args[0].weight"),
             ({**good, "guidance_start": 0.8, "guidance_end": 0.2}, "INVALID_INPUT", 422, "args[0].guidance_start"),
             ({**good, "resize_mode": 7}, "INVALID_INPUT", 422, "args[0].resize_mode"),
             ({**good, "control_mode": "Louder"}, "INVALID_INPUT", 422, "args[0].control_mode")]
    for unit, code, status, field in cases:
        error = refused(lambda unit=unit: txt2img(ingress, alwayson_scripts=controlnet({"enabled": False}, unit)))
        assert (error.code, status_of(error), error.details["field"]) == (
            code, status, f"alwayson_scripts.ControlNet.{field.replace('args[0]', 'args[1]')}"), unit
    units = refused(lambda: txt2img(ingress, alwayson_scripts=controlnet(*[good] * 5)))
    assert units.details["field"] == "alwayson_scripts.ControlNet.args"
    # The extension's DWPose whole-body module needs models not served here: refused as an unknown module is, told
    # which pose modules are served.
    choices = refused(lambda: txt2img(ingress, alwayson_scripts=controlnet({**good, "module": "dw_openpose_full"})))
    assert (choices.code, status_of(choices), choices.details["field"]) == (
        "UNKNOWN_MODEL", 422, "alwayson_scripts.ControlNet.args[0].module")
    assert ("of its pose modules openpose, openpose_hand, openpose_face, openpose_faceonly, openpose_full are served "
            "here" in choices.message)
    assert choices.details["choices"] == ["none", "canny", "invert", "depth_midas", "depth_anything",
                                          "depth_anything_v2", "lineart_standard", "lineart_realistic",
                                          "lineart_coarse", "lineart_anime", "openpose", "openpose_hand",
                                          "openpose_face", "openpose_faceonly", "openpose_full", "softedge_hed",
                                          "softedge_hedsafe", "softedge_pidinet", "softedge_pidisafe", "scribble_hed",
                                          "scribble_pidinet", "mlsd", *MODEL_FREE]  # cpu.yaml has them all


def test_img2img_unit_without_an_image_uses_the_init_image(ingress):
    init = b64(bands())
    plain = img2img(ingress, init_images=[init], width=128)
    implicit = img2img(ingress, init_images=[init], width=128,
                       alwayson_scripts=controlnet({"module": "none", "model": "tiny-canny"}))
    explicit = img2img(ingress, init_images=[init], width=128,
                       alwayson_scripts=controlnet({"module": "none", "model": "tiny-canny", "image": init}))
    assert implicit["images"] == explicit["images"]
    assert np.abs(pixels(decode_b64(implicit["images"][0])) - pixels(decode_b64(plain["images"][0]))).mean() > 1.0



def test_img2img_unit_without_an_image_reads_the_upload_framed_by_img2imgs_resize_mode(ingress):
    """As the extension reads p.init_images[0] with p.resize_mode: the unit's map is made of the upload itself and
    framed as the init image is (Resize and Fill here: the control map's median border, not the init image's
    stretched edges), whatever the unit's own resize mode."""
    upload = b64(bands())  # 128x64, framed into the 64x64 generation
    edit = {"init_images": [upload], "resize_mode": 2}
    unit = {"module": "none", "model": "tiny-canny", "resize_mode": "Just Resize"}
    implicit = img2img(ingress, **edit, alwayson_scripts=controlnet(unit))
    filled = img2img(ingress, **edit, alwayson_scripts=controlnet({**unit, "image": upload,
                                                                   "resize_mode": "Resize and Fill"}))
    assert same_pixels(implicit, filled)
    stretched = img2img(ingress, **edit, alwayson_scripts=controlnet({**unit, "image": upload}))
    assert not same_pixels(implicit, stretched)

def test_controlnet_routes(ingress, tiny):
    from deployments.support.checkpoints import model_hash
    from graphs.api.controlnet import DetectRequest

    assert ingress.controlnet_version.remote().result() == {"version": 2}
    # As the extension lists them: "name [hash]", A1111's old hash of the weights file.
    digest = model_hash(tiny / "controlnet-canny" / "diffusion_pytorch_model.safetensors")
    listed = ingress.controlnet_model_list.remote().result()
    assert listed == {"model_list": [f"tiny-canny [{digest}]"]}
    assert ingress.controlnet_model_list.remote(update=False).result() == listed
    modules = ingress.controlnet_module_list.remote().result()
    assert modules["module_list"] == ["none", "canny", "invert", "depth", "depth_anything", "depth_anything_v2",
                                      "lineart_standard", "lineart", "lineart_coarse", "lineart_anime", "openpose",
                                      "openpose_hand", "openpose_face", "openpose_faceonly", "openpose_full",
                                      "hed", "hed_safe", "pidinet", "pidinet_safe", "scribble_hed", "pidinet_scribble",
                                      "mlsd", "threshold", "scribble_xdog", "blur_gaussian", "tile_resample",
                                      "recolor_luminance", "recolor_intensity", "shuffle", "color",
                                      "tile_colorfix", "tile_colorfix+sharp"]
    labels = ingress.controlnet_module_list.remote(alias_names=True).result()  # the extension's labels
    assert labels["module_list"][2:4] == ["invert (from white bg & black line)", "depth_midas"]
    assert [s["value"] for s in labels["module_detail"]["depth_midas"]["sliders"]] == [512]
    assert [s["value"] for s in modules["module_detail"]["canny"]["sliders"]] == [512, 100.0, 200.0]
    assert ingress.scripts.remote().result() == {"txt2img": ["controlnet"], "img2img": ["controlnet"]}
    photo = Image.new("RGB", (128, 96), (0, 0, 0))
    photo.paste((255, 255, 255), (32, 24, 96, 72))
    detected = ingress.controlnet_detect.remote(DetectRequest(
        controlnet_module="canny", controlnet_input_images=[b64(photo)], controlnet_processor_res=64,
        controlnet_threshold_a=50, controlnet_threshold_b=150)).result()
    assert detected["info"] == "Success"
    edges = decode_b64(detected["images"][0])
    assert edges.size == (85, 64)  # the shorter side at processor_res, the aspect kept
    import cv2

    expected = cv2.Canny(cv2.resize(np.asarray(photo), (85, 64), interpolation=cv2.INTER_AREA), 50, 150)
    assert np.array_equal(np.asarray(edges.convert("L")), expected) and expected.max() == 255
    for body, field, code in [
            (DetectRequest(controlnet_module="depth_zoe", controlnet_input_images=[b64(photo)]), "controlnet_module",
             "UNKNOWN_MODEL"),
            (DetectRequest(controlnet_module="canny"), "controlnet_input_images", "INVALID_INPUT"),
            (DetectRequest(controlnet_module="canny", controlnet_input_images=[b64(photo), "x"]),
             "controlnet_input_images[1]", "INVALID_IMAGE"),
            # a strip's map would be 76800 x 512 at the default resolution
            (DetectRequest(controlnet_module="canny",
                           controlnet_input_images=[b64(photo), b64(Image.new("RGB", (3000, 20)))]),
             "controlnet_input_images[1]", "INVALID_INPUT")]:
        error = refused(lambda body=body: ingress.controlnet_detect.remote(body).result())
        assert (error.code, error.details["field"]) == (code, field)


@pytest.mark.parametrize("upscaler", ["Latent", "None"])
def test_controlnet_with_the_hires_fix(ingress, upscaler):
    """A pixel hires fix's second pass (img2img of the upscaled image) runs the units too, their images framed at
    the hires size; a Latent one's second pass runs without them, and says so."""
    unit = {"module": "canny", "model": "tiny-canny", "image": b64(edges_photo())}
    hires = {"enable_hr": True, "hr_scale": 1.5, "hr_upscaler": upscaler, "hr_second_pass_steps": 2,
             "denoising_strength": 0.5}
    plain = txt2img(ingress, **hires)
    body = txt2img(ingress, **hires, alwayson_scripts=controlnet(unit))
    image = decode_b64(body["images"][0])
    assert image.size == (96, 96)
    assert np.abs(pixels(image) - pixels(decode_b64(plain["images"][0]))).mean() > 1.0
    latent = [w for w in body["info"]["warnings"] if "Latent hires" in w]
    assert bool(latent) == (upscaler == "Latent")


@pytest.mark.parametrize("upscaler", ["Latent", "None"])
def test_controlnet_hr_option_picks_the_passes_a_unit_guides(ingress, upscaler):
    """The extension's hr_option: with a hires fix, "Low res only" guides the first pass alone, "High res only" the
    second alone; a Latent hires fix's second pass runs without ControlNet, and says so only for a unit that asked
    for it there. Without a hires fix every unit guides the one pass."""
    unit = {"module": "canny", "model": "tiny-canny", "image": b64(edges_photo())}
    hires = {"enable_hr": True, "hr_scale": 1.5, "hr_upscaler": upscaler, "hr_second_pass_steps": 2,
             "denoising_strength": 0.5}

    def run(option: str | None, **fields) -> dict:
        return txt2img(ingress, **fields, alwayson_scripts=controlnet(
            unit if option is None else {**unit, "hr_option": option}))

    made = {option: run(option, **hires) for option in ("Both", "Low res only", "High res only")}
    plain = txt2img(ingress, **hires)
    assert made["Both"]["images"] == run(None, **hires)["images"]  # the extension's default
    images = {option: pixels(decode_b64(body["images"][0])) for option, body in made.items()}
    for option in made:
        moved = np.abs(images[option] - pixels(decode_b64(plain["images"][0]))).mean()
        # A Latent hires fix's second pass cannot run ControlNet: a unit for it alone guides nothing, with a warning.
        assert moved == 0 if (upscaler, option) == ("Latent", "High res only") else moved > 0.5, option
    assert np.abs(images["Both"] - images["Low res only"]).mean() > 0.5 or upscaler == "Latent"
    assert np.abs(images["Both"] - images["High res only"]).mean() > 0.5
    warned = {option: any("Latent hires" in w for w in body["info"]["warnings"]) for option, body in made.items()}
    assert warned == {"Both": upscaler == "Latent", "Low res only": False, "High res only": upscaler == "Latent"}
    if upscaler == "Latent":  # the second pass runs without it: Low res only is Both
        assert made["Low res only"]["images"] == made["Both"]["images"]
    # Without a hires fix the option changes nothing, as the extension reads it.
    assert run("High res only")["images"] == run("Both")["images"]
    error = refused(lambda: run("Medium res", **hires))
    assert error.details["field"] == "alwayson_scripts.ControlNet.args[0].hr_option"


def test_a_recolor_units_map_goes_back_into_the_hires_fixs_finished_images(ingress, astronaut):
    """The extension puts a recolor unit's hires map back into A1111's finished images, whatever passes the unit
    guides: a pixel hires fix's images (64 to 96) have the map as their HSV value, "Low res only" too."""
    photo = astronaut.resize((96, 96))
    unit = {"module": "recolor_intensity", "model": "tiny-canny", "image": b64(photo), "hr_option": "Low res only"}
    body = txt2img(ingress, enable_hr=True, hr_scale=1.5, hr_upscaler="None", hr_second_pass_steps=2,
                   denoising_strength=0.5, alwayson_scripts=controlnet(unit))
    made = np.asarray(decode_b64(body["images"][0]).convert("RGB"))
    assert made.shape == (96, 96, 3) and np.array_equal(made.max(axis=2), np.asarray(photo).max(axis=2))


def test_controlnet_control_mode_pixel_perfect_and_a_listed_name(ingress):
    """The extension's control modes and Pixel Perfect are applied (tests/test_control_modes.py has their
    arithmetic); a name as /controlnet/model_list lists it runs the same ControlNet. Pixels are compared: each
    infotext names the settings sent."""
    unit = {"module": "canny", "model": "tiny-canny", "image": b64(edges_photo())}

    def made(**fields) -> np.ndarray:
        hires = fields.pop("hires", {})
        body = txt2img(ingress, **hires, alwayson_scripts=controlnet({**unit, **fields}))
        assert not [w for w in body["info"]["warnings"] if "ControlNet" in w], body["info"]["warnings"]
        return pixels(decode_b64(body["images"][0]))

    def differ(a: np.ndarray, b: np.ndarray) -> bool:
        return bool(np.abs(a - b).mean() > 0.5)

    by_name = made()
    listed = ingress.controlnet_model_list.remote().result()["model_list"][0]
    assert listed.startswith("tiny-canny [") and np.array_equal(made(model=listed), by_name)
    modes = {mode: made(control_mode=mode) for mode in (1, 2)}
    assert differ(modes[1], by_name) and differ(modes[2], by_name) and differ(modes[1], modes[2])
    assert np.array_equal(made(control_mode="ControlNet is more important"), modes[2])
    # 64x64 image, 64x64 target: canny at 64 (processor_res, 512 by default, is not read then).
    perfect = made(pixel_perfect=True, processor_res=5000)
    assert np.array_equal(perfect, made(processor_res=64)) and differ(perfect, by_name)
    # A hires fix's second pass keeps the first pass's resolution (computed at 96x96 it would be 96).
    hires = {"enable_hr": True, "hr_scale": 1.5, "hr_upscaler": "None", "hr_second_pass_steps": 2,
             "denoising_strength": 0.5}
    both = made(pixel_perfect=True, hires=hires)
    assert np.array_equal(both, made(processor_res=64, hires=hires))
    assert not np.array_equal(both, made(processor_res=96, hires=hires))


def test_canny_sliders_set_out_of_bounds_run_at_their_defaults_and_say_so(ingress):
    unit = {"module": "canny", "model": "tiny-canny", "image": b64(edges_photo())}
    default = txt2img(ingress, alwayson_scripts=controlnet(unit))
    high = txt2img(ingress, alwayson_scripts=controlnet({**unit, "threshold_a": 300}))  # the others left unset
    assert high["images"] == default["images"]
    assert [w for w in high["info"]["warnings"] if "threshold_a" in w] == [
        "alwayson_scripts.ControlNet.args[0].threshold_a=300 is outside canny's 1 to 255: it ran at 100, as the "
        "extension resets it"]
    assert not [w for w in default["info"]["warnings"] if "canny" in w]  # -1: unset, the default without a word


def test_controlnet_detect_reads_webuiapis_controlnet_images_too(ingress):
    from graphs.api.controlnet import DetectRequest

    photo = b64(edges_photo())
    canonical = ingress.controlnet_detect.remote(DetectRequest(controlnet_module="canny",
                                                               controlnet_input_images=[photo])).result()
    webuiapi = ingress.controlnet_detect.remote(DetectRequest(controlnet_module="canny",
                                                              controlnet_images=[photo])).result()
    assert webuiapi == canonical and len(canonical["images"]) == 1
    error = refused(lambda: ingress.controlnet_detect.remote(DetectRequest(
        controlnet_module="canny", controlnet_images=[photo, "x"])).result())
    assert error.details["field"] == "controlnet_images[1]"


def test_depth_units_and_detect(ingress, tiny, astronaut):
    """A depth module (the extension's "depth" is MiDaS) guides txt2img by its map, and /controlnet/detect returns
    that map, made on the base replica as the tiny models make it here."""
    import torch

    from deployments.support import depth
    from deployments.support.control import detect
    from graphs.api.controlnet import DetectRequest

    photo = astronaut.resize((128, 96))
    detected = ingress.controlnet_detect.remote(DetectRequest(
        controlnet_module="depth", controlnet_input_images=[b64(photo)], controlnet_processor_res=64)).result()
    local = depth.load({"depth_midas": str(tiny / "depth-midas")}, torch.device("cpu"), torch.float32)
    made = decode_b64(detected["images"][0])
    assert made.size == (85, 64)  # the shorter side at processor_res, the aspect kept
    assert np.array_equal(pixels(made), pixels(detect(photo, "depth_midas", 64, estimators=local)))
    unit = {"module": "depth_midas", "model": "tiny-canny", "image": b64(photo), "processor_res": 64}
    guided, raw = (txt2img(ingress, alwayson_scripts=controlnet(u)) for u in (unit, {**unit, "module": "none"}))
    assert np.abs(pixels(decode_b64(guided["images"][0])) - pixels(decode_b64(raw["images"][0]))).mean() > 0.5
    assert "Module: depth_midas, Model: tiny-canny" in decode_b64(guided["images"][0]).info["parameters"]


def test_lineart_detect(ingress, tiny, astronaut):
    """/controlnet/detect makes a line-art map on the base replica by the extension's names: its key ``lineart``
    (lineart_realistic, by the configured network) and lineart_standard's long label (model-free)."""
    import torch

    from deployments.support import lineart
    from deployments.support.control import detect
    from graphs.api.controlnet import DetectRequest

    photo = astronaut.resize((128, 96))
    local = lineart.load({"lineart_realistic": str(tiny / "lineart" / "sk_model.safetensors")}, torch.device("cpu"))
    for name, module in (("lineart", "lineart_realistic"),
                         ("lineart_standard (from white bg & black line)", "lineart_standard")):
        detected = ingress.controlnet_detect.remote(DetectRequest(
            controlnet_module=name, controlnet_input_images=[b64(photo)], controlnet_processor_res=64)).result()
        made = decode_b64(detected["images"][0])
        assert made.size == (85, 64)
        assert np.array_equal(pixels(made), pixels(detect(photo, module, 64, estimators=local)))


def test_softedge_detect(ingress, tiny, astronaut):
    """/controlnet/detect makes the soft-edge and scribble maps on the base replica by the extension's names (its
    keys, a label, scribble_hed's first key), each as the module makes it of the image at processor_res."""
    import torch

    from deployments.support import softedge
    from deployments.support.control import detect
    from graphs.api.controlnet import DetectRequest

    photo = astronaut.resize((128, 96))
    local = softedge.load({m: str(tiny / "softedge") for m in softedge.SOFTEDGE_MODULES}, torch.device("cpu"))
    for name, module in (("hed", "softedge_hed"), ("pidinet_safe", "softedge_pidisafe"),
                         ("softedge_hedsafe", "softedge_hedsafe"), ("fake_scribble", "scribble_hed"),
                         ("pidinet_scribble", "scribble_pidinet")):
        detected = ingress.controlnet_detect.remote(DetectRequest(
            controlnet_module=name, controlnet_input_images=[b64(photo)], controlnet_processor_res=64)).result()
        made = decode_b64(detected["images"][0])
        assert made.size == (85, 64)
        assert np.array_equal(pixels(made), pixels(detect(photo, module, 64, estimators=local))), name


def test_openpose_detect(ingress, astronaut):
    """/controlnet/detect makes an openpose (and an openpose_full) map on the base replica at processor_res, the
    aspect kept (the tiny body network's random weights find no one: black); the extension's DWPose module is refused
    naming the field."""
    from graphs.api.controlnet import DetectRequest

    for module in ("openpose", "openpose_full"):
        detected = ingress.controlnet_detect.remote(DetectRequest(
            controlnet_module=module, controlnet_input_images=[b64(astronaut.resize((128, 96)))],
            controlnet_processor_res=64)).result()
        made = decode_b64(detected["images"][0])
        assert made.size == (85, 64) and made.mode == "RGB" and not pixels(made).any()
    error = refused(lambda: ingress.controlnet_detect.remote(DetectRequest(
        controlnet_module="dw_openpose_full", controlnet_input_images=[b64(astronaut)])).result())
    assert (error.code, status_of(error), error.details["field"]) == ("UNKNOWN_MODEL", 422, "controlnet_module")
    assert "DWPose and animal pose models are not served here" in error.message


def test_mlsd_detect(ingress, tiny, astronaut):
    """/controlnet/detect makes an mlsd map on the base replica at processor_res with the sliders sent, their defaults
    where they are unset (-1) or outside the extension's bounds: the same map the configured network makes here."""
    import torch

    from deployments.support import mlsd
    from deployments.support.control import detect
    from graphs.api.controlnet import DetectRequest

    photo = astronaut.resize((128, 96))
    local = mlsd.load({"mlsd": str(tiny / "mlsd" / mlsd.WEIGHTS)}, torch.device("cpu"))
    lit = []
    # The random network's segments are 0.19 to 0.26 map pixels long: the distance threshold keeps fewer of them.
    for sent, used in (((-1, -1), (0.1, 0.1)), ((0.05, 0.22), (0.05, 0.22)), ((3.0, 0.24), (0.1, 0.24))):
        detected = ingress.controlnet_detect.remote(DetectRequest(
            controlnet_module="mlsd", controlnet_input_images=[b64(photo)], controlnet_processor_res=64,
            controlnet_threshold_a=sent[0], controlnet_threshold_b=sent[1])).result()
        made = decode_b64(detected["images"][0])
        assert made.size == (85, 64) and made.mode == "RGB"
        assert np.array_equal(pixels(made), pixels(detect(photo, "mlsd", 64, *used, estimators=local))), sent
        lit.append(int((pixels(made)[..., 0] == 255).sum()))
    assert lit[0] > lit[1] > lit[2] > 0, lit


def test_model_free_detect(ingress, astronaut):
    """/controlnet/detect makes the model-free maps on the base replica by the extension's names, each slider read
    as the extension's unit reads it: shuffle at its fixed 512 and the same each call (seed 0: the request has
    none), the colour grid by its key, a sigma out of bounds at its default, a down-sampling rate at the image's
    size."""
    from deployments.support.control import detect
    from graphs.api.controlnet import DetectRequest

    photo = astronaut.resize((128, 96))

    def detected(module: str, **sliders) -> Image.Image:
        body = ingress.controlnet_detect.remote(DetectRequest(
            controlnet_module=module, controlnet_input_images=[b64(photo)], **sliders)).result()
        return decode_b64(body["images"][0])

    shuffled = detected("shuffle", controlnet_processor_res=64)
    assert shuffled.size == (683, 512) and np.array_equal(pixels(shuffled), pixels(detected("shuffle")))
    assert np.array_equal(pixels(shuffled), pixels(detect(photo, "shuffle", 512, seed=0)))
    assert np.array_equal(pixels(detected("color", controlnet_processor_res=128)),
                          pixels(detect(photo, "t2ia_color_grid", 128)))
    assert np.array_equal(pixels(detected("blur_gaussian", controlnet_processor_res=64, controlnet_threshold_a=100)),
                          pixels(detect(photo, "blur_gaussian", 64, 9.0)))
    assert detected("tile_resample", controlnet_processor_res=64, controlnet_threshold_a=4).size == (32, 24)
