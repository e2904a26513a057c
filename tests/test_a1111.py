"""Automatic1111's request surface without Ray: its request models as A1111 clients fill them, the infotext written
and read back, the size rules of the hires fix, img2img and the extras, and how the routes map a request onto the
plan's batches and the result cache."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image
from pydantic import ValidationError

from deployments.support.errors import InvalidInput
from deployments.support.imaging import cover_box, frame
from graphs.api.a1111_infotext import infotext, parse
from graphs.api.a1111_models import ExtrasBatchRequest, Img2ImgRequest, Txt2ImgRequest
from graphs.api.a1111_sizes import binary_mask, crop_box, hires_size, upscale_to

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
    # A1111's resize_image(2) arithmetic: 300x201 into 512x512 is 512 x (201 * 512 // 300) = 343 rows, placed at
    # 512 // 2 - 343 // 2 = 85 (a centring of the difference would put it at 84).
    marked = Image.new("RGB", (300, 201), (0, 0, 0))
    marked.paste((255, 255, 255), (0, 0, 300, 1))  # its top row white
    placed = np.asarray(frame(marked, 512, 512, "fill"))[:, 256, 0]
    assert placed[:85].min() > 200 and placed[85] > 200 and placed[87:85 + 340].max() < 60


def test_upscale_to_a_size_covers_it_then_crops_or_not():
    assert upscale_to((128, 64), 128, 128, crop=True) == (None, 128, 128, (32, 0, 96, 64))
    assert upscale_to((128, 64), 128, 128, crop=False) == (2.0, None, None, None)  # 256x128, uncropped


# --- the infotext ------------------------------------------------------------------------------------------------

def test_the_infotext_written_here_reads_back_as_a1111_parses_it():
    request = Txt2ImgRequest(prompt="a fox,\nin the snow <lora:tiny-style:0.7>", negative_prompt="blurry", steps=3,
                             width=128, height=96, cfg_scale=8, scheduler="karras")
    text = infotext(request, 1001, "tiny-sdxl-base", "DPM++ 2M",
                    {"Hires resize": "256x192", "Refiner": "a, b: c", "Face restoration": None}, "Karras")
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


# --- the answers' file format (samples_format) ---------------------------------------------------------------------

TEXT = "a fox, ☃\nNegative prompt: blurry\nSteps: 2, Sampler: Euler, Seed: 5, Size: 64x64"


def test_a_user_comment_is_written_and_read_as_piexif_does():
    """piexif's ``UserComment.dump(text, encoding="unicode")``, A1111's writer: the 8-byte character code, then
    UTF-16 big-endian; its ``load`` reads that, and ASCII; an unknown code falls back to UTF-8 as A1111 does."""
    from deployments.support.imaging import read_user_comment, user_comment

    assert user_comment("a☃") == b"UNICODE\0" + b"\x00a\x26\x03"
    assert read_user_comment(user_comment(TEXT)) == TEXT
    assert read_user_comment(b"UNICODE\0" + b"\xff\xfe" + "a☃".encode("utf-16-le")) == "a☃"  # a BOM says which
    assert read_user_comment(b"ASCII\0\0\0Steps: 2") == "Steps: 2"
    assert read_user_comment("Steps: 2") == "Steps: 2"  # typed ASCII by its writer: Pillow decodes it
    assert read_user_comment(b"Steps: 2") == "Steps: 2"


@pytest.mark.parametrize("fmt", ["jpeg", "webp"])
def test_a_jpeg_or_webp_carries_the_infotext_as_a1111s_reader_finds_it(fmt):
    import io

    from deployments.support.imaging import encode
    from graphs.api.a1111_infotext import read

    image = Image.new("RGB", (64, 64), (30, 120, 200))
    data = encode(image, fmt, 80, {"parameters": TEXT})
    opened = Image.open(io.BytesIO(data))
    assert opened.format == fmt.upper() and opened.size == (64, 64)
    assert read(opened) == (TEXT, {"exif comment": TEXT})
    assert read(Image.open(io.BytesIO(encode(image, fmt, 80)))) == ("", {})  # no infotext, no EXIF


def test_a_png_keeps_its_text_chunks_and_an_exif_comment_wins_as_in_a1111():
    import io

    from deployments.support.imaging import comment_exif, encode
    from graphs.api.a1111_infotext import read

    png = Image.open(io.BytesIO(encode(Image.new("RGB", (8, 8)), "png", pnginfo={"parameters": TEXT, "x": "y"})))
    assert read(png) == (TEXT, {"x": "y"})
    both = io.BytesIO()
    Image.new("RGB", (8, 8)).save(both, "PNG", pnginfo=_text_chunk("parameters", "old"), exif=comment_exif(TEXT))
    assert read(Image.open(both)) == (TEXT, {"exif comment": TEXT})


def _text_chunk(key: str, value: str):
    from PIL import PngImagePlugin

    info = PngImagePlugin.PngInfo()
    info.add_text(key, value)
    return info


def test_jpeg_quality_and_webp_lossless_shape_the_file():
    import io

    from deployments.support.imaging import encode

    noise = Image.fromarray(np.random.default_rng(0).integers(0, 255, (96, 96, 3), dtype=np.uint8))
    assert len(encode(noise, "jpeg", 30)) < len(encode(noise, "jpeg", 95))
    lossless = Image.open(io.BytesIO(encode(noise, "webp", 80, lossless=True)))
    assert np.array_equal(np.asarray(lossless.convert("RGB")), np.asarray(noise))
    lossy = Image.open(io.BytesIO(encode(noise, "webp", 80)))
    assert not np.array_equal(np.asarray(lossy.convert("RGB")), np.asarray(noise))


def test_an_infotext_too_long_for_a_jpegs_exif_is_left_out_with_a_warning():
    """A JPEG holds its EXIF in one 64 kB segment; in UTF-16 a 10,000-character prompt and negative prompt with
    their hires twins outgrow it. The file goes out without it (A1111 fails the request) and the answer says so."""
    import io

    from deployments.support.generation import Encoding, StageResult
    from graphs.api.a1111_infotext import read

    long = "a" * 40_000
    image = Image.new("RGB", (64, 64))
    jpeg = StageResult(images=[image]).encode(Encoding(format="jpeg", parameters=[long]))
    assert read(Image.open(io.BytesIO(jpeg.encoded[0]))) == ("", {})
    assert jpeg.warnings == ["the infotext is too long for a JPEG's EXIF (64 kB): the file carries none (a PNG or "
                             "WebP would)"]
    webp = StageResult(images=[image]).encode(Encoding(format="webp", parameters=[long]))
    assert read(Image.open(io.BytesIO(webp.encoded[0])))[0] == long and webp.warnings == []


def test_the_saved_options_read_as_a1111s_with_its_defaults():
    from graphs.api.a1111_options import encoding, typed

    running = {"s_churn": 0.0, "s_tmin": 0.0, "s_tmax": 0.0, "s_noise": 1.0, "pad_cond_uncond": False,
               "pad_cond_uncond_v0": False}  # read while a request runs (Txt2ImgRequest.under)
    assert typed({}) == {"samples_format": "png", "jpeg_quality": 80, "webp_lossless": False, "return_grid": True,
                         "initial_noise_multiplier": 1.0, **running}
    assert typed({"samples_format": "jpg", "jpeg_quality": "55", "webp_lossless": "true", "return_grid": "false"}) == {
        "samples_format": "jpg", "jpeg_quality": 55, "webp_lossless": True, "return_grid": False,
        "initial_noise_multiplier": 1.0, **running}
    assert typed({"samples_format": "tiff", "jpeg_quality": "0"}) == typed({})  # a store edited by hand
    assert typed({"s_churn": "12.5", "s_noise": "0.9", "pad_cond_uncond_v0": "true"}) == {
        **typed({}), "s_churn": 12.5, "s_noise": 0.9, "pad_cond_uncond_v0": True}
    assert typed({"s_churn": "101", "s_tmax": "nan", "s_noise": "-1", "s_tmin": "x"}) == typed({})  # by hand
    assert encoding({"samples_format": "jpg"}).format == "jpeg" and encoding({}).quality == 80
    webp = encoding({"samples_format": "webp", "webp_lossless": "true", "jpeg_quality": "70"})
    assert (webp.format, webp.quality, webp.lossless) == ("webp", 70, True)


# --- the routes' mapping onto the plan, without Ray ----------------------------------------------------------------

class Service:
    """An A1111Routes object as the Ingress replica holds one, on a real SQLite job store and result cache, its
    checkpoint fixed and ``plans.a1111_batch`` replaced by a stand-in that keeps what each batch was asked for and
    answers with one 8x8 file per seed."""

    def __init__(self, tmp_path, monkeypatch) -> None:
        from types import SimpleNamespace

        from deployments.support import masking
        from deployments.support.generation import StageResult
        from deployments.support.settings import Settings
        from graphs import plans
        from graphs.api.a1111 import A1111Routes
        from graphs.api.a1111_styles import PromptStyles
        from graphs.jobs.cache import LocalEntries, RequestCache, ResultCache
        from graphs.jobs.sqlite_store import SQLiteJobStore

        self.batches: list[dict] = []

        async def a1111_batch(handles, request, request_id, **options) -> StageResult:
            self.batches.append({"request": request, **options})
            seeds = list(range(request.seed, request.seed + request.batch_size))
            return StageResult(seeds=seeds, encoded=[b"png %d" % s for s in seeds], sizes=[(8, 8)] * len(seeds))

        async def fingerprint(*_args) -> dict:
            return {"weights": "1"}

        async def describe() -> dict:
            return {"restorer": "GFPGAN"}

        monkeypatch.setattr(plans, "a1111_batch", a1111_batch)
        def blurred_box(mask, across, down) -> SimpleNamespace:  # the base replica's, answered at once
            return SimpleNamespace(result=lambda: masking.blurred_box(mask, across, down))

        stage = SimpleNamespace(fingerprint=SimpleNamespace(remote=fingerprint),
                                blurred_box=SimpleNamespace(remote=blurred_box))
        faces = SimpleNamespace(fingerprint=stage.fingerprint, describe=SimpleNamespace(remote=describe))
        self.routes = A1111Routes()
        self.routes.handles = SimpleNamespace(base=stage, refiner=None, upscaler=stage, faces=faces, safety=None,
                                              board=None)
        self.routes.jobs = SQLiteJobStore(tmp_path / "jobs.sqlite3")
        self.routes.config = SimpleNamespace(base=SimpleNamespace(default_sampler="Euler a", max_pixels=2048 * 2048,
                                                                  vae=None, controlnets={}, preprocessors={}),
                                              refiner=None)
        self.routes.styles = PromptStyles(None)
        weights = SimpleNamespace(checkpoint=SimpleNamespace(source="tiny-sdxl-base"))
        self.routes.catalog = SimpleNamespace(entry=lambda _name: weights, sha256=lambda _source: "ab12" * 16)
        self.routes.cache = RequestCache(ResultCache(LocalEntries(tmp_path / "cache"), 10**6, 3600),
                                         self.routes.handles, Settings())

        async def checkpoint(_request) -> str:
            return "tiny-sdxl-base"

        self.routes._checkpoint = checkpoint

    def txt2img(self, **fields) -> dict:
        """The route's answer, ``info`` parsed."""
        import asyncio
        import json

        from starlette.requests import Request

        http = Request({"type": "http", "method": "POST", "path": "/", "headers": [], "client": ("unit", 1)})
        request = Txt2ImgRequest(**{"prompt": "a fox", "steps": 2, **fields})
        response = asyncio.run(self.routes.txt2img(request, http))
        body = json.loads(response.body)
        return {**body, "info": json.loads(body["info"])}

    def img2img(self, **fields) -> dict:
        """The img2img route's answer for a 64x64 init image, ``info`` parsed."""
        import asyncio
        import json

        from starlette.requests import Request

        from tests.helpers import b64

        http = Request({"type": "http", "method": "POST", "path": "/", "headers": [], "client": ("unit", 1)})
        request = Img2ImgRequest(**{"prompt": "a fox", "steps": 2, "width": 64, "height": 64,
                                    "init_images": [b64(Image.new("RGB", (64, 64), (90, 120, 30)))], **fields})
        response = asyncio.run(self.routes.img2img(request, http))
        body = json.loads(response.body)
        return {**body, "info": json.loads(body["info"])}


@pytest.fixture
def service(tmp_path, monkeypatch) -> Service:
    return Service(tmp_path, monkeypatch)


def test_override_settings_that_would_change_the_image_are_named_unless_at_their_default(service):
    quiet = {"sd_model_checkpoint": "tiny-sdxl-base", "samples_format": "png", "eta_noise_seed_delta": 0,
             "sd_vae": "Automatic", "randn_source": "CPU", "CLIP_stop_at_last_layers": 2, "tags": ["a", "b"]}
    assert service.txt2img(override_settings=quiet)["info"]["warnings"] == []
    loud = {"eta_noise_seed_delta": 31337, "randn_source": "GPU", "sd_vae": "sdxl_vae.safetensors",
            "sdxl_clip_l_skip": True, "CLIP_stop_at_last_layers": 2}
    assert service.txt2img(override_settings=loud)["info"]["warnings"] == [
        f"override_settings.{key} is not applied here: the image was made without it"
        for key in ("eta_noise_seed_delta", "sd_vae", "sdxl_clip_l_skip", "randn_source",
                    "CLIP_stop_at_last_layers")]
    request = Txt2ImgRequest(override_settings={"sd_vae": "sdxl_vae.safetensors"})
    assert request.settings_unapplied({"sdxl_vae.safetensors"}) == []  # the replacement VAE that runs


def test_cfg_scale_is_the_guidance_scale_of_txt2img_and_img2img(service):
    txt2img = Txt2ImgRequest(prompt="a fox", cfg_scale=3.5)
    assert service.routes._generation(txt2img, 7, service.routes._choice(txt2img)).guidance_scale == 3.5
    img2img = Img2ImgRequest(init_images=["x"], cfg_scale=3.5)
    edit = service.routes._generation(img2img, 7, service.routes._choice(img2img),
                                      init_image=Image.new("RGB", (64, 64)), strength=0.5)
    assert edit.guidance_scale == 3.5


def test_the_seed_options_map_to_the_generation_request_where_they_apply(service):
    fields = dict(subseed_strength=0.4, seed_resize_from_w=96, seed_resize_from_h=-1, tiling=True)
    txt2img = Txt2ImgRequest(prompt="a fox", **fields)
    made = service.routes._generation(txt2img, 7, service.routes._choice(txt2img), 9)
    assert (made.seed, made.subseed, made.subseed_strength) == (7, 9, 0.4)
    assert (made.seed_resize_from_w, made.seed_resize_from_h, made.tiling) == (96, 0, True)
    img2img = Img2ImgRequest(init_images=["x"], **fields)
    edit = service.routes._generation(img2img, 7, service.routes._choice(img2img), 9,
                                      init_image=Image.new("RGB", (64, 64)), strength=0.5)
    assert (edit.subseed, edit.subseed_strength, edit.seed_resize_from_w, edit.tiling) == (9, 0.4, 96, True)


def test_saved_churn_options_run_as_a1111_reads_them_under_the_requests_own(service):
    """A1111 1.10's Euler reads its churn options while a request runs (its override_settings over the saved ones):
    one other than its default wins over the request's field; at its default the field runs, else nothing. The
    saved value is part of the cache key (a new option is a new image), and the infotext names what ran."""
    from deployments.support.generation import Churn

    euler = {"sampler_name": "Euler", "seed": 5}

    def ran(**fields) -> Churn | None:
        body = service.txt2img(**euler, **fields)
        assert body["info"]["cached"] is False
        return service.batches[-1]["request"].churn

    assert ran() is None
    service.routes.jobs.set_option("s_churn", "10")
    service.routes.jobs.set_option("s_noise", "0.5")
    assert ran() == Churn(s_churn=10.0, s_noise=0.5)  # the same request as before: not the cached answer
    written = parse(service.txt2img(**euler)["info"]["infotexts"][0])
    assert (written["Sigma churn"], written["Sigma noise"]) == ("10.0", "0.5") and "Sigma tmin" not in written
    assert ran(s_churn=3) == Churn(s_churn=10.0, s_noise=0.5)  # the option first, as A1111's sampler reads it
    assert ran(s_churn=3, override_settings={"s_churn": 0}) == Churn(s_churn=3.0, s_noise=0.5)  # default: the field
    assert ran(override_settings={"s_churn": 0}) is None
    assert ran(override_settings={"s_churn": 20, "s_noise": 1.0}) == Churn(s_churn=20.0)
    service.routes.jobs.set_option("s_churn", "0")
    assert ran(s_churn=3) == Churn(s_churn=3.0, s_noise=0.5)


def test_saved_and_overridden_padding_options_reach_the_generation_request(service):
    """pad_cond_uncond and pad_cond_uncond_v0 (v0 winning), read as A1111's CFG denoiser reads them while the request
    runs; neither: a prompt and a negative prompt of different lengths run apart, A1111's default."""
    def padding(**fields) -> str:
        service.txt2img(seed=5, **fields)
        return service.batches[-1]["request"].cond_padding

    assert padding() == "off"
    assert padding(override_settings={"pad_cond_uncond": True}) == "empty"
    assert padding(override_settings={"pad_cond_uncond": True, "pad_cond_uncond_v0": True}) == "v0"
    service.routes.jobs.set_option("pad_cond_uncond", "true")
    assert padding() == "empty"
    assert padding(override_settings={"pad_cond_uncond": False}) == "off"
    assert padding(override_settings={"pad_cond_uncond_v0": True}) == "v0"
    with pytest.raises(InvalidInput) as refused:
        service.txt2img(override_settings={"pad_cond_uncond": "yes"})
    assert refused.value.field == "override_settings.pad_cond_uncond"


def test_a_hires_sampler_that_takes_no_churn_here_says_so_as_the_first_pass_does(service):
    """Euler churns in the first pass; a second pass on Heun or DPM2 (hr_sampler_name) runs without it, and the
    warnings say so as they do for a first pass on them; on Euler, or on a sampler A1111 gives none, nothing."""
    hires = {"sampler_name": "Euler", "seed": 5, "enable_hr": True, "hr_scale": 1.5, "s_churn": 10}
    assert service.txt2img(**hires, hr_sampler_name="Heun")["info"]["warnings"] == [
        "s_churn is not applied to Heun here: the hires fix's second pass was made without it"]
    assert service.txt2img(**hires, hr_sampler_name="DPM2", s_noise=0.5)["info"]["warnings"] == [
        "s_churn is not applied to DPM2 here: the hires fix's second pass was made without it",
        "s_noise is not applied to DPM2 here: the hires fix's second pass was made without it"]
    assert service.txt2img(**hires, hr_sampler_name="Euler")["info"]["warnings"] == []
    assert service.txt2img(**hires, hr_sampler_name="DDIM")["info"]["warnings"] == []
    assert service.txt2img(**{**hires, "sampler_name": "Heun"}, hr_sampler_name="Heun")["info"]["warnings"] == [
        "s_churn is not applied to Heun here: the image was made without it"]  # once: the first pass's
    service.routes.jobs.set_option("s_churn", "10")  # a saved option too
    assert service.txt2img(**{**hires, "s_churn": None}, hr_sampler_name="Heun")["info"]["warnings"] == [
        "s_churn is not applied to Heun here: the hires fix's second pass was made without it"]


def test_the_img2img_noise_multiplier_option_is_read_from_the_store_and_bounded():
    from graphs.api.a1111_options import typed

    assert typed({})["initial_noise_multiplier"] == 1.0
    assert typed({"initial_noise_multiplier": "0.8"})["initial_noise_multiplier"] == 0.8
    for bad in ("-0.5", "2.5", "nan", "x"):  # a store written by hand: the default
        assert typed({"initial_noise_multiplier": bad})["initial_noise_multiplier"] == 1.0
    with pytest.raises(ValidationError, match="initial_noise_multiplier"):
        Img2ImgRequest(init_images=["x"], initial_noise_multiplier=2.5)


@pytest.mark.parametrize(("fill", "content"), [(None, "fill"), (0, "fill"), (1, "original"), (2, "latent noise"),
                                              (3, "latent nothing")])
def test_inpainting_fill_is_the_masked_content_and_the_infotext_names_it_as_a1111_does(service, fill, content):
    """A1111's API default is 0 (fill); its infotext names the content but for 1 (original, the reader's default),
    and an inpainting's mask blur where it blurs."""
    from tests.helpers import b64

    mask = b64(Image.new("L", (64, 64), 255))
    sent = {} if fill is None else {"inpainting_fill": fill}
    body = service.img2img(mask=mask, mask_blur=4, **sent)
    assert service.batches[-1]["request"].masked_content == content
    written = body["info"]["infotexts"][0]
    assert parse(written)["Masked content"] == content and ("Masked content" in written) is (content != "original")
    assert parse(written)["Mask blur"] == "4"
    unblurred = service.img2img(mask=mask, mask_blur=0, **sent)["info"]["infotexts"][0]
    assert "Mask blur" not in unblurred  # A1111 writes it where it blurs
    unmasked = service.img2img(**sent)["info"]["infotexts"][0]  # image-to-image: no masked content to name
    assert "Masked content" not in unmasked and "Mask blur" not in unmasked


@pytest.mark.parametrize("fill", [-1, 4, 9, "fill", [1]])
def test_inpainting_fill_outside_0_to_3_is_a_422_naming_it(fill):
    import asyncio
    import json

    from fastapi.exceptions import RequestValidationError

    from graphs.api.errors import validation_error

    with pytest.raises(ValidationError) as e:
        Img2ImgRequest(init_images=["x"], mask="x", inpainting_fill=fill)
    # As FastAPI hands the body's errors to the edge, under "body".
    refused = RequestValidationError([{**error, "loc": ("body", *error["loc"])} for error in e.value.errors()])
    answer = asyncio.run(validation_error(None, refused))  # type: ignore[arg-type]
    assert answer.status_code == 422
    assert json.loads(answer.body)["details"]["field"] == "inpainting_fill"


@pytest.mark.parametrize(("fields", "field"), [
    ({"prompt": "[" * 1000 + "a" + "|b]" * 1000}, "prompt"),
    ({"prompt": "a <lora:x:1> " + "BREAK " * 1600}, "prompt"),
    ({"negative_prompt": "(blurry:" + "1" + "0" * 39 + ")"}, "negative_prompt"),
])
def test_an_unreadable_prompt_is_refused_before_any_batch(service, fields, field):
    from deployments.support.errors import InvalidInput

    with pytest.raises(InvalidInput) as refused:
        service.txt2img(**fields)
    assert refused.value.field == field
    assert service.batches == []
    assert service.txt2img(prompt="(masterpiece: 1.2) <lora:x:1> BREAK a fox")["images"]


def test_the_hires_second_pass_strength_is_the_denoising_strength(service):
    import asyncio

    def hires(**fields):
        request = Txt2ImgRequest(enable_hr=True, width=64, height=64, **fields)
        return asyncio.run(service.routes._hires(request, service.routes._choice(request)))

    assert hires(denoising_strength=0.3).strength == 0.3
    # A1111 sends 0 for "no denoising": the second pass still runs, at the least strength the base takes.
    assert hires(denoising_strength=0).strength == 0.01


@pytest.mark.parametrize("restore_faces", [True, False])
def test_restore_faces_asks_the_plan_for_face_restoration(service, restore_faces):
    body = service.txt2img(restore_faces=restore_faces, seed=5)
    assert [batch["restore_faces"] for batch in service.batches] == [restore_faces]
    named = "Face restoration: GFPGAN" in body["info"]["infotexts"][0]  # the deployed restorer's name
    assert named is restore_faces


def test_n_iter_batches_take_consecutive_seeds_across_batches(service):
    """As in A1111: batch 2 starts after batch 1's last seed, so four images have four different seeds."""
    body = service.txt2img(seed=100, batch_size=2, n_iter=2)
    assert [batch["request"].seed for batch in service.batches] == [100, 102]
    assert body["info"]["all_seeds"] == [100, 101, 102, 103] and len(body["images"]) == 4


@pytest.mark.parametrize("stopped", [None, "interrupted", "skipped"])
def test_only_a_whole_answer_is_cached(service, monkeypatch, stopped):
    """A batch stopped by /interrupt or /skip answers with its images as they stood: the same request again must
    run in full, not be answered with those from the cache."""
    from graphs.api.a1111 import A1111Routes

    generate = A1111Routes._generate

    async def stopping(self, *args, **kwargs):
        files, info = await generate(self, *args, **kwargs)
        return files, {**info, stopped: True} if stopped else info

    monkeypatch.setattr(A1111Routes, "_generate", stopping)
    first = service.txt2img(seed=5)
    again = service.txt2img(seed=5)
    assert first["info"]["cached"] is False
    assert again["info"]["cached"] is (stopped is None)
    assert len(service.batches) == (1 if stopped is None else 2)


def test_the_saved_format_reaches_the_last_stage_and_the_cache_tells_formats_apart(service):
    """The files are encoded by the plan's last stage as ``samples_format`` says when the request starts; a
    fixed-seed request cached as a PNG is not answered with that PNG once JPEG is the format, nor the reverse."""
    service.txt2img(seed=5)
    assert service.batches[-1]["encode"].format == "png"
    service.routes.jobs.set_option("samples_format", "jpg")
    service.routes.jobs.set_option("jpeg_quality", "60")
    jpeg = service.txt2img(seed=5)
    how = service.batches[-1]["encode"]
    assert (len(service.batches), how.format, how.quality) == (2, "jpeg", 60) and jpeg["info"]["cached"] is False
    assert service.txt2img(seed=5)["info"]["cached"] is True and len(service.batches) == 2
    service.routes.jobs.set_option("jpeg_quality", "61")  # another quality is another file
    assert service.txt2img(seed=5)["info"]["cached"] is False and len(service.batches) == 3
    service.routes.jobs.set_option("samples_format", "png")
    assert service.txt2img(seed=5)["info"]["cached"] is True and len(service.batches) == 3  # the first PNG's,
    # whatever jpeg_quality says


@pytest.mark.parametrize("interrupt", [False, True])
def test_a_stopped_batch_keeps_its_images_then_a_skip_runs_on_and_an_interrupt_ends(service, monkeypatch,
                                                                                      interrupt):
    """The stages answer a stop with the images as they stood (``stopped_at``); the route keeps them, then runs
    the next ``n_iter`` batch after /skip, and none after /interrupt."""
    from starlette.requests import Request

    from graphs import plans

    batch = plans.a1111_batch  # the Service's stand-in

    async def stopping_the_first(handles, request, request_id, **options):
        result = await batch(handles, request, request_id, **options)
        if len(service.batches) == 1:
            if interrupt:
                caller = Request({"type": "http", "method": "POST", "path": "/", "headers": [], "client": ("unit", 1)})
                await service.routes.interrupt(caller)
            result.info["stopped_at"] = [1, 2]
        return result

    monkeypatch.setattr(plans, "a1111_batch", stopping_the_first)
    answer = service.txt2img(seed=7, n_iter=2)
    info = answer["info"]
    if interrupt:
        assert info["interrupted"] is True and "skipped" not in info and len(service.batches) == 1
        assert info["all_seeds"] == [7] and len(answer["images"]) == 1
    else:
        assert info["skipped"] is True and "interrupted" not in info and len(service.batches) == 2
        assert info["all_seeds"] == [7, 8] and len(answer["images"]) == 2


@pytest.mark.parametrize("route", ["interrupt", "skip"])
def test_interrupt_and_skip_ask_the_board_to_stop_not_to_cancel(service, monkeypatch, route):
    """A cancel would throw the running batch's images away; a stop keeps them as they stand."""
    from starlette.requests import Request

    from graphs import plans
    from graphs.api.a1111 import A1111Routes

    asked: list[str] = []

    async def board(_self, method: str, _request_id: str) -> None:
        asked.append(method)

    monkeypatch.setattr(A1111Routes, "_board", board)
    batch = plans.a1111_batch

    async def while_running(handles, request, request_id, **options):
        if not asked:
            caller = Request({"type": "http", "method": "POST", "path": "/", "headers": [], "client": ("unit", 1)})
            await getattr(service.routes, route)(caller)
        return await batch(handles, request, request_id, **options)

    monkeypatch.setattr(plans, "a1111_batch", while_running)
    service.txt2img(seed=7)
    assert asked == ["stop"]


def test_interrogate_without_a_captioner_refuses_clip_naming_model():
    """A config with no captioner deploys none: every interrogator is then a 422 naming model, "clip" included."""
    import asyncio
    from types import SimpleNamespace

    from deployments.support.errors import UnknownModel
    from graphs.api.a1111_info import A1111InfoRoutes
    from graphs.api.a1111_models import InterrogateRequest

    routes = SimpleNamespace(captioner=None)
    with pytest.raises(UnknownModel, match="no captioner is deployed") as caught:
        asyncio.run(A1111InfoRoutes.interrogate(routes, InterrogateRequest(image="x")))  # type: ignore[arg-type]
    assert caught.value.field == "model"


def test_a1111s_grid_layout_and_cells():
    from graphs.api.a1111_grid import compose, grid_size, layout

    # A1111 1.10's image_grid at its defaults: round(sqrt(n)) rows, as many columns as it takes.
    assert [layout(n) for n in (1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 16)] == [
        (1, 1), (1, 2), (2, 2), (2, 2), (2, 3), (2, 3), (3, 3), (3, 3), (3, 3), (3, 4), (4, 4)]
    red, blue = Image.new("RGB", (4, 2), (255, 0, 0)), Image.new("RGB", (2, 4), (0, 0, 255))
    grid = compose([red, blue])
    assert grid.size == grid_size([red.size, blue.size]) == (8, 4)  # cells as large as the largest image
    cells = np.asarray(grid)
    assert (cells[1:3, 0:4] == (255, 0, 0)).all() and (cells[0, 0:4] == 255).all()  # centred, white around
    assert (cells[:, 5:7] == (0, 0, 255)).all() and (cells[:, 4] == 255).all()


def test_a_transparent_mask_is_read_by_its_alpha_as_a1111_reads_it():
    """A page sends its brush strokes as an RGBA image, opaque where painted: A1111's create_binary_mask takes such
    a mask's alpha, rounded at 128; an opaque RGBA or a greyscale mask is read by its luminance."""
    strokes = np.zeros((4, 4, 4), np.uint8)
    strokes[..., :3] = 255  # white everywhere: its luminance would repaint everything
    strokes[0, :, 3] = [0, 128, 129, 255]
    read = np.asarray(binary_mask(Image.fromarray(strokes, "RGBA")))
    assert read.dtype == np.uint8 and read[0].tolist() == [0, 0, 255, 255] and not read[1:].any()
    opaque = strokes.copy()
    opaque[..., 3], opaque[0, 0, :3] = 255, 0
    assert np.asarray(binary_mask(Image.fromarray(opaque, "RGBA")))[0, :2].tolist() == [0, 255]
    grey = Image.fromarray(np.array([[0, 100], [200, 255]], np.uint8), "L")
    assert np.array_equal(np.asarray(binary_mask(grey)), np.asarray(grey))


def test_the_blurs_that_ran_are_part_of_the_cache_key(service):
    """mask_blur sent at its default with mask_blur_x, and mask_blur_x alone, are the same fields (the default is
    the default) and blur differently (4 and 4; 8 and 4): two cache entries, not one answer for both."""
    from tests.helpers import b64

    edit = {"mask": b64(Image.new("L", (64, 64), 255)), "seed": 5, "inpaint_full_res": False}
    service.img2img(**edit, mask_blur=4, mask_blur_x=8)
    assert service.img2img(**edit, mask_blur=4, mask_blur_x=8)["info"]["cached"] is True
    alone = service.img2img(**edit, mask_blur_x=8)
    assert alone["info"]["cached"] is False and len(service.batches) == 2
    assert (service.batches[-1]["request"].mask_blur, service.batches[-1]["request"].mask_blur_y) == (8, 4)


def test_every_n_iter_batch_shuffles_with_the_first_batchs_seed(service):
    """The extension preprocesses once a request: each n_iter batch's shuffle unit draws the first batch's map
    (``shuffle_seed`` of the request's first seed), where each batch's own first seed would give another map."""
    from deployments.support.control import shuffle_seed
    from tests.helpers import b64

    service.routes.config.base.controlnets = {"tiny-canny": "controlnet"}
    unit = {"model": "tiny-canny", "module": "shuffle", "image": b64(Image.new("RGB", (64, 64), (90, 120, 30)))}
    service.txt2img(seed=10, batch_size=2, n_iter=3, alwayson_scripts={"ControlNet": {"args": [unit]}})
    assert [batch["request"].seed for batch in service.batches] == [10, 12, 14]
    assert [batch["request"].control[0].seed for batch in service.batches] == [shuffle_seed(10)] * 3


@pytest.mark.parametrize(("mode", "fit"), [(0, "stretch"), (1, "crop"), (2, "fill"), (3, "stretch")])
def test_a_whole_pictures_mask_reaches_the_base_as_drawn_with_its_resize_mode(service, mode, fit):
    """A1111 blurs the mask at its uploaded size, then frames it by the resize mode: the base does both, so the
    mask travels as drawn (here 48x32 for a 64x64 picture) with the mode it is framed by."""
    from tests.helpers import b64

    mask = Image.new("L", (48, 32))
    mask.paste(255, (8, 8, 24, 20))
    service.img2img(mask=b64(mask), resize_mode=mode, inpaint_full_res=False)
    sent = service.batches[-1]["request"]
    assert (sent.mask.size, sent.mask_fit, sent.inpaint_area) == ((48, 32), fit, "whole")
    assert np.array_equal(np.asarray(sent.mask), np.asarray(mask))


@pytest.mark.parametrize(("level", "blur", "only_masked"), [(1, 4, False), (255, 4, True), (1, 0, True)])
def test_only_masked_is_decided_on_the_blurred_mask_and_written_as_a1111_writes_it(service, level, blur,
                                                                                     only_masked):
    """A mask whose one drawn pixel vanishes in the blur is image-to-image of the whole, as A1111 and the base fall
    back: its infotext writes the blur (A1111 has by then) and no inpaint area, padding or masked content."""
    from tests.helpers import b64

    mask = Image.new("L", (64, 64))
    mask.putpixel((40, 20), level)
    body = service.img2img(mask=b64(mask), mask_blur=blur, inpaint_full_res_padding=8)
    sent, text = service.batches[-1]["request"], body["info"]["infotexts"][0]
    assert (sent.inpaint_area == "masked", sent.mask is not None) == (only_masked, only_masked)
    assert ("Inpaint area: Only masked" in text, "Masked area padding: 8" in text) == (only_masked, only_masked)
    assert ("Masked content: fill" in text) is only_masked
    assert ("Mask blur: 4" in text) is (blur == 4)
    assert any("blank once blurred" in w for w in body["info"]["warnings"]) is not only_masked
