"""Configuration models: one pydantic model per deployment (the environment settings are in ``settings.py``).

Deployment configs arrive through ``serve_config.yaml`` (``args`` of the application builder, forwarded to each
deployment) so that every knob is typed, bounded and documented in one place. Defaults are CPU-safe.
"""

from __future__ import annotations

import re
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from deployments.support.depth import DepthModule
from deployments.support.lineart import LineartModule
from deployments.support.mlsd import MlsdModule
from deployments.support.pose import PoseModule
from deployments.support.softedge import SoftedgeModule

Dtype = Literal["auto", "float32", "float16", "bfloat16"]


class _Config(BaseModel):
    model_config = ConfigDict(extra="forbid", protected_namespaces=())


class DeviceConfig(_Config):
    """Where a model runs. ``auto`` picks CUDA when present (bfloat16 where the GPU has it, else float16),
    otherwise CPU float32."""

    device: str = Field("auto", description="'auto', 'cpu', 'cuda' or 'cuda:N'")
    dtype: Dtype = "auto"
    channels_last: bool = Field(False, description="NHWC memory format for convolutions (CUDA only)")


Attention = Literal["auto", "flash", "efficient", "cudnn", "math"]
CompileMode = Literal["default", "max-autotune-no-cudagraphs", "max-autotune", "reduce-overhead"]


class FastPath(_Config):
    """GPU speed settings of a diffusion deployment. Every default is the plain eager path, which is what a CPU
    wants; ``serve_config.yaml`` sets the measured GPU choices (see ``make bench-gpu``)."""

    attention: Attention = Field("auto", description="scaled-dot-product kernel; 'auto' lets PyTorch choose")
    compile: Literal["none", "regional", "full"] = Field(
        "none", description="torch.compile the repeated transformer blocks ('regional') or the whole UNet"
    )
    compile_mode: CompileMode = "default"
    compile_dynamic: Literal["static", "auto", "dynamic"] = Field(
        "auto", description="shapes: 'static' compiles every size and batch apart; 'auto' (PyTorch's default) "
        "compiles the first shape static, then one graph with the dimensions that changed dynamic; 'dynamic' "
        "compiles one graph for all from the start"
    )
    compile_vae: bool = Field(False, description="also compile the VAE decoder")
    fp8: bool = Field(False, description="FP8 (torchao, dynamic per-row) UNet linear layers; GPUs with FP8 only")
    warmup_sizes: list[tuple[int, int]] = Field(
        [], max_length=16, description="(width, height) pairs run once at start, so compilation happens then"
    )
    warmup_batch_sizes: list[Annotated[int, Field(ge=1, le=64)]] = Field(
        [1], min_length=1, max_length=8, description="images per call at each warm-up size: a batch of a new size "
        "compiles again, so list the batch sizes the deployment's max_batch_size lets form"
    )
    warmup_steps: int = Field(2, ge=1, le=50)


class Batching(_Config):
    """Dynamic batching of compatible requests (same mode, size, steps, sampler, guidance, LoRAs...): one pipeline
    call for several requests, each with its own seeds. Tunable at run time through the deployment's
    ``user_config`` (``{"max_batch_size": 8, "batch_wait_timeout_s": 0.01}``)."""

    max_batch_size: int = Field(8, ge=1, le=64, description="images per pipeline call; 1 turns batching off")
    batch_wait_timeout_s: float = Field(
        0.0, ge=0.0, le=1.0, description="how long a request waits for compatible ones to join its batch; at 0 a "
        "lone request starts at once and requests that arrive while a batch runs form the next one"
    )


class ModelSource(_Config):
    """Where weights come from: a local path, a Hugging Face repo id (local cache only) or an s3:// URI."""

    source: str = Field(..., description="local dir or file, 'org/name' repo id, or s3://bucket/key")
    config: str | None = Field(
        None, description="for a single-file SDXL checkpoint: the diffusers folder or repo id holding its configs"
    )


CHECKPOINT_NAME = r"^[A-Za-z0-9][A-Za-z0-9 ._()+-]{0,127}$"  # what a client may select; never a path


class Checkpoint(ModelSource):
    """One selectable SDXL base checkpoint: its display name, what it is and where its weights are."""

    name: str = Field(..., pattern=CHECKPOINT_NAME, description="what clients select (A1111 sd_model_checkpoint)")
    kind: Literal["sdxl"] = Field("sdxl", description="architecture; SDXL base checkpoints are what is served")
    description: str = Field("", max_length=256)


class SDXLBaseConfig(_Config):
    """The base deployment. ``model`` + ``name`` (one checkpoint) and ``checkpoints`` (any number) may be mixed:
    ``model`` comes first. The first checkpoint is the default unless ``default_checkpoint`` names another."""

    model: ModelSource | None = Field(None, description="a single checkpoint, named by `name`")
    name: str = Field("sdxl-base", pattern=CHECKPOINT_NAME, description="the name of `model`")
    checkpoints: list[Checkpoint] = Field([], max_length=256)
    default_checkpoint: str | None = Field(None, description="the checkpoint a request that names none gets")
    checkpoint_dir: str | None = Field(
        None, description="a folder whose *.safetensors files and diffusers folders are selectable checkpoints too "
        "(named by file stem or folder name), rescanned when it changes"
    )
    checkpoint_config: str | None = Field(
        None, description="for single files found in checkpoint_dir: the diffusers folder or repo id of their configs"
    )
    max_loaded_checkpoints: int = Field(
        1, ge=1, le=16, description="checkpoints a replica holds at once; the least recently used one is evicted"
    )
    checkpoint_aliases: dict[str, str] = Field(
        {}, max_length=64, description="other names for checkpoints (seed 002's 'photorealistic', 'anime')"
    )
    device: DeviceConfig = DeviceConfig()
    vae: ModelSource | None = Field(None, description="a replacement VAE, e.g. an fp16-safe one for float16")
    fast: FastPath = FastPath()
    ip_adapter: str | None = Field(None, description="folder with ip-adapter weights and image_encoder/")
    ip_adapter_weight_name: str = "ip-adapter_sdxl.safetensors"
    lora_dir: str | None = Field(None, description="folder of *.safetensors LoRAs, registered by file stem")
    controlnets: dict[str, str] = Field(
        {}, max_length=32, description="SDXL ControlNets by the name requests select them with -> source (a diffusers "
        "ControlNetModel folder, safetensors weights): loaded once per replica, shared by every checkpoint it holds"
    )
    preprocessors: dict[DepthModule | LineartModule | PoseModule | SoftedgeModule | MlsdModule, str] = Field(
        {}, description="ControlNet preprocessors that need a model, by module name -> source; loaded once per "
        "replica, an absent one is not offered. depth_midas (a DPT, e.g. Intel/dpt-hybrid-midas), depth_anything and "
        "depth_anything_v2 (Depth Anything): a transformers folder (config.json, model.safetensors, "
        "preprocessor_config.json). lineart_realistic, lineart_coarse, lineart_anime: a .safetensors file (or a folder "
        "holding one) converted from lllyasviel/Annotators' sk_model.pth, sk_model2.pth, netG.pth. openpose: "
        "body_pose_model.safetensors (or a folder holding it by that name) converted from its body_pose_model.pth "
        "(CMU's weights: non-commercial use only); openpose_hand, openpose_face, openpose_faceonly, openpose_full: a "
        "folder holding it and, as each draws them, hand_pose_model.safetensors and facenet.safetensors converted "
        "from hand_pose_model.pth and facenet.pth (modules naming the same folder share its networks). "
        "softedge_hed, softedge_hedsafe, scribble_hed: "
        "ControlNetHED.safetensors; softedge_pidinet, softedge_pidisafe, scribble_pidinet: table5_pidinet.safetensors "
        "(each a file, or a folder holding it by that name) converted from its .pth; modules naming the same source "
        "share one network. mlsd: mlsd_large_512_fp32.safetensors (or a folder holding it by that name) converted "
        "from its mlsd_large_512_fp32.pth"
    )
    embeddings_dir: str | None = Field(
        None, description="folder of SDXL textual-inversion embeddings (*.safetensors with clip_l and clip_g), each "
        "used in a prompt by its file stem; rescanned when it changes"
    )
    default_sampler: str = "Euler a"
    batching: Batching = Batching()
    max_pixels: int = Field(2048 * 2048, ge=64 * 64, description="upper bound on width*height")

    @model_validator(mode="after")
    def _checkpoints_named_once(self) -> SDXLBaseConfig:
        names = [c.name for c in self.configured]
        if not names and not self.checkpoint_dir:
            raise ValueError("base: give `model`, `checkpoints` or `checkpoint_dir`")
        if len(set(names)) != len(names):
            raise ValueError(f"base.checkpoints: names must be unique ({names})")
        for name in self.controlnets:  # a name travels in requests and A1111's "name [hash]" lists: never a path
            if not re.match(CHECKPOINT_NAME, name):
                raise ValueError(f"base.controlnets: {name!r} is not a valid name ({CHECKPOINT_NAME})")
        for alias in self.checkpoint_aliases:
            if alias in names:
                raise ValueError(f"base.checkpoint_aliases: {alias!r} is already a checkpoint name")
        if self.checkpoint_dir is None:  # otherwise a target may be a file of the folder, checked when scanned
            for alias, target in {"default_checkpoint": self.default_checkpoint, **self.checkpoint_aliases}.items():
                if target is not None and target not in names:
                    raise ValueError(f"base: {alias} names {target!r}, which is not a checkpoint ({names})")
        return self

    @property
    def configured(self) -> list[Checkpoint]:
        """The checkpoints named in the config, ``model`` first."""
        single = [Checkpoint(name=self.name, source=self.model.source, config=self.model.config)] if self.model else []
        return single + self.checkpoints


class SDXLRefinerConfig(_Config):
    model: ModelSource
    name: str = "sdxl-refiner"
    embeddings_dir: str | None = Field(
        None, description="the base's embeddings folder: their clip_g vectors go into the refiner's one encoder"
    )
    device: DeviceConfig = DeviceConfig()
    vae: ModelSource | None = Field(None, description="a replacement VAE, e.g. an fp16-safe one for float16")
    fast: FastPath = FastPath()
    batching: Batching = Batching()
    max_pixels: int = Field(2048 * 2048, ge=64 * 64)


class UpscalerModel(_Config):
    name: str = Field(..., description="the name clients send, e.g. 'R-ESRGAN 4x+'")
    path: str = Field(..., description=".safetensors file (local path or s3:// URI)")


class UpscalerConfig(_Config):
    models: list[UpscalerModel] = []
    device: DeviceConfig = DeviceConfig()
    tile: int = Field(256, ge=0, description="tile edge in input pixels; 0 disables tiling")
    tile_overlap: int = Field(16, ge=0)
    max_output_pixels: int = Field(8192 * 8192, ge=64 * 64)


class FaceRestorerConfig(_Config):
    model: str | None = Field(None, description="CodeFormer / GFPGAN / RestoreFormer .safetensors")
    retinaface: str | None = Field(None, description="optional RetinaFace (resnet50) .safetensors for detection")
    device: DeviceConfig = DeviceConfig()
    min_detection_confidence: float = Field(0.5, ge=0.0, le=1.0)
    max_faces: int = Field(16, ge=1, le=256, description="restore at most this many faces, most confident first")


class FocalCropperConfig(_Config):
    min_detection_confidence: float = Field(0.5, ge=0.0, le=1.0)
    retinaface: str | None = Field(None, description="RetinaFace .safetensors: detect on the GPU, not MediaPipe")
    device: DeviceConfig = DeviceConfig()
    max_output_pixels: int = Field(4096 * 4096, ge=64 * 64)


class SafetyCheckerConfig(_Config):
    """The NSFW filter: a CLIP vision tower, its projection and concept embeddings with per-concept thresholds, in
    the layout of diffusers' ``StableDiffusionSafetyChecker`` (CompVis/stable-diffusion-safety-checker, or a
    Stable Diffusion pipeline folder's ``safety_checker/`` with its ``feature_extractor/``)."""

    model: str = Field(..., description="folder (config.json, model.safetensors, preprocessor_config.json), repo id "
                       "in the local cache or s3:// prefix")
    enabled: bool | None = Field(None, description="screen every generated image; None: the ENABLE_NSFW_FILTER "
                                 "setting")
    replacement: Literal["black", "blur"] = Field("black", description="what a flagged image is replaced by")
    blur_radius: float = Field(0.08, gt=0.0, le=1.0, description="'blur': Gaussian radius, a fraction of the "
                               "longer side")
    adjustment: float = Field(0.0, ge=-2.0, le=2.0, description="added to every concept score, as diffusers' "
                              "adjustment: above 0 a stricter filter (more benign images flagged), below 0 a laxer one")
    device: DeviceConfig = DeviceConfig()


class CaptionerConfig(_Config):
    """The image captioner behind A1111's ``/interrogate``: BLIP in transformers' layout
    (Salesforce/blip-image-captioning-large). A1111's "clip" interrogator starts from this caption, generated
    with its ``interrogate_clip_*`` settings, whose defaults these are."""

    model: str = Field(..., description="folder (config.json, model.safetensors, preprocessor_config.json, tokenizer "
                       "files), repo id in the local cache or s3:// prefix")
    num_beams: int = Field(1, ge=1, le=16, description="beam search width; 1 is greedy (interrogate_clip_num_beams)")
    min_length: int = Field(24, ge=0, le=512, description="fewest tokens in a caption, the start token counted "
                            "(interrogate_clip_min_length)")
    max_length: int = Field(48, ge=2, le=512, description="most tokens in a caption, the start token counted; at "
                            "most the decoder's max_position_embeddings (interrogate_clip_max_length)")
    device: DeviceConfig = DeviceConfig()

    @model_validator(mode="after")
    def _lengths_in_order(self) -> CaptionerConfig:
        if self.min_length > self.max_length:
            raise ValueError(f"captioner: min_length {self.min_length} is above max_length {self.max_length}")
        return self
