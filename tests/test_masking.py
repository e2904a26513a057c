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
