"""C2PA content credentials on generated images (c2pa-python): who made the file (``claim_generator_info``), the
action (``c2pa.created``, or ``c2pa.opened`` + ``c2pa.edited`` on a parent ingredient for an edit of an upload; then
a ``c2pa.edited`` of type ``compositeWithTrainedAlgorithmicMedia`` when the request's overlay was drawn), the IPTC
digital source type ``trainedAlgorithmicMedia`` and the models that ran, signed with the certificate chain and
key the settings name; and the reading of an uploaded file's credentials. c2pa is imported on first use.
"""

from __future__ import annotations

import importlib.metadata
import io
import logging
import threading
from dataclasses import dataclass, field
from typing import Any, Literal

from PIL import Image
from pydantic import BaseModel, Field

from deployments.support.errors import ServiceError
from deployments.support.settings import Settings

logger = logging.getLogger(__name__)

TRAINED = "http://cv.iptc.org/newscodes/digitalsourcetype/trainedAlgorithmicMedia"
COMPOSITE = "http://cv.iptc.org/newscodes/digitalsourcetype/compositeWithTrainedAlgorithmicMedia"
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


@dataclass(frozen=True)
class Facts:
    """What a manifest says about one image: the models that made it and, for an edit of an upload, that file."""

    models: dict[str, str] = field(default_factory=dict)  # checkpoint, refiner, upscaler, face_restorer
    parent: bytes | None = None
    overlay: bool = False  # a caption or logo the request supplied was drawn over the model's pixels

    @classmethod
    def of(cls, info: dict, parent: bytes | None = None) -> Facts:
        """From a stage result's ``info``: what every stage so far reported it ran."""
        models = {"checkpoint": info.get("model"), "refiner": info.get("refiner"),
                  "upscaler": info.get("upscaler") or info.get("hires_upscaler"),
                  "face_restorer": info.get("restorer") if info.get("face_restoration_applied") else None}
        return cls({k: str(v) for k, v in models.items() if v and v != "None"}, parent,  # "None": no upscaler
                   overlay=bool(info.get("overlay")))

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
    if facts.overlay:
        # A logo can be any picture: the claim must not say the model made every pixel of the file.
        actions.append({"action": "c2pa.edited", "digitalSourceType": COMPOSITE, "softwareAgent": {"name": "imagegen"},
                        "description": "a caption or logo supplied with the request, drawn over the image"})
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


def _report(reader) -> CredentialsReport:
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


def reading_context(settings: Settings):
    """How uploads are read: trusted roots from ``C2PA_TRUST_ANCHORS_FILE``, and nothing a file points at (a remote
    manifest, OCSP) is ever fetched, since uploads are untrusted."""
    import c2pa

    trust: dict[str, Any] = {}
    if settings.c2pa_trust_anchors_file is not None:
        trust["user_anchors"] = settings.c2pa_trust_anchors_file.read_text()
    return c2pa.Context.from_dict({"trust": trust, "verify": {"remote_manifest_fetch": False, "ocsp_fetch": False}})


def read(data: bytes, context) -> CredentialsReport:
    """The credentials of one file: absent, or what c2pa validates of them (a store it cannot parse is invalid)."""
    import c2pa

    try:
        reader = c2pa.Reader.try_create(mime_of(data), io.BytesIO(data), None, context)
        if reader is None:
            return CredentialsReport(present=False)
        with reader:
            return _report(reader)
    except (c2pa.C2paError, KeyError, TypeError, ValueError) as e:
        return CredentialsReport(present=True, validation_state="invalid", error=str(e)[:500])
