"""A1111's saved options that shape its answers' files: ``samples_format`` (png, jpg, jpeg or webp),
``jpeg_quality`` (JPEG and WebP, A1111's default 80), ``webp_lossless`` and ``return_grid`` (a request with
``save_images`` and several images answers the grid of them first; default on); and ``initial_noise_multiplier``,
img2img's for a request that sets none (A1111 reads this option when the request is made, before its
``override_settings`` hold: an override of it changes nothing there, nor here). ``POST /sdapi/v1/options`` keeps them in
the job store, as text, so that every ingress replica reads the same; each generation and extras request reads them
once, when it starts, and its last stage encodes its images that way."""

from __future__ import annotations

import asyncio

from deployments.support.generation import MAX_NOISE_MULTIPLIER, Encoding
from graphs.jobs.store import JobStore

# A1111 1.10's defaults (modules/shared_options.py).
DEFAULTS: dict[str, str | int | float | bool] = {"samples_format": "png", "jpeg_quality": 80, "webp_lossless": False,
                                                 "return_grid": True, "initial_noise_multiplier": 1.0}
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
    for flag in ("webp_lossless", "return_grid"):
        if flag in options:
            out[flag] = options[flag] == "true"
    try:
        noise = float(options.get("initial_noise_multiplier", "1"))
    except ValueError:
        noise = 1.0
    if 0.0 <= noise <= MAX_NOISE_MULTIPLIER:  # NaN too fails this
        out["initial_noise_multiplier"] = noise
    return out


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
