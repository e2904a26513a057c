"""Provenance marks on the images the service generates or edits, and the check that reads them back.

Two marks, both added by the stage that encodes (``StageResult.encode``, in a model replica, never the ingress):

- an invisible watermark in the pixels: invisible-watermark's DWT-DCT method, SDXL's reference watermark. The
  package's own ``encode`` wrapper swaps the horizontal and vertical wavelet details when it rebuilds the image
  and wraps 8-bit values around, which costs 5 to 15 dB of PSNR, and it loops over blocks in Python; so its
  embedding rule runs here vectorised (``quantise_band``: the package's result to the bit, tested) on the Haar
  band this module computes, and where the rule would push pixels past 0 or 255 it takes the step above or
  below. The package's decoder (``WatermarkDecoder``) reads the result. By default the mark is in the luma band,
  where it survives JPEG and WebP re-encoding; SDXL's reference puts it in the U band, which lossy re-encoding
  erases (``WATERMARK_CHROMA_SCALE`` adds that band).
- C2PA content credentials in the file (c2pa-python): who made it (``claim_generator_info``), the action
  (``c2pa.created``, or ``c2pa.opened`` + ``c2pa.edited`` on a parent ingredient for an edit of an upload), the
  IPTC digital source type ``trainedAlgorithmicMedia`` and the models that ran, signed with the certificate chain
  and key the settings name. Without them credentials are off, and the log says so once.

Import-light: the ingress imports this module (through ``generation``). Embedding needs only numpy; c2pa loads
when a replica first signs, invisible-watermark (and with it OpenCV and torch) when one first reads a mark.
"""

from __future__ import annotations

import importlib.metadata
import io
import logging
import threading
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
from PIL import Image
from pydantic import BaseModel, Field

from deployments.support.errors import ServiceError
from deployments.support.imaging import decode
from deployments.support.settings import Settings, current

logger = logging.getLogger(__name__)

MIN_SIDE = 256  # the package refuses images under 256x256 pixels; here a side under 256 is not marked
KEEP_LARGEST = 2.0  # margin by which a moved coefficient stays the block's largest, for rounding on the way back
FOUND_AT = 0.9  # fraction of payload bits that must match: unmarked images read about half of them
TRAINED = "http://cv.iptc.org/newscodes/digitalsourcetype/trainedAlgorithmicMedia"
GENERATION_LABEL = "com.imagegen.generation"  # our assertion: which models made the image
MIME = {"png": "image/png", "jpeg": "image/jpeg", "webp": "image/webp"}
_MAGIC = ((b"\x89PNG\r\n\x1a\n", "image/png"), (b"\xff\xd8\xff", "image/jpeg"))


class SigningFailed(ServiceError):
    """Content credentials are configured but an image could not be signed (a bad key or certificate)."""

    code = "SIGNING_FAILED"


def version() -> str:
    try:
        return importlib.metadata.version("imagegen-serve")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def mime_of(data: bytes) -> str | None:
    for magic, mime in _MAGIC:
        if data.startswith(magic):
            return mime
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "image/webp"
    return None


def _rgb(image: Image.Image) -> Image.Image:
    """The colour planes the mark lives in (an alpha channel is kept aside, not blended in)."""
    return image if image.mode == "RGB" else image.convert("RGB")


# --- the invisible watermark ---------------------------------------------------------------------------------------

class WatermarkReport(BaseModel):
    checked: bool = Field(..., description="false: a side under 256 pixels, too small for the method")
    found: bool = Field(False, description=f"at least {FOUND_AT:.0%} of the configured payload's bits read back")
    payload: str | None = Field(None, description="the bits read, as 0s and 1s")
    payload_hex: str | None = None
    bit_accuracy: float | None = Field(None, description="fraction of bits equal to the configured payload")
    reason: str | None = None


@dataclass(frozen=True)
class Watermark:
    """The payload and the quantisation steps of the two bands the method can use (luma Y, chroma U)."""

    bits: tuple[int, ...]
    luma_scale: float
    chroma_scale: float

    @classmethod
    def from_settings(cls, settings: Settings) -> Watermark:
        return cls(tuple(int(b) for b in settings.watermark_bits), settings.watermark_luma_scale,
                   settings.watermark_chroma_scale)

    @property
    def scales(self) -> list[float]:
        return [self.luma_scale, self.chroma_scale, 0.0]  # Y, U; the method never reads V

    @staticmethod
    def fits(image: Image.Image) -> bool:
        return min(image.size) >= MIN_SIDE

    def embed(self, image: Image.Image) -> Image.Image:
        """The image with the payload in its pixels (alpha, if any, untouched)."""
        rgb = np.asarray(_rgb(image))
        rows, cols = rgb.shape[0] // 4 * 4, rgb.shape[1] // 4 * 4
        red, green, blue = (rgb[:rows, :cols, c].astype(np.float32) for c in range(3))
        luma = 0.299 * red + 0.587 * green + 0.114 * blue  # OpenCV's YUV, as the decoder converts
        planes = (luma, 0.492 * (blue - luma) + 128.0)
        out = rgb.copy()
        for channel, scale in enumerate(self.scales[:2]):
            if scale <= 0:
                continue
            p, q, change = quantise_band(haar_band(planes[channel]), self.bits, scale,
                                         rgb[:rows, :cols] if channel == 0 else None)
            # The inverse wavelet transform with only this band changed: each of the four pixels a moved
            # coefficient covers moves by half its change, in R, G and B as this plane moves them.
            for dy, dx in ((0, 0), (0, 1), (1, 0), (1, 1)):
                r, c = 2 * p + dy, 2 * q + dx
                moved = out[r, c].astype(np.float32) + (change / 2)[:, None] * _RGB_PER_UNIT[channel]
                out[r, c] = np.clip(np.rint(moved), 0, 255).astype(np.uint8)
        marked = Image.fromarray(out)
        if image.mode == "RGBA":
            marked.putalpha(image.getchannel("A"))
        return marked

    def read(self, image: Image.Image) -> WatermarkReport:
        if not self.fits(image):
            return WatermarkReport(checked=False, reason=f"{image.width}x{image.height} is smaller than "
                                   f"{MIN_SIDE}x{MIN_SIDE}: the method cannot carry a mark")
        from imwatermark import WatermarkDecoder

        bgr = np.ascontiguousarray(np.asarray(_rgb(image))[:, :, ::-1])
        bits = np.asarray(WatermarkDecoder("bits", len(self.bits)).decode(bgr, "dwtDct", scales=self.scales),
                          dtype=np.uint8)
        accuracy = float(np.mean(bits == np.asarray(self.bits, dtype=np.uint8)))
        padded = np.concatenate([bits, np.zeros(-len(bits) % 8, np.uint8)])
        return WatermarkReport(checked=True, found=accuracy >= FOUND_AT, payload="".join(map(str, bits)),
                               payload_hex=np.packbits(padded).tobytes().hex(), bit_accuracy=round(accuracy, 4))


# What a unit change of Y or U does to R, G and B (OpenCV's YUV): luma moves all three alike.
_RGB_PER_UNIT = np.array([[1.0, 1.0, 1.0], [0.0, -0.395, 2.032]], dtype=np.float32)


def haar_band(plane: np.ndarray) -> np.ndarray:
    """The approximation band of a one-level Haar transform (``pywt.dwt2(plane, "haar")[0]``, tested): each
    coefficient is half the sum of a 2x2 pixel group."""
    rows, cols = plane.shape[0] // 2 * 2, plane.shape[1] // 2 * 2
    return plane[:rows, :cols].reshape(rows // 2, 2, cols // 2, 2).sum(axis=(1, 3), dtype=np.float64) / 2


def quantise_band(band: np.ndarray, bits: tuple[int, ...], scale: float,
                  pixels: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """invisible-watermark's DWT-DCT embedding (``EmbedMaxDct.encode_frame``), vectorised: in each 4x4 block of
    the band (row-major, bit ``i % len(bits)`` in block ``i``) the largest coefficient but the first moves to the
    lower (bit 0) or upper (bit 1) middle of its quantisation step. The package loops over the blocks in Python
    (see ``tests/bench_provenance.py``); this returns the moved coefficients (rows, columns, changes), which
    applied to the band give the package's result to the bit (tested).

    ``pixels``: the RGB image of a luma band. Where the package's target would push a pixel the coefficient covers
    past 0 or 255 (dark and bright areas, where clipping erases the bit), the same place in the step above or below
    is taken, one that keeps the coefficient the block's largest."""
    rows, cols = band.shape[0] // 4 * 4, band.shape[1] // 4 * 4
    blocks = band[:rows, :cols].reshape(rows // 4, 4, cols // 4, 4).swapaxes(1, 2).reshape(-1, 16)
    index = np.arange(len(blocks))
    position = np.argmax(np.abs(blocks[:, 1:]), axis=1) + 1  # ties: the first, as the package's argmax
    value = blocks[index, position].astype(np.float64)
    p = index // (cols // 4) * 4 + position // 4  # the coefficient's row and column in the band
    q = index % (cols // 4) * 4 + position % 4
    bit = np.asarray(bits, dtype=np.float64)[index % len(bits)]
    sign = np.where(value >= 0, 1.0, -1.0)
    target = sign * (np.floor(np.abs(value) / scale) + 0.25 + 0.5 * bit) * scale
    if pixels is not None:
        # The 2x2 pixel group under each moved coefficient; a change d moves its pixels by d/2.
        group = pixels[2 * p[:, None] + [0, 0, 1, 1], 2 * q[:, None] + [0, 1, 0, 1]]
        low, high = -2.0 * group.min(axis=(1, 2)), 2.0 * (255.0 - group.max(axis=(1, 2)))
        runner_up = np.partition(np.abs(blocks[:, 1:]), -2, axis=1)[:, -2]  # to be read back, stay above it
        options = np.stack([target, target + scale, target - scale])  # the package's first; same residue
        change = options - value
        in_range = (change >= low) & (change <= high) & (np.sign(options) * sign >= 0)
        fits = in_range & (np.abs(options) > runner_up + KEEP_LARGEST)
        cost = np.where(fits, np.abs(change), np.inf)
        cost[0] = np.where(in_range[0], -1.0, cost[0])  # the package's choice wherever it stays in range
        pick = np.argmin(cost, axis=0)
        target = np.where(np.isfinite(cost).any(axis=0), options[pick, index], target)
    return p, q, target - value


# --- C2PA content credentials --------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Facts:
    """What a manifest says about one image: the models that made it and, for an edit of an upload, that file."""

    models: dict[str, str] = field(default_factory=dict)  # checkpoint, refiner, upscaler, face_restorer
    parent: bytes | None = None

    @classmethod
    def of(cls, info: dict, parent: bytes | None = None) -> Facts:
        """From a stage result's ``info``: what every stage so far reported it ran."""
        models = {"checkpoint": info.get("model"), "refiner": info.get("refiner"),
                  "upscaler": info.get("upscaler") or info.get("hires_upscaler"),
                  "face_restorer": info.get("restorer") if info.get("face_restoration_applied") else None}
        return cls({k: str(v) for k, v in models.items() if v and v != "None"}, parent)  # "None": no upscaler

    @property
    def agent(self) -> str:
        """The model an action names: the checkpoint, else what edited the upload."""
        for role in ("checkpoint", "upscaler", "face_restorer", "refiner"):
            if role in self.models:
                return self.models[role]
        return "imagegen"


def manifest(facts: Facts, fmt: str, edit: bool) -> dict:
    """The manifest definition of one file: a creation, or an edit opened from its parent ingredient."""
    agent = {"name": facts.agent}
    if edit:
        actions: list[dict[str, Any]] = [
            {"action": "c2pa.opened", "parameters": {"ingredientIds": ["parent"]}},
            {"action": "c2pa.edited", "digitalSourceType": TRAINED, "softwareAgent": agent}]
    else:
        actions = [{"action": "c2pa.created", "digitalSourceType": TRAINED, "softwareAgent": agent}]
    return {"claim_generator_info": [{"name": "imagegen", "version": version()}], "title": f"imagegen.{fmt}",
            "assertions": [{"label": "c2pa.actions.v2", "data": {"actions": actions}},
                           {"label": GENERATION_LABEL, "data": facts.models}]}


class Signer:
    """The C2PA signer of this process, built once from the certificate chain and key the settings name."""

    def __init__(self, settings: Settings) -> None:
        import c2pa

        if settings.c2pa_cert_file is None or settings.c2pa_key_file is None:
            raise SigningFailed("content credentials need C2PA_CERT_FILE and C2PA_KEY_FILE")
        try:
            info = c2pa.C2paSignerInfo(settings.c2pa_algorithm, settings.c2pa_cert_file.read_bytes(),
                                       settings.c2pa_key_file.read_bytes(), settings.c2pa_tsa_url)
            self.signer = c2pa.Signer.from_info(info)
        except (OSError, c2pa.C2paError) as e:
            raise SigningFailed(f"content credentials: cannot load the certificate or key ({e})") from e
        # No thumbnail (it would double a PNG's size) and no verification of what was just signed.
        self.context = c2pa.Context.from_dict({"builder": {"thumbnail": {"enabled": False}},
                                               "verify": {"verify_after_sign": False}})
        self._lock = threading.Lock()  # one native signer, shared by the encoding threads
        self._check(c2pa)

    def _check(self, c2pa) -> None:
        """Sign a tiny image and read it back: c2pa accepts a key that does not match the certificate and only a
        reader notices (``claimSignature.mismatch``), so a bad pair is refused here, not in every client's hands."""
        probe = io.BytesIO()
        Image.new("RGB", (16, 16)).save(probe, format="PNG")
        signed = self.sign(probe.getvalue(), "png", Facts())
        context = c2pa.Context.from_dict({"verify": {"remote_manifest_fetch": False}})
        with c2pa.Reader("image/png", io.BytesIO(signed), None, context) as reader:
            failed = [f.get("code") for f in ((reader.get_validation_results() or {}).get("activeManifest") or {})
                      .get("failure", []) if f.get("code") != "signingCredential.untrusted"]
        if failed:
            raise SigningFailed(f"content credentials: the certificate and key do not sign validly ({failed})")

    def sign(self, data: bytes, fmt: str, facts: Facts) -> bytes:
        import c2pa

        parent = mime_of(facts.parent) if facts.parent else None
        try:
            with self._lock:
                try:
                    return self._sign(c2pa, data, fmt, facts, parent)
                except c2pa.C2paError:
                    if parent is None:
                        raise
                # c2pa could not read the parent as an ingredient: credit the image as a creation instead.
                logger.warning("content credentials: the parent file is not a readable ingredient; signed as a "
                               "creation")
                return self._sign(c2pa, data, fmt, facts, None)
        except c2pa.C2paError as e:
            logger.error("content credentials: signing failed: %s", e)
            raise SigningFailed(f"content credentials: signing failed ({e})") from e

    def _sign(self, c2pa, data: bytes, fmt: str, facts: Facts, parent: str | None) -> bytes:
        out = io.BytesIO()
        with c2pa.Builder(manifest(facts, fmt, edit=parent is not None), context=self.context) as builder:
            if parent is not None:
                builder.add_ingredient({"title": f"parent.{parent.split('/')[1]}", "relationship": "parentOf",
                                        "label": "parent"}, parent, io.BytesIO(facts.parent or b""))
            builder.sign(self.signer, MIME[fmt], io.BytesIO(data), out)
        return out.getvalue()


class Action(BaseModel):
    action: str
    digital_source_type: str | None = None
    software_agent: str | None = None


class Ingredient(BaseModel):
    title: str | None = None
    relationship: str | None = None


class CredentialsReport(BaseModel):
    present: bool = Field(..., description="the file carries a C2PA manifest store (readable or not)")
    validation_state: Literal["trusted", "valid", "invalid"] | None = Field(
        None, description="trusted: signed by a chain ending in C2PA_TRUST_ANCHORS_FILE; valid: intact and "
        "well signed by a signer not known here; invalid: altered, truncated or badly signed")
    failures: list[str] = Field([], description="the validation codes that failed (c2pa's names)")
    error: str | None = Field(None, description="why the manifest could not be read at all")
    claim_generator: str | None = None
    signer: str | None = Field(None, description="the signing certificate's common name and issuer")
    actions: list[Action] = []
    checkpoint: str | None = None
    models: dict[str, str] = {}
    ingredients: list[Ingredient] = []


class Verification(BaseModel):
    """Both marks of one uploaded image."""

    format: str
    width: int
    height: int
    watermark: WatermarkReport
    credentials: CredentialsReport


def _credentials_report(reader) -> CredentialsReport:
    active = reader.get_active_manifest() or {}
    state = (reader.get_validation_state() or "invalid").lower()
    results = (reader.get_validation_results() or {}).get("activeManifest") or {}
    actions: list[Action] = []
    models: dict[str, str] = {}
    for assertion in active.get("assertions", []):
        label, data = assertion.get("label", ""), assertion.get("data") or {}
        if label.startswith("c2pa.actions"):
            actions += [Action(action=str(a.get("action")), digital_source_type=a.get("digitalSourceType"),
                               software_agent=(a.get("softwareAgent") or {}).get("name")
                               if isinstance(a.get("softwareAgent"), dict) else a.get("softwareAgent"))
                        for a in data.get("actions", [])]
        elif label == GENERATION_LABEL:
            models = {str(k): str(v) for k, v in data.items()}
    generator = (active.get("claim_generator_info") or [{}])[0]
    signature = active.get("signature_info") or {}
    return CredentialsReport(
        present=True, validation_state=state if state in ("trusted", "valid") else "invalid",
        failures=[str(f.get("code")) for f in results.get("failure", [])],
        claim_generator=" ".join(str(generator[k]) for k in ("name", "version") if generator.get(k)) or None,
        signer=", ".join(str(signature[k]) for k in ("common_name", "issuer") if signature.get(k)) or None,
        actions=actions, checkpoint=models.get("checkpoint"), models=models,
        ingredients=[Ingredient(title=i.get("title"), relationship=i.get("relationship"))
                     for i in active.get("ingredients", [])])


# --- one process's marks -----------------------------------------------------------------------------------------

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
        image = decode(data, field=field)
        return Verification(format=(image.format or "").lower(), width=image.width, height=image.height,
                            watermark=self.watermark.read(image), credentials=self.read_credentials(data))

    def read_credentials(self, data: bytes) -> CredentialsReport:
        import c2pa

        if self._reading is None:
            trust: dict[str, Any] = {}
            if self.settings.c2pa_trust_anchors_file is not None:
                trust["user_anchors"] = self.settings.c2pa_trust_anchors_file.read_text()
            # Never fetch anything a file points at (a remote manifest, OCSP): uploads are untrusted.
            self._reading = c2pa.Context.from_dict({"trust": trust, "verify": {"remote_manifest_fetch": False,
                                                                               "ocsp_fetch": False}})
        try:
            reader = c2pa.Reader.try_create(mime_of(data), io.BytesIO(data), None, self._reading)
            if reader is None:
                return CredentialsReport(present=False)
            with reader:
                return _credentials_report(reader)
        except (c2pa.C2paError, KeyError, TypeError, ValueError) as e:  # a manifest store c2pa cannot parse
            return CredentialsReport(present=True, validation_state="invalid", error=str(e)[:500])


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
