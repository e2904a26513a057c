"""``make bench-gpu`` (Serve half): the full-size application through Ray Serve on one GPU, shaped as
``serve_config.yaml`` (its fast-path settings, GPU fractions and queue options), with the fixtures' weights.

Measures: cold start to the first image with an empty compile cache and again with the saved one; the standard
plan (1024², 30 steps) and the maximum-quality preset (hires fix 768 → 1536, Real-ESRGAN, refiner, faces) over
HTTP including encoding; a 4-size batch job; throughput at concurrency 1, 4 and 16 (1024², 20 steps); and each
deployment's GPU memory (sampled from nvidia-smi while it runs) against its fraction; with ``--controlnet``, last,
the standard request with one canny ControlNet unit (its first request compiles one more UNet graph under the
shipped ``compile: full``, a minute or more, so it is opt-in). Prints one table, writes JSON. Needs CUDA and the
fixtures that ``tests/bench_gpu.py`` builds.
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import logging
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import yaml

logger = logging.getLogger("bench-gpu-serve")
ROOT = Path(__file__).resolve().parent.parent
PORT = 8000
URL = f"http://127.0.0.1:{PORT}"
STANDARD = {"prompt": "a lighthouse on a cliff at dusk", "seed": 7, "width": 1024, "height": 1024,
            "num_inference_steps": 30, "use_refiner": False}


class GpuSampler(threading.Thread):
    """Peak GPU memory per process (nvidia-smi), named by the Ray process title of its replica."""

    def __init__(self) -> None:
        super().__init__(daemon=True)
        self.peak_mib: dict[int, int] = {}
        self.names: dict[int, str] = {}
        self.stopped = threading.Event()

    def run(self) -> None:
        while not self.stopped.wait(0.5):
            try:
                out = subprocess.run(["nvidia-smi", "--query-compute-apps=pid,used_memory", "--format=csv,noheader,"
                                      "nounits"], capture_output=True, text=True, timeout=10).stdout
            except (OSError, subprocess.TimeoutExpired):
                continue
            for line in out.strip().splitlines():
                try:
                    pid, mib = (int(v) for v in line.split(","))
                except ValueError:  # "[N/A]" where the driver cannot see per-process use (a container)
                    continue
                self.peak_mib[pid] = max(self.peak_mib.get(pid, 0), mib)
                if pid not in self.names:  # from /proc: a slim image may lack ``ps``
                    try:
                        self.names[pid] = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
                    except OSError:  # gone already, or another PID namespace's
                        self.names[pid] = ""

    def by_deployment(self) -> dict[str, float]:
        peaks: dict[str, float] = {}
        for pid, mib in self.peak_mib.items():
            title = self.names.get(pid, "")
            name = next((d for d in ("SDXLBase", "SDXLRefiner", "Upscaler", "FaceRestorer", "FocalCropper",
                                     "SafetyChecker", "Captioner", "Ingress", "JobRunner") if d in title),
                        title[:40] or str(pid))
            peaks[name] = max(peaks.get(name, 0.0), mib / 1024)
        return peaks


def app_args(models: Path, fast: dict | None, controlnet: bool = False) -> tuple[dict, dict]:
    """serve_config.yaml's args and deployment options, pointed at the fixtures (with ``controlnet``, the base's
    ControlNets are the full-size canny one: deployments.factory --full --only controlnet)."""
    app = yaml.safe_load((ROOT / "serve_config.yaml").read_text())["applications"][0]
    args = app["args"]
    conv = models / "converted"
    args["base"].update(model={"source": str(models / "sdxl-base")}, ip_adapter=None, lora_dir=None)
    if controlnet:
        args["base"]["controlnets"] = {"canny": str(models / "controlnet-canny-sdxl")}
    args["refiner"].update(model={"source": str(models / "sdxl-refiner")})
    for kind in ("base", "refiner"):
        if fast and kind in fast:
            args[kind]["fast"] = {**args[kind].get("fast", {}), **fast[kind]}
    args["upscaler"]["models"] = [
        {"name": "R-ESRGAN 4x+", "path": str(conv / "RealESRGAN_x4plus.safetensors")},
        {"name": "R-ESRGAN 2x+", "path": str(conv / "RealESRGAN_x2plus.safetensors")},
    ]
    args["face_restorer"].update(model=str(conv / "codeformer.safetensors"),
                                 retinaface=str(conv / "detection_Resnet50_Final.safetensors"))
    # MediaPipe does not travel to the GPU machine; RetinaFace on the GPU does the focal crops there.
    args["focal_cropper"] = {**args.get("focal_cropper", {}),
                             "retinaface": str(conv / "detection_Resnet50_Final.safetensors")}
    # The full-size checker of the fixtures (deployments.factory --full --only safety-checker), when built.
    if (models / "safety-checker" / "model.safetensors").exists():
        args["safety_checker"] = {**args["safety_checker"], "model": str(models / "safety-checker")}
    else:
        args.pop("safety_checker", None)
    # The full-size BLIP of the fixtures (deployments.factory --full --only captioner), when built.
    if (models / "captioner" / "model.safetensors").exists():
        args["captioner"] = {**args["captioner"], "model": str(models / "captioner")}
    else:
        args.pop("captioner", None)
    options = {d.pop("name"): d for d in app["deployments"]}
    options["JobRunner"].pop("num_replicas", None)
    if "safety_checker" not in args:
        options.pop("SafetyChecker", None)
    if "captioner" not in args:
        options.pop("Captioner", None)
    return args, options


def fixtures(args: dict) -> list[str]:
    """Every weights path the app's args name."""
    return [args["base"]["model"]["source"], args["refiner"]["model"]["source"],
            *(m["path"] for m in args["upscaler"]["models"]), args["face_restorer"]["model"],
            args["face_restorer"]["retinaface"], *(args["base"].get("controlnets") or {}).values()]


def canny_unit() -> dict:
    """One canny unit of the native API (balanced, processor_res 512) on a photograph (skimage's astronaut)."""
    from PIL import Image
    from skimage import data

    png = io.BytesIO()
    Image.fromarray(data.astronaut()).save(png, format="PNG")
    return {"model": "canny", "image": base64.b64encode(png.getvalue()).decode(), "preprocessor": "canny"}


def deploy(args: dict, options: dict) -> float:
    from ray import serve

    from graphs.app import build_app

    started = time.perf_counter()
    serve.run(build_app({**args, "deployment_options": options}), name="imagegen", route_prefix="/")
    return time.perf_counter() - started


def first_image(client: httpx.Client) -> None:
    response = client.post("/generate", json=STANDARD)
    response.raise_for_status()


def latencies(client: httpx.Client, payload: dict, runs: int) -> list[float]:
    times = []
    for _ in range(runs):
        started = time.perf_counter()
        response = client.post("/generate", json=payload)
        response.raise_for_status()
        times.append(time.perf_counter() - started)
    return times


def throughput(concurrency: int, requests: int) -> dict:
    payload = {**STANDARD, "num_inference_steps": min(20, STANDARD["num_inference_steps"])}

    def one(i: int) -> float:
        with httpx.Client(base_url=URL, timeout=600) as c:
            started = time.perf_counter()
            c.post("/generate", json={**payload, "seed": i}).raise_for_status()
            return time.perf_counter() - started

    started = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        times = list(pool.map(one, range(requests)))
    wall = time.perf_counter() - started
    return {"concurrency": concurrency, "requests": requests, "images_per_s": requests / wall,
            "p50_s": statistics.median(times), "max_s": max(times)}


def batch_job(client: httpx.Client) -> float:
    started = time.perf_counter()
    job = client.post("/generate/batch-sizes", json={"prompt": "a lighthouse", "seed": 3, "sizes": [
        "thumbnail", "og", "sidebar", "avatar"], "steps": STANDARD["num_inference_steps"]}).json()
    job_id = job.get("job_id") or job.get("jobId")
    while True:
        state = client.get(f"/jobs/{job_id}").json()
        if state["status"] in ("completed", "failed", "cancelled"):
            if state["status"] != "completed":
                raise RuntimeError(f"batch job {state['status']}: {state.get('error')}")
            return time.perf_counter() - started
        time.sleep(0.05)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", type=Path, default=Path(os.environ.get(
        "FULLSIZE_MODELS", Path.home() / ".cache" / "imagegen" / "fullsize-models")))
    parser.add_argument("--out", type=Path, default=ROOT / "bench-gpu-serve.json")
    parser.add_argument("--fast", default="", help="JSON overrides of base/refiner fast settings")
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--budget", type=float, default=900, help="seconds; measurements after it are skipped")
    parser.add_argument("--shrink", action="store_true", help="a smoke run of this script on the toy-width "
                        "fixtures that `tests/bench_gpu.py --shrink` builds: 256², 2 steps, on any machine")
    parser.add_argument("--controlnet", action="store_true", help="configure the full-size canny ControlNet and "
                        "time the standard request with one unit, last (its first request compiles a UNet graph)")
    parser.add_argument("--cold", choices=("both", "saved"), default="both",
                        help="both: start once with an empty compile cache, then again with the saved one; saved: "
                             "one start on the cache already there (a short lease, after tests/bench_gpu.py)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # a line per poll would bury the rows
    missing = [path for path in fixtures(app_args(args.models, None, args.controlnet)[0]) if not Path(path).exists()]
    if missing:  # a machine given back between two calls keeps nothing: say so now, not after the 10 minutes
        logger.error("fixtures missing under %s (a fresh machine? run the stages phase first): %s", args.models,
                     ", ".join(missing))
        return 3
    import ray
    from ray import serve

    cache = Path(os.environ.setdefault("MODEL_CACHE_DIR", str(Path.home() / ".cache" / "imagegen" / "models")))
    if args.cold == "both":
        shutil.rmtree(cache / "compile", ignore_errors=True)
    cached = sum(1 for f in (cache / "compile").rglob("*") if f.is_file()) if (cache / "compile").exists() else 0
    # A job store of its own: a durable one would resume an earlier, interrupted run's jobs ahead of these.
    os.environ["JOBS_DATA_DIR"] = tempfile.mkdtemp(prefix="bench-gpu-jobs-")
    env = {k: os.environ[k] for k in ("MODEL_CACHE_DIR", "PYTHONPATH", "JOBS_DATA_DIR") if k in os.environ}
    env["RATE_LIMITS_ENABLED"] = "false"  # one client sends far more than a client's burst: measure, not limit
    if args.shrink:  # serve_config.yaml's shape asks for a GPU machine's cores; here they are logical
        STANDARD.update(width=256, height=256, num_inference_steps=2)
    ray.init(num_gpus=1, num_cpus=16 if args.shrink else None, include_dashboard=False,
             runtime_env={"env_vars": env}, log_to_driver=False)
    serve.start(http_options={"host": "127.0.0.1", "port": PORT})
    sampler = GpuSampler()
    sampler.start()
    report: dict = {"rows": []}
    rows = report["rows"]
    fast = json.loads(args.fast) if args.fast else {}
    if args.shrink:  # the warm-up at the served sizes and batches is minutes of toy-width work on a CPU
        fast = {kind: {"warmup_sizes": [[256, 256]], **fast.get(kind, {})} for kind in ("base", "refiner")}
    app, options = app_args(args.models, fast, args.controlnet)
    report["fast"] = {"base": app["base"].get("fast"), "refiner": app["refiner"].get("fast")}
    deadline = time.monotonic() + args.budget

    def measured(stage: str, run) -> None:
        """One row, skipped once the budget is spent; the JSON is rewritten after each, so a run cut short by
        the machine's limit still leaves what it measured."""
        if time.monotonic() > deadline:
            rows.append({"stage": stage, "skipped": "time budget spent"})
        else:
            try:
                rows.append({"stage": stage, **run()})
            except Exception as e:  # a failed measurement is a finding; the others still run
                logger.exception("%s failed", stage)
                rows.append({"stage": stage, "error": f"{type(e).__name__}: {e}"[:400]})
        logger.info("%s", rows[-1])
        args.out.write_text(json.dumps(report, indent=1, default=str))

    with httpx.Client(base_url=URL, timeout=600) as client:
        def cold() -> dict:
            started = time.perf_counter()
            deploy_s = deploy(app, options)
            first_image(client)
            return {"deploy_s": round(deploy_s, 1), "median_s": time.perf_counter() - started}

        if args.cold == "both":
            measured("cold start to first image, empty compile cache", cold)
            serve.delete("imagegen")
            measured("cold start to first image, saved compile cache", cold)
        else:
            measured(f"cold start to first image, the compile cache there ({cached} files)", cold)
        up = "error" not in rows[-1]
        if not up:  # every later row would wait out its timeout on a service that is not there
            deadline = float("-inf")

        def timed(payload: dict, runs: int) -> dict:
            times = latencies(client, payload, runs)
            return {"median_s": statistics.median(times), "max_s": max(times)}

        size, steps = STANDARD["width"], STANDARD["num_inference_steps"]
        measured(f"standard {size}² {steps} steps via HTTP (PNG)", lambda: timed(STANDARD, args.runs))
        # Random RetinaFace weights find faces everywhere, and CodeFormer on a CPU takes seconds per face.
        quality = {**STANDARD, "preset": "quality", "use_refiner": True} | (
            {"use_face_restoration": False} if args.shrink else {})
        measured(f"max quality: preset quality (hires fix 1536², R-ESRGAN, refiner{'' if args.shrink else ', faces'})",
                 lambda: timed(quality, max(2, args.runs // 2)))
        for concurrency in (1, 4, 16):
            def burst(concurrency: int = concurrency) -> dict:
                result = throughput(concurrency, max(4, concurrency * 2))
                return {"median_s": result["p50_s"], "images_per_s": result["images_per_s"]}

            measured(f"throughput {size}² {min(20, steps)} steps, concurrency {concurrency}", burst)

        def batches() -> dict:
            batch_job(client)
            return {"median_s": statistics.median(batch_job(client) for _ in range(2))}

        measured("4-size batch job (3 SDXL bases + crops)", batches)
        if args.controlnet:
            def controlled() -> dict:
                payload = {**STANDARD, "controlnets": [canny_unit()]}
                first = latencies(client, payload, 1)[0]  # under compile: full, one more UNet graph compiles here
                return {"first_s": round(first, 2), **timed(payload, max(2, args.runs // 2))}

            measured(f"standard {size}² {steps} steps + 1 canny ControlNet unit via HTTP (after its first request)",
                     controlled)
        try:  # each replica's own PyTorch peak, which needs no per-process figures from nvidia-smi
            if not up:
                raise httpx.TransportError("the service never came up")
            described = client.get("/models", timeout=60).json()
            refiner = next((m for m in described["models"] if m["type"] == "refiner"), {})
            report["torch_memory"] = {name: {k: v for k, v in part.items() if k.startswith("gpu_memory")}
                                      for name, part in (("SDXLBase", described["base"]), ("SDXLRefiner", refiner),
                                                         ("FaceRestorer", described["face_restorer"]))}
        except (httpx.HTTPError, KeyError, ValueError) as e:
            report["torch_memory"] = {"error": f"{type(e).__name__}: {e}"}
    sampler.stopped.set()
    try:
        total_gib = int(subprocess.run(["nvidia-smi", "--query-gpu=memory.total", "--format=csv,noheader,nounits"],
                                       capture_output=True, text=True).stdout.split()[0]) / 1024
    except (OSError, IndexError, ValueError):
        total_gib = 0.0  # no NVIDIA GPU here (a --shrink smoke run): no memory rows either
    fractions = {name: o.get("ray_actor_options", {}).get("num_gpus", 0) for name, o in options.items()}
    report["memory"] = {name: {"peak_gib": round(gib, 1), "fraction": fractions.get(name),
                               "budget_gib": round(fractions.get(name, 0) * total_gib, 1)}
                        for name, gib in sampler.by_deployment().items()}
    args.out.write_text(json.dumps(report, indent=1, default=str))
    lines = [f"{'through Serve':<72} {'p50 s':>8} {'img/s':>6}"]
    lines += [f"{r['stage'][:72]:<72} {r['median_s']:>8.2f} {r.get('images_per_s', 0):>6.2f}"
              + (f"  first {r['first_s']:.1f} s" if "first_s" in r else "") if "median_s" in r
              else f"{r['stage'][:72]:<72} {r.get('error') or r.get('skipped')}" for r in rows]
    lines += [f"GPU memory {n:<14} peak {m['peak_gib']:>6.1f} GiB, fraction {m['fraction']} = {m['budget_gib']} GiB"
              for n, m in report["memory"].items()]
    lines += [f"PyTorch peak {n:<12} {m}" for n, m in report.get("torch_memory", {}).items() if m]
    sys.stdout.write("\n".join(lines) + "\n")
    serve.shutdown()
    ray.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
