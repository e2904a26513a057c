"""Shared fixtures: one tiny-model factory for every test layer, and real photos from scikit-image."""

from __future__ import annotations

import logging
import os
import warnings
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

warnings.filterwarnings("ignore", category=FutureWarning)


@pytest.fixture(scope="session")
def tiny(tmp_path_factory) -> Path:
    """The tiny models: ``$TINY_MODELS`` when `make` built them, otherwise built once for this session."""
    from deployments.tiny import build_all

    configured = os.environ.get("TINY_MODELS")
    if configured and (Path(configured) / ".stamp").exists():
        return Path(configured)
    out = tmp_path_factory.mktemp("tiny-models")
    build_all(out)
    return out


@pytest.fixture(scope="session")
def base(tiny):
    from deployments.config import SDXLBaseConfig
    from deployments.sdxl_base import BaseGenerator

    return BaseGenerator(
        SDXLBaseConfig(
            model={"source": str(tiny / "sdxl-base")},
            ip_adapter=str(tiny / "ip-adapter"),
            lora_dir=str(tiny / "loras"),
        )
    )


@pytest.fixture(scope="session")
def refiner(tiny):
    from deployments.config import SDXLRefinerConfig
    from deployments.sdxl_refiner import Refiner

    return Refiner(SDXLRefinerConfig(model={"source": str(tiny / "sdxl-refiner")}))


@pytest.fixture(scope="session")
def upscaler(tiny):
    from deployments.config import UpscalerConfig
    from deployments.upscaler import ImageUpscaler

    return ImageUpscaler(
        UpscalerConfig(
            models=[
                {"name": "R-ESRGAN 4x+", "path": str(tiny / "upscalers" / "tiny-esrgan-x4.safetensors")},
                {"name": "R-ESRGAN 2x+", "path": str(tiny / "upscalers" / "tiny-realesrgan-x2.safetensors")},
            ],
            tile=96,
            tile_overlap=16,
        )
    )


@pytest.fixture(scope="session")
def astronaut() -> Image.Image:
    from skimage import data

    return Image.fromarray(data.astronaut())


@pytest.fixture(scope="session")
def astronaut_face_box():
    """The face in skimage's astronaut photo, as MediaPipe finds it, rounded (x0, y0, x1, y1)."""
    return (174, 68, 278, 172)


def pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image, dtype=np.int16)


logging.getLogger("diffusers").setLevel(logging.ERROR)


@pytest.fixture(scope="session")
def s3_server():
    """A real S3 endpoint over HTTP on loopback (moto's server mode); yields its URL."""
    from moto.server import ThreadedMotoServer

    os.environ.setdefault("AWS_ACCESS_KEY_ID", "testing")
    os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "testing")
    os.environ.setdefault("AWS_DEFAULT_REGION", "us-east-1")
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    yield f"http://{host}:{port}"
    server.stop()


def s3_client(endpoint: str):
    import boto3

    return boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1")
