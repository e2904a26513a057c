"""Image conversions shared by the deployments: PIL <-> tensors, encoding, A1111's metadata (a PNG's ``parameters``
text chunk; a JPEG's or WebP's EXIF UserComment, written and read as A1111 does through piexif)."""

from __future__ import annotations

import base64
import binascii
import io
import struct
from typing import Literal

import numpy as np
from PIL import ExifTags, Image, ImageOps, PngImagePlugin

from deployments.support.errors import InvalidImage, InvalidInput
from deployments.support.settings import current

Format = Literal["png", "jpeg", "webp"]
ALLOWED_FORMATS = {"PNG", "JPEG", "WEBP"}
MAX_INPUT_PIXELS = 4096 * 4096
SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")  # how PIL opens 16-bit greyscale PNGs
ORIENTATION = 0x0112  # the EXIF tag
# What PIL raises on an EXIF block it cannot parse (SyntaxError: "not a TIFF file").
EXIF_ERRORS = (SyntaxError, ValueError, OSError, struct.error, KeyError, IndexError, TypeError)
# A UserComment starts with 8 bytes naming its character code (EXIF 2.3, table 9). piexif, A1111's writer and
# reader, dumps "unicode" as big-endian UTF-16 whatever the TIFF byte order, and loads it the same way.
UNICODE_PREFIX, ASCII_PREFIX, JIS_PREFIX = b"UNICODE\0", b"ASCII\0\0\0", b"JIS\0\0\0\0\0"
JPEG_EXIF_MAX = 65533  # the most EXIF bytes one JPEG APP1 segment holds (Pillow refuses more)


def to_rgb(image: Image.Image) -> Image.Image:
    if image.mode == "RGB":
        return image
    if image.mode in SIXTEEN_BIT_MODES:
        image = eight_bit(image)
    if image.mode in ("RGBA", "LA", "P"):
        rgba = image.convert("RGBA")
        background = Image.new("RGB", rgba.size, (255, 255, 255))
        background.paste(rgba, mask=rgba.getchannel("A"))
        return background
    return image.convert("RGB")


def image_bytes(value: str, field: str) -> bytes:
    """The file a data URI or plain base64 string carries; malformed or empty is an ``InvalidImage`` naming the
    field."""
    payload = value
    if value.startswith("data:"):
        _, comma, payload = value.partition(",")
        if not comma:
            raise InvalidImage(f"{field}: a data URI needs a comma before its payload", field=field)
    try:
        raw = base64.b64decode(payload, validate=False)
    except (binascii.Error, ValueError) as e:
        raise InvalidImage(f"{field}: not valid base64", field=field) from e
    if not raw:
        raise InvalidImage(f"{field}: empty image", field=field)
    return raw


def decode(data: bytes, *, field: str = "image", max_pixels: int = MAX_INPUT_PIXELS,
           turn: bool = True) -> Image.Image:
    """Decode PNG, JPEG or WebP bytes; the pixel cap is checked from the header before any pixel is decoded. A
    16-bit greyscale image comes back as 8-bit; with ``turn``, the image comes back upright (``upright``), as
    every model and crop should see it."""
    try:
        image = Image.open(io.BytesIO(data))
    except (OSError, ValueError, Image.DecompressionBombError) as e:
        raise InvalidImage(f"{field}: not a decodable image", field=field) from e
    if image.format not in ALLOWED_FORMATS:
        raise InvalidImage(f"{field}: format {image.format} refused (PNG, JPEG or WebP only)", field=field)
    width, height = image.size
    if width * height > max_pixels:
        raise InvalidImage(f"{field}: {width}x{height} exceeds the {max_pixels}-pixel limit", field=field)
    try:
        image.load()
    except (OSError, ValueError, Image.DecompressionBombError) as e:
        raise InvalidImage(f"{field}: truncated or corrupt image", field=field) from e
    decoded: Image.Image = eight_bit(image) if image.mode in SIXTEEN_BIT_MODES else image
    return upright(decoded) if turn else decoded


def eight_bit(image: Image.Image) -> Image.Image:
    """A 16-bit greyscale image as 8-bit ``L``, scaled: PIL's own conversion clips at 255, nearly all white."""
    values = np.clip(np.asarray(image), 0, 65535).astype(np.uint32)
    out = Image.fromarray(((values * 255 + 32767) // 65535).astype(np.uint8), "L")
    out.info = dict(image.info)
    return out


def exif_of(image: Image.Image) -> Image.Exif | None:
    """The image's EXIF (empty when it has none), or None when the block is there but unreadable."""
    try:
        return image.getexif()
    except EXIF_ERRORS:
        return None


def upright(image: Image.Image) -> Image.Image:
    """The image as it is meant to be seen, turned by its EXIF orientation (a phone stores its JPEGs sideways);
    as stored when the orientation is absent, plain or unreadable."""
    exif = exif_of(image)
    if exif is None or exif.get(ORIENTATION, 1) == 1:
        return image
    try:
        return ImageOps.exif_transpose(image)
    except EXIF_ERRORS:
        return image


def user_comment(text: str) -> bytes:
    """An EXIF UserComment holding ``text`` as A1111 writes one (piexif's ``UserComment.dump(text,
    encoding="unicode")``)."""
    return UNICODE_PREFIX + text.encode("utf-16-be", errors="replace")


def read_user_comment(value: bytes | str) -> str:
    """The text of an EXIF UserComment as piexif's ``UserComment.load`` reads it (UTF-16 big-endian, unless a
    byte-order mark says otherwise; ASCII; Shift JIS); one with no known character code is read as UTF-8, as A1111
    falls back to."""
    if isinstance(value, str):  # a writer that typed it ASCII: Pillow hands it over decoded
        return value
    prefix, body = value[:8], value[8:]
    if prefix == UNICODE_PREFIX:
        bom = body[:2] in (b"\xff\xfe", b"\xfe\xff")
        return body.decode("utf-16" if bom else "utf-16-be", errors="replace")
    if prefix == ASCII_PREFIX:
        return body.decode("ascii", errors="replace")
    if prefix == JIS_PREFIX:
        return body.decode("shift_jis", errors="replace")
    return value.decode("utf-8", errors="ignore")


def comment_exif(text: str) -> bytes:
    """EXIF bytes whose only tag is the UserComment holding ``text`` (A1111's JPEG and WebP metadata)."""
    exif = Image.Exif()
    exif.get_ifd(ExifTags.IFD.Exif)[ExifTags.Base.UserComment] = user_comment(text)
    return exif.tobytes()


def comment_fits(text: str, fmt: Format) -> bool:
    """Whether ``text`` fits the metadata of a ``fmt`` file: a JPEG holds its EXIF in one 64 kB segment, which a
    long prompt in UTF-16 can outgrow; PNG and WebP take any length."""
    return fmt != "jpeg" or len(comment_exif(text)) <= JPEG_EXIF_MAX


def exif_comment(image: Image.Image) -> str | None:
    """The EXIF UserComment of ``image`` (a JPEG's or WebP's A1111 infotext), None when it has none or its EXIF is
    unreadable."""
    exif = exif_of(image)
    if exif is None:
        return None
    try:
        value = exif.get_ifd(ExifTags.IFD.Exif).get(ExifTags.Base.UserComment)
    except EXIF_ERRORS:
        return None
    return read_user_comment(value) if isinstance(value, bytes | str) else None


def encode(image: Image.Image, fmt: Format = "png", quality: int = 90, pnginfo: dict[str, str] | None = None,
           png_level: int | None = None, lossless: bool = False) -> bytes:
    """PNG (with text chunks, at ``png_level`` or the PNG_COMPRESS_LEVEL setting), JPEG or WebP bytes (``lossless``:
    WebP's lossless mode). A JPEG or WebP carries ``pnginfo["parameters"]`` (A1111's infotext) as its EXIF
    UserComment, as A1111 writes it; a JPEG leaves out one too long for its EXIF segment (``comment_fits``)."""
    if not 1 <= quality <= 100:
        raise InvalidInput("quality must lie in 1..100", field="quality")
    buffer = io.BytesIO()
    if fmt == "png":
        info = PngImagePlugin.PngInfo()
        for key, value in (pnginfo or {}).items():
            info.add_text(key, value)
        if png_level is None:
            png_level = current().png_compress_level
        image.save(buffer, format="PNG", pnginfo=info, compress_level=png_level)
        return buffer.getvalue()
    text = (pnginfo or {}).get("parameters")
    exif = comment_exif(text) if text else b""
    if fmt == "jpeg":
        if len(exif) > JPEG_EXIF_MAX:
            exif = b""
        to_rgb(image).save(buffer, format="JPEG", quality=quality, optimize=True, exif=exif)
    elif fmt == "webp":
        image.save(buffer, format="WEBP", quality=quality, method=4, lossless=lossless, exif=exif)
    else:
        raise InvalidInput(f"unknown format {fmt!r}", field="format")
    return buffer.getvalue()


def pil_to_array(image: Image.Image) -> np.ndarray:
    return np.asarray(to_rgb(image), dtype=np.uint8)


def array_to_pil(array: np.ndarray) -> Image.Image:
    return Image.fromarray(np.clip(array, 0, 255).astype(np.uint8))


def to_tensor(image: Image.Image, device, dtype):
    """RGB PIL image -> 1x3xHxW tensor in [0, 1]."""
    import torch

    array = pil_to_array(image).astype(np.float32) / 255.0
    return torch.from_numpy(array).permute(2, 0, 1).unsqueeze(0).to(device=device, dtype=dtype)


def from_tensor(tensor) -> Image.Image:
    """1x3xHxW tensor in [0, 1] -> RGB PIL image."""
    array = tensor.detach().float().clamp(0, 1).squeeze(0).permute(1, 2, 0).cpu().numpy()
    return Image.fromarray((array * 255.0).round().astype(np.uint8))


def cover_box(size: tuple[int, int], target: tuple[int, int]) -> tuple[int, int, int, int]:
    """The centred region of an image of ``size`` with ``target``'s aspect ratio: what stays of the image once it is
    scaled to cover ``target`` and centre-cropped to it (A1111's "crop and resize")."""
    width, height = size
    if width * target[1] > height * target[0]:  # wider than the target: the sides go
        kept = max(1, round(height * target[0] / target[1]))
        left = (width - kept) // 2
        return left, 0, left + kept, height
    kept = max(1, round(width * target[1] / target[0]))
    top = (height - kept) // 2
    return 0, top, width, top + kept


Fit = Literal["stretch", "crop", "fill"]
# "crop and resize" scales the whole image as A1111 does unless that would make more than this many times the
# target's pixels (an image of a very different shape).
COVER_LIMIT = 4


def frame(image: Image.Image, width: int, height: int, fit: Fit) -> Image.Image:
    """``image`` at ``width`` x ``height`` as A1111's img2img resize modes put it there (``images.resize_image``,
    Lanczos, as it resizes a mask and, with no img2img upscaler set, an image): ``stretch`` (0, "just resize"),
    ``crop`` (1, "crop and resize": scaled to cover, centre-cropped) or ``fill`` (2, "resize and fill": scaled to
    fit, centred, the borders filled with the image's edge rows or columns stretched outwards). Pixel for pixel
    A1111's: the scaled size rounded down, centred on the half sizes rounded down, the borders resampled from the
    edge as A1111 resamples them (PIL's default filter, bicubic, over an empty box at the edge)."""
    if fit == "stretch":
        return image.resize((width, height), Image.Resampling.LANCZOS)
    if image.mode not in ("L", "RGB", "RGBA"):  # palette indices must not be resampled as if they were levels
        image = image.convert("RGB")
    wider = image.width * height > width * image.height  # than the target (exact: A1111 compares float ratios)
    if fit == "crop":
        size = ((image.width * height // image.height, height) if wider
                else (width, image.height * width // image.width))
        if size[0] * size[1] > COVER_LIMIT * width * height:
            # An image far from the target's shape: only its centre is scaled (to within a fraction of a pixel of
            # A1111's), not the whole of it to tens of times the target's pixels.
            return image.resize((width, height), Image.Resampling.LANCZOS, box=cover_box(image.size, (width, height)))
        left, top = size[0] // 2 - width // 2, size[1] // 2 - height // 2
        return image.resize(size, Image.Resampling.LANCZOS).crop((left, top, left + width, top + height))
    size = ((width, max(1, image.height * width // image.width)) if wider
            else (max(1, image.width * height // image.height), height))
    fitted = image.resize(size, Image.Resampling.LANCZOS)
    out = Image.new(image.mode, (width, height))  # black where A1111 leaves a row or column unfilled
    left, top = width // 2 - size[0] // 2, height // 2 - size[1] // 2
    out.paste(fitted, (left, top))
    if wider and top > 0:  # rows above and below
        out.paste(fitted.resize((width, top), box=(0, 0, width, 0)), (0, 0))
        out.paste(fitted.resize((width, top), box=(0, size[1], width, size[1])), (0, top + size[1]))
    elif not wider and left > 0:  # columns left and right
        out.paste(fitted.resize((left, height), box=(0, 0, 0, height)), (0, 0))
        out.paste(fitted.resize((left, height), box=(size[0], 0, size[0], height)), (left + size[0], 0))
    return out
