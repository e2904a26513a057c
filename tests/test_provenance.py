"""Provenance marks without Ray: the invisible watermark (DWT-DCT) and C2PA content credentials added where images
are encoded (``StageResult.encode``), and the reading behind ``POST /provenance/verify``. Credentials are checked
with c2pa's own Reader, independently of ours, against a throwaway CA the tests generate."""

from __future__ import annotations

import io
import json
import logging
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from deployments.support import credentials, imaging, provenance, watermark
from deployments.support.errors import InvalidImage
from deployments.support.generation import Encoding, StageResult
from deployments.support.overlay import Overlay
from deployments.support.settings import SDXL_WATERMARK_BITS, Settings
from tests.helpers import b64, signing_credentials

INFO = {"model": "tiny-sdxl-base", "refiner": "tiny-sdxl-refiner", "mode": "txt2img"}


@pytest.fixture(scope="module")
def c2pa_setup(tmp_path_factory) -> dict[str, str]:
    return signing_credentials(tmp_path_factory.mktemp("c2pa"))


@pytest.fixture
def signing(c2pa_setup, monkeypatch) -> dict[str, str]:
    """This process's settings sign with the test certificate (the marker follows the settings)."""
    for name, value in c2pa_setup.items():
        monkeypatch.setenv(name, value)
    return c2pa_setup


@pytest.fixture(scope="module")
def photo(astronaut) -> Image.Image:
    return astronaut.resize((512, 512))


def manifest_of(data: bytes, anchors: str | None = None) -> tuple[str, dict]:
    """c2pa's own reading: the validation state and the active manifest."""
    import c2pa

    trust = {"user_anchors": Path(anchors).read_text()} if anchors else {}
    context = c2pa.Context.from_dict({"trust": trust, "verify": {"remote_manifest_fetch": False}})
    with c2pa.Reader(credentials.mime_of(data), io.BytesIO(data), None, context) as reader:
        return reader.get_validation_state(), reader.get_active_manifest()


def reencoded(data: bytes, fmt: str, quality: int = 90) -> bytes:
    out = io.BytesIO()
    Image.open(io.BytesIO(data)).save(out, format=fmt, quality=quality)
    return out.getvalue()


def psnr(a: Image.Image, b: Image.Image) -> float:
    error = np.mean((np.asarray(a, np.float64) - np.asarray(b, np.float64)) ** 2)
    return float(10 * np.log10(255**2 / error))


# --- the invisible watermark ---------------------------------------------------------------------------------------

@pytest.mark.parametrize(("fmt", "quality"), [("WEBP", 90), ("JPEG", 90), ("WEBP", 75)])
def test_the_watermark_survives_lossy_reencoding(photo, fmt, quality):
    marks = provenance.Marker(Settings())
    marked, applied = marks.mark(photo)
    assert applied and marked.size == photo.size
    png = StageResult(images=[photo], info=INFO).encode(Encoding()).encoded[0]
    for data in (png, reencoded(png, fmt, quality)):
        found = marks.verify(data).watermark
        assert found.found and found.payload == SDXL_WATERMARK_BITS and found.bit_accuracy == 1.0
        assert found.payload_hex == "b3ec907bb19e"
    clean = io.BytesIO()
    photo.save(clean, format="PNG")
    assert not marks.verify(clean.getvalue()).watermark.found


def test_the_watermark_is_invisible_and_keeps_alpha(photo):
    marks = provenance.Marker(Settings())
    marked, _ = marks.mark(photo)
    assert psnr(photo, marked) > 42  # the package's own encode() costs 5-15 dB more (it swaps wavelet details)
    rgba = photo.convert("RGBA")
    rgba.putalpha(Image.linear_gradient("L").resize(photo.size))
    marked_rgba, applied = marks.mark(rgba)
    assert applied and marked_rgba.mode == "RGBA"
    assert marked_rgba.getchannel("A").tobytes() == rgba.getchannel("A").tobytes()
    assert marks.watermark.read(marked_rgba).found


def test_the_embedding_is_the_packages_to_the_bit():
    """Ours is invisible-watermark's DWT-DCT embedding, vectorised: the same band out for the same band in."""
    import pywt
    from imwatermark.maxDct import EmbedMaxDct

    bits = tuple(int(b) for b in SDXL_WATERMARK_BITS)
    rng = np.random.default_rng(3)
    for shape in ((128, 128), (66, 130)):
        band = (rng.random(shape) * 600 - 50).astype(np.float32)
        theirs = band.copy()
        EmbedMaxDct(list(bits), wmLen=len(bits), scales=[24, 0, 0], block=4).encode_frame(theirs, 24)
        rows, columns, change = watermark.quantise_band(band, bits, 24)
        ours = band.astype(np.float64)
        ours[rows, columns] += change
        assert np.array_equal(ours.astype(np.float32), theirs)
        image = rng.random((2 * shape[0] + 3, 2 * shape[1] + 1)).astype(np.float32) * 255
        ours_band = watermark.haar_band(image)  # whole 2x2 groups only: pywt pads an odd edge
        assert ours_band.shape == (shape[0] + 1, shape[1])
        assert np.allclose(ours_band, pywt.dwt2(image, "haar")[0][: shape[0] + 1, : shape[1]], atol=1e-3)


@pytest.mark.parametrize("tone", ["dark", "bright"])
def test_dark_and_bright_images_keep_the_mark(photo, tone):
    """Where the package's step would push pixels past 0 or 255 (and clipping would erase the bit), the same
    position one step up or down is taken."""
    faint = np.asarray(photo, np.float64) * 0.1
    image = Image.fromarray((faint if tone == "dark" else 255 - faint).astype(np.uint8))
    marks = provenance.Marker(Settings())
    png = StageResult(images=[image], info=INFO).encode(Encoding()).encoded[0]
    for data in (png, reencoded(png, "WEBP")):
        assert marks.verify(data).watermark.found
    assert psnr(image, Image.open(io.BytesIO(png)).convert("RGB")) > 42


def test_the_sdxl_reference_band_is_read_by_the_packages_own_decoder(photo):
    """With WATERMARK_CHROMA_SCALE=36 (and no luma band) the mark is where SDXL's reference puts it: invisible-
    watermark's decoder with its default settings finds the payload."""
    from imwatermark import WatermarkDecoder

    marks = provenance.Marker(Settings(watermark_luma_scale=0, watermark_chroma_scale=36))
    marked, _ = marks.mark(photo)
    bgr = np.ascontiguousarray(np.asarray(marked)[:, :, ::-1])
    bits = WatermarkDecoder("bits", 48).decode(bgr, "dwtDct")
    assert "".join(str(int(b)) for b in bits) == SDXL_WATERMARK_BITS


def test_a_custom_payload_is_embedded_and_read(photo):
    payload = "0110100101101110011101100110100101110011"  # "invis"
    marks = provenance.Marker(Settings(watermark_bits=payload))
    report = marks.watermark.read(marks.mark(photo)[0])
    assert report.found and report.payload == payload and bytes.fromhex(report.payload_hex or "") == b"invis"


def test_unmarked_images_read_about_half_the_bits_and_are_not_found(astronaut):
    """An unmarked image reads each bit by chance: these read 46 to 58% of the payload, and none of them is
    a mark (a threshold at half the bits would find one in two)."""
    from skimage import data

    noise = np.random.default_rng(0).integers(0, 256, (256, 256, 3), dtype=np.uint8)
    mark = watermark.Watermark.from_settings(Settings())
    for image in (astronaut, Image.fromarray(data.chelsea()), Image.fromarray(noise)):
        report = mark.read(image)
        assert report.checked and 0.45 <= (report.bit_accuracy or 0) <= 0.6
        assert not report.found


@pytest.mark.parametrize(("flipped", "found"), [(0, True), (2, True), (14, False)])
def test_a_mark_is_found_only_when_nearly_all_its_bits_read_back(photo, flipped, found):
    """A mark of another payload that shares 34 of 48 bits (71%) is not ours; one that differs by two bits is
    read as ours with its accuracy."""
    ours = watermark.Watermark.from_settings(Settings())
    bits = list(ours.bits)
    for i in range(flipped):
        bits[3 * i] ^= 1
    marked = watermark.Watermark(tuple(bits), ours.luma_scale, ours.chroma_scale).embed(photo)
    report = ours.read(marked)
    assert report.bit_accuracy == pytest.approx((48 - flipped) / 48, abs=1e-4)
    assert report.found is found


def test_images_too_small_for_the_method_are_skipped_with_the_reason(photo, caplog):
    marks = provenance.Marker(Settings())
    narrow = photo.resize((512, 255))
    with caplog.at_level(logging.INFO, logger="deployments.support.provenance"):
        out, applied = marks.mark(narrow)
    assert not applied and out is narrow
    assert any("no invisible watermark on a 512x255 image" in r.getMessage() for r in caplog.records)
    result = StageResult(images=[narrow, photo], info=INFO).encode(Encoding())
    assert result.info["watermarked"] == [False, True]
    report = marks.verify(result.encoded[0]).watermark
    assert not report.checked and not report.found and "smaller than 256x256" in (report.reason or "")


def test_the_watermark_can_be_turned_off(photo, monkeypatch):
    monkeypatch.setenv("WATERMARK_ENABLED", "false")
    result = StageResult(images=[photo], info=INFO).encode(Encoding())
    assert result.info["watermarked"] == [False]
    assert np.array_equal(np.asarray(Image.open(io.BytesIO(result.encoded[0]))), np.asarray(photo))


def test_settings_refuse_half_a_configuration():
    with pytest.raises(ValueError, match="go together"):
        Settings(c2pa_cert_file="/tmp/chain.pem")
    with pytest.raises(ValueError, match="WATERMARK_LUMA_SCALE"):
        Settings(watermark_luma_scale=0)
    with pytest.raises(ValueError, match="watermark_bits"):
        Settings(watermark_bits="0101x")


# --- content credentials -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("fmt", ["png", "jpeg", "webp"])
def test_every_format_carries_a_manifest_that_validates(photo, signing, fmt):
    result = StageResult(images=[photo], info=INFO).encode(Encoding(format=fmt))
    data = result.encoded[0]
    assert result.info["credentials"] and Image.open(io.BytesIO(data)).format == fmt.upper()
    state, manifest = manifest_of(data, signing["C2PA_TRUST_ANCHORS_FILE"])
    assert state == "Trusted"
    assert manifest["claim_generator_info"][0]["name"] == "imagegen"
    assert manifest["claim_generator_info"][0]["version"] == credentials.version() == "0.1.0"
    actions = next(a["data"]["actions"] for a in manifest["assertions"] if a["label"] == "c2pa.actions.v2")
    assert actions == [{"action": "c2pa.created", "softwareAgent": {"name": "tiny-sdxl-base"},
                        "digitalSourceType": "http://cv.iptc.org/newscodes/digitalsourcetype/trainedAlgorithmicMedia"}]
    models = next(a["data"] for a in manifest["assertions"] if a["label"] == credentials.GENERATION_LABEL)
    assert models == {"checkpoint": "tiny-sdxl-base", "refiner": "tiny-sdxl-refiner"}
    assert "thumbnail" not in manifest  # no second copy of the image inside the file
    # Without the CA among the trust anchors the signature is still intact: valid, not trusted.
    assert manifest_of(data)[0] == "Valid"
    # Ours reads the same, and the watermark beside it.
    report = provenance.marker().verify(data)
    assert report.credentials.validation_state == "trusted" and report.credentials.checkpoint == "tiny-sdxl-base"
    assert report.credentials.claim_generator == "imagegen 0.1.0" and report.watermark.found
    assert report.credentials.actions[0].digital_source_type == credentials.TRAINED


def test_an_edit_names_the_upload_it_started_from(photo, signing):
    parent = StageResult(images=[photo], info=INFO).encode(Encoding()).encoded[0]  # itself signed
    edited = StageResult(images=[photo.resize((1024, 1024))], info={"upscaler": "R-ESRGAN 4x+"}).encode(
        Encoding(parent=parent)).encoded[0]
    state, manifest = manifest_of(edited, signing["C2PA_TRUST_ANCHORS_FILE"])
    assert state == "Trusted"
    actions = next(a["data"]["actions"] for a in manifest["assertions"] if a["label"] == "c2pa.actions.v2")
    assert [a["action"] for a in actions] == ["c2pa.opened", "c2pa.edited"]
    assert actions[1]["digitalSourceType"] == credentials.TRAINED
    assert actions[1]["softwareAgent"] == {"name": "R-ESRGAN 4x+"}
    (ingredient,) = manifest["ingredients"]
    assert ingredient["relationship"] == "parentOf" and ingredient["format"] == "image/png"
    assert ingredient.get("active_manifest")  # the parent's own credentials travel with it
    report = provenance.marker().verify(edited).credentials
    assert [i.relationship for i in report.ingredients] == ["parentOf"] and report.models == {
        "upscaler": "R-ESRGAN 4x+"}


def test_an_overlaid_file_says_it_holds_the_clients_pixels(photo, signing):
    logo = Image.new("RGB", (64, 64), (250, 10, 10))
    spec = Overlay(logo=b64(logo), size=1.0, x=0.0, y=0.0)  # a logo over the whole frame: any picture at all
    result = StageResult(images=[photo], info=INFO).encode(Encoding(overlay=spec))
    assert result.info["overlay"] is True
    state, manifest = manifest_of(result.encoded[0], signing["C2PA_TRUST_ANCHORS_FILE"])
    assert state == "Trusted"
    actions = next(a["data"]["actions"] for a in manifest["assertions"] if a["label"] == "c2pa.actions.v2")
    assert [(a["action"], a["digitalSourceType"]) for a in actions] == [
        ("c2pa.created", credentials.TRAINED), ("c2pa.edited", credentials.COMPOSITE)]
    assert "caption or logo" in actions[1]["description"]
    report = provenance.marker().verify(result.encoded[0]).credentials
    assert [a.digital_source_type for a in report.actions] == [credentials.TRAINED, credentials.COMPOSITE]


@pytest.mark.parametrize(("fmt", "lossless"), [("png", False), ("jpeg", False), ("webp", False), ("webp", True)])
def test_a1111_parameters_survive_signing(photo, signing, fmt, lossless):
    """A PNG's ``parameters`` chunk, a JPEG's or WebP's EXIF UserComment (A1111's ``samples_format``): signing keeps
    it, the manifest validates over it, and the watermark is in the pixels."""
    how = Encoding(format=fmt, quality=80, lossless=lossless, parameters=["a fox\nSteps: 3"])
    data = StageResult(images=[photo], info=INFO).encode(how).encoded[0]
    image = Image.open(io.BytesIO(data))
    found = image.info["parameters"] if fmt == "png" else imaging.exif_comment(image)
    assert image.format == fmt.upper() and found == "a fox\nSteps: 3"
    assert manifest_of(data, signing["C2PA_TRUST_ANCHORS_FILE"])[0] == "Trusted"
    report = provenance.marker().verify(data)
    assert report.credentials.validation_state == "trusted" and report.watermark.found


def test_without_certificate_there_is_no_manifest_and_one_log_line(photo, monkeypatch, caplog):
    for name in ("C2PA_CERT_FILE", "C2PA_KEY_FILE"):
        monkeypatch.delenv(name, raising=False)
    with caplog.at_level(logging.INFO, logger="deployments.support.provenance"):
        first = StageResult(images=[photo], info=INFO).encode(Encoding()).encoded[0]
        second = StageResult(images=[photo.resize((128, 128))], info=INFO).encode(Encoding(format="webp"))
    said = [r for r in caplog.records if "content credentials off" in r.getMessage()]
    assert len(said) == 1 and not second.info["credentials"]
    assert provenance.marker().verify(first).credentials.model_dump() == credentials.CredentialsReport(
        present=False).model_dump()


def test_a_key_that_does_not_match_its_certificate_is_refused(c2pa_setup, tmp_path):
    other = signing_credentials(tmp_path)
    with pytest.raises(credentials.SigningFailed, match="claimSignature.mismatch"):
        provenance.Marker(Settings(c2pa_cert_file=c2pa_setup["C2PA_CERT_FILE"],
                                   c2pa_key_file=other["C2PA_KEY_FILE"]))
    with pytest.raises(credentials.SigningFailed, match="self-signed"):
        provenance.Marker(Settings(c2pa_cert_file=c2pa_setup["C2PA_TRUST_ANCHORS_FILE"],
                                   c2pa_key_file=c2pa_setup["C2PA_KEY_FILE"]))


# --- reading forged, truncated and garbage files -------------------------------------------------------------------

def forged(data: bytes, how: str, fix_crc: bool = True) -> bytes:
    """The manifest store (JUMBF) tampered with: ``flip`` flips bytes past its headers, ``rename`` claims another
    checkpoint (same length, so every structure stays well formed). In a PNG the forger also fixes the chunk's
    CRC, as anyone editing a manifest would."""
    out = bytearray(data)
    if how == "rename":
        out = bytearray(data.replace(b"tiny-sdxl-base", b"fake-sdxl-base"))
    else:
        store = data.find(b"c2pa.assertions")
        for offset in (40, 41, 42):
            out[store + offset] ^= 0xFF
    assert out != bytearray(data)
    if fix_crc and data.startswith(b"\x89PNG"):
        start = data.find(b"caBX") - 4
        length = int.from_bytes(data[start:start + 4], "big")
        out[start + 8 + length:start + 12 + length] = zlib.crc32(out[start + 4:start + 8 + length]).to_bytes(4, "big")
    return bytes(out)


@pytest.mark.parametrize("fmt", ["png", "jpeg", "webp"])
def test_forged_manifests_read_invalid(photo, signing, fmt):
    data = StageResult(images=[photo], info=INFO).encode(Encoding(format=fmt)).encoded[0]
    broken = provenance.marker().verify(forged(data, "flip"))
    assert broken.credentials.present and broken.credentials.validation_state == "invalid"
    assert broken.credentials.error and broken.watermark.found  # the pixels were not touched
    renamed = provenance.marker().verify(forged(data, "rename")).credentials
    assert renamed.validation_state == "invalid" and "assertion.hashedURI.mismatch" in renamed.failures
    if fmt == "png":  # a chunk whose CRC no longer matches makes the whole file undecodable
        with pytest.raises(InvalidImage):
            provenance.marker().verify(forged(data, "flip", fix_crc=False))


def test_a_manifest_copied_onto_other_pixels_reads_invalid(photo, signing):
    signed = StageResult(images=[photo], info=INFO).encode(Encoding()).encoded[0]
    other = StageResult(images=[photo.transpose(Image.Transpose.FLIP_LEFT_RIGHT)], info=INFO).encode(
        Encoding(png_level=1)).encoded[0]
    # Same-size files: splice the first file's manifest chunk (caBX) into the second one.
    start = signed.find(b"caBX") - 4
    length = int.from_bytes(signed[start:start + 4], "big") + 12
    chunk = signed[start:start + length]
    theirs = other.find(b"caBX") - 4
    spliced = other[:theirs] + chunk + other[theirs + int.from_bytes(other[theirs:theirs + 4], "big") + 12:]
    read = provenance.marker().verify(spliced).credentials
    assert read.validation_state == "invalid" and "assertion.dataHash.mismatch" in read.failures


def test_truncated_and_garbage_files_are_invalid_images(photo, signing):
    data = StageResult(images=[photo], info=INFO).encode(Encoding(format="webp")).encoded[0]
    marks = provenance.marker()
    for bad in (data[: len(data) // 2], data[:200], b"garbage", b"\x89PNG\r\n\x1a\n" + b"\x00" * 64,
                json.dumps({"not": "an image"}).encode()):
        with pytest.raises(InvalidImage) as refused:
            marks.verify(bad)
        assert refused.value.field == "image"


def test_the_readme_settings_sign(c2pa_setup, photo):
    """The README's environment block names settings that exist; with real files behind them, images are signed."""
    section = (Path(__file__).resolve().parents[1] / "README.md").read_text().split("## Provenance")[1]
    section = section.split("\n## ")[0]
    exports = dict(line.removeprefix("export ").split("=", 1) for line in section.splitlines()
                   if line.startswith("export "))
    assert set(exports) == {"C2PA_CERT_FILE", "C2PA_KEY_FILE", "C2PA_ALGORITHM", "C2PA_TRUST_ANCHORS_FILE"}
    files = {"C2PA_CERT_FILE": c2pa_setup["C2PA_CERT_FILE"], "C2PA_KEY_FILE": c2pa_setup["C2PA_KEY_FILE"],
             "C2PA_TRUST_ANCHORS_FILE": c2pa_setup["C2PA_TRUST_ANCHORS_FILE"]}
    settings = Settings(**{**exports, **files})
    assert settings.c2pa_algorithm == exports["C2PA_ALGORITHM"]
    marks = provenance.Marker(settings)
    out = io.BytesIO()
    photo.save(out, format="PNG")
    signed = marks.sign(out.getvalue(), "png", credentials.Facts.of(INFO))
    assert marks.verify(signed).credentials.validation_state == "trusted"
