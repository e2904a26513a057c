"""Orchestration overhead: p50 of ``POST /generate`` on a local Ray cluster against the same work in-process.

Run with ``make bench`` (tiny models, CPU). Prints the figures; asserts nothing.
"""

from __future__ import annotations

import logging
import os
import statistics
import sys
import time
from pathlib import Path

import httpx
import yaml

ROOT = Path(__file__).resolve().parent.parent
RUNS = int(os.environ.get("BENCH_RUNS", "15"))
PAYLOAD = {"prompt": "red apple", "seed": 42, "width": 256, "height": 256, "num_inference_steps": 8}


def in_process(tiny: Path) -> list[float]:
    from deployments.config import SDXLBaseConfig, SDXLRefinerConfig
    from deployments.generation import GenerationRequest
    from deployments.sdxl_base import BaseGenerator
    from deployments.sdxl_refiner import Refiner, RefineRequest

    base = BaseGenerator(SDXLBaseConfig(model={"source": str(tiny / "sdxl-base")}))
    refiner = Refiner(SDXLRefinerConfig(model={"source": str(tiny / "sdxl-refiner")}))
    times = []
    for _ in range(RUNS + 2):
        started = time.perf_counter()
        handoff = base.generate(GenerationRequest(prompt=PAYLOAD["prompt"], seed=42, width=256, height=256, steps=8,
                                                  denoising_end=0.8))
        image = refiner.refine(RefineRequest(prompt=PAYLOAD["prompt"], seeds=handoff.seeds, steps=8,
                                             latents=handoff.latents, denoising_start=0.8))[0]
        image.save(open(os.devnull, "wb"), format="PNG")  # noqa: SIM115 - the encode is part of the work
        times.append(time.perf_counter() - started)
    return times[2:]  # first calls warm caches


def over_http(tiny: Path) -> list[float]:
    import ray
    from ray import serve

    from graphs.app import build_app

    config = yaml.safe_load((ROOT / "configs" / "cpu.yaml").read_text())["applications"][0]
    ray.init(num_cpus=4, num_gpus=1, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"TINY_MODELS": str(tiny)}})
    serve.start(http_options={"host": "127.0.0.1", "port": 8765})
    serve.run(build_app(config["args"]), name="imagegen", route_prefix="/")
    times = []
    with httpx.Client(base_url="http://127.0.0.1:8765", timeout=120) as client:
        for _ in range(RUNS + 2):
            started = time.perf_counter()
            client.post("/generate", json=PAYLOAD).raise_for_status()
            times.append(time.perf_counter() - started)
    serve.shutdown()
    ray.shutdown()
    return times[2:]


def main() -> int:
    logging.basicConfig(level=logging.WARNING)
    tiny = Path(os.environ["TINY_MODELS"])
    direct = statistics.median(in_process(tiny))
    served = statistics.median(over_http(tiny))
    print(f"p50 in-process (base -> refiner latents -> PNG): {direct * 1000:.0f} ms")  # noqa: T201
    print(f"p50 POST /generate through Serve (same work):    {served * 1000:.0f} ms")  # noqa: T201
    print(f"orchestration overhead: {(served - direct) * 1000:.0f} ms ({served / direct:.2f}x)")  # noqa: T201
    return 0


if __name__ == "__main__":
    sys.exit(main())
