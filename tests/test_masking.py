"""A1111's "Only masked" inpainting (``deployments/support/masking.py``): the region as A1111 computes it (checked
against the rule written out again here, independently), the paste back, and the tiny base running it: the answer
at the init image's own size, every pixel outside the mask the init image's own, the region inpainted exactly as
the whole picture of that region would be."""

from __future__ import annotations

import cv2
import numpy as np
import pytest
from PIL import Image

from deployments.sdxl_base import passes_over
from deployments.support import masking
from deployments.support.generation import GenerationRequest, StageResult
from deployments.support.imaging import COVER_LIMIT, frame
from tests.helpers import pixels

SMALL = dict(prompt="a photo of a cat", width=64, height=64, steps=2, guidance_scale=5.0, seed=2, strength=1.0)


def expected_region(mask: np.ndarray, padding: int, width: int, height: int) -> tuple[int, int, int, int] | None:
    """A1111's crop region from its definition: the non-zero pixels' bounds, ``padding`` wider within the image; the
    short side (against width:height) lengthened by the truncated difference, its odd pixel at the far end; the span
    then moved to lie inside the image, and cut at its edge when longer than the image."""
    rows, cols = np.nonzero(mask)
    if not len(rows):
        return None
    image_h, image_w = mask.shape
    left, right = max(int(cols.min()) - padding, 0), min(int(cols.max()) + 1 + padding, image_w)
    top, bottom = max(int(rows.min()) - padding, 0), min(int(rows.max()) + 1 + padding, image_h)

    def placed(start: int, end: int, grow: int, limit: int) -> tuple[int, int]:
        length = end - start + grow
        first = max(0, min(start - grow // 2, limit - length))
        return first, min(first + length, limit)

    if (right - left) * height > (bottom - top) * width:
        grow = int((right - left) * height / width - (bottom - top))
        top, bottom = placed(top, bottom, grow, image_h)
    else:
        grow = int((bottom - top) * width / height - (right - left))
        left, right = placed(left, right, grow, image_w)
    return left, top, right, bottom


def rect_mask(size: tuple[int, int], box: tuple[int, int, int, int]) -> Image.Image:
    mask = Image.new("L", size, 0)
    mask.paste(255, box)
    return mask


# --- the region -----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize(("size", "box", "padding", "target"), [
    ((200, 120), (150, 90, 190, 110), 8, (64, 64)),  # a corner: padded to the edges, then grown back inside
    ((200, 120), (10, 40, 190, 60), 0, (64, 128)),  # a wide strip for a portrait: taller than the image, cut there
    ((120, 200), (2, 3, 12, 9), 30, (128, 64)),  # padding clamped at the top left, then grown along x to 2:1
    ((256, 96), (100, 10, 101, 11), 0, (64, 64)),  # one pixel: grown to 1x1, nothing to lengthen
    ((96, 96), (0, 0, 96, 96), 16, (64, 128)),  # all of it: the image itself
    ((300, 100), (40, 20, 61, 51), 5, (64, 128)),  # odd growth: the odd pixel goes to the far end
])
def test_the_region_is_a1111s_crop_region(size, box, padding, target):
    mask = rect_mask(size, box)
    found = masking.masked_box(mask, padding)
    assert found is not None
    region = masking.to_aspect(found, *target, size)
    assert region == expected_region(np.asarray(mask), padding, *target)
    left, top, right, bottom = region
    assert 0 <= left < right <= size[0] and 0 <= top < bottom <= size[1]


def test_a_blank_mask_has_no_region():
    assert masking.masked_box(Image.new("L", (64, 48)), 32) is None
    assert masking.only_masked(Image.new("RGB", (64, 48)), Image.new("L", (64, 48)), 64, 64, 0, 4, 4) is None


def test_the_blur_is_a1111s_and_its_reach_widens_the_region():
    """A1111 blurs with OpenCV, across then down, over 2 * int(2.5 * sigma + 0.5) + 1 taps, and takes the region from
    the blurred mask: a hard square blurred by 4 reaches 10 pixels further each way."""
    mask = rect_mask((128, 96), (50, 40, 70, 60))
    blurred = masking.blur(mask, 4, 2)
    by_hand = cv2.GaussianBlur(cv2.GaussianBlur(np.asarray(mask), (21, 1), 4), (1, 11), 2)
    assert np.array_equal(np.asarray(blurred), by_hand)
    assert blurred.getbbox() == (40, 35, 80, 65)
    cut = masking.only_masked(Image.new("RGB", (128, 96)), mask, 64, 64, 3, 4, 2)
    assert cut is not None and cut.box == expected_region(by_hand, 3, 64, 64)


def test_the_paste_keeps_every_pixel_outside_the_mask_and_lands_in_the_region():
    original = Image.fromarray(np.random.default_rng(0).integers(0, 256, (90, 160, 3), dtype=np.uint8))
    mask = rect_mask((160, 90), (120, 60, 150, 85))
    cut = masking.only_masked(original, mask, 64, 64, 4, 0, 0)
    assert cut is not None and cut.box == expected_region(np.asarray(mask), 4, 64, 64) == (116, 52, 154, 90)
    # The region (square, as the generation is) at the generation size, for image and mask alike.
    assert np.array_equal(pixels(cut.image), pixels(original.crop(cut.box).resize((64, 64), Image.LANCZOS)))
    assert np.array_equal(np.asarray(cut.mask), np.asarray(mask.crop(cut.box).resize((64, 64), Image.LANCZOS)))
    out = pixels(cut.paste.apply(Image.new("RGB", (64, 64), (255, 0, 255))))
    inside = np.asarray(mask) > 0
    assert out.shape == (90, 160, 3)
    assert np.array_equal(out[~inside], pixels(original)[~inside])
    assert (out[inside] == (255, 0, 255)).all()


def test_a_control_image_is_cut_as_the_init_image_is(astronaut):
    """The extension frames a unit's image at the init image's size by the unit's resize mode, cuts the region out and
    frames that at the generation size: the init image itself comes out as the cut init image."""
    original = astronaut.resize((140, 100))
    cut = masking.only_masked(original, rect_mask((140, 100), (10, 10, 40, 30)), 64, 32, 2, 0, 0)
    assert cut is not None and cut.box == (1, 8, 49, 32)
    assert np.array_equal(pixels(cut.control(original, "crop")), pixels(cut.image))
    half = original.resize((70, 50))  # the same picture at half size: stretched back, then cut
    assert np.abs(pixels(cut.control(half, "stretch")) - pixels(cut.image)).mean() < 40
    assert cut.control(half, "stretch").size == (64, 32)


def test_several_init_images_keep_the_generation_size_only_masked():
    """Each init image of an edit becomes a pass of its own: at its own size, but for "Only masked", whose region is
    inpainted at the request's size."""
    images = [Image.new("RGB", (96, 80)), Image.new("RGB", (120, 72))]
    source = StageResult(images=images, seeds=[1, 2])
    request = GenerationRequest(**SMALL, init_image=images[0], mask=Image.new("L", (96, 80), 255))
    assert [(p.width, p.height) for p in passes_over(request.model_copy(update={"inpaint_area": "masked"}),
                                                        source)] == [(64, 64), (64, 64)]
    assert [(p.width, p.height) for p in passes_over(request, source)] == [(96, 80), (120, 72)]


# --- the base -----------------------------------------------------------------------------------------------------

def inpaint(base, **kw):
    return base.generate(GenerationRequest(**{**SMALL, "inpaint_area": "masked", "mask_blur": 0, **kw}))


def test_only_masked_answers_at_the_init_size_and_repaints_the_mask_alone(base, astronaut):
    init = astronaut.resize((160, 96))
    mask = rect_mask((160, 96), (128, 70, 152, 92))  # the bottom right corner
    result = inpaint(base, init_image=init, mask=mask, inpaint_padding=6, width=64, height=128)
    out, src = pixels(result.images[0]), pixels(init)
    inside = np.asarray(mask) > 0
    assert result.images[0].size == (160, 96) and result.info["mode"] == "inpaint"
    assert result.info["inpaint_region"] == list(expected_region(np.asarray(mask), 6, 64, 128))
    assert np.array_equal(out[~inside], src[~inside])
    assert np.abs(out[inside] - src[inside]).mean() > 5.0


def test_the_region_is_inpainted_as_the_whole_picture_of_it_would_be(base, astronaut):
    """A region exactly the generation's size is inpainted untouched by any resize: the answer's region is, pixel
    for pixel, what inpainting the whole picture of that region gives."""
    init = astronaut.resize((128, 112))
    mask = rect_mask((128, 112), (70, 30, 110, 70))
    region = expected_region(np.asarray(mask), 12, 64, 64)
    assert region == (58, 18, 122, 82)
    only = inpaint(base, init_image=init, mask=mask, inpaint_padding=12)
    whole = base.generate(GenerationRequest(**SMALL, mask_blur=0, init_image=init.crop(region),
                                            mask=mask.crop(region)))
    assert np.array_equal(pixels(only.images[0].crop(region)), pixels(whole.images[0]))
    assert np.array_equal(pixels(only.images[0])[:, :58], pixels(init)[:, :58])


def test_a_blurred_mask_widens_the_region_and_the_paste(base, astronaut):
    init = astronaut.resize((128, 96))
    mask = rect_mask((128, 96), (80, 20, 100, 40))
    result = inpaint(base, init_image=init, mask=mask, mask_blur=3)
    blurred = masking.blur(mask, 3, 3)
    assert result.info["inpaint_region"] == list(expected_region(np.asarray(blurred), 0, 64, 64))
    out, src = pixels(result.images[0]), pixels(init)
    reached = np.asarray(blurred) > 0
    assert np.array_equal(out[~reached], src[~reached])
    ring = reached & (np.asarray(mask) == 0)  # past the mask's edge, within the blur's reach: partly repainted
    assert np.abs(out[ring] - src[ring]).mean() > 1.0


def test_a_mask_blank_once_blurred_runs_image_to_image_of_the_whole(base, astronaut):
    init = astronaut.resize((96, 80))
    result = inpaint(base, init_image=init, mask=Image.new("L", (96, 80)), mask_blur=4)
    assert result.images[0].size == (64, 64) and result.info["mode"] == "img2img"
    assert any("blank" in w for w in result.warnings)


def test_a_deferred_paste_travels_with_the_result(base, astronaut):
    """For a stage after the base (face restoration): the images as inpainted, at the generation size, and their
    pastes, which give the pixels the base would have answered."""
    init = astronaut.resize((96, 96))
    mask = rect_mask((96, 96), (10, 60, 30, 90))
    pasted = inpaint(base, init_image=init, mask=mask, batch_size=2)
    deferred = inpaint(base, init_image=init, mask=mask, batch_size=2, defer_paste=True)
    assert [i.size for i in deferred.images] == [(64, 64)] * 2 and len(deferred.pastes) == 2
    settled = deferred.pasted()
    assert not settled.pastes
    assert [pixels(i).tolist() for i in settled.images] == [pixels(i).tolist() for i in pasted.images]


# --- the whole picture's mask: A1111's order ------------------------------------------------------------------------

def a1111_resize(mode: int, image: Image.Image, width: int, height: int) -> Image.Image:
    """A1111 1.10's ``images.resize_image`` for an image it resizes with Lanczos (a mask; an image with no img2img
    upscaler), step by step: 0 stretches; 1 scales the whole image to cover (the other side floored) and pastes it
    centred on a black canvas; 2 scales it to fit, pastes it centred, then stretches its first and last rows (or
    columns) over the borders, each resized from an empty box at that edge with PIL's default filter."""
    if mode == 0:
        return image.resize((width, height), Image.LANCZOS)
    target, source = width / height, image.width / image.height
    if mode == 1:
        scaled_w = width if target > source else image.width * height // image.height
        scaled_h = height if target <= source else image.height * width // image.width
    else:
        scaled_w = width if target < source else image.width * height // image.height
        scaled_h = height if target >= source else image.height * width // image.width
    scaled = image.resize((scaled_w, scaled_h), Image.LANCZOS)
    canvas = Image.new("RGB", (width, height))
    canvas.paste(scaled, (width // 2 - scaled_w // 2, height // 2 - scaled_h // 2))
    if mode == 2 and target < source:
        band = height // 2 - scaled_h // 2
        canvas.paste(scaled.resize((width, band), box=(0, 0, width, 0)), (0, 0))
        canvas.paste(scaled.resize((width, band), box=(0, scaled_h, width, scaled_h)), (0, band + scaled_h))
    elif mode == 2 and target > source:
        band = width // 2 - scaled_w // 2
        canvas.paste(scaled.resize((band, height), box=(0, 0, 0, height)), (0, 0))
        canvas.paste(scaled.resize((band, height), box=(scaled_w, 0, scaled_w, height)), (band + scaled_w, 0))
    return canvas


def a1111_whole_mask(mask: Image.Image, width: int, height: int, mode: int, across: int, down: int) -> np.ndarray:
    """``StableDiffusionProcessingImg2Img.init``'s mask for a whole picture: OpenCV's blur at the upload's size, x
    then y, then ``resize_image`` with the request's resize mode (its first band: A1111's canvas is RGB)."""
    drawn = np.asarray(mask)
    if across > 0:
        drawn = cv2.GaussianBlur(drawn, (2 * int(2.5 * across + 0.5) + 1, 1), across)
    if down > 0:
        drawn = cv2.GaussianBlur(drawn, (1, 2 * int(2.5 * down + 0.5) + 1), down)
    framed = a1111_resize(mode, Image.fromarray(drawn), width, height)
    return np.asarray(framed)[..., 0] if framed.mode == "RGB" else np.asarray(framed)


@pytest.mark.parametrize(("size", "target"), [
    ((300, 200), (256, 256)), ((200, 300), (256, 256)), ((97, 61), (128, 128)), ((61, 97), (64, 128)),
    ((300, 201), (512, 512)), ((128, 64), (64, 64)), ((64, 64), (96, 64)), ((80, 80), (80, 80)),
])
@pytest.mark.parametrize(("mode", "fit"), [(0, "stretch"), (1, "crop"), (2, "fill")])
def test_frame_is_a1111s_resize_image_pixel_for_pixel(size, target, mode, fit):
    """Sizes floored, placed at half less half, fill's borders resampled from the edge with bicubic: an image and
    a soft mask come out exactly as A1111 frames them (crop is exact only while the covering image is at most
    COVER_LIMIT times the target's pixels, which every size here is)."""
    rng = np.random.default_rng(sum(size) + sum(target))
    image = Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))
    mask = Image.fromarray(cv2.GaussianBlur(rng.integers(0, 2, (size[1], size[0]), dtype=np.uint8) * 255, (9, 9), 3))
    assert np.array_equal(pixels(frame(image, *target, fit)), pixels(a1111_resize(mode, image, *target)))
    framed = frame(mask, *target, fit)
    assert framed.mode == "L" and np.array_equal(np.asarray(framed),
                                                 np.asarray(a1111_resize(mode, mask, *target).convert("L")))


@pytest.mark.parametrize("size", [(403, 15), (15, 403)])
def test_a_far_other_shape_is_cropped_from_its_centre_alone(size):
    """Past COVER_LIMIT, crop scales only the image's centre (not a 403 x 15 strip to 1719 x 64 for a 64x64 answer):
    a fraction of a pixel off A1111's placing, within a few levels of its pixels on a smooth image."""
    noise = np.random.default_rng(2).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    strip = Image.fromarray(cv2.GaussianBlur(noise, (0, 0), 2))
    ours, theirs = pixels(frame(strip, 64, 64, "crop")), pixels(a1111_resize(1, strip, 64, 64))
    covering = max(size) * 64 // min(size) * 64  # the whole strip scaled to cover 64x64
    assert covering > COVER_LIMIT * 64 * 64
    assert ours.shape == theirs.shape == (64, 64, 3) and np.abs(ours - theirs).max() <= 4


@pytest.mark.parametrize(("mode", "fit"), [(0, "stretch"), (1, "crop"), (2, "fill")])
def test_the_whole_pictures_mask_is_blurred_at_its_upload_size_then_framed(base, astronaut, mode, fit, monkeypatch):
    """The mask the base inpaints a whole picture with (its latent mask and filled pixels) and the paste's alpha are
    A1111's: the upload blurred at its own size, framed by the resize mode, doubled for the overlay."""
    from deployments.support import inpainting

    mask = rect_mask((48, 40), (10, 6, 30, 24))
    seen: list[Image.Image] = []
    of = inpainting.Repaint.of
    monkeypatch.setattr(inpainting.Repaint, "of", lambda content, used, *rest: (seen.append(used), of(content, used,
                                                                                                       *rest))[1])
    result = base.generate(GenerationRequest(**SMALL, init_image=astronaut.resize((64, 64)), mask=mask, mask_blur=3,
                                             mask_blur_y=1, mask_fit=fit, masked_content="fill", defer_paste=True))
    expected = a1111_whole_mask(mask, 64, 64, mode, 3, 1)
    assert len(seen) == 1 and np.array_equal(np.asarray(seen[0]), expected)
    assert np.array_equal(np.asarray(result.pastes[0].alpha), np.clip(expected.astype(int) * 2, 0, 255))
    assert 0 < int((expected > 0).sum()) < 64 * 64


def test_a_small_mask_keeps_its_soft_edge_in_proportion_at_a_larger_size():
    """The review's example: a 256² mask at 1024² with blur 4 softens over 4 times the pixels it did when the blur
    ran at 1024 (A1111 blurs the upload: the edge grows with the resize)."""
    mask = rect_mask((256, 256), (64, 64, 192, 192))
    row = np.asarray(masking.whole_picture(mask, 1024, 1024, "stretch", 4, 4))[512]
    before = np.asarray(masking.blur(mask.resize((1024, 1024), Image.NEAREST), 4, 4))[512]
    assert np.array_equal(row, a1111_whole_mask(mask, 1024, 1024, 0, 4, 4)[512])
    soft, was = int(((row > 0) & (row < 255)).sum()), int(((before > 0) & (before < 255)).sum())
    assert was == 2 * 20 and soft >= 4 * was - 8  # two edges, each the blur's 21 taps wide less one


# --- "Only masked" decided before the base: the blurred mask's box ------------------------------------------------

def random_mask(rng: np.random.Generator) -> Image.Image:
    """A few small blots of any level, anywhere (at the edges and corners too), on a small mask."""
    width, height = (int(n) for n in rng.integers(8, 120, 2))
    drawn = np.zeros((height, width), np.uint8)
    for _ in range(int(rng.integers(1, 4))):
        y, x = int(rng.integers(0, height)), int(rng.integers(0, width))
        drawn[y:y + int(rng.integers(1, 5)), x:x + int(rng.integers(1, 5))] = int(rng.integers(1, 256))
    return Image.fromarray(drawn)


def test_the_blurred_box_from_the_drawn_region_is_the_whole_blurs():
    """Blurring only the drawn region, twice the blur's reach around it, finds exactly the box (or the blankness) of
    the whole mask's blur, at the image's edges too; a cut of one reach would not (its reflected border adds
    pixels that the whole mask has zeros for: about one mask in nine here)."""
    rng = np.random.default_rng(7)
    blank = 0
    for _ in range(300):
        mask = random_mask(rng)
        across, down = (int(n) for n in rng.integers(0, 12, 2))
        whole = masking.blur(mask, across, down).getbbox()
        assert masking.blurred_box(mask, across, down) == whole, (mask.size, across, down)
        blank += whole is None
    assert 0 < blank < 300  # some blots vanish in the blur, most do not


@pytest.mark.parametrize(("level", "across", "down", "blank"), [
    (1, 4, 4, True),  # the review's case: one pixel of 1 blurred by 4
    (255, 4, 4, False),
    (6, 4, 0, False),  # 6 x 0.1 rounds to 1 along a row alone
    (6, 4, 4, True),  # then the column's blur takes it to 0
    (1, 0, 0, False),  # no blur: the pixel itself
])
def test_a_faint_pixel_can_vanish_in_the_blur(level, across, down, blank):
    mask = Image.new("L", (64, 48))
    mask.putpixel((0, 47), level)  # a corner: the blur reflects there
    assert (masking.blurred_box(mask, across, down) is None) is blank
    assert (masking.blur(mask, across, down).getbbox() is None) is blank
    assert (masking.only_masked(Image.new("RGB", (64, 48)), mask, 64, 64, 0, across, down) is None) is blank
