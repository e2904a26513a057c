"""Visible overlays on a finished image: a caption or a logo watermark (seed 002's optional "text overlay" and
"watermark" steps). ``/process`` applies them as an operation, ``/generate`` after generation and before encoding.

Two steps, so that a bad overlay is refused before any work starts: ``prepare`` checks everything the request
names (exactly one of text and logo, the font file, the logo's size and bytes) and raises a typed error naming
the field; ``draw`` then cannot fail on input. Torch-free: the ingress runs it.
"""

from __future__ import annotations

import io
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from PIL import Image, ImageColor, ImageDraw, ImageFont
from pydantic import AliasChoices, BaseModel, ConfigDict, Field, field_validator

from deployments.support.errors import InvalidInput
from deployments.support.imaging import decode, image_bytes

MAX_TEXT_CHARS = 500
MAX_LOGO_CHARS = 4 * 1024 * 1024  # base64 characters, about 3 MB of PNG
MAX_LOGO_PIXELS = 2048 * 2048
FONT_SUFFIXES = (".ttf", ".otf", ".ttc")
FONT_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,127}")
DEFAULT_TEXT_SIZE = 0.05  # of the image's height
DEFAULT_LOGO_SIZE = 0.2  # of the image's width

Anchor = Literal["top-left", "top-center", "top-right", "center-left", "center", "center-right", "bottom-left",
                 "bottom-center", "bottom-right"]
_ROWS = {"top": 0.0, "center": 0.5, "bottom": 1.0}
_COLUMNS = {"left": 0.0, "center": 0.5, "right": 1.0}


class Overlay(BaseModel):
    """One caption or one logo, placed at an anchor (or at x/y) and blended at an opacity."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    text: str | None = Field(None, min_length=1, max_length=MAX_TEXT_CHARS, description="a caption; or give logo")
    logo: str | None = Field(None, max_length=MAX_LOGO_CHARS, description="base64 or data URI PNG, JPEG or WebP")
    position: Anchor = Field("bottom-right", description="one of the nine anchors; x and y replace it")
    x: float | None = Field(None, ge=0.0, le=1.0, description="left edge, as a fraction of the image's width")
    y: float | None = Field(None, ge=0.0, le=1.0, description="top edge, as a fraction of the image's height")
    margin: int = Field(16, ge=0, le=1024, description="pixels between the overlay and the anchored edges")
    size: float | None = Field(None, gt=0.0, le=1.0, description=f"text: font size as a fraction of the image's "
                               f"height (default {DEFAULT_TEXT_SIZE}); logo: width as a fraction of the image's "
                               f"width (default {DEFAULT_LOGO_SIZE})")
    opacity: float = Field(1.0, ge=0.0, le=1.0, description="0 leaves the image unchanged")
    font: str | None = Field(None, max_length=128, description="a font file in FONTS_DIR (with or without its "
                             "suffix); default: PIL's own")
    color: str = Field("white", max_length=64, description="a colour name, #rgb, #rrggbb or rgb(r, g, b)")
    max_width: float = Field(0.9, gt=0.0, le=1.0, validation_alias=AliasChoices("max_width", "maxWidth"),
                             description="text wraps at this fraction of the image's width")

    @field_validator("color")
    @classmethod
    def known_colour(cls, value: str) -> str:
        try:
            channels = ImageColor.getrgb(value)
        except ValueError as e:
            raise ValueError(f"{value!r} is not a colour") from e
        # PIL parses rgb(999, 0, 0) and hsl(400, 200%, 50%) without complaint, and fails only when the layer is
        # drawn, after the image was made: out-of-range channels are refused here.
        if not all(0 <= channel <= 255 for channel in channels):
            raise ValueError(f"{value!r} has a channel outside 0..255")
        return value


@dataclass(frozen=True)
class Prepared:
    """An overlay whose every input is checked: the spec, its decoded logo or its font file."""

    spec: Overlay
    logo: Image.Image | None = None
    font_path: Path | None = None


def prepare(spec: Overlay, fonts_dir: Path | None, field: str) -> Prepared:
    """Check ``spec`` against what it names; errors name ``field`` + the member (``overlay.font``)."""
    if (spec.text is None) == (spec.logo is None):
        raise InvalidInput(f"{field}: give exactly one of text and logo", field=f"{field}.text")
    if (spec.x is None) != (spec.y is None):
        missing = "y" if spec.y is None else "x"
        raise InvalidInput(f"{field}: x and y go together", field=f"{field}.{missing}")
    if spec.logo is not None:
        return Prepared(spec, logo=_logo(spec.logo, f"{field}.logo"))
    font_path = _font(spec.font, fonts_dir, f"{field}.font") if spec.font else None
    return Prepared(spec, font_path=font_path)


def prepare_all(specs: list[Overlay], fonts_dir: Path | None, field: str) -> list[Prepared]:
    return [prepare(spec, fonts_dir, f"{field}.{i}") for i, spec in enumerate(specs)]


def draw(image: Image.Image, overlay: Prepared) -> Image.Image:
    """The image with the overlay blended on; RGBA stays RGBA, anything else comes back RGB."""
    keeps_alpha = image.mode in ("RGBA", "LA", "PA") or "transparency" in image.info
    base = image.convert("RGBA")
    if overlay.logo is not None:
        layer = _logo_layer(base.size, overlay.spec, overlay.logo)
        corner = _place(base.size, layer.size, overlay.spec)
    else:
        layer, corner = _text_layer(base.size, overlay)
    canvas = Image.new("RGBA", base.size, (0, 0, 0, 0))
    canvas.paste(layer, corner)  # paste clips whatever falls outside
    out = Image.alpha_composite(base, canvas)
    return out if keeps_alpha else out.convert("RGB")


def draw_all(image: Image.Image, overlays: list[Prepared]) -> Image.Image:
    for overlay in overlays:
        image = draw(image, overlay)
    return image


# --- checks -------------------------------------------------------------------------------------------------------

def _logo(value: str, field: str) -> Image.Image:
    raw = image_bytes(value, field)
    try:
        with Image.open(io.BytesIO(raw)) as probe:  # the header only: a huge logo costs nothing
            width, height = probe.size
    except Image.DecompressionBombError as e:
        raise InvalidInput(f"{field}: larger than {MAX_LOGO_PIXELS} pixels", field=field) from e
    except (OSError, ValueError):
        width = height = 0  # not an image: decode() below says so in its own words
    if width * height > MAX_LOGO_PIXELS:
        raise InvalidInput(f"{field}: {width}x{height} is larger than {MAX_LOGO_PIXELS} pixels", field=field,
                           details={"limit_pixels": MAX_LOGO_PIXELS})
    return decode(raw, field=field).convert("RGBA")


def available_fonts(fonts_dir: Path | None) -> list[str]:
    if fonts_dir is None or not fonts_dir.is_dir():
        return []
    return sorted(p.name for p in fonts_dir.iterdir() if p.suffix.lower() in FONT_SUFFIXES and p.is_file())


def _font(name: str, fonts_dir: Path | None, field: str) -> Path:
    """A file of the fonts folder, by name with or without its suffix; nothing outside the folder."""
    known = available_fonts(fonts_dir)
    if FONT_NAME.fullmatch(name) and fonts_dir is not None:
        for candidate in (name, *(name + suffix for suffix in FONT_SUFFIXES)):
            if candidate in known:
                path = fonts_dir / candidate
                try:
                    ImageFont.truetype(str(path), 12)
                except OSError as e:
                    raise InvalidInput(f"{field}: {candidate} is not a usable font", field=field) from e
                return path
    raise InvalidInput(f"{field}: unknown font {name!r}", field=field, details={"available": known})


# --- drawing ------------------------------------------------------------------------------------------------------

def _text_layer(canvas: tuple[int, int], overlay: Prepared) -> tuple[Image.Image, tuple[int, int]]:
    """The wrapped caption as an RGBA block (its colour everywhere, the glyphs times opacity as alpha) and its
    top-left corner on the canvas. Only the part of the block that lands on the canvas is made, and only the lines
    that reach it are drawn: 500 wide characters on a tall, thin image would otherwise draw gigabytes of layer
    (for seconds) that the paste then clips away."""
    spec = overlay.spec
    width, height = canvas
    pixels = max(6, round((spec.size or DEFAULT_TEXT_SIZE) * height))
    font = (ImageFont.truetype(str(overlay.font_path), pixels) if overlay.font_path is not None
            else ImageFont.load_default(size=pixels))
    limit = max(1, min(spec.max_width * width, width - 2 * spec.margin))
    lines = wrap(spec.text or "", font, limit)
    align = spec.position.rsplit("-", 1)[-1] if "-" in spec.position else "center"
    spacing = max(1, pixels // 5)
    box = ImageDraw.Draw(Image.new("L", (1, 1))).multiline_textbbox((0, 0), "\n".join(lines), font=font,
                                                                   spacing=spacing, align=align)
    block = (max(1, math.ceil(box[2] - box[0])), max(1, math.ceil(box[3] - box[1])))
    left, top = _place(canvas, block, spec)
    # The window of the block that the canvas shows, in the block's own coordinates.
    x0, y0 = max(0, -left), max(0, -top)
    x1, y1 = min(block[0], width - left), min(block[1], height - top)
    glyphs = Image.new("L", (max(1, x1 - x0), max(1, y1 - y0)), 0)
    if x1 > x0 and y1 > y0:
        _draw_lines(ImageDraw.Draw(glyphs), lines, (-box[0] - x0, -box[1] - y0), glyphs.height, font, spacing,
                    align)
    rgba = ImageColor.getrgb(spec.color)
    alpha = (rgba[3] if len(rgba) == 4 else 255) / 255 * spec.opacity
    layer = Image.new("RGBA", glyphs.size, (*rgba[:3], 0))
    layer.putalpha(glyphs.point(lambda v: round(v * alpha)))
    return layer, (left + x0, top + y0)


def _draw_lines(draw: ImageDraw.ImageDraw, lines: list[str], origin: tuple[float, float], height: int,
                font: ImageFont.FreeTypeFont | ImageFont.ImageFont, spacing: int, align: str) -> None:
    """``multiline_text`` for the lines that reach rows 0..``height``: each where ``multiline_text`` puts it (one
    pitch below the last, aligned within the widest), the others skipped."""
    pitch = font.getbbox("A")[3] + spacing
    widest = max(font.getlength(line) for line in lines)
    share = {"left": 0.0, "center": 0.5, "right": 1.0}[align]
    for i, line in enumerate(lines):
        y = origin[1] + i * pitch
        ink = font.getbbox(line)
        if not line or y + ink[3] <= 0 or y + ink[1] >= height:
            continue
        draw.text((origin[0] + share * (widest - font.getlength(line)), y), line, font=font, fill=255)


def wrap(text: str, font: ImageFont.FreeTypeFont | ImageFont.ImageFont, limit: float) -> list[str]:
    """Greedy word wrap at ``limit`` pixels; a word wider than the limit is cut between characters."""
    lines: list[str] = []
    for paragraph in text.splitlines() or [""]:
        line = ""
        for word in paragraph.split():
            candidate = f"{line} {word}" if line else word
            if font.getlength(candidate) <= limit:
                line = candidate
                continue
            if line:
                lines.append(line)
            line = ""
            for char in word:
                if line and font.getlength(line + char) > limit:
                    lines.append(line)
                    line = ""
                line += char
        lines.append(line)
    return lines


def _logo_layer(canvas: tuple[int, int], spec: Overlay, logo: Image.Image) -> Image.Image:
    width = max(1, round((spec.size or DEFAULT_LOGO_SIZE) * canvas[0]))
    height = max(1, round(logo.height * width / logo.width))
    if height > canvas[1]:  # a tall logo: fit the image's height instead
        width, height = max(1, round(width * canvas[1] / height)), canvas[1]
    layer = logo.resize((width, height), Image.Resampling.LANCZOS)
    layer.putalpha(layer.getchannel("A").point(lambda v: round(v * spec.opacity)))
    return layer


def _place(canvas: tuple[int, int], layer: tuple[int, int], spec: Overlay) -> tuple[int, int]:
    """The layer's top-left corner: x/y when given, else the anchor ``margin`` pixels in from its edges."""
    (width, height), (w, h) = canvas, layer
    if spec.x is not None and spec.y is not None:
        return round(spec.x * width), round(spec.y * height)
    row, _, column = spec.position.partition("-")
    column = column or "center"
    fx, fy = _COLUMNS[column], _ROWS[row]
    left = round(spec.margin + fx * (width - w - 2 * spec.margin))
    top = round(spec.margin + fy * (height - h - 2 * spec.margin))
    return left, top
