"""Upscaler: Real-ESRGAN-family models through spandrel, Lanczos when none is loaded.

Graph position: SDXLBase -> **Upscaler** -> SDXLRefiner (hires fix), or ingress -> **Upscaler** (extras), or
FocalCropper's caller when a crop is smaller than its target. Models are registered under the names A1111
clients send ("R-ESRGAN 4x+", ...). Any target scale: whole model passes, a last pass on an image shrunk so that it
lands on the target (no pass makes more than the target or the pixel cap), then a Lanczos resize to the exact
size. Large images run in overlapping tiles so memory stays bounded.
"""

from __future__ import annotations

import asyncio
import logging
import math
import threading

import torch
from PIL import Image
from ray import serve

from deployments.support import device as devices
from deployments.support.config import UpscalerConfig
from deployments.support.errors import InvalidInput, UnknownModel
from deployments.support.generation import Encoding, StageResult, encoded
from deployments.support.imaging import from_tensor, to_rgb, to_tensor
from deployments.support.logs import replica_logging
from deployments.support.metrics import StageMetrics
from deployments.support.settings import Settings, current
from deployments.weights import loader

logger = logging.getLogger(__name__)

# Names A1111 clients send for neural upscalers: when one is not loaded here the request degrades to Lanczos
# (and says so); a name outside this list and the loaded ones is refused. Spelled as A1111 lists its built-in models
# (modules/realesrgan_model.py, esrgan_model.py, bsrgan_model.py, dat_model.py, extensions-builtin/SwinIR, ScuNET,
# LDSR): a model not downloaded yet goes by its model_name ("SwinIR 4x", "ScuNET GAN", "BSRGAN 4x"); once its file
# is there, by the file's stem ("SwinIR_4x", "ScuNET", "BSRGAN"). webuiapi's enums hard-code the first kind.
A1111_NAMES = {
    "R-ESRGAN 4x+", "R-ESRGAN 4x+ Anime6B", "R-ESRGAN 2x+", "R-ESRGAN General 4xV3", "R-ESRGAN General WDN 4xV3",
    "R-ESRGAN AnimeVideo", "ESRGAN_4x", "BSRGAN", "BSRGAN 4x", "SwinIR 4x", "SwinIR_4x", "LDSR", "ScuNET GAN",
    "ScuNET", "ScuNET PSNR", "DAT x2", "DAT x3", "DAT x4",
    "Latent", "Latent (antialiased)", "Latent (bicubic)", "Latent (bicubic antialiased)", "Latent (nearest)",
    "Latent (nearest-exact)",
}

BUILTIN = {
    "None": None,
    "Lanczos": Image.Resampling.LANCZOS,
    "Nearest": Image.Resampling.NEAREST,
    "Bicubic": Image.Resampling.BICUBIC,
}


def target_size(size: tuple[int, int], scale: float | None, width: int | None, height: int | None) -> tuple[int, int]:
    w, h = size
    if width and height:
        return width, height
    if width:
        return width, max(1, round(h * width / w))
    if height:
        return max(1, round(w * height / h)), height
    if scale is None or not 0 < scale <= 16:
        raise InvalidInput("scale must lie in (0, 16]", field="scale")
    return max(1, round(w * scale)), max(1, round(h * scale))


class ImageUpscaler:
    def __init__(self, config: UpscalerConfig, settings: Settings | None = None) -> None:
        self.config = config
        self.device, self.dtype = devices.resolve(config.device)
        self.models = {}
        self.weights = loader.WeightFiles()
        for entry in config.models:
            descriptor = loader.load_spandrel(entry.path, settings)
            self.weights.add(f"upscaler:{entry.name}", loader.resolve(entry.path, settings))
            dtype = devices.supported_dtype(descriptor, self.dtype)
            descriptor.to(self.device).eval()
            if dtype != torch.float32:
                descriptor.to(dtype)
            if config.device.channels_last and self.device.type == "cuda":
                descriptor.model.to(memory_format=torch.channels_last)
            self.models[entry.name] = descriptor
            logger.info("upscaler %r: %s x%d", entry.name, descriptor.architecture.id, descriptor.scale)
        self._lock = threading.Lock()
        self.oom = devices.OomGuard(self.device, "upscaler")

    def names(self) -> list[str]:
        return list(BUILTIN) + list(self.models)

    def check(self, upscaler: str, field: str = "upscaler") -> None:
        """Refuse a name that is neither built in, loaded, nor one A1111 clients send (that one falls back)."""
        if upscaler not in BUILTIN and upscaler not in self.models and upscaler not in A1111_NAMES:
            raise UnknownModel(f"unknown upscaler {upscaler!r}", field=field, details={"choices": self.names()})

    def upscale(
        self,
        source: StageResult | Image.Image,
        upscaler: str = "Lanczos",
        scale: float | None = 2.0,
        width: int | None = None,
        height: int | None = None,
        box: tuple[int, int, int, int] | None = None,
    ) -> StageResult:
        """The previous stage's images (every one of them; only their ``box`` region, when given) at the target
        size; ``info["upscaler"]`` says what actually ran."""
        source = StageResult.of(source)
        ran, warnings, images = upscaler, [], []
        for image in source.images or [source.image]:  # none: ``image`` raises the structured error
            image = to_rgb(image if box is None else image.crop(box))
            size = target_size(image.size, scale, width, height)
            if size[0] * size[1] > self.config.max_output_pixels:
                raise InvalidInput(f"output {size[0]}x{size[1]} exceeds the pixel limit", field="scale")
            ran, warned, out = self._upscale(image, upscaler, size)
            warnings += warned
            images.append(out)
        return source.then(images, warnings=list(dict.fromkeys(warnings)), upscaler=ran)

    def _upscale(self, image: Image.Image, upscaler: str, size: tuple[int, int]) -> tuple[str, list[str], Image.Image]:
        """What ran, its warnings, and ``image`` at ``size``."""
        if upscaler in BUILTIN:
            if BUILTIN[upscaler] is None:
                return "None", [], image.copy()
            return upscaler, [], image.resize(size, BUILTIN[upscaler])
        if upscaler not in self.models:
            self.check(upscaler)
            warning = f"upscaler {upscaler!r} is not loaded; Lanczos used instead"
            logger.warning(warning)
            return "Lanczos", [warning], image.resize(size, Image.Resampling.LANCZOS)
        descriptor = self.models[upscaler]
        factor, cap = descriptor.scale, self.config.max_output_pixels
        with self._lock, self.oom(), torch.inference_mode():
            out, passes = image, 0
            # Whole model passes while the target is at least a model scale away (x4 model, x16 request: two). A pass
            # may overshoot and be downscaled, as A1111 does: the first one (x4 model, x2 request: the model sees
            # every input pixel), and a later one by up to twice the target a side (x8: 16x, then down to 8x). Such
            # a pass that would pass the pixel cap shrinks each tile's output as it is made, so that the model still
            # sees every pixel and no image past the cap is built (untiled, its input is shrunk instead). Any other
            # overshooting pass would build up to factor² times the target (x4.1: 16x) to throw most of it away, so
            # the image is shrunk first and that last pass lands on the target, a few pixels short at most, still
            # ending in model detail.
            while out.width < size[0] or out.height < size[1]:
                full = (out.width * factor, out.height * factor)
                within_target = full[0] <= size[0] and full[1] <= size[1]
                worth = passes == 0 or (full[0] <= 2 * size[0] and full[1] <= 2 * size[1])
                land = not within_target and not (worth and full[0] * full[1] <= cap)
                if land:
                    keep = min(1.0, math.sqrt(cap / (full[0] * full[1]))) if worth else 0.0
                    if worth and self.config.tile:
                        fit = (max(size[0], math.floor(full[0] * keep)), max(size[1], math.floor(full[1] * keep)))
                        out = self._run_model(descriptor, out, fit)
                        break
                    shrunk = (max(1, size[0] // factor, math.floor(out.width * keep)),
                              max(1, size[1] // factor, math.floor(out.height * keep)))
                    out = out.resize(shrunk, Image.Resampling.LANCZOS)
                out, passes = self._run_model(descriptor, out), passes + 1
                if land or factor == 1:
                    break
        if out.size != size:
            out = out.resize(size, Image.Resampling.LANCZOS)
        return upscaler, [], out

    def _run_model(self, descriptor, image: Image.Image, size: tuple[int, int] | None = None) -> Image.Image:
        """One model pass over ``image``; with ``size`` (tiled only), its output is made at that smaller size."""
        dtype = next(descriptor.model.parameters()).dtype
        tensor = to_tensor(image, self.device, dtype)
        if self.config.device.channels_last and self.device.type == "cuda":
            tensor = tensor.contiguous(memory_format=torch.channels_last)
        tile = self.config.tile
        if tile and (size is not None or image.width > tile or image.height > tile):
            return from_tensor(tiled(descriptor, tensor, tile, self.config.tile_overlap, size))
        return from_tensor(descriptor(tensor))


def tiled(model, tensor: torch.Tensor, tile: int, overlap: int, size: tuple[int, int] | None = None) -> torch.Tensor:
    """Run ``model`` over overlapping tiles and blend them with linear ramps, so seams do not show. With ``size``
    (width, height), each tile's output is shrunk to that scale as it is made: the accumulators never hold more."""
    _, channels, height, width = tensor.shape
    scale = model.scale
    out_w, out_h = size or (width * scale, height * scale)
    ry, rx = out_h / (height * scale), out_w / (width * scale)
    out = torch.zeros((1, channels, out_h, out_w), dtype=torch.float32, device=tensor.device)
    weight = torch.zeros_like(out[:, :1])
    step = max(1, tile - overlap)
    ys = list(range(0, max(height - tile, 0) + 1, step))
    xs = list(range(0, max(width - tile, 0) + 1, step))
    if ys[-1] + tile < height:
        ys.append(height - tile)
    if xs[-1] + tile < width:
        xs.append(width - tile)
    for y in ys:
        for x in xs:
            patch = tensor[:, :, y : y + tile, x : x + tile]
            result = model(patch).float()
            ph, pw = result.shape[-2:]
            ramp = _ramp(ph, pw, overlap * scale, result.device)
            oy, ox = y * scale, x * scale
            if size is not None:  # this tile's place at the smaller scale (the blend absorbs the rounding)
                y0, y1 = round(oy * ry), min(out_h, max(round((oy + ph) * ry), round(oy * ry) + 1))
                x0, x1 = round(ox * rx), min(out_w, max(round((ox + pw) * rx), round(ox * rx) + 1))
                result = torch.nn.functional.interpolate(result, size=(y1 - y0, x1 - x0), mode="bicubic",
                                                         antialias=True, align_corners=False)
                ramp = torch.nn.functional.interpolate(ramp, size=(y1 - y0, x1 - x0), mode="bilinear",
                                                       antialias=True, align_corners=False)
                oy, ox, ph, pw = y0, x0, y1 - y0, x1 - x0
            out[:, :, oy : oy + ph, ox : ox + pw] += result * ramp
            weight[:, :, oy : oy + ph, ox : ox + pw] += ramp
    return out / weight.clamp_min(1e-8)


def _ramp(h: int, w: int, overlap: int, device) -> torch.Tensor:
    def axis(n: int) -> torch.Tensor:
        r = torch.ones(n, device=device)
        k = min(overlap, n // 2)
        if k:
            edge = torch.linspace(1.0 / (k + 1), 1.0, k, device=device)
            r[:k] = edge
            r[n - k :] = edge.flip(0)
        return r

    return (axis(h)[:, None] * axis(w)[None, :])[None, None]


@serve.deployment(ray_actor_options={"num_cpus": 0.5}, max_ongoing_requests=4, health_check_period_s=10)
class Upscaler:
    def __init__(self, config: dict | UpscalerConfig) -> None:
        replica_logging()  # before anything here logs
        self.thread = devices.InferenceThread("upscaler")
        self.model = self.thread.call(ImageUpscaler, UpscalerConfig.model_validate(config))
        self.metrics = StageMetrics("upscaler")

    async def upscale(self, source: StageResult | Image.Image, upscaler: str = "Lanczos", scale: float | None = 2.0,
                      width: int | None = None, height: int | None = None, encode: Encoding | None = None,
                      box: tuple[int, int, int, int] | None = None) -> StageResult:
        """``source``: the previous stage's result, or an image; ``encode``: answer with files, not pixels; ``box``:
        upscale only that region of each image (a focal crop of a base that travels here whole)."""
        if isinstance(source, StageResult) and source.stopped:  # A1111 skips the hires fix after /interrupt
            return await encoded(source, encode)
        with self.metrics.track():
            result = await self.thread.run(self.model.upscale, source, upscaler, scale, width, height, box)
        self.metrics.produced(len(result.images))
        return await encoded(result, encode)

    async def names(self) -> list[str]:
        return self.model.names()

    async def check(self, upscalers: dict[str, str]) -> dict | None:
        """The first name ``upscale`` would refuse, as ``{"message", "field", "details"}`` of its ``UnknownModel``
        (``upscalers``: field -> name), else None. The ingress asks before any work starts and raises the error
        itself: a client's mistake answered as a value is no failed call in Serve's log and error counter (a
        raise here logged a traceback at ERROR). ``upscale`` refuses them too."""
        for field, name in upscalers.items():
            try:
                self.model.check(name, field)
            except UnknownModel as e:
                self.metrics.failed(e)  # the stage's (client) failure, as when ``upscale`` refused it
                return {"message": e.message, "field": e.field, "details": e.details}
        return None

    async def describe(self) -> dict:
        return {name: {"scale": d.scale, "architecture": d.architecture.id} for name, d in self.model.models.items()}

    async def fingerprint(self) -> dict[str, str]:
        """Hashes of the loaded weights (the result cache's key), off the inference thread."""
        model = self.model
        runtime = f"{model.device.type}/{model.dtype}/{model.config.tile}/{model.config.tile_overlap}"
        return {**await asyncio.to_thread(self.model.weights.digests), "upscaler_runtime": runtime}

    async def memory(self) -> dict:
        """GPU memory as A1111's ``/memory`` reports it: the ingress asks a model replica, having no torch."""
        return devices.cuda_memory(self.model.device)

    async def check_health(self) -> None:
        devices.check_health(self.thread, self.model.oom, current().inference_stall_seconds)
