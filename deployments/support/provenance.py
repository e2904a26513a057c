"""Provenance marks on the images the service generates or edits, and the check that reads them back
(``POST /provenance/verify``): the invisible watermark (``watermark``) and C2PA content credentials
(``credentials``), both added by the stage that encodes (``StageResult.encode``, in a model replica, never the
ingress). Without a certificate and key, credentials are off and each process's log says so once.

Import-light: the ingress imports this module (through ``generation``); c2pa loads when a replica first signs,
invisible-watermark (and with it OpenCV and torch) when one first reads a mark.
"""

from __future__ import annotations

import logging
import threading

from PIL import Image
from pydantic import BaseModel

from deployments.support import credentials
from deployments.support.credentials import CredentialsReport, Facts, Signer
from deployments.support.imaging import decode
from deployments.support.settings import Settings, current
from deployments.support.watermark import MIN_SIDE, Watermark, WatermarkReport

logger = logging.getLogger(__name__)


class Verification(BaseModel):
    """Both marks of one uploaded image."""

    format: str
    width: int
    height: int
    watermark: WatermarkReport
    credentials: CredentialsReport


class Marker:
    """This process's watermark and signer (either may be off), built once from the settings."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.watermark = Watermark.from_settings(settings)
        self.signer: Signer | None = None
        if settings.c2pa_cert_file is None:
            logger.info("content credentials off: C2PA_CERT_FILE and C2PA_KEY_FILE are not set")
        else:
            self.signer = Signer(settings)
            logger.info("content credentials on: signing with %s (%s)", settings.c2pa_cert_file,
                        settings.c2pa_algorithm)
        self._reading = None

    def mark(self, image: Image.Image) -> tuple[Image.Image, bool]:
        """The image with the invisible watermark, and whether it got one."""
        if not self.settings.watermark_enabled:
            return image, False
        if not self.watermark.fits(image):
            logger.info("no invisible watermark on a %dx%d image: the method needs %dx%d", *image.size, MIN_SIDE,
                        MIN_SIDE)
            return image, False
        return self.watermark.embed(image), True

    def sign(self, data: bytes, fmt: str, facts: Facts) -> bytes:
        return data if self.signer is None else self.signer.sign(data, fmt, facts)

    def verify(self, data: bytes, field: str = "image") -> Verification:
        """Both marks of an uploaded file; an undecodable one is a 400 naming ``field``."""
        image = decode(data, field=field, turn=False)  # the marks are in the pixels as stored
        if self._reading is None:
            self._reading = credentials.reading_context(self.settings)
        return Verification(format=(image.format or "").lower(), width=image.width, height=image.height,
                            watermark=self.watermark.read(image), credentials=credentials.read(data, self._reading))


_current: Marker | None = None
_lock = threading.Lock()


def marker() -> Marker:
    """The marks of this process, for its settings (read once, so the log says once whether credentials are on)."""
    global _current
    settings = current()
    with _lock:
        if _current is None or _current.settings is not settings:
            _current = Marker(settings)
        return _current
