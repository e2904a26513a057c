"""Upscaler, face restorer and focal cropper on real photos and tiny spandrel models."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from deployments.face_restorer import FaceEnhancer
from deployments.focal_cropper import Cropper
from deployments.support import faces as face_lib
from deployments.support.config import FaceRestorerConfig, FocalCropperConfig, UpscalerConfig
from deployments.support.cropping import CropSize, crop_box, derivatives
from deployments.support.errors import InvalidInput, ModelLoadError, UnknownModel
from deployments.support.generation import StageResult
from deployments.support.imaging import decode, from_tensor
from deployments.upscaler import ImageUpscaler, tiled
from tests.helpers import pixels


@pytest.fixture(scope="module")
def restorer(tiny):
    return FaceEnhancer(FaceRestorerConfig(model=str(tiny / "faces" / "tiny-restoreformer.safetensors")))


@pytest.fixture(scope="module")
def cropper():
    return Cropper(FocalCropperConfig())


# --- upscaler -----------------------------------------------------------------------------------------------

@pytest.mark.parametrize(
    "name,scale,size,expected",
    [
        ("R-ESRGAN 4x+", 4, None, (256, 192)),
        ("R-ESRGAN 4x+", 2, None, (128, 96)),
        ("R-ESRGAN 2x+", 2, None, (128, 96)),
        ("R-ESRGAN 2x+", 3.3, None, (211, 158)),
        ("R-ESRGAN 4x+", None, (333, 101), (333, 101)),
        ("Lanczos", 2, None, (128, 96)),
        ("Nearest", 1.5, None, (96, 72)),
    ],
)
def test_upscale_gives_exact_sizes(upscaler, astronaut, name, scale, size, expected):
    image = astronaut.resize((64, 48))
    width, height = size or (None, None)
    result = upscaler.upscale(image, name, scale=scale, width=width, height=height)
    assert result.image.size == expected
    assert result.info["upscaler"] == name and not result.warnings


def test_model_upscale_is_not_a_plain_resize(upscaler, astronaut):
    image = astronaut.resize((64, 64))
    neural = pixels(upscaler.upscale(image, "R-ESRGAN 4x+", 4).image)
    lanczos = pixels(upscaler.upscale(image, "Lanczos", 4).image)
    assert np.abs(neural - lanczos).mean() > 2.0


@pytest.mark.parametrize("side,scale,cap,passes", [
    (64, 4, 300 * 300, [256]),  # the model's own scale: one pass
    (64, 8, 8192 * 8192, [256, 1024]),  # two passes, the second at most twice the target a side, then down
    (64, 8, 600 * 600, [256, 600]),  # ... unless that passes the cap: on the largest input within it
    (64, 2, 300 * 300, [256]),  # one pass on every input pixel, then down (A1111's way), within the cap
    (64, 4.2, 300 * 300, [256, 268]),  # the second pass lands on the target; it used to make 1024 (11.7x the cap)
    (64, 16, 8192 * 8192, [256, 1024]),  # two whole scales: two full passes
    (128, 2, 300 * 300, [300]),  # a first pass past the cap (512: 2.9x) runs on the largest input within it
])
def test_no_model_pass_makes_more_than_the_target_or_the_cap(tiny, astronaut, side, scale, cap, passes):
    upscaler = ImageUpscaler(UpscalerConfig(models=[{"name": "R-ESRGAN 4x+", "path": str(
        tiny / "upscalers" / "tiny-esrgan-x4.safetensors")}], max_output_pixels=cap, tile=0))
    made = []
    run_model = upscaler._run_model

    def counted(descriptor, image):
        out = run_model(descriptor, image)
        made.append(out.width)
        assert out.height == out.width
        return out

    upscaler._run_model = counted
    image = astronaut.resize((side, side))
    result = upscaler.upscale(image, "R-ESRGAN 4x+", scale)
    target = round(side * scale)
    assert result.image.size == (target, target) and made == passes
    assert max(made) ** 2 <= cap
    # The last pass still ends in model detail, not a Lanczos enlargement.
    lanczos = pixels(upscaler.upscale(image, "Lanczos", scale).image)
    assert np.abs(pixels(result.image) - lanczos).mean() > 2.0


def test_a_pass_past_the_cap_sees_every_input_pixel_and_shrinks_tile_by_tile(tiny, astronaut):
    """Tiled, a first pass whose output would pass the cap makes its output at the cap tile by tile: the model
    sees the whole input (it used to see an input shrunk to fit), no image past the cap is built, and the blend
    shows no seams (the result is the whole pass, downscaled)."""
    import torch

    from deployments.support.imaging import to_tensor

    upscaler = ImageUpscaler(UpscalerConfig(models=[{"name": "R-ESRGAN 4x+", "path": str(
        tiny / "upscalers" / "tiny-esrgan-x4.safetensors")}], max_output_pixels=300 * 300, tile=48, tile_overlap=8))
    seen, made = [], []
    run_model = upscaler._run_model

    def counted(descriptor, image, size=None):
        seen.append(image.size)
        out = run_model(descriptor, image, size)
        made.append(out.size)
        return out

    upscaler._run_model = counted
    image = astronaut.resize((128, 128))
    result = upscaler.upscale(image, "R-ESRGAN 4x+", 2).image
    assert seen == [(128, 128)] and made == [(300, 300)] and result.size == (256, 256)
    descriptor = upscaler.models["R-ESRGAN 4x+"]
    with torch.inference_mode():
        whole = from_tensor(tiled(descriptor, to_tensor(image, "cpu", torch.float32), 48, 8))
    expected = pixels(whole.resize((300, 300), Image.Resampling.BICUBIC).resize((256, 256), Image.Resampling.LANCZOS))
    assert np.abs(pixels(result) - expected).mean() < 1.0  # 0.1 levels here


def test_tiled_and_untiled_agree(upscaler, astronaut):
    import torch

    from deployments.support.imaging import to_tensor

    descriptor = upscaler.models["R-ESRGAN 4x+"]
    tensor = to_tensor(astronaut.resize((160, 120)), "cpu", torch.float32)
    with torch.inference_mode():
        whole = descriptor(tensor).float()
        pieces = tiled(descriptor, tensor, tile=64, overlap=16)
    assert pieces.shape == whole.shape == (1, 3, 480, 640)
    # Receptive fields are cut at tile borders; the overlap blend keeps the error small.
    assert (pieces - whole).abs().mean() < 0.01


class Nearest(torch.nn.Module):
    """A x4 model that repeats each input pixel: its output at a pixel does not depend on the tile around it."""

    scale = 4

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.interpolate(x, scale_factor=4, mode="nearest")


class TileMean(torch.nn.Module):
    """A x4 model whose whole output is its input's mean: every tile answers differently from its neighbours."""

    scale = 4

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.mean(dim=(2, 3), keepdim=True).expand(-1, -1, x.shape[2] * 4, x.shape[3] * 4)


def test_tiles_cover_the_last_rows_and_columns():
    """70x90 in 32-pixel tiles 24 apart: the regular grid stops short of the bottom and right edges, where one more
    tile, flush with the edge, must run (the tiny models' output is near black, so a missing band hid there)."""
    tensor = torch.rand((1, 3, 70, 90), generator=torch.Generator().manual_seed(0)) + 0.1
    model = Nearest()
    with torch.inference_mode():
        torch.testing.assert_close(tiled(model, tensor, tile=32, overlap=8), model(tensor))


def test_tiles_cross_fade_over_their_whole_overlap():
    """On a gradient, each tile of ``TileMean`` differs from the next by 24 gradient steps (tiles start 24 pixels
    apart). Blended over the whole overlap (8 input pixels: 32 output pixels) no step between neighbouring output
    pixels exceeds that difference spread over 32 pixels; a ramp over 8 output pixels makes steps 3x as large, a
    seam."""
    x, y = torch.linspace(0, 1, 80), torch.linspace(0, 1, 56)
    tensor = (x[None, :] + y[:, None]).expand(1, 3, 56, 80)
    with torch.inference_mode():
        out = tiled(TileMean(), tensor, tile=32, overlap=8)
    assert out.shape == (1, 3, 224, 320)
    for dim, side in ((-1, 80), (-2, 56)):
        largest_step = out.diff(dim=dim).abs().max().item()
        assert largest_step <= 24 / (side - 1) / 32


def test_unloaded_model_falls_back_to_lanczos_and_says_so(upscaler, astronaut):
    image = astronaut.resize((64, 64))
    result = upscaler.upscale(image, "SwinIR_4x", 4)
    assert result.info["upscaler"] == "Lanczos"
    assert result.image.size == (256, 256)
    assert "SwinIR_4x" in result.warnings[0]
    assert np.array_equal(pixels(result.image), pixels(image.resize((256, 256), Image.Resampling.LANCZOS)))


def test_every_image_of_a_batch_is_upscaled_in_one_call(upscaler, astronaut):
    """A1111's pixel hires fix hands the upscaler the base's whole batch, replica to replica."""
    images = [astronaut.resize((64, 48)), astronaut.resize((64, 48)).rotate(90)]
    result = upscaler.upscale(StageResult(images=images, seeds=[7, 8], warnings=["earlier"]), "SwinIR_4x", 2)
    assert result.seeds == [7, 8] and [i.size for i in result.images] == [(128, 96)] * 2
    for image, out in zip(images, result.images, strict=True):
        assert np.array_equal(pixels(out), pixels(upscaler.upscale(image, "SwinIR_4x", 2).image))
    assert result.warnings == ["earlier", "upscaler 'SwinIR_4x' is not loaded; Lanczos used instead"]  # once
    assert result.info["upscaler"] == "Lanczos"
    with pytest.raises(InvalidInput) as empty:
        upscaler.upscale(StageResult(seeds=[1]), "Lanczos", 2)
    assert empty.value.field == "image"


def test_a_region_of_a_whole_base_is_upscaled(upscaler, astronaut):
    """The batch-sizes plan sends the base itself and the crop's box: only that region is upscaled."""
    box = (100, 40, 164, 88)
    region = upscaler.upscale(StageResult(images=[astronaut], seeds=[3]), "R-ESRGAN 4x+", None, 256, 192, box=box)
    assert region.seeds == [3] and region.image.size == (256, 192)
    alone = upscaler.upscale(astronaut.crop(box), "R-ESRGAN 4x+", None, 256, 192)
    assert np.array_equal(pixels(region.image), pixels(alone.image))


def test_lanczos_only_upscaler_without_models(astronaut):
    empty = ImageUpscaler(UpscalerConfig())
    assert empty.upscale(astronaut, "R-ESRGAN 4x+", 0.5).image.size == (256, 256)
    with pytest.raises(InvalidInput):
        empty.upscale(astronaut, "Lanczos", 0)
    # A name that is neither built in, loaded nor A1111's is refused by the stage itself too, whatever called it.
    with pytest.raises(UnknownModel) as e:
        empty.upscale(astronaut, "Nope", 2.0)
    assert e.value.details["field"] == "upscaler"


def test_the_deployments_check_answers_and_counts_what_it_refuses():
    """The ingress asks the upscaler first (``Upscaler.check``): a name refused then is the stage's failure in its
    metrics, as when ``upscale`` refuses it, answered as a value that the ingress raises as the 422 naming the field.
    Raised in the replica, a client's mistake would be a failed call to Serve: an ERROR with a traceback in the
    replica's log and a count in Ray's deployment error counter."""
    import asyncio
    from types import SimpleNamespace

    from deployments.upscaler import Upscaler

    failed: list = []
    shell = SimpleNamespace(model=ImageUpscaler(UpscalerConfig()), metrics=SimpleNamespace(failed=failed.append))
    check = Upscaler.func_or_class.check
    assert asyncio.run(check(shell, {"hr_upscaler": "SwinIR 4x", "upscaler_1": "Lanczos"})) is None
    refusal = asyncio.run(check(shell, {"upscaler_1": "Lanczos", "upscaler_2": "Nope"}))
    assert refusal == {"message": "unknown upscaler 'Nope'", "field": "upscaler_2",
                       "details": {"field": "upscaler_2", "choices": shell.model.names()}}
    (error,) = failed
    assert isinstance(error, UnknownModel) and error.field == "upscaler_2"


# --- face restorer ------------------------------------------------------------------------------------------

def test_face_restorer_changes_the_face_and_leaves_the_background(restorer, astronaut, astronaut_face_box):
    result = restorer.restore(astronaut, weight=0.6)
    assert result.info["faces_found"] == 1 and result.info["face_restoration_applied"]
    assert result.info["restorer"] == "RestoreFormer"
    before, after = pixels(astronaut), pixels(result.image)
    x0, y0, x1, y1 = astronaut_face_box
    face_core = (slice(y0 + 25, y1 - 25), slice(x0 + 25, x1 - 25))
    assert np.abs(before[face_core] - after[face_core]).mean() > 10.0
    changed = np.abs(before - after).max(axis=2) > 0
    ys, xs = np.nonzero(changed)
    # Everything that changed lies in a generous neighbourhood of the face; the rest is bit-identical.
    assert xs.min() >= x0 - 80 and xs.max() <= x1 + 80 and ys.min() >= y0 - 80 and ys.max() <= y1 + 80
    assert np.array_equal(before[400:, :], after[400:, :])
    assert np.array_equal(before[:, :100], after[:, :100])


def test_visibility_blends_towards_the_original(restorer, astronaut, astronaut_face_box):
    full = pixels(restorer.restore(astronaut, visibility=1.0).image)
    half = pixels(restorer.restore(astronaut, visibility=0.5).image)
    before = pixels(astronaut)
    assert np.abs(half - before).mean() < np.abs(full - before).mean()


def test_no_face_means_unchanged_and_flagged(restorer):
    blank = Image.new("RGB", (256, 256), (90, 120, 150))
    result = restorer.restore(blank)
    assert result.info["faces_found"] == 0 and not result.info["face_restoration_applied"]
    assert np.array_equal(pixels(result.image), pixels(blank))
    assert "no face" in result.warnings[0]


def test_every_image_of_a_batch_is_restored_in_one_call(restorer, astronaut):
    blank = Image.new("RGB", astronaut.size, (90, 120, 150))
    result = restorer.restore(StageResult(images=[astronaut, blank], seeds=[1, 2]), weight=0.6)
    alone = restorer.restore(astronaut, weight=0.6)
    assert result.seeds == [1, 2] and len(result.images) == 2
    assert np.array_equal(pixels(result.images[0]), pixels(alone.image))
    assert np.array_equal(pixels(result.images[1]), pixels(blank))
    assert result.info["faces_found"] == 1 and result.info["face_restoration_applied"]
    assert result.warnings == ["no face detected: image unchanged"]


def _identity_restorer(architecture: str, tiny):
    """A real spandrel descriptor of ``architecture`` whose network returns its input unchanged, in its own [-1, 1]
    domain: an ideal restorer of a face that needs no restoration."""
    import spandrel
    import spandrel_extra_arches
    import torch

    spandrel_extra_arches.install(ignore_duplicates=True)
    torch.manual_seed(0)
    if architecture == "RestoreFormer":
        descriptor = spandrel.ModelLoader().load_from_file(tiny / "faces" / "tiny-restoreformer.safetensors")
    else:
        if architecture == "GFPGAN":
            from spandrel.architectures.GFPGAN import GFPGAN

            model = GFPGAN()
        else:
            from spandrel_extra_arches.architectures.CodeFormer import CodeFormer

            model = CodeFormer(dim_embd=64, n_head=8, n_layers=1, codebook_size=64,
                               connect_list=["32", "64", "128", "256"])
        descriptor = spandrel.ModelLoader().load_from_state_dict(model.state_dict())
    assert descriptor.architecture.id == architecture
    descriptor.model.forward = lambda x, *args, **kwargs: (x, None)
    return descriptor.eval()


@pytest.mark.parametrize("architecture", ["GFPGAN", "RestoreFormer", "CodeFormer"])
def test_an_identity_restorer_gives_the_face_back_unchanged(tiny, astronaut, astronaut_face_box, architecture):
    """Each network is called in its own [-1, 1] range: spandrel's descriptor call takes [0, 1] and clamps to
    [0, 1], which turned every pixel darker than mid-grey into 128 (black 0 -> 128, face mean 147 -> 166)."""
    enhancer = FaceEnhancer(FaceRestorerConfig())
    enhancer.descriptor = _identity_restorer(architecture, tiny)
    crop, _ = face_lib.align(np.asarray(astronaut), enhancer.detect(astronaut)[0], 512)
    assert crop.min() == 0 and crop.max() == 255  # the full range is at stake
    with torch.inference_mode():
        out = enhancer._restore_crop(enhancer.descriptor, crop, 0.5)
    assert np.abs(out.astype(np.int16) - crop).max() <= 1
    # Through detection, alignment and paste-back, the face keeps its brightness (the warps blur it a little).
    x0, y0, x1, y1 = astronaut_face_box
    before = pixels(astronaut)[y0:y1, x0:x1]
    after = pixels(enhancer.restore(astronaut, weight=0.5).image)[y0:y1, x0:x1]
    assert abs(after.mean() - before.mean()) < 1.0
    assert np.abs(after - before).mean() < 3.0


def test_gfpgan_restores_the_same_face_the_same_way(astronaut):
    """Its checkpoint's noise buffers, not fresh noise each call: the result cache relies on it."""
    import spandrel
    from spandrel.architectures.GFPGAN import GFPGAN

    torch.manual_seed(0)
    state = GFPGAN().state_dict()
    for name in state:  # a trained model's noise strengths are not 0, as a fresh one's are
        if name.endswith(".weight") and state[name].shape == (1,):
            state[name] = torch.full((1,), 0.5)
    enhancer = FaceEnhancer(FaceRestorerConfig())
    enhancer.descriptor = spandrel.ModelLoader().load_from_state_dict(state).eval()
    crop, _ = face_lib.align(np.asarray(astronaut), enhancer.detect(astronaut)[0], 512)
    with torch.inference_mode():
        first, second = (enhancer._restore_crop(enhancer.descriptor, crop, 0.5) for _ in range(2))
    assert np.array_equal(first, second)


def test_a_model_that_is_not_a_face_restorer_is_refused(tiny):
    with pytest.raises(ModelLoadError) as caught:
        FaceEnhancer(FaceRestorerConfig(model=str(tiny / "upscalers" / "tiny-esrgan-x4.safetensors")))
    assert caught.value.field == "face_restorer.model" and "ESRGAN" in caught.value.message


@pytest.mark.parametrize("crop_scale,max_jump,min_ramp", [
    (2.0, 40, 15),  # the 512 crop covers 256 px of the image: a face about 120 px wide
    (12.0, 128, 4),  # the crop covers 43 px: a face about 20 px wide
])
def test_paste_back_feathers_with_a_smooth_ramp(crop_scale, max_jump, min_ramp):
    """A white restored face pasted on black: along a row through the face, alpha ramps from 0 to 1 over several
    pixels. The mask used to jump from 0 to 133 in one pixel (a seam around every face), small faces 0 to 255."""
    offset = -crop_scale * 100  # the crop's corner lands at (100, 100)
    matrix = np.array([[crop_scale, 0, offset], [0, crop_scale, offset]], np.float32)  # image -> crop
    white = np.full((512, 512, 3), 255, np.uint8)
    side = 100 + int(512 / crop_scale)
    out = face_lib.paste_back(np.zeros((side + 100, side + 100, 3), np.uint8), white, matrix).astype(np.int16)
    row = out[(100 + side) // 2, :, 0]
    assert row.max() == 255 and np.array_equal(out[:100], np.zeros_like(out[:100]))
    assert np.abs(np.diff(row)).max() < max_jump
    left_edge = row[: (100 + side) // 2]
    assert ((left_edge > 0) & (left_edge < 255)).sum() >= min_ramp
    # The feather stays inside the warped crop: pasting white on white, the warp's black border never shows.
    on_white = face_lib.paste_back(np.full_like(out, 255, np.uint8), white, matrix)
    assert on_white.min() == 255


@pytest.fixture(scope="module")
def three_astronauts(astronaut):
    """Three real portraits side by side, 512 px each, the middle one mirrored."""
    photo = np.asarray(astronaut)
    return Image.fromarray(np.concatenate([photo, photo[:, ::-1], photo], axis=1))


def test_each_face_is_detected_once_most_confident_first(restorer, three_astronauts):
    """MediaPipe finds the mirrored astronaut twice (boxes with IoU 0.28, one's centre inside the other): four
    faces, that one restored twice, and sorted by area rather than confidence."""
    found = restorer.detect(three_astronauts)
    assert sorted(int(f.centre[0] // 512) for f in found) == [0, 1, 2]
    assert [f.score for f in found] == sorted((f.score for f in found), reverse=True)


@pytest.mark.parametrize("max_faces", [1, 2])
def test_max_faces_restores_only_the_most_confident(tiny, restorer, three_astronauts, max_faces):
    """``max_faces`` holds with the default detector (MediaPipe) too: it used to be given to RetinaFace only."""
    ranked = [int(f.centre[0] // 512) for f in restorer.detect(three_astronauts)]
    enhancer = FaceEnhancer(FaceRestorerConfig(model=str(tiny / "faces" / "tiny-restoreformer.safetensors"),
                                               max_faces=max_faces))
    restored = []
    restore_crop = enhancer._restore_crop
    enhancer._restore_crop = lambda *args: restored.append(1) or restore_crop(*args)
    result = enhancer.restore(three_astronauts, weight=0.6)
    assert len(restored) == max_faces and result.info["faces_found"] == max_faces
    before, after = pixels(three_astronauts), pixels(result.image)
    changed = {tile for tile in range(3) if not np.array_equal(before[:, tile * 512:(tile + 1) * 512],
                                                               after[:, tile * 512:(tile + 1) * 512])}
    assert changed == set(ranked[:max_faces])


def test_overlapping_detections_of_one_face_are_dropped():
    def face(box, score):
        return face_lib.Face(box, np.zeros((4, 2), np.float32), score)

    # MediaPipe's pair for the mirrored astronaut: IoU 0.28, but the weaker box's centre lies inside the stronger.
    pair = [face((738, 45, 815, 122), 0.68), face((181, 52, 282, 153), 0.7), face((757, 72, 842, 157), 0.78)]
    assert [f.box for f in face_lib.distinct(pair)] == [(757, 72, 842, 157), (181, 52, 282, 153)]
    # Centres outside each other's box: IoU 0.32 is one face, IoU 0.25 two neighbours.
    near = [face((0, 0, 100, 100), 0.9), face((52, 0, 152, 100), 0.8), face((160, 0, 260, 100), 0.7)]
    assert [f.box[0] for f in face_lib.distinct(near)] == [0, 160]
    apart = [face((0, 0, 100, 100), 0.9), face((60, 0, 160, 100), 0.8)]
    assert len(face_lib.distinct(apart)) == 2


def test_no_restorer_loaded_is_skipped_and_flagged(astronaut):
    result = FaceEnhancer(FaceRestorerConfig()).restore(astronaut)
    assert result.info["faces_found"] == 1 and not result.info["face_restoration_applied"]
    assert result.info["restorer"] is None
    assert np.array_equal(pixels(result.image), pixels(astronaut))


# --- focal cropper ------------------------------------------------------------------------------------------

SIZES = [CropSize(name="hero", width=1200, height=400), CropSize(name="story", width=270, height=480),
         CropSize(name="square", width=300, height=300), CropSize(name="og", width=1200, height=630)]


def test_focal_point_comes_from_the_face(cropper, astronaut, astronaut_face_box):
    focus = cropper.focus(astronaut)
    x0, y0, x1, y1 = astronaut_face_box
    assert focus.source == "faces"
    assert x0 <= focus.point[0] <= x1 and y0 <= focus.point[1] <= y1


def test_the_face_lies_inside_every_crop(cropper, astronaut, astronaut_face_box):
    focus, crops = cropper.crop(astronaut, SIZES)
    fx0, fy0, fx1, fy1 = astronaut_face_box
    for crop in crops:
        x0, y0, x1, y1 = crop.box
        target = next(s for s in SIZES if s.name == crop.name)
        assert crop.image.size == (target.width, target.height)
        assert abs((x1 - x0) / (y1 - y0) - target.width / target.height) < 0.02
        assert x0 <= fx0 and y0 <= fy0 and x1 >= fx1 and y1 >= fy1, crop.name
    assert {c.name: c.upscaled for c in crops}["hero"]  # 512 wide source, 1200 wide target


def test_centre_fallback_without_faces(cropper):
    blank = Image.new("RGB", (400, 200), (10, 10, 10))
    focus, crops = cropper.crop(blank, [CropSize(name="sq", width=100, height=100)])
    assert focus.source == "centre" and focus.point == (200, 100)
    assert crops[0].box == (100, 0, 300, 200)


def test_faces_that_cannot_fit_are_centred_on_the_focus():
    from deployments.support.cropping import Focus

    focus = Focus((500, 100), [(100, 0, 200, 200), (800, 0, 900, 200)], "faces")
    assert crop_box((1000, 200), (1, 1), focus) == (400, 0, 600, 200)


@pytest.mark.parametrize("fmt,magic", [("png", b"\x89PNG"), ("jpeg", b"\xff\xd8"), ("webp", b"RIFF")])
def test_crops_encode_with_derivatives(cropper, astronaut, fmt, magic):
    _, crops = cropper.crop(astronaut, [CropSize(name="sq", width=256, height=256)], fmt=fmt, quality=70,
                            derivative_widths=[64, 128, 512])
    assert crops[0].encoded.startswith(magic)
    assert sorted(crops[0].derivatives) == [64, 128]  # never larger than the image
    assert decode(crops[0].derivatives[64]).size == (64, 64)


def test_webp_quality_trades_size(astronaut):
    small = derivatives(astronaut, [512], "webp", 20)[512]
    large = derivatives(astronaut, [512], "webp", 95)[512]
    assert len(small) < len(large)


def test_retinaface_detector_loads_from_safetensors(tmp_path, astronaut):
    import torch
    from facexlib.detection.retinaface import RetinaFace
    from safetensors.torch import save_file

    torch.manual_seed(0)
    weights = tmp_path / "retinaface-mobile0.25.safetensors"
    save_file(RetinaFace(network_name="mobile0.25", half=False, device="cpu").state_dict(), weights)
    enhancer = FaceEnhancer(FaceRestorerConfig(retinaface=str(weights), max_faces=3, min_detection_confidence=0.0))
    found = enhancer.detect(astronaut)
    # Random weights find random "faces"; the plumbing (boxes, landmarks, cap) is what is checked here.
    assert 1 <= len(found) <= 3
    assert all(f.landmarks.shape == (4, 2) for f in found)


@pytest.fixture(scope="module")
def codeformer(tmp_path_factory, astronaut):
    """A random full-size CodeFormer (its VQGAN is fixed-size) through spandrel_extra_arches, and its float32
    restorations of the astronaut by fidelity weight, each made once: a restoration at 512² is the slow part."""
    from safetensors.torch import save_file
    from spandrel_extra_arches.architectures.CodeFormer import CodeFormer

    torch.manual_seed(0)
    model = CodeFormer(dim_embd=64, n_head=8, n_layers=1, codebook_size=64, connect_list=["32", "64", "128", "256"])
    path = tmp_path_factory.mktemp("codeformer") / "codeformer.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, path)
    restored: dict[float, np.ndarray] = {}

    def restore(weight: float) -> np.ndarray:
        if weight not in restored:
            restored[weight] = pixels(FaceEnhancer(FaceRestorerConfig(model=str(path))).restore(astronaut,
                                                                                              weight=weight).image)
        return restored[weight]

    return path, restore


def test_codeformer_fidelity_weight_is_honoured(codeformer):
    path, restore = codeformer
    assert FaceEnhancer(FaceRestorerConfig(model=str(path))).name == "CodeFormer"
    assert np.abs(restore(0.0) - restore(1.0)).mean() > 0.01


def test_codeformer_runs_in_bfloat16(codeformer, astronaut):
    """On CUDA the restorer runs in bfloat16, which spandrel allows CodeFormer; its codebook lookup multiplies a
    float32 one-hot by the bfloat16 codebook. The same weights, cast as a GPU replica casts them, restore the face
    as float32 does (a CPU replica never picks bfloat16 itself, so the cast is made here)."""
    path, restore = codeformer
    reference = restore(1.0)
    enhancer = FaceEnhancer(FaceRestorerConfig(model=str(path)))
    enhancer.descriptor.to(torch.bfloat16)
    enhancer.dtype = torch.bfloat16
    half = pixels(enhancer.restore(astronaut, weight=1.0).image)
    assert half.shape == reference.shape
    # Restored as in float32: nearer the float32 face than the photo is (random weights make the codebook's
    # nearest-code choice sensitive to precision, so "nearer" rather than "equal": 2.2 against 6.7 grey levels).
    restored = np.abs(reference - pixels(astronaut)).mean()
    assert restored > 1
    assert np.abs(half - reference).mean() < restored / 2
