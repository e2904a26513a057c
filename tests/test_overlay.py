"""Overlays (captions and logo watermarks) without Ray: where the pixels land, how opacity blends, how text
wraps, and every hostile input refused with its field named, as ``/process`` and ``/generate`` see them."""

from __future__ import annotations

import base64
import math

import numpy as np
import pytest
from PIL import Image, ImageDraw, ImageFont
from pydantic import ValidationError

from deployments.support.errors import InvalidImage, InvalidInput
from deployments.support.overlay import Overlay, _place, _text_layer, draw, prepare, wrap
from graphs.api.processing import ProcessRequest, overlays_of, process_image
from tests.helpers import b64, decode_b64, pixels

GREY = (100, 100, 100)
W, H = 200, 150
ANCHORS = ["top-left", "top-center", "top-right", "center-left", "center", "center-right", "bottom-left",
           "bottom-center", "bottom-right"]


def canvas(mode: str = "RGB") -> Image.Image:
    return Image.new(mode, (W, H), GREY if mode == "RGB" else (*GREY, 255))


def logo(width: int = 40, height: int = 20, colour=(255, 0, 0, 255)) -> str:
    return b64(Image.new("RGBA", (width, height), colour))


def changed(before: Image.Image, after: Image.Image) -> tuple[int, int, int, int] | None:
    """The bounding box (left, top, right, bottom; right and bottom exclusive) of the pixels that differ."""
    diff = np.any(pixels(before.convert("RGB")) != pixels(after.convert("RGB")), axis=2)
    ys, xs = np.nonzero(diff)
    return (int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1) if len(xs) else None


def overlaid(spec: Overlay, image: Image.Image | None = None, fonts=None) -> tuple[Image.Image, Image.Image]:
    image = image or canvas()
    return image, draw(image, prepare(spec, fonts, "overlay"))


@pytest.mark.parametrize("anchor", ANCHORS)
def test_a_logo_lands_exactly_at_its_anchor(anchor):
    before, after = overlaid(Overlay(logo=logo(), size=0.2, position=anchor, margin=10))
    row, _, column = anchor.partition("-")
    column = column or "center"
    left = {"left": 10, "center": (W - 40) // 2, "right": W - 40 - 10}[column]
    top = {"top": 10, "center": (H - 20) // 2, "bottom": H - 20 - 10}[row]
    assert changed(before, after) == (left, top, left + 40, top + 20)
    assert after.getpixel((left + 5, top + 5)) == (255, 0, 0)


@pytest.mark.parametrize("anchor", ANCHORS)
def test_text_lands_in_its_corner_within_the_margin(anchor):
    margin = 12
    before, after = overlaid(Overlay(text="Watermark", size=0.1, position=anchor, margin=margin))
    left, top, right, bottom = changed(before, after)
    row, _, column = anchor.partition("-")
    column = column or "center"
    slack = 2  # anti-aliased glyph edges
    assert left >= margin and top >= margin and right <= W - margin and bottom <= H - margin
    if column == "left":
        assert left <= margin + slack
    elif column == "right":
        assert right >= W - margin - slack
    else:
        assert abs((left + right) / 2 - W / 2) <= slack
    if row == "top":
        assert top <= margin + slack
    elif row == "bottom":
        assert bottom >= H - margin - slack
    else:
        assert abs((top + bottom) / 2 - H / 2) <= slack


def test_x_and_y_place_the_top_left_corner():
    before, after = overlaid(Overlay(logo=logo(), size=0.2, x=0.5, y=0.2))
    assert changed(before, after) == (100, 30, 140, 50)


def test_an_overlay_past_the_edge_is_clipped():
    before, after = overlaid(Overlay(logo=logo(), size=0.2, x=0.9, y=0.9))
    assert changed(before, after) == (180, 135, W, H)


def test_a_caption_taller_than_the_image_costs_no_more_than_the_image():
    # 500 wide characters at the image's height on a tall, thin image: every character a line of its own, a
    # block of gigabytes had it been drawn whole before the paste clipped it.
    spec = prepare(Overlay(text="W" * 500, size=1.0), None, "overlay")
    layer, corner = _text_layer((64, 2048), spec)
    assert layer.width <= 64 and layer.height <= 2048 and corner == (0, 0)


@pytest.mark.parametrize("spec", [
    Overlay(text="W" * 40, size=0.6, position="center"),
    Overlay(text="gy jq\n\nA caption, long enough", size=0.5, max_width=0.3, position="bottom-center"),
    Overlay(text="line one\nline two\nthree", size=1.0, x=0.3, y=0.2),
    Overlay(text="several words that wrap", size=0.4, position="top-right", margin=0),
])
def test_a_clipped_caption_shows_what_the_whole_block_would(spec):
    """Against multiline_text drawing the whole block, placed by the anchor, then clipped by the paste."""
    image = canvas()
    font = ImageFont.load_default(size=round(spec.size * H))
    text = "\n".join(wrap(spec.text, font, min(spec.max_width * W, W - 2 * spec.margin)))
    align = spec.position.rsplit("-", 1)[-1] if "-" in spec.position else "center"
    spacing = round(spec.size * H) // 5
    box = ImageDraw.Draw(image).multiline_textbbox((0, 0), text, font=font, spacing=spacing, align=align)
    block = Image.new("RGBA", (math.ceil(box[2] - box[0]), math.ceil(box[3] - box[1])), (255, 255, 255, 0))
    glyphs = Image.new("L", block.size, 0)
    ImageDraw.Draw(glyphs).multiline_text((-box[0], -box[1]), text, font=font, fill=255, spacing=spacing,
                                          align=align)
    block.putalpha(glyphs)
    expected = Image.new("RGBA", image.size, (0, 0, 0, 0))
    expected.paste(block, _place(image.size, block.size, spec))
    expected = Image.alpha_composite(image.convert("RGBA"), expected).convert("RGB")
    assert changed(expected, draw(image, prepare(spec, None, "overlay"))) is None


@pytest.mark.parametrize("spec", [Overlay(text="Hello", opacity=0.0), Overlay(logo=logo(), opacity=0.0)])
def test_opacity_zero_changes_nothing(spec):
    before, after = overlaid(spec)
    assert changed(before, after) is None and after.mode == "RGB"


def test_opacity_blends_towards_the_overlay():
    before, after = overlaid(Overlay(logo=logo(), size=0.2, opacity=0.5, position="top-left", margin=0))
    red, green, blue = after.getpixel((5, 5))
    assert abs(red - (100 + 255) / 2) <= 1 and abs(green - 50) <= 1 and abs(blue - 50) <= 1
    assert after.getpixel((100, 100)) == GREY


def test_text_takes_its_colour():
    before, after = overlaid(Overlay(text="Hello", size=0.2, color="#00ff00", position="center"))
    inked = pixels(after)[np.all(pixels(after) != pixels(before), axis=2)]
    assert (inked[:, 1] > inked[:, 0]).all() and (inked[:, 1] > inked[:, 2]).all()
    assert any(tuple(p) == (0, 255, 0) for p in inked)  # solid glyph cores are exactly the colour


def test_wrapping_keeps_text_within_the_width():
    text = "a caption long enough to need several lines at this width"
    before, one_line = overlaid(Overlay(text="caption", size=0.08, position="top-left", margin=0))
    line_height = changed(before, one_line)[3]
    _, after = overlaid(Overlay(text=text, size=0.08, max_width=0.4, position="top-left", margin=0))
    left, top, right, bottom = changed(before, after)
    assert right - left <= 0.4 * W
    assert bottom - top > 2 * line_height  # it did wrap, onto three lines or more


def test_a_word_wider_than_the_limit_is_cut():
    font = ImageFont.load_default(size=20)
    lines = wrap("supercalifragilistic ok", font, 60)
    assert len(lines) > 2 and all(font.getlength(line) <= 60 for line in lines)
    assert "".join(lines).replace(" ", "") == "supercalifragilisticok"


def test_rgba_stays_rgba_and_grey_becomes_rgb():
    _, rgba = overlaid(Overlay(text="Hi"), canvas("RGBA"))
    _, grey = overlaid(Overlay(text="Hi"), Image.new("L", (W, H), 100))
    assert rgba.mode == "RGBA" and grey.mode == "RGB"


@pytest.fixture
def fonts(tmp_path):
    folder = tmp_path / "fonts"
    folder.mkdir()
    (folder / "aileron.ttf").write_bytes(ImageFont.load_default(size=10).font_bytes)  # Pillow's own TTF
    (folder / "broken.ttf").write_bytes(b"not a font")
    (tmp_path / "secret.ttf").write_bytes(b"outside the folder")
    return folder


def test_a_font_from_the_fonts_folder(fonts):
    prepared = prepare(Overlay(text="Hi", font="aileron"), fonts, "overlay")
    assert prepared.font_path == fonts / "aileron.ttf"
    assert prepare(Overlay(text="Hi", font="aileron.ttf"), fonts, "overlay").font_path == fonts / "aileron.ttf"
    assert changed(canvas(), draw(canvas(), prepared)) is not None


@pytest.mark.parametrize("name", ["missing", "../secret", "secret", "/etc/passwd", "aileron.ttf/..", ".hidden"])
def test_an_unknown_font_is_refused_by_name(fonts, name):
    with pytest.raises(InvalidInput) as e:
        prepare(Overlay(text="Hi", font=name), fonts, "overlays.0")
    assert e.value.code == "INVALID_INPUT" and e.value.field == "overlays.0.font"
    assert e.value.details["available"] == ["aileron.ttf", "broken.ttf"]


def test_a_broken_font_file_and_no_fonts_folder_are_refused(fonts):
    with pytest.raises(InvalidInput, match="not a usable font") as e:
        prepare(Overlay(text="Hi", font="broken"), fonts, "overlay")
    assert e.value.field == "overlay.font"
    with pytest.raises(InvalidInput) as e:
        prepare(Overlay(text="Hi", font="aileron"), None, "overlay")
    assert e.value.field == "overlay.font"


@pytest.mark.parametrize(("body", "field"), [
    ({"text": "x" * 501}, "text"),
    ({"text": "x", "opacity": 1.5}, "opacity"),
    ({"text": "x", "opacity": -0.1}, "opacity"),
    ({"text": "x", "color": "not-a-colour"}, "color"),
    ({"text": "x", "color": "#12345"}, "color"),
    ({"text": "x", "color": "rgb(99999999999999999999,0,0)"}, "color"),
    ({"text": "x", "color": "rgb(256,0,0)"}, "color"),
    ({"text": "x", "color": "rgba(1,2,3,999)"}, "color"),
    ({"text": "x", "color": "hsl(400,200%,50%)"}, "color"),
    ({"text": "x", "size": 0}, "size"),
    ({"text": "x", "position": "upper-left"}, "position"),
    ({"text": "x", "margin": -1}, "margin"),
    ({"text": "x", "maxWidth": 2}, "maxWidth"),
    ({"text": "x", "x": 1.5, "y": 0}, "x"),
    ({"text": "x", "stroke": 2}, "stroke"),
])
def test_out_of_range_values_name_their_field(body, field):
    with pytest.raises(ValidationError) as e:
        ProcessRequest.model_validate({"image": "x", "operations": ["overlay"], "overlays": [body]})
    assert e.value.errors()[0]["loc"] == ("overlays", 0, field)


@pytest.mark.parametrize(("spec", "field"), [
    (Overlay(), "overlay.text"),
    (Overlay(text="x", logo=logo()), "overlay.text"),
    (Overlay(text="x", x=0.5), "overlay.y"),
    (Overlay(text="x", y=0.5), "overlay.x"),
])
def test_inconsistent_overlays_name_their_field(spec, field):
    with pytest.raises(InvalidInput) as e:
        prepare(spec, None, "overlay")
    assert e.value.field == field


def test_an_oversized_logo_is_refused_from_its_header():
    big = logo(3000, 2000)
    with pytest.raises(InvalidInput) as e:
        prepare(Overlay(logo=big), None, "overlay")
    assert e.value.code == "INVALID_INPUT" and e.value.field == "overlay.logo"


@pytest.mark.parametrize("data", ["not base64 at all", base64.b64encode(b"GIF89a....").decode(), "",
                                  "data:image/png;base64", "data:image/png"])
def test_an_undecodable_logo_is_an_invalid_image(data):
    with pytest.raises(InvalidImage) as e:
        prepare(Overlay(logo=data or "data:image/png;base64,"), None, "overlay")
    assert e.value.field == "overlay.logo"


def test_process_draws_overlays_after_sanitizing(astronaut):
    body = ProcessRequest(image=b64(astronaut), operations=["sanitize", "overlay"],
                          overlays=[Overlay(logo=logo(), size=0.1, position="bottom-left", margin=8),
                                    Overlay(text="(c) imagegen", position="top-right")])
    answer = process_image(astronaut, body, overlays_of(body, None))
    out = decode_b64(answer.imageData)
    assert answer.format == "png" and out.size == astronaut.size
    box = changed(astronaut, out)
    assert box[0] <= 8 + 1 and box[3] >= astronaut.height - 8 - 1  # the logo, bottom left
    assert box[2] >= astronaut.width - 16 - 2 and box[1] <= 16 + 2  # the caption, top right
    assert out.getpixel((12, astronaut.height - 12)) == (255, 0, 0)


def test_the_overlay_operation_and_its_overlays_come_together():
    with pytest.raises(InvalidInput) as e:
        overlays_of(ProcessRequest(image="x", operations=["overlay"]), None)
    assert e.value.field == "overlays"
    with pytest.raises(InvalidInput) as e:
        overlays_of(ProcessRequest(image="x", operations=["sanitize"], overlays=[Overlay(text="x")]), None)
    assert e.value.field == "operations"

