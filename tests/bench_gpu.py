"""``make bench-gpu``: the full-size models, stage by stage, with each fast-path setting, and their fidelity.

Builds the full-size random-weight fixtures where it runs (``deployments.factory --full``, into
``FULLSIZE_MODELS``), converts the released ``.pth`` files, then runs the real serving classes in process:

- GPU: SDXL base 1024², 30 steps, batch 1, eagerly in float16 (the old default) and bfloat16, then each
  optimisation and all of them together; the same call with one canny ControlNet unit (balanced, the full-size
  diffusers/controlnet-canny-sdxl-1.0 layout) beside the plain one on the same replica, seed and settings (eager
  bfloat16; with the shipped settings too unless ``--quick``); refiner 1536² at strength 0.35; Real-ESRGAN x2
  768 → 1536; CodeFormer on one aligned face; VAE decode at 1024² and 1536²; Depth Anything V2 Large's map at
  processor_res 1024. Each variant's final latents and image are compared with the eager float32 run on the same
  seed and weights (relative error, PSNR).
- CPU (no CUDA): the full-size base at 256², 2 steps, against its float32 eager self, so that the comparison code
  runs everywhere, and the depth map; the ControlNet pair is skipped there (the full-size base and ControlNet
  together are about 19 GB in float32): ``--shrink`` runs its code.

One table is printed last; every number is also written as JSON (``--out``). Serve figures come from
``tests/bench_gpu_serve.py``. Nothing here asserts: it measures.
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import math
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

logger = logging.getLogger("bench-gpu")
ROOT = Path(__file__).resolve().parent.parent
SEED = 1234
PROMPT = "a lighthouse on a cliff at dusk, oil painting"
CONTROLNET = "controlnet-canny-sdxl"  # deployments.factory --full --only controlnet
DEPTH = "depth-anything-v2"


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def timed(fn: Callable[[], object], repeat: int) -> tuple[list[float], object]:
    """Wall times of ``repeat`` calls (device synchronised), after the caller's own warm-up."""
    times, result = [], None
    for _ in range(repeat):
        sync()
        started = time.perf_counter()
        result = fn()
        sync()
        times.append(time.perf_counter() - started)
    return times, result


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return math.inf if mse == 0 else 10 * math.log10(255.0**2 / mse)


def rel_error(a: torch.Tensor, b: torch.Tensor) -> float:
    a64, b64 = a.double(), b.double()
    return float(torch.linalg.vector_norm(a64 - b64) / torch.linalg.vector_norm(b64).clamp_min(1e-30))


def build_fixtures(models: Path, device: str, only: set[str], shrink: bool = False) -> None:
    from deployments.factory.full import build_all

    if (models / ".stamp").exists():  # `make fullsize` built every artefact
        return
    missing = {a for a in only if not (models / ".done" / a).exists()}
    if not missing:
        return
    started = time.perf_counter()
    build_all(models, only=missing, device=device, shrink=shrink)
    for artefact in missing:
        (models / ".done").mkdir(parents=True, exist_ok=True)
        (models / ".done" / artefact).touch()
    logger.info("fixtures %s built in %.1fs", sorted(missing), time.perf_counter() - started)


def convert_releases(models: Path) -> dict[str, Path]:
    from deployments.weights.convert import convert_file

    out = {}
    for pth in sorted((models / "releases").glob("*.pth")):
        target = models / "converted" / f"{pth.stem}.safetensors"
        if not target.exists():
            convert_file(pth, target)
        out[pth.stem] = target
    return out


class Capture:
    """Keeps the final latents a generator decodes, for the fidelity columns."""

    def __init__(self, generator) -> None:
        self.latents: torch.Tensor | None = None
        decode = generator.decode

        def keep(latents, *args, **kwargs):
            self.latents = latents.detach().float().cpu()
            return decode(latents, *args, **kwargs)

        generator.decode = keep


def base_generator(models: Path, *, dtype: str, channels_last=False, controlnet=False, **fast):
    from deployments.sdxl_base import BaseGenerator
    from deployments.support.config import SDXLBaseConfig

    config = SDXLBaseConfig(model={"source": str(models / "sdxl-base")},
                            device={"device": "auto", "dtype": dtype, "channels_last": channels_last}, fast=fast,
                            controlnets={"canny": str(models / CONTROLNET)} if controlnet else {})
    return BaseGenerator(config)


def control_photo():
    """The canny unit's control image: a photograph (skimage's astronaut, 512²), so that canny finds edges as on a
    real upload; its map is made at the unit's processor_res (512) and framed at the generation size."""
    from PIL import Image
    from skimage import data

    return Image.fromarray(data.astronaut())


def free() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch._dynamo.reset()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


class Bench:
    def __init__(self, models: Path, size: int, steps: int, repeat: int, budget_s: float) -> None:
        self.models, self.size, self.steps, self.repeat = models, size, steps, repeat
        self.deadline = time.monotonic() + budget_s
        self.rows: list[dict] = []
        self.reference: dict | None = None
        self.out: Path | None = None

    def flush(self) -> None:
        """Write what is measured so far: a run cut short still leaves its numbers."""
        if self.out is not None:
            self.out.write_text(json.dumps({"rows": self.rows}, indent=1, default=str))

    def out_of_time(self, name: str) -> bool:
        if time.monotonic() > self.deadline:
            self.rows.append({"stage": name, "skipped": "time budget spent"})
            return True
        return False

    def request(self, control=None):
        from deployments.support.control import ControlUnit
        from deployments.support.generation import GenerationRequest

        units = [ControlUnit(model="canny", image=control, module="canny")] if control is not None else []
        return GenerationRequest(prompt=PROMPT, width=self.size, height=self.size, steps=self.steps, seed=SEED,
                                 guidance_scale=7.0, sampler="Euler", control=units)

    def base_variant(self, name: str, *, dtype: str, channels_last=False, attention: list[str] | None = None,
                     repeat: int | None = None, controlnet=False, **fast) -> None:
        """Load once, then time the plain call and (optionally) each attention kernel on the same replica; with
        ``controlnet``, then the same call with one canny unit (its first call, which compiles its UNet graph
        under ``compile``, is not timed)."""
        if self.out_of_time(name):
            return
        try:
            started = time.perf_counter()
            gen = base_generator(self.models, dtype=dtype, channels_last=channels_last, controlnet=controlnet,
                                 **fast)
            capture = Capture(gen)
            load_s = time.perf_counter() - started
            first_started = time.perf_counter()
            gen.generate(self.request())  # warm-up: compilation and autotuning happen here
            sync()
            first_s = time.perf_counter() - first_started
            for kernel in attention or [gen.config.fast.attention]:
                gen.config.fast.attention = kernel
                label = name if kernel == "auto" or attention is None else f"{name} + attention {kernel}"
                try:
                    if kernel != "auto" and attention is not None:
                        gen.generate(self.request())
                    times, result = timed(lambda: gen.generate(self.request()), repeat or self.repeat)
                except RuntimeError as e:  # a kernel this GPU (or this torch) lacks
                    self.rows.append({"stage": label, "error": f"{type(e).__name__}: {e}"[:400]})
                    continue
                self.record_base(label, times, result, capture, load_s, first_s, gen)
            if controlnet:
                self.controlnet_row(name, gen, capture, repeat)
        except Exception as e:  # a variant that fails is a finding, not the end of the run
            logger.exception("variant %s failed", name)
            self.rows.append({"stage": name, "error": f"{type(e).__name__}: {e}"[:400]})
        finally:
            gen = capture = None
            free()

    def record_base(self, label, times, result, capture, load_s, first_s, gen) -> None:
        image = np.asarray(result.images[0])
        row = {
            "stage": f"base {self.size}² {self.steps} steps",
            "variant": label,
            "median_s": statistics.median(times),
            "min_s": min(times),
            "runs": len(times),
            "load_s": round(load_s, 2),
            "first_call_s": round(first_s, 2),
            "it_per_s": self.steps / statistics.median(times),
            "finite": bool(torch.isfinite(capture.latents).all()),
            "fast_path": gen.fast,
            **(gen.describe() if torch.cuda.is_available() else {}),
        }
        if self.reference is None:
            self.reference = {"latents": capture.latents, "image": image}
            row.update(latent_rel_error=0.0, psnr_db=math.inf)
        else:
            row.update(latent_rel_error=rel_error(capture.latents, self.reference["latents"]),
                       psnr_db=psnr(image, self.reference["image"]))
        row.pop("running", None)
        self.rows.append(row)
        logger.info("%s: %.3fs median (%s)", label, row["median_s"], row.get("latent_rel_error"))
        self.flush()

    def controlnet_row(self, name: str, gen, capture: Capture, repeat: int | None) -> None:
        """The variant's call again with one canny unit (balanced, scale 1) on the same replica, seed and settings,
        beside the plain row just recorded: its cost, and how far the unit moved the latents (not a fidelity
        figure: the reference has no unit)."""
        label = f"canny ControlNet (balanced) on {name}"
        plain = next((r for r in reversed(self.rows) if r.get("variant") == name and "median_s" in r), None)
        if plain is None:  # the plain call failed: nothing to set the unit's cost against
            self.rows.append({"stage": label, "skipped": "no plain row of this variant to compare with"})
            return
        plain_latents = capture.latents
        photo = control_photo()
        try:
            first_started = time.perf_counter()
            gen.generate(self.request(photo))
            sync()
            first_s = time.perf_counter() - first_started
            times, result = timed(lambda: gen.generate(self.request(photo)), repeat or self.repeat)
        except Exception as e:  # the plain row stands; the unit's failure is a finding of its own
            logger.exception("%s failed", label)
            self.rows.append({"stage": label, "error": f"{type(e).__name__}: {e}"[:400]})
            return
        median = statistics.median(times)
        row = {
            "stage": f"base {self.size}² {self.steps} steps",
            "variant": label,
            "median_s": median,
            "min_s": min(times),
            "runs": len(times),
            "first_call_s": round(first_s, 2),
            "it_per_s": self.steps / median,
            "finite": bool(torch.isfinite(capture.latents).all()),
            "controlnet_s": median - plain["median_s"],
            "controlnet_pct": 100 * (median / plain["median_s"] - 1),
            "latent_change_vs_plain": rel_error(capture.latents, plain_latents),
            "image_size": list(result.images[0].size),
            "fast_path": gen.fast,
            **(gen.describe() if torch.cuda.is_available() else {}),
        }
        row.pop("running", None)
        self.rows.append(row)
        logger.info("%s: %.3fs median, %+.3fs over the plain call", label, median, row["controlnet_s"])
        self.flush()

    def stage(self, name: str, setup: Callable[[], Callable[[], object] | dict[str, Callable[[], object]]],
              repeat: int | None = None) -> None:
        """Time one stage; ``setup`` loads once and returns one callable, or several named ones."""
        if self.out_of_time(name):
            return
        try:
            runs = setup()
            for label, run in (runs.items() if isinstance(runs, dict) else [(name, runs)]):
                run()
                times, _ = timed(run, repeat or self.repeat)
                row = {"stage": label, "median_s": statistics.median(times), "min_s": min(times), "runs": len(times)}
                if torch.cuda.is_available():
                    row["gpu_memory_peak_gb"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
                self.rows.append(row)
                logger.info("%s: %.3fs", label, row["median_s"])
                self.flush()
        except Exception as e:
            logger.exception("stage %s failed", name)
            self.rows.append({"stage": name, "error": f"{type(e).__name__}: {e}"[:400]})
        finally:
            free()


def refiner_stage(models: Path, size: int, dtype: str) -> Callable[[], Callable[[], object]]:
    def setup():
        from PIL import Image

        from deployments.sdxl_refiner import Refiner
        from deployments.support.config import SDXLRefinerConfig
        from deployments.support.generation import RefineRequest

        refiner = Refiner(SDXLRefinerConfig(model={"source": str(models / "sdxl-refiner")},
                                            device={"dtype": dtype, "channels_last": True}))
        rng = np.random.default_rng(0)
        photo = Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8))
        request = RefineRequest(prompt=PROMPT, seeds=[SEED], steps=30, strength=0.35)
        return lambda: refiner.refine_images(request, photo)

    return setup


def upscaler_stage(path: Path, dtype: str, tile: int, channels_last: bool, size: int = 768):
    def setup():
        from PIL import Image

        from deployments.support.config import UpscalerConfig
        from deployments.upscaler import ImageUpscaler

        up = ImageUpscaler(UpscalerConfig(models=[{"name": "x2", "path": str(path)}], tile=tile,
                                          device={"dtype": dtype, "channels_last": channels_last}))
        image = Image.fromarray(np.random.default_rng(1).integers(0, 256, (size, size, 3), dtype=np.uint8))
        return lambda: up.upscale(image, "x2", 2.0)

    return setup


def face_stage(path: Path, retinaface: Path, dtype: str):
    def setup():
        from skimage import data

        from deployments.face_restorer import FaceEnhancer
        from deployments.support.config import FaceRestorerConfig

        faces = FaceEnhancer(FaceRestorerConfig(model=str(path), retinaface=str(retinaface), device={"dtype": dtype}))
        crop = np.ascontiguousarray(data.astronaut()[:512, :512])

        def run():
            with torch.inference_mode():
                return faces._restore_crop(faces.descriptor, crop, 0.6)

        return run

    return setup


def depth_stage(models: Path, dtype: str, resolution: int):
    """Depth Anything V2 Large's map of a 1024² photograph at ``resolution`` (the unit's processor_res), on the
    device and dtype a base replica loads its preprocessors with: the CPU work around the model (resizing,
    normalising, the 8-bit map) included, as a request pays it."""

    def setup():
        from PIL import Image

        from deployments.support import depth
        from deployments.support.config import DeviceConfig
        from deployments.support.control import detect
        from deployments.support.device import resolve

        device, torch_dtype = resolve(DeviceConfig(dtype=dtype))
        estimators = depth.load({"depth_anything_v2": str(models / DEPTH)}, device, torch_dtype)
        photo = control_photo().resize((1024, 1024), Image.Resampling.BICUBIC)
        return lambda: detect(photo, "depth_anything_v2", resolution, estimators=estimators)

    return setup


def vae_stage(models: Path, dtype: str, compiled: bool, sizes: tuple[int, ...] = (1024, 1536)):
    """VAE decode at 1024² and 1536² on one loaded base (compiling the UNet too would only cost time: the
    regional setting compiles nothing until the UNet runs)."""

    def setup():
        gen = base_generator(models, dtype=dtype, channels_last=True, compile="regional" if compiled else "none",
                             compile_vae=compiled)
        runs = {}
        for size in sizes:
            latents = torch.randn(1, 4, size // 8, size // 8, generator=torch.Generator().manual_seed(0))
            latents = latents.to(gen.device, gen.dtype)
            label = f"VAE decode {size}² {dtype}{' compiled' if compiled else ' eager'}"
            runs[label] = lambda latents=latents: gen.decode(latents)
        return runs

    return setup


def gpu_plan(bench: Bench, models: Path, converted: dict[str, Path], quick: bool) -> None:
    """Most wanted first, since the budget cuts the tail: the reference, the plain and the shipped settings,
    every other stage, then each optimisation alone."""
    shipped = dict(dtype="bfloat16", channels_last=True, compile="full", compile_vae=True)  # serve_config.yaml's
    bench.base_variant("eager float32 (reference)", dtype="float32", repeat=1)
    # The ControlNet's own cost, eager (tens of seconds); under the shipped settings its first call compiles one
    # more UNet graph (its residuals are inputs), a minute or more, so --quick leaves that pair out.
    bench.base_variant("eager bfloat16", dtype="bfloat16", controlnet=True)
    bench.base_variant("shipped: bfloat16 + channels-last + compile full + VAE compiled", **shipped,
                       controlnet=not quick)
    up, big, small = converted["RealESRGAN_x2plus"], bench.size * 3 // 2, bench.size * 3 // 4  # 1536 and 768
    vae_sizes, detector = (bench.size, big), converted["detection_Resnet50_Final"]  # MediaPipe is CPU-only
    bench.stage(f"refiner {big}² strength 0.35 (bf16, channels-last)", refiner_stage(models, big, "bfloat16"))
    bench.stage(f"Real-ESRGAN x2 {small}→{big} float16 + channels-last, tile 512",
                upscaler_stage(up, "float16", 512, True, small))
    bench.stage("CodeFormer one 512² face bfloat16", face_stage(converted["codeformer"], detector, "bfloat16"))
    bench.stage("VAE decode eager", vae_stage(models, "bfloat16", False, vae_sizes))
    bench.stage("Depth Anything V2 Large map, processor_res 1024, bfloat16", depth_stage(models, "bfloat16", 1024),
                repeat=4 * bench.repeat)  # tens of milliseconds: more runs for a steadier median
    bench.base_variant("eager float16, VAE upcast per call (old default)", dtype="float16")
    bench.base_variant("eager bfloat16", dtype="bfloat16",
                       attention=["flash", "efficient", "cudnn"])
    bench.base_variant("bfloat16 + channels-last", dtype="bfloat16", channels_last=True)
    bench.base_variant("bfloat16 + compile regional", dtype="bfloat16", compile="regional")
    bench.base_variant("bfloat16 + compile full", dtype="bfloat16", compile="full")
    if not quick:
        bench.base_variant("shipped + CUDA graphs", **shipped, compile_mode="reduce-overhead")
        bench.base_variant("bfloat16 + fp8 linears + compile full", dtype="bfloat16", compile="full", fp8=True)
    bench.stage(f"Real-ESRGAN x2 {small}→{big} float32, tile 512", upscaler_stage(up, "float32", 512, False, small))
    bench.stage(f"Real-ESRGAN x2 {small}→{big} float16 + channels-last, no tiles",
                upscaler_stage(up, "float16", 0, True, small))
    if not quick:
        bench.stage("CodeFormer one 512² face float32", face_stage(converted["codeformer"], detector, "float32"))
    bench.stage("VAE decode compiled", vae_stage(models, "bfloat16", True, vae_sizes))


def table(rows: list[dict]) -> str:
    """One line a row; a ControlNet row ends with its cost over the plain row of its variant."""
    lines = [f"{'stage / variant':<78} {'median s':>9} {'it/s':>6} {'peak GB':>8} {'lat err':>9} {'PSNR':>6}"]
    for row in rows:
        name = row["stage"] + (f" | {row['variant']}" if "variant" in row else "")
        if "error" in row or "skipped" in row:
            lines.append(f"{name[:78]:<78} {row.get('error') or row.get('skipped')}"[:200])
            continue
        err = row.get("latent_rel_error")
        ps = row.get("psnr_db")
        cost = row.get("controlnet_s")
        lines.append(
            f"{name[:78]:<78} {row['median_s']:>9.3f} {row.get('it_per_s', 0):>6.1f} "
            f"{row.get('gpu_memory_peak_gb', 0):>8.1f} {'' if err is None else f'{err:.2e}':>9} "
            f"{'' if ps is None else f'{ps:.1f}':>6}"
            + ("" if cost is None else f"  ControlNet {cost:+.3f} s ({row['controlnet_pct']:+.0f} %)")
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", type=Path, default=Path(os.environ.get(
        "FULLSIZE_MODELS", Path.home() / ".cache" / "imagegen" / "fullsize-models")))
    parser.add_argument("--out", type=Path, default=ROOT / "bench-gpu.json")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--budget", type=float, default=420, help="seconds for the stage table")
    parser.add_argument("--quick", action="store_true", help="skip the slowest compile variants (CUDA graphs, FP8) "
                        "and CodeFormer in float32")
    parser.add_argument("--shrink", action="store_true", help="a smoke run of this script: the fixtures' layouts at "
                        "toy widths (deployments.factory.full.shapes), in --models, which must be a folder of its own; "
                        "the GPU plan then runs wherever it is, at 256², 2 steps, once each")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    cuda = torch.cuda.is_available()
    report: dict = {"device": torch.cuda.get_device_name() if cuda else "cpu", "torch": torch.__version__}
    if cuda or args.shrink:
        build_fixtures(args.models, "cuda" if cuda else "cpu", {"sdxl-base", "sdxl-refiner", "releases",
                                                                "safety-checker", "captioner", "controlnet",
                                                                "depth-anything-v2"}, args.shrink)
        converted = convert_releases(args.models)
        bench = (Bench(args.models, 256, 2, 1, args.budget) if args.shrink
                 else Bench(args.models, 1024, 30, args.repeat, args.budget))
        bench.out = args.out
        gpu_plan(bench, args.models, converted, args.quick)
    else:
        build_fixtures(args.models, "cpu", {"sdxl-base", "depth-anything-v2"}, args.shrink)
        bench = Bench(args.models, 256, 2, 1, args.budget)
        bench.base_variant("eager float32 (reference)", dtype="float32")
        bench.base_variant("eager float32, again", dtype="float32")
        bench.rows.append({"stage": "base 256² 2 steps", "variant": "canny ControlNet (balanced) on eager float32",
                           "skipped": "CPU mode: the full-size base and ControlNet take about 19 GB in float32 "
                                      "(--shrink runs this row)"})
        bench.stage("Depth Anything V2 Large map, processor_res 1024, float32", depth_stage(args.models, "float32",
                                                                                            1024))
    report["rows"] = bench.rows
    args.out.write_text(json.dumps(report, indent=1, default=str))
    sys.stdout.write(f"\n{report['device']}, torch {report['torch']}\n{table(bench.rows)}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
