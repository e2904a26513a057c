"""Benchmarks on a local Ray cluster (tiny models, CPU), run with ``make bench``; they print, asserting nothing.

- Orchestration overhead: p50 of ``POST /generate`` against the same work in-process.
- Multi-size batch: one ``/generate/batch-sizes`` job for four sizes against four independent text2img jobs of
  the same sizes, all submitted at once.
"""

from __future__ import annotations

import logging
import os
import statistics
import sys
import time
from pathlib import Path

import httpx

from graphs.jobs.sizes import SizeTable
from tests import cluster

RUNS = int(os.environ.get("BENCH_RUNS", "15"))
BATCH_SIZES = {"thumbnail": (640, 360), "og": (1200, 632), "sidebar": (304, 600), "avatar": (512, 512)}
BATCH_STEPS = 4
SIZES = SizeTable.load(cluster.ROOT / "configs" / "sizes.yaml")
PAYLOAD = {"prompt": "red apple", "seed": 42, "width": 256, "height": 256, "num_inference_steps": 8}


def in_process(tiny: Path) -> list[float]:
    from deployments.sdxl_base import BaseGenerator
    from deployments.sdxl_refiner import Refiner
    from deployments.support.config import SDXLBaseConfig, SDXLRefinerConfig
    from deployments.support.generation import GenerationRequest, RefineRequest

    base = BaseGenerator(SDXLBaseConfig(model={"source": str(tiny / "sdxl-base")}))
    refiner = Refiner(SDXLRefinerConfig(model={"source": str(tiny / "sdxl-refiner")}))
    times = []
    for _ in range(RUNS + 2):
        started = time.perf_counter()
        handoff = base.generate(GenerationRequest(prompt=PAYLOAD["prompt"], seed=42, width=256, height=256, steps=8,
                                                  denoising_end=0.8))
        image = refiner.refine_latents(RefineRequest(prompt=PAYLOAD["prompt"], steps=8, denoising_start=0.8),
                                       handoff).image
        image.save(open(os.devnull, "wb"), format="PNG")  # noqa: SIM115 - the encode is part of the work
        times.append(time.perf_counter() - started)
    return times[2:]  # first calls warm caches


def wait_all(client: httpx.Client, job_ids: list[str]) -> None:
    pending = set(job_ids)
    while pending:
        for job_id in list(pending):
            job = client.get(f"/jobs/{job_id}").json()
            if job["status"] in ("completed", "failed", "cancelled"):
                assert job["status"] == "completed", job["error"]
                pending.discard(job_id)
        time.sleep(0.1)


def independent(client: httpx.Client, sizes: list[tuple[int, int]]) -> float:
    started = time.perf_counter()
    ids = [client.post("/generate/text2img", json={"prompt": "a portrait", "width": w, "height": h, "seed": 7,
                                                   "steps": BATCH_STEPS}).json()["id"] for w, h in sizes]
    wait_all(client, ids)
    return time.perf_counter() - started


def batch_against_independent(client: httpx.Client) -> tuple[float, float, float]:
    """Wall time of one 4-size batch job; of 4 text2img jobs at the target sizes, all submitted together; and of 4
    at the SDXL bucket of each size's aspect (what a client must render to crop each size at native quality)."""
    started = time.perf_counter()
    job = client.post("/generate/batch-sizes", json={"prompt": "a portrait", "sizes": list(BATCH_SIZES),
                                                     "seed": 7, "steps": BATCH_STEPS}).json()
    wait_all(client, [job["job_id"]])
    batch = time.perf_counter() - started
    buckets = [SIZES.bases[SIZES.aspect(w, h)] for w, h in BATCH_SIZES.values()]
    return batch, independent(client, list(BATCH_SIZES.values())), independent(client, buckets)


def over_http(tiny: Path) -> tuple[list[float], list[tuple[float, float, float]]]:
    base_url = cluster.start({"TINY_MODELS": str(tiny)})
    times = []
    with httpx.Client(base_url=base_url, timeout=120) as client:
        for _ in range(RUNS + 2):
            started = time.perf_counter()
            client.post("/generate", json=PAYLOAD).raise_for_status()
            times.append(time.perf_counter() - started)
        batches = [batch_against_independent(client) for _ in range(3)]
    cluster.stop()
    return times[2:], batches[1:]


def main() -> int:
    logging.basicConfig(level=logging.WARNING)
    tiny = Path(os.environ["TINY_MODELS"])
    direct = statistics.median(in_process(tiny))
    http_times, batches = over_http(tiny)
    served = statistics.median(http_times)
    print(f"p50 in-process (base -> refiner latents -> PNG): {direct * 1000:.0f} ms")  # noqa: T201
    print(f"p50 POST /generate through Serve (same work):    {served * 1000:.0f} ms")  # noqa: T201
    print(f"orchestration overhead: {(served - direct) * 1000:.0f} ms ({served / direct:.2f}x)")  # noqa: T201
    batch, at_target, at_bucket = (statistics.median(b[i] for b in batches) for i in range(3))
    print(f"4-size batch {list(BATCH_SIZES)}, {BATCH_STEPS} steps: {batch:.1f} s from 3 bases")  # noqa: T201
    print(f"4 independent jobs at the target sizes: {at_target:.1f} s (batch/independent {batch / at_target:.2f}x)")  # noqa: T201
    print(f"4 independent jobs at each size's SDXL bucket: {at_bucket:.1f} s "  # noqa: T201
          f"(batch/independent {batch / at_bucket:.2f}x)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
