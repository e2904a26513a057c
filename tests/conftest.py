"""Shared fixtures: one tiny-model factory for every test layer, and real photos from scikit-image."""

from __future__ import annotations

import logging
import os
import time
import warnings
from pathlib import Path

import pytest
from PIL import Image

from tests import cluster

warnings.filterwarnings("ignore", category=FutureWarning)


@pytest.fixture(scope="session")
def tiny(tmp_path_factory) -> Path:
    """The tiny models: ``$TINY_MODELS`` when `make` built them, otherwise built once for this session."""
    from deployments.factory.tiny import build_all

    configured = os.environ.get("TINY_MODELS")
    if configured and (Path(configured) / ".stamp").exists():
        return Path(configured)
    out = tmp_path_factory.mktemp("tiny-models")
    build_all(out)
    return out


@pytest.fixture(scope="session")
def anyio_backend() -> str:
    """Async tests (``pytest.mark.anyio``) run on asyncio, as Ray Serve replicas do."""
    return "asyncio"


@pytest.fixture(scope="session")
def base(tiny):
    from deployments.sdxl_base import BaseGenerator
    from deployments.support.config import SDXLBaseConfig

    return BaseGenerator(
        SDXLBaseConfig(
            model={"source": str(tiny / "sdxl-base")},
            ip_adapter=str(tiny / "ip-adapter"),
            lora_dir=str(tiny / "loras"),
            controlnets={"tiny-canny": str(tiny / "controlnet-canny")},
            preprocessors={"depth_midas": str(tiny / "depth-midas"),
                           "depth_anything_v2": str(tiny / "depth-anything-v2"),
                           "lineart_realistic": str(tiny / "lineart" / "sk_model.safetensors"),
                           "lineart_anime": str(tiny / "lineart" / "netG.safetensors"),
                           # a folder holding body_pose_model.safetensors, hand_pose_model.safetensors and
                           # facenet.safetensors: the five pose modules share its three networks
                           **{m: str(tiny / "openpose") for m in ("openpose", "openpose_hand", "openpose_face",
                                                                  "openpose_faceonly", "openpose_full")},
                           # one HED (a file, and the folder holding it: two sources, two networks), one PiDiNet
                           "softedge_hed": str(tiny / "softedge" / "ControlNetHED.safetensors"),
                           "scribble_hed": str(tiny / "softedge"),
                           "softedge_pidisafe": str(tiny / "softedge"),
                           "mlsd": str(tiny / "mlsd" / "mlsd_large_512_fp32.safetensors")},
        )
    )


@pytest.fixture(scope="session")
def refiner(tiny):
    from deployments.sdxl_refiner import Refiner
    from deployments.support.config import SDXLRefinerConfig

    return Refiner(SDXLRefinerConfig(model={"source": str(tiny / "sdxl-refiner")}))


@pytest.fixture(scope="session")
def upscaler(tiny):
    from deployments.support.config import UpscalerConfig
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


logging.getLogger("diffusers").setLevel(logging.ERROR)


@pytest.fixture(scope="session")
def redis_url(tmp_path_factory):
    """A real redis-server on a loopback port, started for this session."""
    import shutil
    import socket
    import subprocess

    binary = shutil.which("redis-server")
    if binary is None:
        pytest.skip("redis-server is not installed (CI installs Debian's redis-server)")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    folder = tmp_path_factory.mktemp("redis")
    server = subprocess.Popen([binary, "--port", str(port), "--bind", "127.0.0.1", "--dir", str(folder),
                               "--save", "", "--appendonly", "yes"], stdout=subprocess.DEVNULL)
    import redis

    client = redis.Redis(port=port)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            client.ping()
            break
        except redis.ConnectionError:
            time.sleep(0.05)
    yield f"redis://127.0.0.1:{port}/0"
    server.terminate()
    server.wait(10)


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


# --- the served application (one real local Ray cluster for every HTTP test module) ---------------------------

ROOT = cluster.ROOT
BUCKET = "illustrations-test"


METRICS_PORT = cluster.free_port()


@pytest.fixture(scope="session")
def s3_proxy(s3_server):
    """The ingress reaches S3 through this proxy, so tests can take S3 down (``broken = True``)."""
    from tests.netfaults import TruncatingProxy

    host, port = s3_server.removeprefix("http://").split(":")
    proxy = TruncatingProxy((host, int(port)), budget=None)
    yield proxy
    proxy.close()


@pytest.fixture(scope="session")
def jobs_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("jobs-data")


# Test policies: quick Upscaler autoscaling, and quick health checks so that a wedged replica is replaced within
# seconds (tests/test_faults.py).
DEPLOYMENT_OPTIONS = {
    "Upscaler": {"autoscaling_config": {
        "min_replicas": 1, "max_replicas": 2, "target_ongoing_requests": 1, "upscale_delay_s": 0.5,
        "downscale_delay_s": 2, "metrics_interval_s": 0.5, "look_back_period_s": 1}},
    "FocalCropper": {"health_check_period_s": 1, "health_check_timeout_s": 2, "graceful_shutdown_timeout_s": 1},
    # The batching defaults, given as serve_config.yaml gives its own: Serve calls each replica's reconfigure.
    "SDXLBase": {"user_config": {"max_batch_size": 8, "batch_wait_timeout_s": 0.0}},
    "SDXLRefiner": {"user_config": {"max_batch_size": 8, "batch_wait_timeout_s": 0.0}},
}


def serve_app() -> None:
    """(Re)deploy configs/cpu.yaml's application with the test policies."""
    cluster.deploy(DEPLOYMENT_OPTIONS)


@pytest.fixture(scope="session")
def c2pa_files(tmp_path_factory) -> dict[str, str]:
    """A throwaway CA and signing certificate: the served images carry content credentials the tests can trust."""
    from tests.helpers import signing_credentials

    return signing_credentials(tmp_path_factory.mktemp("c2pa"))


@pytest.fixture(scope="session")
def service(tiny, s3_proxy, jobs_dir, c2pa_files, tmp_path_factory):
    import httpx

    env = {
        "TINY_MODELS": str(tiny), "AWS_ENDPOINT_URL": s3_proxy.url, "S3_BUCKET_NAME": BUCKET,
        "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_REGION": "us-east-1",
        "ILLUSTRATION_SIZE": "256", "DEFAULT_NUM_INFERENCE_STEPS": "4", "MAX_BODY_BYTES": str(4 * 1024 * 1024),
        "JOBS_DATA_DIR": str(jobs_dir), "MAX_CONCURRENT_JOBS": "1", "MAX_QUEUE_SIZE": "8",
        "MODEL_CACHE_DIR": str(tmp_path_factory.mktemp("model-cache")),  # checkpoint hashes, never the user's
        "JOB_LEASE_SECONDS": "3", "JOB_POLL_SECONDS": "0.1", "WEBHOOK_ALLOW_HOSTS": "127.0.0.1",
        "WEBHOOK_BACKOFF_SECONDS": "0.2", "JOBS_PER_TOKEN": "true",
        "JOB_DRAIN_SECONDS": "5",  # a redeploy waits no longer than this for a job still running (tests/test_runner)
        # The suite floods the service on purpose (test_hostile); test_ratelimit_http tightens these.
        "RATE_LIMIT_GENERATE_BURST": "100000", "RATE_LIMIT_SUBMIT_BURST": "100000", "RATE_LIMIT_READ_BURST": "100000",
        **c2pa_files,  # signed content credentials on every image (the watermark is on by default)
    }
    os.environ["TINY_MODELS"] = str(tiny)
    base_url = cluster.start(env, DEPLOYMENT_OPTIONS, _metrics_export_port=METRICS_PORT)
    with httpx.Client(base_url=base_url, timeout=120) as client:
        yield client
    cluster.stop()


@pytest.fixture(autouse=True)
def fresh_settings():
    """Settings are read once per process; a test that sets environment variables gets them read again."""
    from deployments.support import settings

    settings.current.cache_clear()
    yield
    settings.current.cache_clear()
