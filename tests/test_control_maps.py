"""A control map at the generation size, framed as A1111's ControlNet extension frames a detected map: a few-colour
map keeps its colours, a canny map stays binary and one pixel thin, Resize and Fill centres the map on its median
border colour, Crop and Resize crops the centre; and a unit's control image is framed so, module none too."""

from __future__ import annotations

import cv2
import numpy as np
from PIL import Image

from deployments.support.control import ControlUnit, control_image
from deployments.support.control_maps import frame_map, nms, resize_map
from deployments.support.imaging import frame

POSE_COLOURS = {(0, 0, 0), (255, 0, 0), (0, 255, 85), (0, 0, 255), (255, 170, 0)}


def pose_like() -> Image.Image:
    """A pose map's kind of image: a few limbs and joints of exact colours on black."""
    x = np.zeros((48, 40, 3), np.uint8)
    cv2.line(x, (5, 5), (30, 40), (255, 0, 0), 3)
    cv2.line(x, (35, 4), (8, 30), (0, 255, 85), 2)
    cv2.circle(x, (20, 24), 4, (0, 0, 255), -1)
    cv2.ellipse(x, (28, 12), (6, 3), 30, 0, 360, (255, 170, 0), -1)
    return Image.fromarray(x)


def canny_map() -> Image.Image:
    shapes = np.zeros((64, 64), np.uint8)
    cv2.circle(shapes, (30, 34), 20, 255, -1)
    cv2.rectangle(shapes, (5, 5), (25, 20), 128, -1)
    return Image.fromarray(cv2.Canny(shapes, 100, 200)).convert("RGB")


def opened_share(gray: np.ndarray) -> float:
    """The share of a binary map's white pixels that an opening (3x3 erode, then dilate) removes: the extension's
    test of a one-pixel-edge map (over a half)."""
    square = np.ones((3, 3), np.uint8)
    return float((cv2.dilate(cv2.erode(gray, square), square) < gray).sum() / (gray > 127).sum())


def test_a_few_colour_map_keeps_exactly_its_colours():
    image = pose_like()
    assert {tuple(c) for c in np.asarray(image).reshape(-1, 3)} == POSE_COLOURS
    for fit in ("stretch", "crop", "fill"):
        framed = np.asarray(frame_map(image, 96, 64, fit))
        assert framed.shape == (64, 96, 3)
        assert {tuple(c) for c in framed.reshape(-1, 3)} == POSE_COLOURS, fit
    # Nearest neighbour, as OpenCV computes it; Lanczos would have blended colours the map never had.
    stretched = np.asarray(frame_map(image, 96, 64, "stretch"))
    assert np.array_equal(stretched, cv2.resize(np.asarray(image), (96, 64), interpolation=cv2.INTER_NEAREST))
    assert len({tuple(c) for c in np.asarray(frame(image, 96, 64, "stretch")).reshape(-1, 3)}) > 20


def test_a_canny_map_enlarged_stays_binary_and_one_pixel_thin():
    edges = canny_map()
    framed = np.asarray(frame_map(edges, 160, 160, "stretch"))
    assert set(np.unique(framed)) == {0, 255}
    assert (framed[..., 0] == framed[..., 1]).all() and (framed[..., 0] == framed[..., 2]).all()
    gray = framed[..., 0]
    # One pixel thin: an opening removes every line, as it does the canny map's own.
    assert opened_share(np.asarray(edges)[..., 0]) > 0.5 and opened_share(gray) > 0.95
    # Cubic and Otsu alone leave lines several pixels wide: the suppression and the thinning are what thin them.
    cubic = cv2.resize(np.asarray(edges)[..., 0], (160, 160), interpolation=cv2.INTER_CUBIC)
    _, thick = cv2.threshold(cubic, 0, 255, cv2.THRESH_BINARY + cv2.THRESH_OTSU)
    assert opened_share(thick) < 0.2 and (gray > 0).sum() < (thick > 0).sum() / 2
    # The lines stay where canny's were: every white pixel lies on the enlarged, thresholded edges.
    assert (thick[gray > 0] == 255).all()


def test_a_thick_binary_map_is_resized_then_otsu_thresholded():
    # Not one-pixel edges (a filled disc): area filter to shrink, then Otsu on the channels' mean.
    disc = np.zeros((90, 90), np.uint8)
    cv2.circle(disc, (40, 50), 30, 255, -1)
    framed = np.asarray(frame_map(Image.fromarray(disc).convert("RGB"), 50, 40, "stretch"))
    _, expected = cv2.threshold(cv2.resize(disc, (50, 40), interpolation=cv2.INTER_AREA), 0, 255,
                                cv2.THRESH_BINARY + cv2.THRESH_OTSU)
    assert np.array_equal(framed, np.stack([expected] * 3, axis=2))


def test_nms_keeps_a_pixel_that_is_a_maximum_along_some_direction():
    rng = np.random.default_rng(3)
    gray = rng.integers(0, 256, (12, 15), dtype=np.uint8)
    padded = np.pad(gray.astype(np.int16), 1, constant_values=-1)  # outside the map counts for nothing
    h, w = gray.shape

    def at(dy: int, dx: int) -> np.ndarray:
        return padded[1 + dy:1 + dy + h, 1 + dx:1 + dx + w]

    kept = np.zeros_like(gray, dtype=bool)
    for (ay, ax), (by, bx) in (((0, -1), (0, 1)), ((-1, 0), (1, 0)), ((-1, -1), (1, 1)), ((-1, 1), (1, -1))):
        kept |= (gray >= at(ay, ax)) & (gray >= at(by, bx))
    assert np.array_equal(nms(gray), np.where(kept, gray, 0))


def test_fill_centres_the_map_on_its_median_border_colour():
    x = np.full((20, 40, 3), (10, 20, 30), np.uint8)
    x[0, :15] = (200, 100, 50)  # a minority of the border pixels
    x[5:15, 10:30] = (250, 250, 250)
    x[8:12, 12:20] = (0, 90, 0)
    framed = np.asarray(frame_map(Image.fromarray(x), 64, 64, "fill"))
    # 40x20 at k = min(64/20, 64/40) = 1.6 is 64x32, pasted 16 rows down.
    assert (framed[:16] == (10, 20, 30)).all() and (framed[48:] == (10, 20, 30)).all()
    assert np.array_equal(framed[16:48], cv2.resize(x, (64, 32), interpolation=cv2.INTER_NEAREST))
    # The median of every border pixel, corners counted twice, per channel, truncated to an integer.
    border = np.concatenate([x[0], x[-1], x[:, 0], x[:, -1]])
    assert tuple(np.median(border, axis=0).astype(np.uint8)) == (10, 20, 30)
    # A border of two colours, one for each half: its median lies between them, truncated.
    two = np.zeros((10, 10, 3), np.uint8)
    two[:, 5:] = 255
    canvas = np.asarray(frame_map(Image.fromarray(two), 20, 40, "fill"))
    assert tuple(canvas[0, 0]) == (127, 127, 127)


def test_crop_takes_the_centre():
    columns = np.tile(np.arange(80, dtype=np.uint8)[None, :, None], (40, 1, 3))  # 80 grey levels, nearest
    columns[:, :, 1] = 255 - columns[:, :, 1]
    framed = np.asarray(frame_map(Image.fromarray(columns), 32, 32, "crop"))
    # k = max(32/40, 32/80) = 0.8: 64x32, then columns 16 to 47 (as many cut on either side).
    assert np.array_equal(framed, cv2.resize(columns, (64, 32), interpolation=cv2.INTER_NEAREST)[:, 16:48])


def test_a_map_at_the_size_is_kept_and_every_unit_is_framed_so():
    photo = np.random.default_rng(0).integers(0, 256, (64, 96, 3), dtype=np.uint8)  # many colours
    assert resize_map(photo, (96, 64)) is photo
    # Module none frames the image itself as a detected map (the extension runs detectmap_proc on it too).
    unit = ControlUnit(model="tiny-canny", image=pose_like(), module="none", resize_mode="stretch")
    assert np.array_equal(np.asarray(control_image(unit, None, 96, 64)), np.asarray(frame_map(pose_like(), 96, 64,
                                                                                              "stretch")))
    # A photo (over 200 colours) is resized with the area filter to shrink, cubic to enlarge.
    shrunk = np.asarray(frame_map(Image.fromarray(photo), 48, 32, "stretch"))
    assert np.array_equal(shrunk, cv2.resize(photo, (48, 32), interpolation=cv2.INTER_AREA))
    grown = np.asarray(frame_map(Image.fromarray(photo), 192, 128, "stretch"))
    assert np.array_equal(grown, cv2.resize(photo, (192, 128), interpolation=cv2.INTER_CUBIC))
