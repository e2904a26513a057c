"""Helpers shared by the test modules (test modules never import each other): images and pixels, error bodies,
S3 clients, job submission and waiting, a webhook receiver."""

from __future__ import annotations

import base64
import io
import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
from PIL import Image


def pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image, dtype=np.int16)


def centre_square(size: int = 64) -> Image.Image:
    """An inpainting mask repainting the centre square (white), half the side, keeping the border (black)."""
    mask = Image.new("L", (size, size), 0)
    mask.paste(255, (size // 4, size // 4, size * 3 // 4, size * 3 // 4))
    return mask


def gaussian64(x: np.ndarray, sigma: float, taps: int) -> np.ndarray:
    """OpenCV's GaussianBlur written out in float64: a separable kernel ``taps`` wide (OpenCV's choice: round(6 sigma
    + 1) | 1 for an 8-bit image, round(8 sigma + 1) | 1 for a float one), borders reflected without repeating the
    edge pixel; over the first two axes."""
    half = taps // 2
    kernel = np.exp(-np.arange(-half, half + 1) ** 2 / (2 * sigma ** 2))
    kernel /= kernel.sum()
    out = x.astype(np.float64)
    for axis in (0, 1):
        size = out.shape[axis]
        wide = np.pad(out, [(half, half) if a == axis else (0, 0) for a in range(out.ndim)], mode="reflect")
        out = sum(w * np.take(wide, np.arange(i, i + size), axis=axis) for i, w in enumerate(kernel))
    return out


def s3_client(endpoint: str):
    import boto3

    return boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1")


def generated(handle, request):
    """What the ingress's ``/generate`` handler answers for ``request`` (called through a Serve handle), as the
    response model: the handler gives the serialised body, as it goes out over HTTP."""
    from graphs.api.generate import GenerateResponse

    return GenerateResponse.model_validate_json(handle.generate.remote(request).result().body)


def decode_b64(data: str) -> Image.Image:
    return Image.open(io.BytesIO(base64.b64decode(data.split(",", 1)[-1])))


def b64(image: Image.Image, fmt: str = "PNG", **save) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **save)
    return base64.b64encode(buffer.getvalue()).decode()


def within(condition, timeout: float, every: float = 0.2):
    """``condition()``'s first true value within ``timeout`` seconds, else None."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if value := condition():
            return value
        time.sleep(every)
    return None


def until(condition, timeout: float = 60.0, every: float = 0.2):
    """``condition()``'s first true value; fails after ``timeout`` seconds."""
    value = within(condition, timeout, every)
    if value is None:
        raise AssertionError(f"condition not met within {timeout} s")
    return value


def seconds_until(condition, timeout: float, every: float = 0.2) -> float:
    """Seconds until ``condition()`` held; fails after ``timeout``."""
    started = time.monotonic()
    until(condition, timeout, every)
    return time.monotonic() - started


def error(response, status: int, code: str, field: str | None = None) -> dict:
    assert response.status_code == status, response.text
    body = response.json()
    assert body["code"] == code and set(body) == {"error", "code", "details"}
    if field is not None:
        assert body["details"]["field"] == field
    return body


def interrupted(response, images: int = 1) -> dict:
    """An A1111 generation stopped by /interrupt mid-way: 200, as in A1111, with the images its finished batches
    made and those of the batch stopped, as they stood (one, for a lone batch of one)."""
    assert response.status_code == 200, response.text
    body = response.json()
    info = json.loads(body["info"])
    assert info["interrupted"] is True and len(body["images"]) == images == len(info["all_seeds"])
    for image in body["images"]:
        assert decode_b64(image).size == (info["width"], info["height"])
    return info


SMALL = {"prompt": "a lighthouse", "width": 128, "height": 128, "steps": 3, "seed": 11}
LONG = {"prompt": "a long one", "width": 256, "height": 256, "steps": 150, "seed": 3}


def wait(service, job_id: str, until=("completed", "failed", "cancelled"), timeout: float = 120,
         headers: dict | None = None) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        response = service.get(f"/jobs/{job_id}", headers=headers)
        assert response.status_code == 200, f"GET /jobs/{job_id}: {response.status_code} {response.text}"
        job = response.json()
        if job["status"] in until:
            return job
        time.sleep(0.2)
    raise AssertionError(f"job {job_id} stuck in {job['status']}")


def submit(service, path="/generate/text2img", body=None, **headers) -> dict:
    response = service.post(path, json=body or SMALL, headers=headers)
    assert response.status_code == 202, response.text
    return response.json()


def drain(service) -> None:
    for job in service.get("/jobs", params={"status": "queued", "limit": 500}).json()["jobs"]:
        service.post(f"/jobs/{job['id']}/cancel")
    for job in service.get("/jobs", params={"status": "processing"}).json()["jobs"]:
        service.post(f"/jobs/{job['id']}/cancel")
        wait(service, job["id"])


class Receiver:
    """A loopback HTTP server that records POSTs (and the ``Host`` each was sent with) and fails the first
    ``failures`` of them with ``status`` (500), sending ``headers`` with the failures. With ``tls`` (a
    certificate and key file), it speaks https."""

    def __init__(self, failures: int = 0, status: int = 500, headers: dict[str, str] | None = None,
                 tls: tuple[str, str] | None = None) -> None:
        self.bodies: list[dict] = []
        self.hosts: list[str] = []
        self.failures = failures
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):  # noqa: N802 - http.server's naming
                body = json.loads(self.rfile.read(int(self.headers["content-length"])))
                receiver.bodies.append(body)
                receiver.hosts.append(self.headers["host"])
                failing = len(receiver.bodies) <= receiver.failures
                self.send_response(status if failing else 200)
                for name, value in (headers or {}).items() if failing else ():
                    self.send_header(name, value)
                self.end_headers()

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        scheme = "http"
        if tls is not None:
            import ssl

            context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            context.load_cert_chain(*tls)
            self.server.socket = context.wrap_socket(self.server.socket, server_side=True)
            scheme = "https"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.port = self.server.server_address[1]
        self.url = f"{scheme}://127.0.0.1:{self.port}/hook"

    def close(self) -> None:
        self.server.shutdown()


def tls_files(folder, host: str) -> tuple[str, str, str]:
    """A throwaway CA and a server certificate for ``host`` it issued: (CA file, certificate file, key file)."""
    import datetime
    from pathlib import Path

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    now = datetime.datetime.now(datetime.UTC)
    ca_key, key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "test CA")])
    ca = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name).public_key(ca_key.public_key())
          .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=5))
          .not_valid_after(now + datetime.timedelta(days=1))
          .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
          .sign(ca_key, hashes.SHA256()))
    cert = (x509.CertificateBuilder().subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, host)]))
            .issuer_name(ca_name).public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName(host)]), critical=False)
            .sign(ca_key, hashes.SHA256()))
    folder = Path(folder)
    paths = folder / "ca.pem", folder / "cert.pem", folder / "key.pem"
    paths[0].write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    paths[1].write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    paths[2].write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return str(paths[0]), str(paths[1]), str(paths[2])


def signing_credentials(folder) -> dict[str, str]:
    """A throwaway C2PA signing setup in ``folder``: a root CA and an ES256 signing certificate it issued (a C2PA
    signer may not be self-signed, and needs the digitalSignature key usage and an emailProtection or
    documentSigning EKU). Returns the settings that point at them: chain (signer, then CA), key, trust anchor."""
    import datetime
    from pathlib import Path

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    def name(common: str) -> x509.Name:
        return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common),
                          x509.NameAttribute(NameOID.ORGANIZATION_NAME, "imagegen tests")])

    def usage(*, sign: bool, ca: bool) -> x509.KeyUsage:
        return x509.KeyUsage(digital_signature=sign, content_commitment=False, key_encipherment=False,
                             data_encipherment=False, key_agreement=False, key_cert_sign=ca, crl_sign=ca,
                             encipher_only=False, decipher_only=False)

    now = datetime.datetime.now(datetime.UTC)
    ca_key, key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())

    def certificate(subject: str, public, issuer: x509.Name, *, ca: bool):
        builder = (x509.CertificateBuilder().subject_name(name(subject)).issuer_name(issuer).public_key(public)
                   .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(hours=1))
                   .not_valid_after(now + datetime.timedelta(days=7))
                   .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
                   .add_extension(usage(sign=not ca, ca=ca), critical=True)
                   .add_extension(x509.SubjectKeyIdentifier.from_public_key(public), critical=False))
        if not ca:
            builder = (builder.add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.EMAIL_PROTECTION]),
                                             critical=False)
                       .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
                                      critical=False))
        return builder.sign(ca_key, hashes.SHA256())

    root = certificate("imagegen test CA", ca_key.public_key(), name("imagegen test CA"), ca=True)
    signer = certificate("imagegen test signer", key.public_key(), root.subject, ca=False)
    folder = Path(folder)
    pem = serialization.Encoding.PEM
    (folder / "chain.pem").write_bytes(signer.public_bytes(pem) + root.public_bytes(pem))
    (folder / "signer.key").write_bytes(key.private_bytes(pem, serialization.PrivateFormat.PKCS8,
                                                          serialization.NoEncryption()))
    (folder / "ca.pem").write_bytes(root.public_bytes(pem))
    return {"C2PA_CERT_FILE": str(folder / "chain.pem"), "C2PA_KEY_FILE": str(folder / "signer.key"),
            "C2PA_TRUST_ANCHORS_FILE": str(folder / "ca.pem")}


def refused(call):
    """The structured error (a ``ServiceError``) an in-process route raised: the HTTP edge answers it as a 4xx
    naming its field."""
    import pytest

    from deployments.support.errors import ServiceError
    from graphs.api.errors import unwrap

    with pytest.raises(Exception) as raised:  # noqa: PT011 - unwrapped and checked below
        call()
    error = unwrap(raised.value)
    assert isinstance(error, ServiceError), repr(raised.value)
    return error


def module_list(configured: dict, alias_names: bool) -> dict:
    """``GET /controlnet/module_list`` as the ingress answers it where the base's ``preprocessors`` are
    ``configured`` (its route method called directly: it reads only the config)."""
    import asyncio
    from types import SimpleNamespace

    from graphs.api.controlnet import ControlNetRoutes

    routes = SimpleNamespace(config=SimpleNamespace(base=SimpleNamespace(preprocessors=configured)))
    return asyncio.run(ControlNetRoutes.controlnet_module_list(routes, alias_names))  # type: ignore[arg-type]
