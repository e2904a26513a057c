"""A1111's saved options that shape its answers' files: ``samples_format`` (png, jpg, jpeg or webp),
``jpeg_quality`` (JPEG and WebP, A1111's default 80), ``webp_lossless`` and ``return_grid`` (a request with
``save_images`` and several images answers the grid of them first; default on); ``initial_noise_multiplier``,
img2img's for a request that sets none (A1111 reads this option when the request is made, before its
``override_settings`` hold: an override of it changes nothing there, nor here); and those A1111 reads while a request
runs, its ``override_settings`` over them (``Txt2ImgRequest.under``): Euler's churn (``s_churn``, ``s_tmin``,
``s_tmax``, ``s_noise``) and ``pad_cond_uncond`` / ``pad_cond_uncond_v0``. ``POST /sdapi/v1/options`` keeps them in
the job store, as text, so that every ingress replica reads the same; each generation and extras request reads them
once, when it starts, and its last stage encodes its images that way."""

from __future__ import annotations

import asyncio
import math

from deployments.support.generation import MAX_NOISE_MULTIPLIER, Encoding
from graphs.api.a1111_models import CHURN_SETTINGS, PADDING_SETTINGS
from graphs.jobs.store import JobStore

# A1111 1.10's defaults (modules/shared_options.py).
DEFAULTS: dict[str, str | int | float | bool] = {"samples_format": "png", "jpeg_quality": 80, "webp_lossless": False,
                                                 "return_grid": True, "initial_noise_multiplier": 1.0,
                                                 **{key: default for key, (default, _) in CHURN_SETTINGS.items()},
                                                 **PADDING_SETTINGS}
FORMATS = {"png": "png", "jpg": "jpeg", "jpeg": "jpeg", "webp": "webp"}  # A1111's names -> the encoder's


def stored(value: str | int | float | bool) -> str:
    """An option's value as the job store keeps it."""
    return str(value).lower() if isinstance(value, bool) else str(value)


def typed(options: dict[str, str]) -> dict[str, str | int | float | bool]:
    """The answer-shaping options from the store's text, their defaults where unset (or unreadable: a store written
    by hand)."""
    out = dict(DEFAULTS)
    if options.get("samples_format", "").lower() in FORMATS:
        out["samples_format"] = options["samples_format"]
    quality = options.get("jpeg_quality", "")
    if quality.isdigit() and 1 <= int(quality) <= 100:
        out["jpeg_quality"] = int(quality)
    for flag in ("webp_lossless", "return_grid", *PADDING_SETTINGS):
        if flag in options:
            out[flag] = options[flag] == "true"
    bounds = {"initial_noise_multiplier": MAX_NOISE_MULTIPLIER, **{k: most for k, (_, most) in CHURN_SETTINGS.items()}}
    for key, most in bounds.items():
        value = _number(options.get(key, ""))
        if value is not None and 0.0 <= value <= most:
            out[key] = value
    return out


def _number(text: str) -> float | None:
    """A stored number, or None where the text is none (or not finite)."""
    try:
        value = float(text)
    except ValueError:
        return None
    return value if math.isfinite(value) else None


def encoding(options: dict[str, str]) -> Encoding:
    """How an A1111 answer's files are encoded, as the saved options say (A1111's ``encode_pil_to_base64``)."""
    values = typed(options)
    return Encoding(format=FORMATS[str(values["samples_format"]).lower()], quality=int(values["jpeg_quality"]),
                    lossless=bool(values["webp_lossless"]))


def file_key(how: Encoding) -> dict:
    """What of ``how`` changes the answer's files, for the result cache's key: a PNG is the same at any
    ``jpeg_quality``."""
    if how.format == "png":
        return {"format": "png"}
    return {"format": how.format, "quality": how.quality, "lossless": how.lossless and how.format == "webp"}


async def answer_encoding(jobs: JobStore) -> Encoding:
    """The saved options' encoding, read now from the store every replica shares."""
    return encoding(await asyncio.to_thread(jobs.options))
