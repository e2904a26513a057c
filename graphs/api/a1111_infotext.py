"""A1111's infotext, the ``parameters`` text chunk of every PNG it writes (the EXIF UserComment of a JPEG or WebP):
the prompt, an optional ``Negative prompt:`` line, then one line of comma-separated ``Key: value`` settings, a value
holding a comma, a colon or a line break written as a JSON string (A1111's ``quote``). Written for each image made
here, and read back for ``/png-info`` as A1111's ``read_info_from_image`` finds it and its
``parse_generation_parameters`` reads it."""

from __future__ import annotations

import json
import re

from PIL import Image

from deployments.support.imaging import exif_comment
from graphs.api.a1111_models import Txt2ImgRequest

_SETTING = re.compile(r'\s*(\w[\w \-/]{0,63}):\s*("(?:\\.|[^\\"])+"|[^,]*)(?:,|$)')  # one ``Key: value``, A1111's
_SIZE = re.compile(r"^(\d+)x(\d+)$")  # "512x768" is read as "Key-1" and "Key-2"

# What A1111's reader adds for the settings a text leaves out (each one's default there).
READ_DEFAULTS: dict[str, object] = {
    "Clip skip": "1", "Hires resize-1": 0, "Hires resize-2": 0, "Hires sampler": "Use same sampler",
    "Hires schedule type": "Use same scheduler", "Hires checkpoint": "Use same checkpoint", "Hires prompt": "",
    "Hires negative prompt": "",
    "Mask mode": "Inpaint masked", "Masked content": "original", "Inpaint area": "Whole picture",
    "Masked area padding": 32, "RNG": "GPU", "Schedule type": "Automatic", "Schedule max sigma": 0,
    "Schedule min sigma": 0, "Schedule rho": 0, "VAE Encoder": "Full", "VAE Decoder": "Full", "FP8 weight": "Disable",
}


def quote(value: object) -> str:
    """A setting's value as A1111 writes it: as is, or as a JSON string when it would break the settings line."""
    text = str(value)
    if "," not in text and ":" not in text and "\n" not in text:
        return text
    return json.dumps(text, ensure_ascii=False)


def infotext(r: Txt2ImgRequest, seed: int, model: str, sampler: str, extra: dict | None = None,
             schedule: str = "Automatic", subseed: int | None = None) -> str:
    """The infotext of one image of ``r``: its ``seed``, the checkpoint ``model``, the ``sampler`` that ran and the
    label of its ``schedule`` (A1111's "Automatic" where the sampler names none); its variation seed ``subseed`` and
    the seed resize, as A1111 writes them, where they apply."""
    settings = {"Steps": r.steps, "Sampler": sampler, "Schedule type": schedule,
                "CFG scale": r.cfg_scale, "Seed": seed, "Size": f"{r.width}x{r.height}", "Model": model}
    if r.subseed_strength != 0:
        settings.update({"Variation seed": subseed, "Variation seed strength": r.subseed_strength})
    if r.seed_resize_from_w > 0 and r.seed_resize_from_h > 0:
        settings["Seed resize from"] = f"{r.seed_resize_from_w}x{r.seed_resize_from_h}"
    if r.tiling:
        settings["Tiling"] = "True"
    settings.update(extra or {})
    lines = [r.prompt]
    if r.negative_prompt:
        lines.append(f"Negative prompt: {r.negative_prompt}")
    lines.append(", ".join(f"{key}: {quote(value)}" for key, value in settings.items() if value is not None))
    return "\n".join(lines)


def read(image: Image.Image) -> tuple[str, dict[str, str]]:
    """The infotext of ``image`` and its other text metadata, as A1111's ``read_info_from_image`` finds them: the
    ``parameters`` text chunk, unless the image's EXIF holds a UserComment (a JPEG's or WebP's), which is then the
    infotext and is also named "exif comment" among the items."""
    items = {key: value for key, value in image.info.items() if isinstance(key, str) and isinstance(value, str)}
    text = items.pop("parameters", "")
    comment = exif_comment(image) if "exif" in image.info else None
    if comment:
        items["exif comment"] = text = comment
    return text, items


def unquote(text: str) -> str:
    if len(text) < 2 or text[0] != '"' or text[-1] != '"':
        return text
    try:
        value = json.loads(text)
    except ValueError:
        return text
    return value if isinstance(value, str) else text


def parse(text: str) -> dict:
    """A1111's ``parameters`` dict of an infotext: ``Prompt``, ``Negative prompt`` and every setting by its key
    (values as the text has them; a size ``WxH`` as ``Key-1`` and ``Key-2``), then A1111's defaults for the settings
    left out. The last line holds the settings when it has at least three; otherwise it is part of a prompt."""
    *lines, last = text.strip().split("\n")
    if len(_SETTING.findall(last)) < 3:
        lines.append(last)
        last = ""
    prompt, negative, in_negative = "", "", False
    for line in lines:
        line = line.strip()
        if line.startswith("Negative prompt:"):
            in_negative = True
            line = line[len("Negative prompt:"):].strip()
        if in_negative:
            negative += ("\n" if negative else "") + line
        else:
            prompt += ("\n" if prompt else "") + line
    out: dict = {"Prompt": prompt, "Negative prompt": negative}
    for key, value in _SETTING.findall(last):
        if not value:  # A1111 skips an empty value
            continue
        value = unquote(value)
        size = _SIZE.match(value)
        if size is not None:
            out[f"{key}-1"], out[f"{key}-2"] = size.groups()
        else:
            out[key] = value
    return {**out, **{key: value for key, value in READ_DEFAULTS.items() if key not in out}}
