"""The SDXL base checkpoints one replica holds: each loaded checkpoint's pipelines (with their textual-inversion
embeddings, ``embeddings.py``), the LoRA folder they share, and
the least-recently-used set of checkpoints with the memory of an evicted one freed.

Everything here runs on the replica's inference thread, except ``Resident.evict``, which only drops a reference
(Serve's multiplexer calls it from another thread): the memory is freed by the next ``sweep``, on the inference
thread, before the next checkpoint loads.
"""

from __future__ import annotations

import gc
import logging
import threading
import time
import weakref
from collections import Counter, OrderedDict
from collections.abc import Callable
from pathlib import Path

import torch

from deployments.support import device as devices
from deployments.support import fastpath
from deployments.support.checkpoints import Entry
from deployments.support.config import SDXLBaseConfig
from deployments.support.embeddings import TextualInversions
from deployments.support.errors import UnknownModel
from deployments.support.folders import WatchedFolder
from deployments.support.generation import LoraRef
from deployments.support.samplers import build_scheduler
from deployments.support.settings import Settings
from deployments.weights import loader

logger = logging.getLogger(__name__)


class LoraFiles(WatchedFolder[Path]):
    """The LoRAs of ``lora_dir`` by file stem (a source that cannot be resolved fails the request naming one)."""

    kind = "lora_dir"

    def _read(self, folder: Path) -> dict[str, Path]:
        found = {}
        for path in sorted(folder.glob("*")):
            if path.suffix.lower() in loader.PICKLE_SUFFIXES | {".safetensors"}:
                try:
                    loader.check_safetensors(path)
                except loader.UnsafeWeights as e:
                    logger.warning("LoRA skipped: %s", e)
                    continue
                found[path.stem] = path
        return found


class Pipelines:
    """One loaded checkpoint: its text-to-image pipeline and the image-to-image and inpainting ones derived from
    it (sharing every module: no extra memory, one set of LoRA layers), with the IP-Adapter and LoRAs."""

    def __init__(self, entry: Entry, config: SDXLBaseConfig, device: torch.device, dtype: torch.dtype,
                 settings: Settings | None, compile_cache: Path) -> None:
        from diffusers import StableDiffusionXLImg2ImgPipeline, StableDiffusionXLInpaintPipeline

        self.name = entry.name
        pipe = loader.load_sdxl(entry.checkpoint, refiner=False, dtype=dtype, settings=settings, vae=config.vae)
        if config.ip_adapter:
            _load_ip_adapter(pipe, loader.resolve(config.ip_adapter, settings))
        pipe.to(device)
        self.fast = fastpath.apply(pipe, config.device, config.fast, device, compile_cache)
        self.txt2img = pipe
        # In the pipe's own dtype: diffusers (0.42) otherwise converts a derived pipeline, and so every module it
        # shares with this one, to float32.
        self.img2img = StableDiffusionXLImg2ImgPipeline.from_pipe(pipe, dtype=pipe.dtype)
        self.inpaint = StableDiffusionXLInpaintPipeline.from_pipe(pipe, dtype=pipe.dtype)
        for p in (self.img2img, self.inpaint):
            p.set_progress_bar_config(disable=True)
        self.scheduler_config = dict(pipe.scheduler.config)
        build_scheduler(config.default_sampler, self.scheduler_config)  # fail at load, not per request
        self.loras: set[str] = set()
        # Empty until the replica syncs the embeddings folder in (at load, then before each batch).
        self.inversions = TextualInversions([self.txt2img, self.img2img, self.inpaint], f"SDXL base {self.name}")
        modules = (pipe.unet, pipe.vae, pipe.text_encoder, pipe.text_encoder_2, getattr(pipe, "image_encoder", None))
        self.parameters = sum(p.numel() for m in modules if m is not None for p in m.parameters())  # LoRAs aside

    def add_loras(self, files: dict[str, Path], names: list[str] | None = None) -> None:
        """Load LoRAs this checkpoint does not hold yet (all of ``files``, or those of ``names``)."""
        for name in names if names is not None else list(files):
            if name in files and name not in self.loras:
                self.txt2img.load_lora_weights(str(files[name]), adapter_name=name)
                self.loras.add(name)

    def apply_loras(self, files: dict[str, Path], explicit: list[LoraRef], tagged: list[LoraRef],
                    warnings: list[str]) -> list[LoraRef]:
        """Activate a request's LoRAs with their weights (the others off); returns those active. An unknown one
        listed explicitly is refused; one tagged in the prompt is ignored with a warning (A1111 does the same)."""
        for ref in explicit:
            if ref.name not in files:
                raise UnknownModel(f"unknown LoRA {ref.name!r}", field="loras", details={"choices": list(files)})
        for ref in tagged:
            if ref.name not in files:
                warnings.append(f"LoRA {ref.name!r} not found, ignored")
        wanted = {r.name: r for r in [*explicit, *tagged] if r.name in files}  # a tag overrides the list's weight
        active = [r for r in wanted.values() if r.weight != 0.0]
        if active:
            self.add_loras(files, [r.name for r in active])  # one dropped into lora_dir since this one loaded
            self.txt2img.enable_lora()
            self.txt2img.set_adapters([r.name for r in active], [r.weight for r in active])
        elif self.loras:
            self.txt2img.disable_lora()
        return active

    @property
    def ip_adapter_loaded(self) -> bool:
        return getattr(self.txt2img.unet, "encoder_hid_proj", None) is not None


def _load_ip_adapter(pipe, folder: Path) -> None:
    from transformers import CLIPImageProcessor

    weights = folder / "ip-adapter_sdxl.safetensors"
    if not weights.exists():
        weights = next(folder.glob("*.safetensors"), weights)
    loader.check_safetensors(weights)
    processor = folder / "image_encoder" / "preprocessor_config.json"
    if processor.exists():  # encoders trained at another resolution ship their own preprocessing
        pipe.feature_extractor = CLIPImageProcessor.from_pretrained(processor.parent)
    pipe.load_ip_adapter(str(folder), subfolder="", weight_name=weights.name, image_encoder_folder="image_encoder")


class Resident:
    """The checkpoints a replica holds, most recently used last.

    ``get`` is the replica's own least-recently-used policy (at most ``limit``), for the plain class and Serve's
    local testing mode. Under Serve, the multiplexer is the policy: it calls ``load`` for a checkpoint it routes
    here and ``evict`` for the one it drops, so that its routing table and this replica's memory agree.
    """

    def __init__(self, load: Callable[[str], Pipelines], device: torch.device, limit: int) -> None:
        self._load, self.device, self.limit = load, device, limit
        self._held: OrderedDict[str, Pipelines] = OrderedDict()
        self._lock = threading.RLock()  # evict() may run from a finalizer, on any thread
        self._evicted: list[weakref.ref] = []
        self._dirty = False
        self.loads: Counter[str] = Counter()
        self.evictions = 0
        self.load_seconds: dict[str, float] = {}

    def get(self, name: str) -> Pipelines:
        with self._lock:
            held = self._held.get(name)
            if held is not None:
                self._held.move_to_end(name)
                return held
            while len(self._held) >= self.limit:
                self.evict(next(iter(self._held.values())))
        return self.load(name)

    def load(self, name: str) -> Pipelines:
        """The held checkpoint, or a fresh load (after freeing the memory of any evicted one)."""
        with self._lock:
            if name in self._held:
                return self._held[name]
        self.sweep()
        started = time.perf_counter()
        pipes = self._load(name)
        seconds = time.perf_counter() - started  # the weights, IP-Adapter, LoRAs and any warm-up
        with self._lock:
            self._held[name] = pipes
            self.loads[name] += 1
            self.load_seconds[name] = round(seconds, 3)
        logger.info("checkpoint %s loaded in %.2fs (%d held)", name, seconds, len(self._held))
        return pipes

    def evict(self, pipes: Pipelines) -> None:
        """Drop a held checkpoint: requests already running on it finish with it, then its memory goes."""
        with self._lock:
            if self._held.get(pipes.name) is not pipes:
                return  # already evicted (Serve's hook can run twice), or loaded again since
            del self._held[pipes.name]
            self.evictions += 1
            self._evicted.append(weakref.ref(pipes))
            self._dirty = True
        logger.info("checkpoint %s evicted", pipes.name)

    def sweep(self) -> None:
        """Collect what evicted checkpoints left (their modules hold reference cycles) and return the freed
        device memory to the driver."""
        if not self._dirty:
            return
        self._dirty = False
        gc.collect()
        devices.free_cache(self.device)
        with self._lock:
            self._evicted = [ref for ref in self._evicted if ref() is not None]
            if self._evicted:
                self._dirty = True  # still in use by a running request: try again after it

    @property
    def names(self) -> list[str]:
        with self._lock:
            return list(self._held)

    def held(self, name: str) -> Pipelines | None:
        with self._lock:
            return self._held.get(name)

    def describe(self) -> dict:
        with self._lock:
            held = list(self._held.values())
            return {"held": [p.name for p in held], "max": self.limit, "loads": dict(self.loads),
                    "evictions": self.evictions, "evicted_alive": sum(ref() is not None for ref in self._evicted),
                    "load_seconds": dict(self.load_seconds), "parameters": sum(p.parameters for p in held)}
