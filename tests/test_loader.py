"""The loader: every source kind, the S3 cache, truncated downloads and refused pickles."""

from __future__ import annotations

import pickle
import shutil
from pathlib import Path

import pytest
import torch

from deployments.support.config import ModelSource
from deployments.support.errors import DownloadIncomplete, ModelLoadError, UnsafeWeights
from deployments.support.settings import Settings
from deployments.weights import loader
from tests.helpers import s3_client
from tests.netfaults import TruncatingProxy


def _unet_equal(a, b) -> bool:
    sa, sb = a.unet.state_dict(), b.unet.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


@pytest.fixture(scope="module")
def folder_pipe(tiny):
    return loader.load_sdxl(ModelSource(source=str(tiny / "sdxl-base")), refiner=False, dtype=torch.float32)


def test_single_file_checkpoint_loads_the_same_weights(tiny, folder_pipe):
    single = loader.load_sdxl(
        ModelSource(source=str(tiny / "sdxl-base.safetensors"), config=str(tiny / "sdxl-base")),
        refiner=False, dtype=torch.float32,
    )
    assert _unet_equal(folder_pipe, single)
    for name in ("vae", "text_encoder", "text_encoder_2"):
        a, b = getattr(folder_pipe, name).state_dict(), getattr(single, name).state_dict()
        assert all(torch.equal(a[k], b[k]) for k in a), name


def test_hugging_face_repo_id_from_the_local_cache(tiny, tmp_path, folder_pipe):
    # The hub cache layout: models--org--name/{refs/main, snapshots/<commit>/...}
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hub" / "models--tiny-org--sdxl-base"
    shutil.copytree(tiny / "sdxl-base", repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    settings = Settings(HF_HUB_CACHE=tmp_path / "hub", MODEL_CACHE_DIR=tmp_path / "cache")
    pipe = loader.load_sdxl(ModelSource(source="tiny-org/sdxl-base"), refiner=False, dtype=torch.float32,
                            settings=settings)
    assert _unet_equal(folder_pipe, pipe)
    with pytest.raises(ModelLoadError, match="not in the local Hugging Face cache"):
        loader.resolve("tiny-org/absent", settings)


def test_missing_source_is_a_typed_error(tmp_path):
    with pytest.raises(ModelLoadError):
        loader.resolve(str(tmp_path / "nothing-here"))


def _upload_folder(client, bucket: str, prefix: str, folder: Path) -> None:
    for path in folder.rglob("*"):
        if path.is_file():
            client.upload_file(str(path), bucket, f"{prefix}/{path.relative_to(folder)}")


def test_s3_folder_and_file_download_once_then_reuse(tiny, tmp_path, s3_server, folder_pipe, caplog):
    client = s3_client(s3_server)
    client.create_bucket(Bucket="models")
    _upload_folder(client, "models", "sdxl/base", tiny / "sdxl-base")
    client.upload_file(str(tiny / "upscalers" / "tiny-esrgan-x4.safetensors"), "models", "up/x4.safetensors")
    settings = Settings(AWS_ENDPOINT_URL=s3_server, MODEL_CACHE_DIR=tmp_path / "cache")

    pipe = loader.load_sdxl(ModelSource(source="s3://models/sdxl/base"), refiner=False, dtype=torch.float32,
                            settings=settings)
    assert _unet_equal(folder_pipe, pipe)
    descriptor = loader.load_spandrel("s3://models/up/x4.safetensors", settings)
    assert descriptor.scale == 4

    cached = tmp_path / "cache" / "s3" / "models" / "up" / "x4.safetensors"
    stamp = cached.stat().st_mtime_ns
    caplog.set_level("INFO", logger="deployments.weights.loader")
    loader.resolve("s3://models/up/x4.safetensors", settings)
    assert cached.stat().st_mtime_ns == stamp
    assert "cached copy reused" in caplog.text
    assert not list(cached.parent.glob("*.part-*"))


def test_truncated_s3_download_is_rejected_and_not_cached(tiny, tmp_path, s3_server):
    client = s3_client(s3_server)
    client.create_bucket(Bucket="cut")
    source = tiny / "sdxl-base.safetensors"  # several MB
    client.upload_file(str(source), "cut", "model.safetensors")
    host, port = s3_server.removeprefix("http://").split(":")
    proxy = TruncatingProxy((host, int(port)), budget=200_000)
    try:
        settings = Settings(AWS_ENDPOINT_URL=proxy.url, MODEL_CACHE_DIR=tmp_path / "cache")
        fetcher = loader.S3Fetcher(settings)
        with pytest.raises(DownloadIncomplete):
            fetcher.fetch("s3://cut/model.safetensors")
    finally:
        proxy.close()
    folder = tmp_path / "cache" / "s3" / "cut"
    assert not (folder / "model.safetensors").exists()
    assert not list(folder.glob("*.part-*"))
    # A good connection afterwards completes the download.
    good = loader.S3Fetcher(Settings(AWS_ENDPOINT_URL=s3_server, MODEL_CACHE_DIR=tmp_path / "cache"))
    assert good.fetch("s3://cut/model.safetensors").stat().st_size == source.stat().st_size


class _Canary:
    """Unpickling this writes a file: proof that code ran."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self):
        return (Path.write_text, (self.path, "pwned"))


@pytest.mark.parametrize("name", ["evil.pt", "evil.pth", "evil.ckpt", "evil.bin", "evil.safetensors"])
def test_pickles_are_refused_without_running(tmp_path, name):
    canary = tmp_path / "canary"
    path = tmp_path / name
    path.write_bytes(pickle.dumps({"state_dict": _Canary(canary)}))
    with pytest.raises(UnsafeWeights):
        loader.load_spandrel(str(path))
    assert not canary.exists()


def test_folder_with_only_pickled_weights_is_refused(tmp_path):
    (tmp_path / "unet").mkdir()
    (tmp_path / "unet" / "diffusion_pytorch_model.bin").write_bytes(b"x")
    with pytest.raises(UnsafeWeights):
        loader.load_sdxl(ModelSource(source=str(tmp_path)), refiner=False, dtype=torch.float32)


def test_pickled_lora_is_skipped_and_never_executed(tiny, tmp_path):
    from deployments.sdxl_base import BaseGenerator
    from deployments.support.config import SDXLBaseConfig

    canary = tmp_path / "canary"
    loras = tmp_path / "loras"
    loras.mkdir()
    shutil.copy(tiny / "loras" / "tiny-style.safetensors", loras)
    (loras / "evil.safetensors").write_bytes(pickle.dumps(_Canary(canary)))
    (loras / "evil2.pt").write_bytes(pickle.dumps(_Canary(canary)))
    generator = BaseGenerator(SDXLBaseConfig(model={"source": str(tiny / "sdxl-base")}, lora_dir=str(loras)))
    assert sorted(generator.loras) == ["tiny-style"]
    assert not canary.exists()
