"""The one place where weights are found, fetched and loaded.

Sources, for every model kind:
- a local path (a diffusers folder, or a single ``.safetensors`` file);
- a Hugging Face repo id (``org/name``), resolved from the local hub cache only: nothing is downloaded;
- an ``s3://bucket/key`` URI (a file, or a prefix holding a diffusers folder), downloaded once into the model
  cache with an atomic rename and a size check, then reused. ``AWS_ENDPOINT_URL`` selects any S3-compatible
  server.

Only safetensors are loaded: a pickle (``.ckpt``, ``.pt``, ``.pth``, pickled ``.bin``) can run code when
opened, so it is refused before any library touches it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import struct
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING

from deployments.support.config import ModelSource
from deployments.support.depth import ARCHITECTURES
from deployments.support.errors import DownloadIncomplete, ModelLoadError, UnsafeWeights
from deployments.support.lineart import ARCHITECTURES as LINEART_ARCHITECTURES
from deployments.support.settings import Settings, current

if TYPE_CHECKING:
    import torch

logger = logging.getLogger(__name__)

PICKLE_SUFFIXES = {".ckpt", ".pt", ".pth", ".bin", ".pkl", ".pickle"}
_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_CHUNK = 1 << 20


def check_safetensors(path: Path) -> None:
    """Refuse anything that is not a well-formed safetensors file, by name and by header."""
    if path.suffix.lower() in PICKLE_SUFFIXES:
        raise UnsafeWeights(f"{path.name}: pickled checkpoints are refused; convert it to .safetensors")
    if path.suffix.lower() != ".safetensors":
        raise UnsafeWeights(f"{path.name}: only .safetensors weights are loaded")
    try:
        with path.open("rb") as f:
            (header_len,) = struct.unpack("<Q", f.read(8))
            if header_len > 100 * 1024 * 1024 or header_len > path.stat().st_size - 8:
                raise ValueError("header length out of range")
            json.loads(f.read(header_len))
    except (OSError, ValueError, struct.error) as e:
        raise UnsafeWeights(f"{path.name}: not a valid safetensors file ({e})") from e


def _check_folder(path: Path) -> None:
    pickles = [p for p in path.rglob("*") if p.suffix.lower() in PICKLE_SUFFIXES]
    has_safetensors = any(path.rglob("*.safetensors"))
    if pickles and not has_safetensors:
        raise UnsafeWeights(f"{path}: holds only pickled weights ({pickles[0].name}); safetensors are required")


def s3_client(endpoint_url: str | None, region: str, read_timeout: float = 60, attempts: int = 3):
    """A boto3 S3 client for AWS or any S3-compatible endpoint, with bounded timeouts and retries."""
    import boto3
    from botocore.config import Config

    retries = {"max_attempts": attempts, "mode": "standard"}
    config = Config(connect_timeout=10, read_timeout=read_timeout, retries=retries)
    return boto3.client("s3", endpoint_url=endpoint_url, region_name=region, config=config)


def _parse_s3(uri: str) -> tuple[str, str, bool]:
    """``s3://bucket/key`` -> bucket, key, and whether the key is a folder (a prefix, then ending in ``/``)."""
    bucket, _, key = uri.removeprefix("s3://").partition("/")
    if not bucket or not key or ".." in key.split("/"):
        raise ModelLoadError(f"malformed S3 URI {uri!r}", field="source")
    if key.endswith("/") or not Path(key).suffix:
        return bucket, key.rstrip("/") + "/", True
    return bucket, key, False


class S3Fetcher:
    """Downloads S3 objects into the model cache once; a complete copy is reused, a partial one never is."""

    def __init__(self, settings: Settings, client=None) -> None:
        self.settings = settings
        self._client = client
        self._making = threading.Lock()  # boto3's default session is not safe to build a client from two threads

    @property
    def client(self):
        with self._making:
            if self._client is None:
                self._client = s3_client(self.settings.aws_endpoint_url, self.settings.aws_region)
        return self._client

    def fetch(self, uri: str) -> Path:
        bucket, key, folder = _parse_s3(uri)
        root = self.settings.model_cache_dir / "s3" / bucket
        if folder:
            for listed in self._list(bucket, key):
                self._fetch_object(bucket, listed["Key"], root / listed["Key"])
            return root / key.rstrip("/")
        return self._fetch_object(bucket, key, root / key)

    def identity(self, uri: str) -> str:
        """A SHA-256 over what the store says of the objects (key, size and ETag of each), read with one listing
        or one HEAD and nothing downloaded: replacing any object changes it. What the result cache keys an S3
        source on, on every replica alike, whether it holds a copy or not."""
        from botocore.exceptions import BotoCoreError, ClientError

        bucket, key, folder = _parse_s3(uri)
        if folder:
            objects = [(o["Key"], o["Size"], o.get("ETag", "")) for o in self._list(bucket, key)]
        else:
            try:
                head = self.client.head_object(Bucket=bucket, Key=key)
            except (BotoCoreError, ClientError) as e:
                raise ModelLoadError(f"cannot read s3://{bucket}/{key}: {e}") from e
            objects = [(key, head["ContentLength"], head.get("ETag", ""))]
        return hashlib.sha256(json.dumps([bucket, sorted(objects)]).encode()).hexdigest()

    def _list(self, bucket: str, prefix: str) -> list[dict]:
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            pages = self.client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
            objects = [obj for page in pages for obj in page.get("Contents", [])]
        except (BotoCoreError, ClientError) as e:
            raise ModelLoadError(f"cannot list s3://{bucket}/{prefix}: {e}") from e
        if not objects:
            raise ModelLoadError(f"nothing under s3://{bucket}/{prefix}")
        return objects

    def _fetch_object(self, bucket: str, key: str, dest: Path) -> Path:
        from botocore.exceptions import BotoCoreError, ClientError

        marker = dest.with_name(dest.name + ".complete")
        try:
            head = self.client.head_object(Bucket=bucket, Key=key)
        except (BotoCoreError, ClientError) as e:
            if dest.exists() and marker.exists():
                logger.warning("s3://%s/%s unreachable (%s); using the cached copy", bucket, key, e)
                return dest
            raise ModelLoadError(f"cannot read s3://{bucket}/{key}: {e}") from e
        size, etag = head["ContentLength"], head.get("ETag", "")
        if dest.exists() and marker.exists() and marker.read_text() == f"{size} {etag}" and dest.stat().st_size == size:
            logger.info("s3://%s/%s: cached copy reused (%d bytes)", bucket, key, size)
            return dest
        dest.parent.mkdir(parents=True, exist_ok=True)
        part = dest.with_name(f"{dest.name}.part-{os.getpid()}")
        try:
            self._download(bucket, key, part, size)
            os.replace(part, dest)  # atomic: readers see the old file or the whole new one
            marker.write_text(f"{size} {etag}")
        except (BotoCoreError, ClientError, OSError) as e:
            raise DownloadIncomplete(f"download of s3://{bucket}/{key} failed: {e}") from e
        finally:
            part.unlink(missing_ok=True)
        return dest

    def _download(self, bucket: str, key: str, part: Path, size: int) -> None:
        logger.info("downloading s3://%s/%s (%d bytes)", bucket, key, size)
        body = self.client.get_object(Bucket=bucket, Key=key)["Body"]
        received, last_log, started = 0, time.monotonic(), time.monotonic()
        with part.open("wb") as out:
            try:
                while chunk := body.read(_CHUNK):
                    out.write(chunk)
                    received += len(chunk)
                    if time.monotonic() - last_log >= self.settings.download_progress_seconds:
                        last_log = time.monotonic()
                        percent = 100 * received / size
                        logger.info("s3://%s/%s: %d/%d bytes (%.0f%%)", bucket, key, received, size, percent)
            except Exception as e:  # urllib3 and botocore raise several types for a cut stream
                raise DownloadIncomplete(f"s3://{bucket}/{key}: stream broke after {received} bytes: {e}") from e
            out.flush()
            os.fsync(out.fileno())
        if received != size:
            raise DownloadIncomplete(f"s3://{bucket}/{key}: got {received} of {size} bytes")
        logger.info("s3://%s/%s: done in %.1fs", bucket, key, time.monotonic() - started)


def resolve(source: str, settings: Settings | None = None, fetcher: S3Fetcher | None = None) -> Path:
    """Turn a source string into a local path, fetching from S3 or the hub cache as needed."""
    settings = settings or current()
    if source.startswith("s3://"):
        return (fetcher or S3Fetcher(settings)).fetch(source)
    path = Path(source).expanduser()
    if path.exists():
        return path
    if _REPO_ID.match(source):
        from huggingface_hub import snapshot_download
        from huggingface_hub.errors import LocalEntryNotFoundError

        try:
            return Path(snapshot_download(source, cache_dir=settings.hf_hub_cache, local_files_only=True))
        except (LocalEntryNotFoundError, OSError, ValueError) as e:
            raise ModelLoadError(
                f"{source!r} is not in the local Hugging Face cache (downloads are disabled)", field="source"
            ) from e
    raise ModelLoadError(f"model source {source!r} not found", field="source")


_WEIGHT_PARTS = ("unet", "vae", "text_encoder", "text_encoder_2")
_SHARD = re.compile(r"-\d{5}-of-\d{5}$")


def file_variants(folder: Path) -> set[str | None]:
    """The variants a component folder's safetensors come in: ``fp16`` for ``model.fp16.safetensors`` (sharded
    or not), None for plain files; empty when it holds none."""
    return {_variant(f) for f in folder.glob("*.safetensors")}


def _variant(file: Path) -> str | None:
    stem = _SHARD.sub("", file.name.removesuffix(".safetensors"))
    return stem.rpartition(".")[2] if "." in stem else None


def _controlnet_variant(folder: Path, dtype: torch.dtype) -> str | None:
    """The variant of a ControlNet folder's weights to read for ``dtype``, as ``pick_variant`` picks a pipeline's."""
    found = file_variants(folder)
    for variant in [*_preferred(dtype), *sorted(v for v in found if v)]:
        if variant in found:
            return variant
    return None


def controlnet_weights(folder: Path, dtype: torch.dtype) -> Path:
    """The weights file ``load_controlnet`` reads from a ControlNet folder for ``dtype`` (the first shard of sharded
    weights): what A1111's extension would hash to list it."""
    variant = _controlnet_variant(folder, dtype)
    files = sorted(f for f in folder.glob("*.safetensors") if _variant(f) == variant)
    if not files:
        raise ModelLoadError(f"{folder}: no .safetensors weights", field="controlnets")
    return files[0]


def weight_variants(folder: Path) -> tuple[set[str | None], ...]:
    """For each weight component of a diffusers folder, the variants its safetensors come in."""
    return tuple(found for part in _WEIGHT_PARTS if (found := file_variants(folder / part)))


def _preferred(dtype: torch.dtype) -> list[str | None]:
    """File variants in the order ``dtype`` prefers them: half precision reads the ``fp16`` files (half the bytes);
    float32 and bfloat16 full precision, which rounds to bfloat16 exactly once."""
    import torch

    return ["fp16", None] if dtype == torch.float16 else [None, "fp16", "bf16"]


def pick_variant(folder: Path, dtype: torch.dtype) -> str | None:
    """The file variant to load: the one matching ``dtype`` when every component has it, else what is there.

    Releases ship full-precision files, ``fp16`` ones, or both. Half precision loads the ``fp16`` files (half the
    bytes read); float32 and bfloat16 prefer full precision, which rounds to bfloat16 exactly once.
    """
    per_part = weight_variants(folder)
    if not per_part:
        return None
    common = set.intersection(*per_part)
    for variant in [*_preferred(dtype), *sorted(v for v in common if v)]:
        if variant in common:
            return variant
    raise ModelLoadError(f"{folder}: no file variant is present in every component ({per_part})", field="source")


def load_vae(source: ModelSource, dtype: torch.dtype, settings: Settings | None = None):
    from diffusers import AutoencoderKL

    path = resolve(source.source, settings)
    try:
        if path.is_file():
            check_safetensors(path)
            return AutoencoderKL.from_single_file(path, torch_dtype=dtype, local_files_only=True)
        _check_folder(path)
        vae_dir = path / "vae" if (path / "vae").is_dir() else path
        variant = "fp16" if file_variants(vae_dir) == {"fp16"} else None
        return AutoencoderKL.from_pretrained(vae_dir, torch_dtype=dtype, variant=variant, use_safetensors=True,
                                             local_files_only=True)
    except (OSError, ValueError, KeyError, RuntimeError) as e:
        raise ModelLoadError(f"cannot load VAE from {source.source}: {e}", field="vae") from e


INPAINTING_CHANNELS = 9  # an inpainting UNet's input: 4 latent channels, the mask, the masked image's 4
_SGM_UNET_INPUT = "model.diffusion_model.input_blocks.0.0.weight"  # the UNet's first convolution in an SGM file


def sgm_unet_channels(path: Path) -> int | None:
    """The input channels of the UNet in a single-file (SGM) checkpoint, read from its safetensors header alone (no
    tensor is loaded): 4 for a base, 9 for an inpainting one; None where the file holds no such UNet."""
    try:
        with path.open("rb") as f:
            (length,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(length))
    except (OSError, ValueError, struct.error) as e:
        raise UnsafeWeights(f"{path.name}: not a valid safetensors file ({e})") from e
    entry = header.get(_SGM_UNET_INPUT) if isinstance(header, dict) else None
    shape = entry.get("shape") if isinstance(entry, dict) else None
    if not isinstance(shape, list) or len(shape) != 4 or not isinstance(shape[1], int):
        return None
    return shape[1]


def load_sdxl(source: ModelSource, *, refiner: bool, dtype: torch.dtype, settings: Settings | None = None,
              vae: ModelSource | None = None):
    """Load an SDXL base (text-to-image) or refiner (image-to-image) pipeline from any source kind."""
    from diffusers import StableDiffusionXLImg2ImgPipeline, StableDiffusionXLPipeline

    cls = StableDiffusionXLImg2ImgPipeline if refiner else StableDiffusionXLPipeline
    path = resolve(source.source, settings)
    extra = {"vae": load_vae(vae, dtype, settings)} if vae is not None else {}
    what = "refiner" if refiner else "base"
    try:
        if path.is_file():
            check_safetensors(path)
            config = str(resolve(source.config, settings)) if source.config else None
            channels = None if refiner else sgm_unet_channels(path)
            if channels is not None:
                # The UNet's input width follows the file, not ``config:`` (a base's configs serve an inpainting
                # fine-tune too). ``num_in_channels``: diffusers maps this legacy name onto the UNet alone, where
                # ``in_channels`` would reach the VAE as well.
                extra["num_in_channels"] = channels
            pipe = cls.from_single_file(path, config=config, torch_dtype=dtype, local_files_only=True, **extra)
            logger.info("SDXL %s: single file %s", what, path.name)
        else:
            _check_folder(path)
            variant = pick_variant(path, dtype)
            pipe = cls.from_pretrained(path, torch_dtype=dtype, variant=variant, use_safetensors=True,
                                       local_files_only=True, **extra)
            logger.info("SDXL %s: %s files from %s", what, variant or "full-precision", path)
    except (OSError, ValueError, KeyError, RuntimeError) as e:
        raise ModelLoadError(f"cannot load SDXL {what} from {source.source}: {e}") from e
    if not refiner and pipe.unet.config.in_channels == INPAINTING_CHANNELS:
        logger.info("SDXL %s %s is an inpainting checkpoint (a %d-channel UNet: latents, mask, masked image): every "
                    "mode runs its inpainting pipeline", what, path.name, INPAINTING_CHANNELS)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def load_controlnet(source: str, dtype: torch.dtype, settings: Settings | None = None, name: str = ""):
    """Load an SDXL ControlNet from a diffusers ``ControlNetModel`` folder (config.json and
    diffusion_pytorch_model.safetensors, or its fp16 variant): what the releases (diffusers/controlnet-canny-sdxl-1.0,
    xinsir/controlnet-*-sdxl-1.0) ship. A pickled ``.bin`` beside the safetensors is never opened."""
    from diffusers import ControlNetModel

    field = f"controlnets.{name}" if name else "controlnets"
    folder = resolve(source, settings)
    if not folder.is_dir():
        raise ModelLoadError(f"{source}: a ControlNet is a diffusers folder (config.json and "
                             "diffusion_pytorch_model.safetensors)", field=field)
    _check_folder(folder)
    if not any(folder.glob("*.safetensors")):
        raise UnsafeWeights(f"{folder}: no .safetensors weights (pickled checkpoints are refused)", field=field)
    variant = _controlnet_variant(folder, dtype)
    try:
        model = ControlNetModel.from_pretrained(folder, torch_dtype=dtype, variant=variant, use_safetensors=True,
                                                local_files_only=True)
    except (OSError, ValueError, KeyError, RuntimeError) as e:
        raise ModelLoadError(f"cannot load the ControlNet from {source}: {e}", field=field) from e
    logger.info("ControlNet %s: %s files from %s", name, variant or "full-precision", folder)
    return model


def load_depth(source: str, module: str, dtype: torch.dtype, settings: Settings | None = None):
    """Load a ControlNet preprocessor's depth estimator in transformers' layout (config.json, model.safetensors,
    preprocessor_config.json, as Intel/dpt-hybrid-midas and depth-anything/Depth-Anything-V2-*-hf ship them): a DPT
    for ``depth_midas``, Depth Anything for ``depth_anything`` and ``depth_anything_v2``. A pickled
    pytorch_model.bin beside model.safetensors is never opened. Returns (model, image processor)."""
    from transformers import AutoConfig, DepthAnythingForDepthEstimation, DPTForDepthEstimation, DPTImageProcessor

    field = f"preprocessors.{module}"
    folder = resolve(source, settings)
    if not folder.is_dir():
        raise ModelLoadError(f"{source}: a depth model is a folder (config.json, model.safetensors and "
                             "preprocessor_config.json)", field=field)
    weights = folder / "model.safetensors"
    if not weights.exists():
        raise UnsafeWeights(f"{folder}: no model.safetensors (pickled checkpoints are refused)", field=field)
    check_safetensors(weights)
    expected = ARCHITECTURES[module]
    try:
        kind = AutoConfig.from_pretrained(folder, local_files_only=True).model_type
    except (OSError, ValueError, KeyError) as e:
        raise ModelLoadError(f"cannot read {module}'s depth model config in {source}: {e}", field=field) from e
    if kind != expected:
        raise ModelLoadError(f"{folder}: a {kind!r} model; {module} runs a {expected!r} one", field=field)
    cls = DPTForDepthEstimation if expected == "dpt" else DepthAnythingForDepthEstimation
    try:
        model, info = cls.from_pretrained(folder, use_safetensors=True, local_files_only=True, dtype=dtype,
                                          output_loading_info=True)
        processor = DPTImageProcessor.from_pretrained(folder, local_files_only=True)
    except (OSError, ValueError, KeyError, RuntimeError) as e:
        raise ModelLoadError(f"cannot load {module}'s depth model from {source}: {e}", field=field) from e
    # A layer missing from the file would be left at its random start: maps that silently mean nothing.
    if info.get("missing_keys"):
        raise ModelLoadError(f"{weights.name}: missing {sorted(info['missing_keys'])[:4]}", field=field)
    logger.info("%s: %s from %s", module, type(model).__name__, folder)
    return model, processor


def preprocessor_weights(path: Path, field: str, name: str | None = None) -> Path:
    """The weights file of a line-art, pose, soft-edge or M-LSD preprocessor's source: the ``.safetensors`` file
    itself, or in a folder (an ``s3://`` prefix, a local folder) the file ``name`` where the model has a file name of
    its own, else the one ``.safetensors`` file it holds. A pickle, or a folder of pickles alone, is refused naming
    ``field``."""
    if path.is_dir():
        # A model with a file name of its own is read by it: a folder of several converted releases may hold it.
        found = sorted(path.glob(name or "*.safetensors"))
        if len(found) > 1:
            raise ModelLoadError(f"{path}: holds {len(found)} .safetensors files ({', '.join(f.name for f in found)});"
                                 " a line-art model is one file", field=field)
        if not found:
            wanted = name or ".safetensors weights"
            pickles = sorted(p.name for p in path.iterdir() if p.suffix.lower() in PICKLE_SUFFIXES)
            if pickles:
                raise UnsafeWeights(f"{path}: no {wanted}, and pickled weights ({pickles[0]}) are refused; convert "
                                    "them with python -m deployments.weights.convert", field=field)
            raise ModelLoadError(f"{path}: no {wanted}", field=field)
        path = found[0]
    try:
        check_safetensors(path)
    except UnsafeWeights as e:  # named here: the error says which preprocessor's source it is
        raise UnsafeWeights(e.message, field=field) from e
    return path


def _preprocessor_state(source: str, field: str, settings: Settings | None,
                        name: str | None = None) -> tuple[Path, dict[str, torch.Tensor]]:
    """A line-art, pose, soft-edge or M-LSD preprocessor's source resolved, its weights file found and read: (file,
    state dict)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        path = resolve(source, settings)
    except ModelLoadError as e:  # named here: a missing or unreadable source says which preprocessor's it is
        raise type(e)(e.message, field=field) from e
    weights = preprocessor_weights(path, field, name)
    try:
        return weights, load_file(weights)
    except (OSError, ValueError, SafetensorError) as e:
        raise ModelLoadError(f"cannot read {weights.name}: {e}", field=field) from e


def load_lineart(source: str, module: str, settings: Settings | None = None):
    """Load a ControlNet line-art preprocessor's network from safetensors (``python -m deployments.weights.convert``
    writes them from lllyasviel/Annotators' ``sk_model.pth``, ``sk_model2.pth`` and ``netG.pth``): the
    informative-drawings generator for ``lineart_realistic`` and ``lineart_coarse``, the anime U-Net for
    ``lineart_anime``. A file whose names and shapes are not exactly that network's is refused. Returns the network,
    float32 on the CPU."""
    from deployments.support import lineart_nets

    field = f"preprocessors.{module}"
    weights, state = _preprocessor_state(source, field, settings)
    expected = LINEART_ARCHITECTURES[module]
    found = lineart_nets.architecture(state)
    if found is not None and found != expected:
        raise ModelLoadError(f"{weights.name}: a {found!r} network; {module} runs a {expected!r} one", field=field)
    try:
        net = lineart_nets.from_state_dict(expected, state)
    except ValueError as e:
        raise ModelLoadError(f"{weights.name}: {e}", field=field) from e
    logger.info("%s: %s from %s", module, type(net).__name__, weights)
    return net


def load_pose(source: str, settings: Settings | None = None, network: str = "body", module: str = "openpose"):
    """Load one of OpenPose's networks for a ControlNet pose module from safetensors (``python -m
    deployments.weights.convert`` writes them from lllyasviel/Annotators' ``body_pose_model.pth``,
    ``hand_pose_model.pth`` and ``facenet.pth``): the ``body``, ``hand`` or ``face`` network, read from a folder by its
    converted name (``body_pose_model.safetensors``, ``hand_pose_model.safetensors``, ``facenet.safetensors``), or
    for ``openpose`` (which runs one network) from the file itself. A file whose names and shapes are not exactly the
    release's is refused, saying which (``details``: up to ten keys of each kind), naming
    ``preprocessors.<module>``. Returns the network, float32 on the CPU."""
    from deployments.support import pose_parts

    field = f"preprocessors.{module}"
    name = pose_parts.WEIGHTS[network]
    try:
        path = resolve(source, settings)
    except ModelLoadError as e:  # named here: a missing or unreadable source says which preprocessor's it is
        raise type(e)(e.message, field=field) from e
    needs = pose_parts.networks(module)
    if len(needs) > 1 and not path.is_dir():
        raise ModelLoadError(f"{module} runs {' and '.join(pose_parts.TITLES[n] for n in needs)}: its source is a "
                             f"folder holding {', '.join(pose_parts.WEIGHTS[n] for n in needs)}, not a file "
                             f"({path.name})", field=field)
    weights, state = _preprocessor_state(str(path), field, settings, name)
    _refuse_mismatches(weights, pose_parts.TITLES[network], pose_parts.mismatches(network, state), field)
    model = pose_parts.from_state_dict(network, {key: value.float() for key, value in state.items()})
    logger.info("%s: %s from %s (%.1f M weights)", module, pose_parts.TITLES[network], weights,
                sum(v.numel() for v in state.values()) / 1e6)
    return model


def load_softedge(source: str, module: str, settings: Settings | None = None):
    """Load a ControlNet soft-edge or scribble preprocessor's network from safetensors (``python -m
    deployments.weights.convert`` writes them from lllyasviel/Annotators' ``ControlNetHED.pth`` and
    ``table5_pidinet.pth``): HED for the ``hed`` modules, PiDiNet for the ``pidinet`` ones; a file, or a folder
    holding ``ControlNetHED.safetensors`` / ``table5_pidinet.safetensors``. A file whose names and shapes are not
    exactly that release's is refused naming ``preprocessors.<module>`` (``details``: up to ten names of each kind).
    Returns the network, float32 on the CPU (PiDiNet's pixel differences rewritten as plain convolutions)."""
    from deployments.support import softedge, softedge_nets

    field = f"preprocessors.{module}"
    expected = softedge.ARCHITECTURES[module]
    weights, state = _preprocessor_state(source, field, settings, softedge.WEIGHTS[expected])
    found = softedge_nets.architecture(state)
    if found is not None and found != expected:
        raise ModelLoadError(f"{weights.name}: a {found!r} network; {module} runs a {expected!r} one", field=field)
    _refuse_mismatches(weights, f"the {expected} network's weights", softedge_nets.mismatches(expected, state), field)
    net = softedge_nets.from_state_dict(expected, state)
    logger.info("%s: the %s network from %s (%.2f M weights)", module, expected, weights,
                sum(v.numel() for v in state.values()) / 1e6)
    return net


def load_mlsd(source: str, settings: Settings | None = None):
    """Load the ControlNet ``mlsd`` preprocessor's M-LSD large network from safetensors (``python -m
    deployments.weights.convert`` writes it from lllyasviel/Annotators' ``mlsd_large_512_fp32.pth``): a file, or a
    folder holding ``mlsd_large_512_fp32.safetensors``. A file whose names and shapes are not exactly the release's is
    refused, saying which (``details``: up to ten keys of each kind). Returns the network, float32 on the CPU."""
    from deployments.support import mlsd

    weights, state = _preprocessor_state(source, mlsd.FIELD, settings, mlsd.WEIGHTS)
    _refuse_mismatches(weights, "M-LSD's large network", mlsd.mismatches(state), mlsd.FIELD)
    model = mlsd.from_state_dict({key: value.float() if value.is_floating_point() else value
                                  for key, value in state.items()})
    logger.info("mlsd: M-LSD's large network from %s (%.2f M weights)", weights,
                sum(p.numel() for p in model.parameters()) / 1e6)
    return model


def _refuse_mismatches(weights: Path, network: str, problems: dict[str, list[str]], field: str) -> None:
    """A preprocessor's weights that are not its release's (``problems``: missing, unexpected and wrong-shaped keys)
    refused, naming ``field``, the counts and first keys of each kind in the message, up to ten in ``details``."""
    if problems:
        summary = "; ".join(f"{len(keys)} {kind.replace('_', ' ')} ({', '.join(keys[:3])}...)"
                            for kind, keys in problems.items())
        raise ModelLoadError(f"{weights.name}: not {network}: {summary}", field=field,
                             details={kind: keys[:10] for kind, keys in problems.items()})


def load_spandrel(source: str, settings: Settings | None = None):
    """Load an upscaler or face restorer through spandrel; returns its ImageModelDescriptor."""
    import spandrel
    import spandrel_extra_arches

    path = resolve(source, settings)
    check_safetensors(path)
    spandrel_extra_arches.install(ignore_duplicates=True)  # CodeFormer and friends
    try:
        descriptor = spandrel.ModelLoader().load_from_file(path)
    except (spandrel.UnsupportedModelError, OSError, ValueError, KeyError, RuntimeError) as e:
        raise ModelLoadError(f"cannot load {path.name}: {e}") from e
    if not isinstance(descriptor, spandrel.ImageModelDescriptor):
        raise ModelLoadError(f"{path.name}: not an image-to-image model")
    return descriptor


def load_safety_checker(source: str, dtype: torch.dtype, settings: Settings | None = None):
    """Load a CLIP safety checker in diffusers' ``StableDiffusionSafetyChecker`` layout and its image processor.

    ``source`` is the checker's own folder (config.json, model.safetensors, preprocessor_config.json, as
    CompVis/stable-diffusion-safety-checker ships it) or a Stable Diffusion pipeline folder, whose
    ``safety_checker/`` takes its preprocessing from ``feature_extractor/``. Returns (model, processor, folder).
    """
    from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker
    from transformers import CLIPImageProcessor

    path = resolve(source, settings)
    folder = path / "safety_checker" if (path / "safety_checker").is_dir() else path
    if not folder.is_dir():
        raise ModelLoadError(f"{source}: a safety checker is a folder (config.json and model.safetensors)",
                             field="safety_checker.model")
    _check_folder(folder)
    variants = file_variants(folder)
    if not variants:
        raise UnsafeWeights(f"{folder}: no .safetensors weights (pickled checkpoints are refused)")
    variant = "fp16" if "fp16" in variants and (dtype == _half() or None not in variants) else None
    weights = folder / ("model.fp16.safetensors" if variant else "model.safetensors")
    if weights.exists():
        check_safetensors(weights)
    processor_dir = next((d for d in (folder, folder.parent / "feature_extractor")
                          if (d / "preprocessor_config.json").exists()), None)
    if processor_dir is None:
        raise ModelLoadError(f"{folder}: no preprocessor_config.json beside it or in ../feature_extractor",
                             field="safety_checker.model")
    try:
        model, info = StableDiffusionSafetyChecker.from_pretrained(
            folder, variant=variant, use_safetensors=True, local_files_only=True, dtype=dtype,
            output_loading_info=True)
        processor = CLIPImageProcessor.from_pretrained(processor_dir, local_files_only=True)
    except (OSError, ValueError, KeyError, RuntimeError) as e:
        raise ModelLoadError(f"cannot load the safety checker from {source}: {e}", field="safety_checker.model") from e
    # A missing concept table would be left at its initial ones: a filter that silently decides nothing.
    if info.get("missing_keys"):
        missing = sorted(info["missing_keys"])[:4]
        raise ModelLoadError(f"{weights.name}: missing {missing}", field="safety_checker.model")
    logger.info("safety checker: %s files from %s", variant or "full-precision", folder)
    return model, processor, folder


def load_captioner(source: str, dtype: torch.dtype, settings: Settings | None = None):
    """Load a BLIP captioner in transformers' layout (Salesforce/blip-image-captioning-large: config.json,
    model.safetensors, preprocessor_config.json, BERT tokenizer files) and its processor. The release's
    pytorch_model.bin beside model.safetensors is never opened. Returns (model, processor, folder)."""
    from transformers import BlipForConditionalGeneration, BlipProcessor

    field = "captioner.model"
    folder = resolve(source, settings)
    if not folder.is_dir():
        raise ModelLoadError(f"{source}: a captioner is a folder (config.json and model.safetensors)", field=field)
    _check_folder(folder)
    weights = folder / "model.safetensors"
    if not weights.exists():
        raise UnsafeWeights(f"{folder}: no model.safetensors (pickled checkpoints are refused)", field=field)
    check_safetensors(weights)
    try:
        model, info = BlipForConditionalGeneration.from_pretrained(
            folder, use_safetensors=True, local_files_only=True, dtype=dtype, output_loading_info=True)
        processor = BlipProcessor.from_pretrained(folder, local_files_only=True)
    except (OSError, ValueError, KeyError, RuntimeError) as e:
        raise ModelLoadError(f"cannot load the captioner from {source}: {e}", field=field) from e
    # A layer missing from the file would be left at its random start: captions that silently mean nothing.
    if info.get("missing_keys"):
        raise ModelLoadError(f"{weights.name}: missing {sorted(info['missing_keys'])[:4]}", field=field)
    logger.info("captioner: %s", folder)
    return model, processor, folder


def _half():
    import torch

    return torch.float16


# --- content hashes of what a replica loaded (the result cache's key) --------------------------------------------

_HASHED: dict[tuple[str, int, int], str] = {}
_HASH_LOCK = threading.Lock()
_HASHED_SUFFIXES = {".safetensors", ".json", ".txt", ".model"}


def file_sha256(path: Path) -> str:
    """SHA-256 of a file, remembered per path, size and modification time for the life of the process."""
    stat = path.stat()
    memo = (str(path), stat.st_size, stat.st_mtime_ns)
    with _HASH_LOCK:
        if memo in _HASHED:
            return _HASHED[memo]
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(_CHUNK * 8):
            digest.update(chunk)
    with _HASH_LOCK:
        _HASHED[memo] = digest.hexdigest()
    return _HASHED[memo]


class WeightFiles:
    """The weight files a replica loaded, each noted (size, modification time) when it was loaded and hashed on
    first use. A result cache keyed on these hashes names what the replica really runs: a file replaced on disk
    since it was loaded is never hashed as if it were the loaded one (its entry says so instead)."""

    def __init__(self) -> None:
        self._files: dict[str, list[tuple[str, Path, int, int]]] = {}
        self._digests: dict[str, str] | None = None

    def add(self, role: str, path: Path) -> None:
        """A weight file, or a folder (its weights, configs and tokenizer files), under a name such as
        ``checkpoint`` or ``lora:style``."""
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in _HASHED_SUFFIXES) \
            if path.is_dir() else [path]
        root = path if path.is_dir() else path.parent
        noted = []
        for file in files:
            stat = file.stat()
            noted.append((str(file.relative_to(root)), file, stat.st_size, stat.st_mtime_ns))
        self._files[role] = noted
        self._digests = None

    def digests(self) -> dict[str, str]:
        """One SHA-256 per role (over its files' names and contents); hashing runs once, off the event loop."""
        if self._digests is None:
            out = {}
            for role, files in self._files.items():
                digest = hashlib.sha256()
                for name, path, size, mtime in files:
                    try:
                        stat = path.stat()
                        same = (stat.st_size, stat.st_mtime_ns) == (size, mtime)
                    except OSError:
                        same = False
                    content = file_sha256(path) if same else f"replaced since loaded ({size} bytes, {mtime})"
                    digest.update(f"{name}\0{content}\0".encode())
                out[role] = digest.hexdigest()
            self._digests = out
        return dict(self._digests)
