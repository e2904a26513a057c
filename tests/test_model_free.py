"""The model-free preprocessors (threshold, scribble_xdog, blur_gaussian, tile_resample, recolor_luminance,
recolor_intensity, shuffle, t2ia_color_grid) against the extension's formulas written out independently in float64,
on skimage's astronaut and small drawings; each module's sliders (``control.SLIDERS``) as a unit, the native API and
A1111's units bound and reset them; module_list's details; units through the tiny base."""

from __future__ import annotations

from typing import get_args

import cv2
import numpy as np
import pytest
from PIL import Image
from pydantic import ValidationError

from deployments.support import model_free
from deployments.support.control import (
    PREPROCESSORS,
    SLIDERS,
    ControlUnit,
    Preprocessor,
    detect,
    offered,
    shuffle_seed,
)
from deployments.support.generation import GenerationRequest
from graphs.api import a1111_controlnet
from graphs.api.a1111_models import Txt2ImgRequest
from graphs.api.control_fields import ControlNetUnit, control_units
from tests.helpers import b64, gaussian64, module_list, pixels

SMALL = dict(prompt="a lighthouse", width=64, height=64, steps=2, guidance_scale=5.0, seed=5)


def at_resolution(rgb: np.ndarray, resolution: int) -> np.ndarray:
    """The extension's resize_image_with_pad without its padding: the shorter side at ``resolution`` (each side
    rounded half to even), cubic up, area down."""
    height, width = rgb.shape[:2]
    k = resolution / min(height, width)
    size = (int(np.round(width * k)), int(np.round(height * k)))
    return cv2.resize(rgb, size, interpolation=cv2.INTER_CUBIC if k > 1 else cv2.INTER_AREA)



def xdog_difference(sized: np.ndarray) -> np.ndarray:
    """scribble_xdog's stroke strength: padded to 64s with edge pixels; float blurs at sigma 0.5 and 5 (OpenCV's
    float kernels: 5 and 41 taps); 255 minus the smallest channel of wide - narrow, clipped, truncated to 8 bits,
    taken from 255 (the extension's ``255 - dog``); the padding cropped."""
    height, width = sized.shape[:2]
    x = np.pad(sized, ((0, -height % 64), (0, -width % 64), (0, 0)), mode="edge")
    stored = np.trunc(np.clip(255 - (gaussian64(x, 5.0, 41) - gaussian64(x, 0.5, 5)).min(axis=2), 0, 255))
    return (255 - stored)[:height, :width]


def extension_xdog(sized: np.ndarray, level: float) -> np.ndarray:
    """scribble_xdog's map: the stroke strength doubled modulo 256 (the extension's 8-bit arithmetic), white above
    ``level``."""
    return np.where((2 * xdog_difference(sized)) % 256 > level, 255, 0)


def area(n_src: int, n_dst: int) -> np.ndarray:
    """Area resampling as a matrix: each output pixel the mean of the input span it covers, partial pixels weighed."""
    scale = n_src / n_dst
    starts = np.arange(n_dst)[:, None] * scale
    pixels_ = np.arange(n_src)[None, :]
    return np.clip(np.minimum(starts + scale, pixels_ + 1) - np.maximum(starts, pixels_), 0, None) / scale


def cubic(n_src: int, n_dst: int) -> np.ndarray:
    """OpenCV's cubic resampling as a matrix: Keys' kernel (a = -0.75) at the pixel centres' positions, the edge
    pixels repeated beyond the border."""
    def weight(t):
        t = np.abs(t)
        return np.where(t <= 1, (1.25 * t - 2.25) * t * t + 1, np.where(t < 2, ((-0.75 * t + 3.75) * t - 6) * t + 3, 0))

    out = np.zeros((n_dst, n_src))
    for d in range(n_dst):
        at = (d + 0.5) * n_src / n_dst - 0.5
        left = int(np.floor(at))
        for j in range(-1, 3):
            out[d, min(max(left + j, 0), n_src - 1)] += weight(at - left - j)
    return out


def resampled(rgb: np.ndarray, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
    return np.floor(np.einsum("yh,hwc,xw->yxc", rows, rgb.astype(np.float64), cols, optimize=True) + 0.5)


def lightness(rgb: np.ndarray) -> np.ndarray:
    """CIE L* of the array read as BGR (channel 0 as blue, the extension's call), as OpenCV scales it to 8 bits."""
    linear = rgb / 255.0
    linear = np.where(linear <= 0.04045, linear / 12.92, ((linear + 0.055) / 1.055) ** 2.4)
    y = 0.212671 * linear[..., 2] + 0.715160 * linear[..., 1] + 0.072169 * linear[..., 0]
    return np.floor(np.where(y > 0.008856, 116 * np.cbrt(y) - 16, 903.3 * y) * 2.55 + 0.5)


def gamma(channel: np.ndarray, power: float) -> np.ndarray:
    return np.trunc(np.clip((channel / 255.0) ** power * 255, 0, 255))


def extension_shuffle(rgb: np.ndarray, seed: int) -> np.ndarray:
    """ContentShuffleDetector after np.random.seed(seed): per axis, uniform noise on a 256-pixel grid (two more
    each way), cubic up to the image plus 256 each side, cropped, stretched to 0..1, times the width (x) or height
    (y) less one; the image read bilinearly there as OpenCV's remap reads a float map (1/32 pixel, black outside)."""
    random = np.random.RandomState(seed)
    height, width = rgb.shape[:2]

    def field() -> np.ndarray:
        coarse = random.uniform(0, 1, size=(height // 256 + 2, width // 256 + 2, 1))[..., 0]
        big = cubic(coarse.shape[0], height + 512) @ coarse @ cubic(coarse.shape[1], width + 512).T
        big = big[256:256 + height, 256:256 + width] - big[256:256 + height, 256:256 + width].min()
        return big / big.max()

    x, y = (np.round((field() * (n - 1)).astype(np.float32) * 32) / 32 for n in (width, height))
    x0, y0 = np.floor(x).astype(int), np.floor(y).astype(int)
    fx, fy = (x - x0)[..., None], (y - y0)[..., None]

    def at(row, col):
        inside = ((row >= 0) & (row < height) & (col >= 0) & (col < width))[..., None]
        return np.where(inside, rgb[np.clip(row, 0, height - 1), np.clip(col, 0, width - 1)], 0.0)

    return np.floor(at(y0, x0) * (1 - fx) * (1 - fy) + at(y0, x0 + 1) * fx * (1 - fy) + at(y0 + 1, x0) * (1 - fx) * fy
                    + at(y0 + 1, x0 + 1) * fx * fy + 0.5)


def drawing() -> np.ndarray:
    """Strokes on white: thin and thick lines (their cores make the widest blur differences), a grey hatch."""
    canvas = np.full((200, 300, 3), 255, np.uint8)
    cv2.line(canvas, (20, 30), (280, 170), (0, 0, 0), 2)
    cv2.circle(canvas, (150, 100), 60, (10, 10, 10), 3)
    for x in range(200, 260, 6):
        cv2.line(canvas, (x, 20), (x + 20, 60), (110, 110, 110), 1)
    for width in range(1, 9):
        cv2.rectangle(canvas, (20 + 30 * width, 185), (20 + 31 * width, 199), (0, 0, 0), -1)
    return canvas


def grey(made: Image.Image) -> np.ndarray:
    got = np.asarray(made).astype(int)
    assert made.mode == "RGB" and (got == got[..., :1]).all()
    return got[..., 0]


def test_threshold_xdog_and_blur_are_the_extensions_formulas_at_processor_res(astronaut):
    photo, pen = np.asarray(astronaut), drawing()
    for image, resolution in ((photo, 256), (pen, 96), (pen, 256)):  # area down; cubic up (the drawing at 256)
        sized = at_resolution(image, resolution)
        made = detect(Image.fromarray(image), "threshold", resolution, 100)
        assert made.size == sized.shape[1::-1]
        assert np.array_equal(grey(made), np.where(sized.min(axis=2) > 100, 255, 0))
        assert np.array_equal(grey(detect(Image.fromarray(image), "scribble_xdog", resolution, 20)),
                              extension_xdog(sized, 20))
        blurred = np.asarray(detect(Image.fromarray(image), "blur_gaussian", resolution, 4.5)).astype(int)
        diff = np.abs(blurred - np.floor(gaussian64(sized, 4.5, 29) + 0.5))  # 8-bit: round(6 sigma + 1) | 1 taps
        assert diff.max() <= 1 and (diff == 0).mean() > 0.9  # OpenCV's 8-bit blur is fixed-point
    # The thick strokes' cores: the extension's doubling wraps past 255, and some of them come out black.
    core = xdog_difference(at_resolution(pen, 256))
    wrapped = (core >= 128) & (core < 144)
    assert wrapped.sum() > 100 and not grey(detect(Image.fromarray(pen), "scribble_xdog", 256))[wrapped].any()
    # threshold_a and its default: a lower level whitens more; None is 127.
    assert np.array_equal(grey(detect(astronaut, "threshold", 256)), grey(detect(astronaut, "threshold", 256, 127)))
    assert grey(detect(astronaut, "threshold", 256, 30)).mean() > grey(detect(astronaut, "threshold", 256)).mean()


def test_tile_resample_and_recolor_work_at_the_images_size(astronaut):
    photo = np.asarray(astronaut)
    assert np.array_equal(pixels(detect(astronaut, "tile_resample", 64, 1.05)), photo)  # below 1.1: as it is
    for rate in (2.5, 3.0):
        made = detect(astronaut, "tile_resample", 64, rate)  # processor_res is not read
        size = int(512 / rate)
        assert made.size == (size, size)
        diff = np.abs(pixels(made) - resampled(photo, area(512, size), area(512, size)))
        assert diff.max() <= 1 and (diff == 0).mean() > 0.999
    # Lightness as OpenCV's 8-bit Lab makes it (within a level of CIE's), of the RGB array read as BGR: red and
    # blue swapped, as the extension asks it; gamma then on that lightness, exactly.
    light = grey(detect(astronaut, "recolor_luminance", 64))
    assert light.shape == photo.shape[:2]
    diff = np.abs(light - lightness(photo.astype(np.float64)))
    assert diff.max() <= 1 and (diff == 0).mean() > 0.8
    assert np.abs(light - lightness(photo[..., ::-1].astype(np.float64))).max() > 20  # the plain RGB reading differs
    for power in (0.6, 1.7):
        assert np.array_equal(grey(detect(astronaut, "recolor_luminance", a=power)), gamma(light, power))
        assert np.array_equal(grey(detect(astronaut, "recolor_intensity", a=power)),
                              gamma(photo.max(axis=2).astype(np.float64), power))
    assert np.array_equal(grey(detect(astronaut, "recolor_intensity")), photo.max(axis=2))


def test_shuffle_is_the_extensions_flow_drawn_from_the_seed(astronaut):
    photo = np.asarray(astronaut)
    made = detect(astronaut, "shuffle", 512, seed=1234)
    diff = np.abs(pixels(made) - extension_shuffle(photo, 1234))
    assert diff.max() <= 8 and (diff == 0).mean() > 0.999  # a flow a 1/32 pixel apart, rarely
    assert np.array_equal(pixels(detect(astronaut, "shuffle", 512, seed=1234)), pixels(made))  # the same seed
    assert np.abs(pixels(detect(astronaut, "shuffle", 512, seed=1235)) - pixels(made)).mean() > 10
    small = detect(Image.fromarray(drawing()), "shuffle", 64, seed=7)  # pixel perfect's resolution: 96x64
    assert small.size == (96, 64)
    assert np.abs(pixels(small) - extension_shuffle(at_resolution(drawing(), 64), 7)).max() <= 8
    # The extension's numpy seed: the first image's seed plus the variation seed (-1, or unused: the seed again).
    assert shuffle_seed(5) == shuffle_seed(5, 99, 0.0) == 10 and shuffle_seed(5, 99, 0.3) == 104
    assert shuffle_seed(2**32 - 1) == 2**32 - 2


def test_color_grid_is_64_pixel_cells_of_the_image_at_processor_res(astronaut):
    photo = np.asarray(astronaut).astype(np.float64)
    halved = np.floor(photo.reshape(256, 2, 256, 2, 3).mean(axis=(1, 3)) + 0.5)  # area, by two: 2x2 means
    for resolution, sized in ((512, photo), (256, halved)):
        made = detect(astronaut, "t2ia_color_grid", resolution)
        cells = np.clip(resampled(sized, cubic(resolution, resolution // 64), cubic(resolution, resolution // 64)),
                        0, 255)
        expected = np.repeat(np.repeat(cells, 64, axis=0), 64, axis=1)
        diff = np.abs(pixels(made) - expected)
        assert made.size == (resolution, resolution) and diff.max() <= 1 and (diff == 0).mean() > 0.98
    wide = detect(Image.fromarray(drawing()), "t2ia_color_grid", 128)  # 300x200: 192x128, 3x2 cells
    assert wide.size == (192, 128) and len(np.unique(pixels(wide).reshape(-1, 3), axis=0)) <= 6
    assert model_free.color_size(300, 200, 128) == (192, 128) and model_free.color_size(201, 402, 100) == (100, 200)
    # Below one cell's 64 pixels (Pixel Perfect's estimate has no floor): one cell of one colour, not a 500.
    tiny = detect(astronaut, "t2ia_color_grid", 20)
    assert tiny.size == (20, 20) and len(np.unique(pixels(tiny).reshape(-1, 3), axis=0)) == 1


def test_a_unit_keeps_its_modules_sliders_naming_the_field():
    """The unit's fields take every module's values; each module's own bounds are checked against the module."""
    ControlUnit(model="c", module="threshold", threshold_a=0)  # threshold's level goes to 0, canny's does not
    ControlUnit(model="c", module="none", threshold_a=250, processor_res=64)  # not read: anything in the fields'
    for module, field, value, message in [
            ("canny", "threshold_a", 0, "threshold_a=0 is outside canny's 1 to 255"),
            ("tile_resample", "threshold_a", 9, "threshold_a=9 is outside tile_resample's 1 to 8"),
            ("blur_gaussian", "threshold_a", 65, "threshold_a=65 is outside blur_gaussian's 0.01 to 64"),
            ("shuffle", "processor_res", 256, "processor_res=256 is not read: shuffle runs at 512")]:
        with pytest.raises(ValidationError, match=message):
            ControlUnit(model="c", module=module, **{field: value})
    with pytest.raises(ValidationError):
        ControlUnit(model="c", module="none", threshold_a=256)  # past every module's
    # The native API: the same bounds, a 422 naming the field; canny's thresholds by one name or the other.
    image = b64(Image.new("RGB", (48, 32), (200, 40, 40)))
    for fields, where in [({"preprocessor": "blur_gaussian", "threshold_a": 65}, "threshold_a"),
                          ({"preprocessor": "recolor_intensity", "threshold_a": 0.05}, "threshold_a"),
                          ({"preprocessor": "canny", "low_threshold": 40, "threshold_a": 40}, "threshold_a"),
                          ({"preprocessor": "canny", "high_threshold": 90, "threshold_b": 90}, "threshold_b"),
                          ({"preprocessor": "canny", "threshold_b": 0}, "threshold_b")]:
        with pytest.raises(ValidationError) as refused:
            ControlNetUnit(model="c", image=image, **fields)
        assert refused.value.errors()[0]["loc"] == (where,), fields
    native = [{"model": "c", "image": image, "preprocessor": "canny", "threshold_a": 40, "high_threshold": 90},
              {"model": "c", "image": image, "preprocessor": "tile_resample", "threshold_a": 2.5, "processor_res": 64},
              {"model": "c", "image": image, "preprocessor": "shuffle", "processor_res": 1024},
              {"model": "c", "image": image, "preprocessor": "none", "threshold_a": 3}]
    units = control_units(native, ["c"], edit=False)
    assert [(u.processor_res, u.threshold_a, u.threshold_b) for u in units] == [
        (512, 40, 90), (512, 2.5, None), (512, None, None), (512, None, None)]  # what each does not read: neutral
    # The same units as A1111's extension takes them are the same units.
    extension = [{"model": "c", "image": image, "module": "canny", "threshold_a": 40, "threshold_b": 90},
                 {"model": "c", "image": image, "module": "tile_resample", "threshold_a": 2.5, "processor_res": 64},
                 {"model": "c", "image": image, "module": "shuffle", "processor_res": 1024},
                 {"model": "c", "image": image, "module": "none", "threshold_a": 3}]
    theirs = a1111_controlnet.control_units(Txt2ImgRequest(prompt="p", alwayson_scripts={"ControlNet": {
        "args": extension}}), {"c": "x"}, edit=False, modules=offered({}))
    assert [u.model_dump(exclude={"image"}) for u in units] == [u.model_dump(exclude={"image"}) for u in theirs]


def test_a1111_units_reset_each_modules_sliders_as_the_extension_does():
    image = "data:image/png;base64," + b64(Image.new("RGB", (64, 64), (255, 255, 255)))
    units = [{"module": "blur_gaussian", "threshold_a": 100, "processor_res": 256},  # sigma past 64: reset to 9
             {"module": "tile_resample", "threshold_a": -1, "threshold_b": 3},  # unset: 1, without a word
             {"module": "shuffle", "processor_res": 768},  # its resolution is fixed
             {"module": "color", "processor_res": 4096, "pixel_perfect": True},  # its key; computed: no note
             {"module": "recolor_luminance", "threshold_a": 0.05}]
    requests = [Txt2ImgRequest(prompt="x", alwayson_scripts={"ControlNet": {"args": [
        {"model": "c", "image": image, **u} for u in group]}}) for group in (units[:4], units[4:])]  # 4 at most
    made = [u for r in requests for u in a1111_controlnet.control_units(r, {"c": "x"}, edit=False,
                                                                         modules=offered({}))]
    assert [(u.module, u.processor_res, u.threshold_a) for u in made] == [
        ("blur_gaussian", 256, 9.0), ("tile_resample", 512, 1.0), ("shuffle", 512, None),
        ("t2ia_color_grid", 512, None), ("recolor_luminance", 512, 1.0)]
    field = "alwayson_scripts.ControlNet.args"
    assert [n for r in requests for n in a1111_controlnet.notes(r)] == [
        f"{field}[0].threshold_a=100 is outside blur_gaussian's 0.01 to 64: it ran at 9, as the extension resets it",
        f"{field}[2].processor_res=768 is not read: shuffle runs at 512, as the extension fixes it",
        f"{field}[0].threshold_a=0.05 is outside recolor_luminance's 0.1 to 2: it ran at 1, as the extension resets it"]
    request = requests[0]
    text = a1111_controlnet.infotext(request)  # the values used
    assert "Module: blur_gaussian, Model: c, Weight: 1.0, Resize Mode: Crop and Resize, Processor Res: 256, " \
           "Threshold A: 9.0, Threshold B: -1," in text["ControlNet 0"]
    assert "Module: t2ia_color_grid" in text["ControlNet 3"] and "Threshold A: 1.0" in text["ControlNet 1"]


def test_module_list_details_each_modules_sliders():
    keys = module_list({}, False)
    assert keys["module_list"] == ["none", "canny", "invert", "lineart_standard", "threshold", "scribble_xdog",
                                   "blur_gaussian", "tile_resample", "recolor_luminance", "recolor_intensity",
                                   "shuffle", "color", "tile_colorfix", "tile_colorfix+sharp"]
    detail = keys["module_detail"]
    resolution = {"name": "Preprocessor Resolution", "value": 512, "min": 64, "max": 2048, "step": 8}
    assert detail["threshold"]["sliders"] == [
        resolution, {"name": "Binarization Threshold", "value": 127, "min": 0, "max": 255, "step": 1}]
    assert detail["blur_gaussian"]["sliders"][1] == {"name": "Sigma", "value": 9.0, "min": 0.01, "max": 64.0,
                                                     "step": 1}
    assert detail["tile_resample"]["sliders"] == [
        {"name": "Down Sampling Rate", "value": 1.0, "min": 1.0, "max": 8.0, "step": 0.01}]
    assert [s["name"] for s in detail["recolor_intensity"]["sliders"]] == ["Gamma Correction"]
    assert detail["shuffle"]["sliders"] == [] and detail["color"]["sliders"] == [resolution]
    assert [s["name"] for s in detail["scribble_xdog"]["sliders"]] == ["Preprocessor Resolution", "XDoG Threshold"]
    assert not any(d["model_free"] for d in detail.values())
    labels = module_list({}, True)
    assert labels["module_list"][-3:] == ["t2ia_color_grid", "tile_colorfix", "tile_colorfix+sharp"]
    assert detail["tile_colorfix+sharp"]["sliders"] == [
        {"name": "Variation", "value": 8.0, "min": 3.0, "max": 32.0, "step": 1},
        {"name": "Sharpness", "value": 1.0, "min": 0.0, "max": 2.0, "step": 0.01}]
    assert labels["module_detail"]["t2ia_color_grid"] == detail["color"]
    # Every module has its row, and the unit's Literal names every module.
    assert set(PREPROCESSORS) == set(SLIDERS) == set(get_args(Preprocessor))


def test_a_hires_fixs_second_pass_shuffles_with_the_first_images_seed(astronaut):
    """A pixel hires fix's second pass runs one img2img per image, each with its own seed: their shuffle units keep
    the map of the first pass (the first image's seed), as the extension makes one map for every image."""
    from deployments.sdxl_base import passes_over
    from deployments.support.generation import StageResult

    units = [ControlUnit(model="c", image=astronaut, module="shuffle"), ControlUnit(model="c", module="threshold"),
             ControlUnit(model="c", image=astronaut, module="shuffle", seed=3)]
    request = GenerationRequest(**{**SMALL, "seed": -1, "batch_size": 2}, control=units)
    passes = passes_over(request, StageResult(images=[astronaut.resize((64, 64))] * 2, seeds=[7, 8]))
    assert [p.seed for p in passes] == [7, 8]
    assert [[u.seed for u in p.control] for p in passes] == [[shuffle_seed(7), None, 3]] * 2


def test_model_free_units_guide_the_base(base, astronaut):
    """A shuffle unit draws its map from the request's seed (``shuffle_seed``): the same image as a unit given that
    numpy seed, another than a unit given another's; a threshold unit guides by its own map."""
    def gen(**unit) -> np.ndarray:
        control = [ControlUnit(model="tiny-canny", image=astronaut, **unit)]
        return pixels(base.generate(GenerationRequest(**SMALL, control=control)).images[0])

    shuffle = {"module": "shuffle", "pixel_perfect": True}  # at 64, the generation size
    shuffled = gen(**shuffle)
    assert np.array_equal(gen(**shuffle, seed=shuffle_seed(SMALL["seed"])), shuffled)
    assert np.abs(gen(**shuffle, seed=shuffle_seed(6)) - shuffled).mean() > 0.5  # seed 6's map, seed 5's noise
    assert np.abs(gen(module="threshold", processor_res=64) - shuffled).mean() > 0.5
    assert "threshold" in base.describe()["preprocessors"]
