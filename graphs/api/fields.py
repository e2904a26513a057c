"""Field types shared by every API family (bounds in one place), and image fields in and out."""

from __future__ import annotations

import base64
from typing import Annotated

from PIL import Image
from pydantic import Field

from deployments.support.imaging import decode, encode, image_bytes
from deployments.support.samplers import MIN_STRENGTH

MAX_SEED = 2**32 - 1

MAX_PROMPT = 10_000  # characters of a prompt, as GenerationRequest takes them
Prompt = Annotated[str, Field(max_length=MAX_PROMPT)]
RequiredPrompt = Annotated[str, Field(min_length=1, max_length=MAX_PROMPT)]
Seed = Annotated[int, Field(ge=-1, le=MAX_SEED, description="-1 draws a random seed")]
Steps = Annotated[int, Field(ge=1, le=150)]
Guidance = Annotated[float, Field(ge=0.0, le=30.0)]
Side = Annotated[int, Field(ge=64, le=2048, multiple_of=8, description="pixels, a multiple of 8")]
Strength = Annotated[float, Field(ge=MIN_STRENGTH, le=1.0, description="img2img denoising strength")]
Sampler = Annotated[str, Field(max_length=64)]


def image_field(value: str, field: str) -> Image.Image:
    """Decode a data URI or plain base64 image; a malformed one is a 400 naming the field, never a 500."""
    return decode(image_bytes(value, field), field=field)


def b64_png(image: Image.Image, pnginfo: dict[str, str] | None = None) -> str:
    return base64.b64encode(encode(image, "png", pnginfo=pnginfo)).decode()
