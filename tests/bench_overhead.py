"""``make bench``: where a request's milliseconds go, on a local Ray cluster serving configs/cpu.yaml's application
(tiny models, CPU). One run prints one Markdown table and writes the numbers as JSON (``--out``); it asserts
nothing. The measures are issue 10's:

- Orchestration overhead: p50 and p99 of ``POST /generate`` minus the same stage calls made in-process on the
  model classes, for the standard plan at 64² (1 step) and 256² (8 steps) and the hires-fix plan 768² → 1536²;
  and of A1111's hires fix with a pixel upscaler for a batch of two (256² → 512²).
  Served and in-process runs alternate, so a machine that gets busier mid-run slows both sides alike.
- Per-hop breakdown: the edge (client time minus the time the ingress reports), the rest inside the ingress, a
  no-op through proxy and ingress (``GET /health``), one ingress → stage handle call (``GET /models`` makes five),
  the batch wait of each diffusion stage, a 1536² image between processes, and PNG encoding at levels 1 and 6.
- Ingress (and proxy) CPU time per 1536² answer, from the replica process's CPU counters, less what it spends
  idle over the same time (measured while the in-process side runs).
- Throughput: 8 concurrent requests against the same 8 one after another, compatible and mutually incompatible
  (different step counts); then the compatible set again with a batch wait set live through ``user_config``.
- Latency of mixed requests from 8 client threads, and the memory of every replica process: its own pages
  (USS) beside its resident set, which also counts the object store's shared pages it has read.

The in-process side builds its models from the same config (IP-Adapter and LoRAs included, as the base replica
loads them) and runs torch with the replicas' thread count (Ray's ``OMP_NUM_THREADS`` for a fractional-CPU
actor), so both sides do the same arithmetic; the bench process takes the replicas' niceness, so that a busy
machine slows both sides alike. With one step the standard plan's base runs no denoising step (the Euler
"leading" schedule puts the lone timestep at 1, past the 0.8 hand-off): it prepares latents, and the refiner
runs the step and decodes. The in-process side makes the same two calls; the JSON records the steps each ran.
The multi-size batch of earlier versions is gone: it measured the job queue, not the serving path.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import queue
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

import httpx
import numpy as np
import yaml
from PIL import Image

from tests import cluster

logger = logging.getLogger("bench")
TIMEOUT = 600.0
PROMPT = "red apple on a wooden table"
SMALL = {"prompt": PROMPT, "width": 64, "height": 64, "num_inference_steps": 1}
MEDIUM = {"prompt": PROMPT, "width": 256, "height": 256, "num_inference_steps": 8}
HIRES = {"prompt": PROMPT, "width": 768, "height": 768, "num_inference_steps": 4, "hires_fix": True}
# A1111's hires fix with a pixel upscaler, for a batch of two: base -> upscaler -> base img2img over both images.
A1111_HIRES = {"prompt": PROMPT, "width": 256, "height": 256, "steps": 4, "batch_size": 2, "enable_hr": True,
               "hr_scale": 2, "hr_upscaler": "R-ESRGAN 4x+", "denoising_strength": 0.5, "hr_second_pass_steps": 4}
MIXED = [SMALL, {**MEDIUM, "use_refiner": False}, MEDIUM,
         {"prompt": PROMPT, "width": 128, "height": 128, "num_inference_steps": 4, "use_refiner": False}]
CLIENTS = 8
PREFIX = "ServeReplica:imagegen:"


@dataclass(frozen=True)
class Runs:
    small: int  # standard 64², 1 step
    medium: int  # standard 256², 8 steps
    hires: int
    hops: int  # /health, /models and handle calls
    transfer: int
    encode: int
    mixed: int


FULL = Runs(small=50, medium=30, hires=8, hops=100, transfer=10, encode=5, mixed=32)
QUICK = Runs(small=5, medium=3, hires=2, hops=20, transfer=3, encode=1, mixed=16)


@dataclass
class Row:
    measure: str
    value: str = ""  # the p50 where the row is a latency
    p99: str = ""
    detail: str = ""
    goal: str = ""


def ms(seconds: float) -> str:
    return f"{seconds * 1000:.1f} ms"


def p50(values: list[float]) -> float:
    return float(np.percentile(values, 50))


def p99(values: list[float]) -> float:
    return float(np.percentile(values, 99))


# --- the in-process side ---------------------------------------------------------------------------------------

class InProcess:
    """The plans' stage calls (graphs/plans.py) made directly on the model classes, one after another, with the
    final PNG encode; each call returns its stages' times."""

    def __init__(self, args) -> None:
        from deployments.sdxl_base import BaseGenerator
        from deployments.sdxl_refiner import Refiner
        from deployments.upscaler import ImageUpscaler

        self.base, self.refiner = BaseGenerator(args.base), Refiner(args.refiner)
        self.upscaler, self.hires_upscaler = ImageUpscaler(args.upscaler), args.hires_upscaler
        self.steps = {"base": 0, "refiner": 0}  # denoising steps each stage ran (see ``count``)

    def _requests(self, body: dict, **mode):
        from deployments.support.generation import GenerationRequest, RefineRequest

        request = GenerationRequest(prompt=body["prompt"], seed=body["seed"], width=body["width"],
                                    height=body["height"], steps=body["num_inference_steps"])
        return request, RefineRequest(prompt=request.prompt, steps=request.steps,
                                      guidance_scale=request.guidance_scale, **mode)

    def count(self, stage: str) -> Callable[[int, int], None]:
        self.steps[stage] = 0

        def seen(step: int, _total: int) -> None:
            self.steps[stage] = max(self.steps[stage], step)

        return seen

    def standard(self, body: dict) -> dict[str, float]:
        from deployments.support.generation import Encoding
        from graphs.plans import ENSEMBLE_SPLIT

        request, refine = self._requests(body, denoising_start=ENSEMBLE_SPLIT)
        laps = Laps()
        handoff = self.base.generate(request.model_copy(update={"denoising_end": ENSEMBLE_SPLIT}),
                                     on_progress=self.count("base"))
        laps("base")
        result = self.refiner.refine_latents(refine, handoff, on_progress=self.count("refiner"))
        laps("refiner")
        result.encode(Encoding())
        laps("encode")
        return laps.times

    def a1111_hires(self, body: dict) -> dict[str, float]:
        from deployments.sdxl_base import passes_over
        from deployments.support.generation import BatchItem, Encoding, GenerationRequest

        request = GenerationRequest(prompt=body["prompt"], seed=body["seed"], width=body["width"],
                                    height=body["height"], steps=body["steps"], batch_size=body["batch_size"])
        laps = Laps()
        first = self.base.generate(request, on_progress=self.count("base"))
        laps("base")
        upscaled = self.upscaler.upscale(first, body["hr_upscaler"], body["hr_scale"])
        laps("upscaler")
        again = request.model_copy(update={"strength": body["denoising_strength"],
                                           "steps": body["hr_second_pass_steps"]})
        items = [BatchItem(p, "hires") for p in passes_over(again, upscaled)]
        result = upscaled.joined(self.base.generate_batch(items))
        laps("base img2img")
        result.encode(Encoding(parameters=["infotext"] * len(result.images)))
        laps("encode")
        return laps.times

    def hires_fix(self, body: dict) -> dict[str, float]:
        from deployments.support.generation import Encoding
        from graphs.plans import HIRES_BASE, HIRES_STRENGTH

        request, refine = self._requests(body, strength=HIRES_STRENGTH)
        laps = Laps()
        base = self.base.generate(request.model_copy(update={"width": HIRES_BASE, "height": HIRES_BASE}),
                                  on_progress=self.count("base"))
        laps("base")
        upscaled = self.upscaler.upscale(base, self.hires_upscaler, 2.0)
        laps("upscaler")
        result = self.refiner.refine_images(refine, upscaled, on_progress=self.count("refiner"))
        laps("refiner")
        result.encode(Encoding())
        laps("encode")
        return laps.times


class Laps:
    def __init__(self) -> None:
        self.times: dict[str, float] = {}
        self._last = time.perf_counter()

    def __call__(self, stage: str) -> None:
        now = time.perf_counter()
        self.times[stage], self._last = now - self._last, now


# --- the served side --------------------------------------------------------------------------------------------

def post(client: httpx.Client, body: dict) -> tuple[float, float]:
    """Client seconds of one request (``POST /generate``, or A1111's txt2img for its body), and the seconds the
    ingress reports spending on it (``/generate`` alone reports them: else the client's)."""
    started = time.perf_counter()
    response = client.post("/sdapi/v1/txt2img" if "enable_hr" in body else "/generate", json=body)
    elapsed = time.perf_counter() - started
    response.raise_for_status()
    return elapsed, response.json().get("generation_time_seconds", elapsed)


def replica_torch_threads(num_cpus: float) -> int:
    """Torch's thread count in a Ray worker given ``num_cpus``, as the base replica is (Ray sets OMP_NUM_THREADS
    from the CPUs it assigns, at run time, where the environment leaves it unset)."""
    import ray

    @ray.remote(num_cpus=num_cpus)
    def threads() -> int:
        import torch

        return torch.get_num_threads()

    return ray.get(threads.remote())


def replica_pids() -> dict[str, int]:
    """The pid of every live Serve actor of this cluster by name (replicas by deployment, the proxy, the
    controller). From the GCS actor table: ``ray.util.state`` needs the dashboard, which the cluster lacks."""
    from ray._private import state

    pids: dict[str, int] = {}
    for actor in state.actors(actor_state_name="ALIVE").values():
        name = actor["ActorClassName"]
        if name.startswith(PREFIX) or name in ("ProxyActor", "ServeController"):
            name = name.removeprefix(PREFIX)
            key = name if name not in pids else f"{name} #{sum(k.startswith(name) for k in pids) + 1}"
            pids[key] = actor["Pid"]
    return pids


class CpuMeter:
    """CPU seconds (user + system) that some processes spend while the service answers (``busy``) and while it
    has nothing to do (``idle``: health checks, metrics pushes), so that an answer costs its busy time less the
    idle rate over the same wall time. Linux counts CPU time in 10 ms ticks, so only long windows are precise."""

    def __init__(self, pids: dict[str, int]) -> None:
        import psutil

        self.processes = {name: psutil.Process(pid) for name, pid in pids.items()}
        self.cpu = {kind: dict.fromkeys(pids, 0.0) for kind in ("busy", "idle")}
        self.wall = {"busy": 0.0, "idle": 0.0}
        self.answers = 0

    def _read(self) -> dict[str, float]:
        return {name: sum(p.cpu_times()[:2]) for name, p in self.processes.items()}

    @contextlib.contextmanager
    def window(self, kind: str) -> Iterator[None]:
        before, started = self._read(), time.perf_counter()
        yield
        self.wall[kind] += time.perf_counter() - started
        self.answers += kind == "busy"
        for name, seconds in self._read().items():
            self.cpu[kind][name] += seconds - before[name]

    def idle_rate(self, name: str) -> float:
        return self.cpu["idle"][name] / self.wall["idle"]

    def per_answer(self, name: str) -> tuple[float, float]:
        """CPU seconds per answer: as counted, and less the idle rate."""
        busy = self.cpu["busy"][name]
        return busy / self.answers, (busy - self.idle_rate(name) * self.wall["busy"]) / self.answers


def measured(meter: CpuMeter | None, kind: str) -> contextlib.AbstractContextManager:
    return meter.window(kind) if meter else contextlib.nullcontext()


@dataclass
class SideBySide:
    name: str
    served: list[float] = field(default_factory=list)
    inside: list[float] = field(default_factory=list)  # what the ingress reports
    local: list[dict[str, float]] = field(default_factory=list)

    @property
    def local_totals(self) -> list[float]:
        return [sum(stages.values()) for stages in self.local]


def side_by_side(name: str, client: httpx.Client, run_local: Callable[[dict], dict[str, float]], body: dict,
                 runs: int, meter: CpuMeter | None = None) -> SideBySide:
    """Alternate the served request and its in-process equivalent, after one warm-up of each. A meter counts the
    served requests as busy time and the in-process runs, while the service waits, as idle time."""
    run_local({**body, "seed": 0})
    post(client, {**body, "seed": 0})
    result = SideBySide(name)
    for seed in range(1, runs + 1):
        with measured(meter, "idle"):
            result.local.append(run_local({**body, "seed": seed}))
        with measured(meter, "busy"):
            served, inside = post(client, {**body, "seed": seed})
        result.served.append(served)
        result.inside.append(inside)
    logger.info("%s: served p50 %.3f s, in-process p50 %.3f s", name, p50(result.served), p50(result.local_totals))
    return result


def overhead_rows(r: SideBySide, steps: dict[str, int], goal: str = "") -> list[Row]:
    local = r.local_totals
    stages = ", ".join(f"{s} {ms(p50([t[s] for t in r.local]))}" for s in r.local[0])
    edge = [s - i for s, i in zip(r.served, r.inside, strict=True)]
    total = Row(f"overhead, {r.name}", ms(p50(r.served) - p50(local)), ms(p99(r.served) - p99(local)),
                f"Serve {ms(p50(r.served))} vs in-process {ms(p50(local))} ({p50(r.served) / p50(local):.2f}x), "
                f"{len(local)} runs", goal)
    if r.inside == r.served:  # the answer reports no ingress time (A1111): no split at the edge
        total.detail += f"; in-process {stages}"
        return [total]
    return [
        total,
        Row("↳ edge: proxy, HTTP, body, base64 + JSON (client − ingress time)", ms(p50(edge)), ms(p99(edge))),
        Row("↳ inside the ingress: hops, transfers, batch waits (ingress time − in-process)",
            ms(p50(r.inside) - p50(local)), ms(p99(r.inside) - p99(local)),
            f"in-process {stages}; denoising steps base {steps['base']}, refiner {steps['refiner']}"),
    ]


def timings(call: Callable[[], object], runs: int) -> list[float]:
    call()  # warm-up
    times = []
    for _ in range(runs):
        started = time.perf_counter()
        call()
        times.append(time.perf_counter() - started)
    return times


def photograph() -> Image.Image:
    from skimage import data

    return Image.fromarray(data.astronaut()).resize((1536, 1536), Image.Resampling.LANCZOS)


def hop_rows(client: httpx.Client, runs: Runs, report: dict) -> list[Row]:
    """Each hop timed on its own, from outside the service."""
    from ray import serve

    from deployments.support.generation import StageResult
    from deployments.support.imaging import encode

    health = timings(lambda: client.get("/health").raise_for_status(), runs.hops)
    models = timings(lambda: client.get("/models").raise_for_status(), runs.hops)
    base = serve.get_deployment_handle("SDXLBase", app_name="imagegen")
    refiner = serve.get_deployment_handle("SDXLRefiner", app_name="imagegen")
    upscaler = serve.get_deployment_handle("Upscaler", app_name="imagegen")
    describe = timings(lambda: base.describe.remote().result(), runs.hops)
    waits = [h.describe.remote().result()["batching"]["batch_wait_timeout_s"] for h in (base, refiner)]
    big = photograph()
    small = big.resize((64, 64))
    through = {size: timings(lambda i=image: upscaler.upscale.remote(StageResult(images=[i]), "None", 1.0).result(),
                             runs.transfer) for size, image in ((1536, big), (64, small))}
    copy = p50(timings(big.copy, runs.transfer))
    one_way = (p50(through[1536]) - p50(through[64]) - copy) / 2
    png = {level: timings(lambda lv=level: encode(big, "png", png_level=lv), runs.encode) for level in (1, 6)}
    sizes = {level: len(encode(big, "png", png_level=level)) / 1e6 for level in (1, 6)}
    handle_hop = (p50(models) - p50(health)) / 5  # four describes and the board's holdings
    report["hops"] = {"health_s": health, "models_s": models, "describe_s": describe, "batch_wait_s": waits,
                      "upscale_none_s": {str(k): v for k, v in through.items()}, "copy_1536_s": copy,
                      "image_one_way_s": one_way, "png_s": png, "png_mb": sizes, "handle_hop_s": handle_hop}
    return [
        Row("hop: GET /health (proxy + ingress, no stage)", ms(p50(health)), ms(p99(health))),
        Row("hop: ingress → stage handle call", ms(handle_hop), "",
            f"(GET /models {ms(p50(models))} − /health) / 5 handle calls"),
        Row("hop: driver → SDXLBase.describe handle round trip", ms(p50(describe)), ms(p99(describe))),
        Row("hop: batch wait of a lone request", ms(sum(waits)), "",
            f"SDXLBase {ms(waits[0])} + SDXLRefiner {ms(waits[1])} (batching.batch_wait_timeout_s)"),
        Row("hop: 1536² image one way between processes", ms(one_way), "",
            f"(1536² − 64² round trip through Upscaler 'None', less a {ms(copy)} copy) / 2"),
        *(Row(f"encode: PNG level {level}, 1536² photograph", ms(p50(png[level])), "", f"{sizes[level]:.2f} MB")
          for level in (1, 6)),
    ]


def fire(base_url: str, bodies: list[dict], clients: int) -> tuple[float, list[float]]:
    """Send ``bodies`` from ``clients`` threads, each on its own connection, all starting at once: the wall time
    and every request's latency."""
    pending: queue.SimpleQueue[dict] = queue.SimpleQueue()
    for body in bodies:
        pending.put(body)
    latencies: list[float] = []
    start = threading.Barrier(clients + 1)

    def client_loop() -> None:
        with httpx.Client(base_url=base_url, timeout=TIMEOUT) as client:
            start.wait()
            while True:
                try:
                    body = pending.get_nowait()
                except queue.Empty:
                    return
                latencies.append(post(client, body)[0])

    threads = [threading.Thread(target=client_loop) for _ in range(clients)]
    for thread in threads:
        thread.start()
    start.wait()
    started = time.perf_counter()
    for thread in threads:
        thread.join()
    return time.perf_counter() - started, latencies


RETUNED_WAIT_S = 0.05  # the batch wait the retuned run sets through user_config, on both diffusion stages


def throughput_rows(base_url: str, report: dict) -> list[Row]:
    """The three sets on the configuration as deployed (a lone request never waits), then the compatible set
    again after ``user_config`` gives both diffusion stages a batch wait, a live update that restarts nothing:
    8 requests that arrive over a few tens of milliseconds then share one batch."""
    compatible = [{**MEDIUM, "use_refiner": False, "seed": i} for i in range(8)]
    sets = [
        ("8 compatible 256², 8 steps, no refiner", compatible, "≥ 2x"),
        ("8 compatible 256², 8 steps, refiner", [{**MEDIUM, "seed": i} for i in range(8)], ""),
        ("8 incompatible 256², 5-12 steps, no refiner",
         [{**MEDIUM, "use_refiner": False, "num_inference_steps": 5 + i, "seed": i} for i in range(8)], "≥ 1x"),
    ]
    from ray import serve

    base = serve.get_deployment_handle("SDXLBase", app_name="imagegen")

    def batches() -> int:
        return base.describe.remote().result()["batching"]["batches"]

    def measure(name: str, bodies: list[dict], goal: str) -> Row:
        serial, _ = fire(base_url, bodies, 1)
        before = batches()
        concurrent, _ = fire(base_url, bodies, len(bodies))
        calls = batches() - before
        report["throughput"][name] = {"serial_s": serial, "concurrent_s": concurrent, "base_batches": calls}
        row = Row(f"throughput: {name}", f"{serial / concurrent:.2f}x", "",
                  f"concurrent {len(bodies) / concurrent:.2f} img/s in {calls} SDXLBase batches, "
                  f"serial {len(bodies) / serial:.2f} img/s", goal)
        logger.info("%s", row)
        return row

    report["throughput"] = {}
    rows = [measure(name, bodies, goal) for name, bodies, goal in sets]
    def wait(seconds: float) -> None:
        retuned = {"user_config": {"batch_wait_timeout_s": seconds}}
        cluster.deploy({"SDXLBase": retuned, "SDXLRefiner": retuned})

    wait(RETUNED_WAIT_S)
    try:
        rows.append(measure(f"{sets[0][0]}, batch wait {ms(RETUNED_WAIT_S)}", compatible, "≥ 2x"))
    finally:
        wait(0.0)  # cpu.yaml's: the mixed requests that follow run as deployed
    return rows


def mixed_row(base_url: str, count: int, report: dict) -> Row:
    bodies = [{**MIXED[i % len(MIXED)], "seed": i} for i in range(count)]
    wall, latencies = fire(base_url, bodies, CLIENTS)
    report["mixed"] = {"wall_s": wall, "latencies_s": latencies}
    return Row(f"latency: {count} mixed requests from {CLIENTS} clients", ms(p50(latencies)), ms(p99(latencies)),
               f"64²/1, 128²/4, 256²/8 ± refiner; {count / wall:.2f} img/s")


def cpu_rows(meter: CpuMeter, report: dict) -> list[Row]:
    rows, report["cpu_per_answer"] = [], {"answers": meter.answers, "wall_s": meter.wall, "cpu_s": meter.cpu}
    for name, label, goal in (("Ingress", "Ingress", "≤ 50 ms"), ("ProxyActor", "proxy", "")):
        raw, net = meter.per_answer(name)
        report["cpu_per_answer"][name] = {"raw_s": raw, "net_s": net, "idle_cpu_per_s": meter.idle_rate(name)}
        rows.append(Row(f"{label} CPU per 1536² answer, net of idle", ms(net), "",
                        f"{ms(raw)} counted, idle {ms(meter.idle_rate(name))}/s over {meter.wall['idle']:.0f} s; "
                        f"{meter.answers} hires-fix answers", goal))
    return rows


def memory_rows(pids: dict[str, int], report: dict) -> list[Row]:
    """Resident memory split into the process's own pages (USS) and the shared ones it has touched: those are
    mostly Ray's object store, mapped into every process that reads a large result, and counted once per machine
    however many processes map them. The goal is the ingress's own memory."""
    import psutil

    mb = 1e6
    full = {name: psutil.Process(pid).memory_full_info() for name, pid in pids.items()}
    report["rss_mb"] = {name: m.rss / mb for name, m in full.items()}
    report["uss_mb"] = {name: m.uss / mb for name, m in full.items()}
    report["shared_mb"] = {name: m.shared / mb for name, m in full.items()}
    return [Row(f"memory: {name}", f"{m.uss / mb:.0f} MB own", "",
                f"RSS {m.rss / mb:.0f} MB, of which {m.shared / mb:.0f} MB shared (object store, libraries); "
                f"pid {pids[name]}", "≤ 300 MB" if name == "Ingress" else "")
            for name, m in sorted(full.items())]


def table(rows: list[Row]) -> str:
    lines = ["| measure | p50 / value | p99 | detail | goal |", "|---|---:|---:|---|---|"]
    lines += [f"| {r.measure} | {r.value} | {r.p99} | {r.detail} | {r.goal} |" for r in rows]
    return "\n".join(lines) + "\n"


def run(tiny: Path, runs: Runs, report: dict) -> list[Row]:
    import psutil
    import torch

    from graphs.app import AppArgs

    app = yaml.safe_load((cluster.ROOT / "configs" / "cpu.yaml").read_text())["applications"][0]
    base_url = cluster.start({"TINY_MODELS": str(tiny), "RATE_LIMITS_ENABLED": "false"})  # measure, not limit
    try:
        pids = replica_pids()
        # Ray runs its workers at a lower priority (niceness 15): on a busy machine the in-process side and the
        # client would otherwise get the CPU first.
        psutil.Process().nice(psutil.Process(pids["SDXLBase"]).nice())
        report["niceness"] = psutil.Process().nice()
        base_cpus = next(d for d in app["deployments"] if d["name"] == "SDXLBase")["ray_actor_options"]["num_cpus"]
        torch.set_num_threads(replica_torch_threads(base_cpus))
        report["in_process_torch_threads"] = torch.get_num_threads()
        local = InProcess(AppArgs.model_validate(app["args"]))
        meter = CpuMeter({name: pids[name] for name in ("Ingress", "ProxyActor")})
        rows: list[Row] = []
        with httpx.Client(base_url=base_url, timeout=TIMEOUT) as client:
            plans = [("standard 64², 1 step", local.standard, SMALL, runs.small, None, ""),
                     ("standard 256², 8 steps", local.standard, MEDIUM, runs.medium, None, "≤ 5 ms p50"),
                     ("hires fix 768² → 1536², 4 steps", local.hires_fix, HIRES, runs.hires, meter, ""),
                     ("A1111 pixel hires fix 256² → 512², batch of 2, 4 + 4 steps", local.a1111_hires, A1111_HIRES,
                      runs.hires, None, "")]
            report["side_by_side"] = {}
            for name, run_local, body, count, cpu, goal in plans:
                result = side_by_side(name, client, run_local, body, count, cpu)
                report["side_by_side"][name] = asdict(result)
                report["side_by_side"][name]["denoising_steps"] = dict(local.steps)
                rows += overhead_rows(result, local.steps, goal)
            rows += hop_rows(client, runs, report)
            rows += cpu_rows(meter, report)
        rows += throughput_rows(base_url, report)
        rows.append(mixed_row(base_url, runs.mixed, report))
        rows += memory_rows(replica_pids(), report)
        return rows
    finally:
        cluster.stop()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("bench.json"), help="where the numbers go as JSON")
    parser.add_argument("--quick", action="store_true", help="fewer runs: minutes on a busy 2-core machine")
    options = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    runs = QUICK if options.quick else FULL
    report: dict = {"runs": asdict(runs), "quick": options.quick, "png_compress_level": os.environ.get(
        "PNG_COMPRESS_LEVEL", "1 (default)"), "load_average": os.getloadavg()}
    started = time.perf_counter()
    rows = run(Path(os.environ["TINY_MODELS"]), runs, report)
    report["rows"] = [asdict(r) for r in rows]
    report["wall_s"] = time.perf_counter() - started
    options.out.write_text(json.dumps(report, indent=1, ensure_ascii=False, default=str))
    sys.stdout.write(table(rows))
    sys.stdout.write(f"\nload average {os.getloadavg()[0]:.1f} at the end, {report['wall_s']:.0f} s in all; "
                     f"JSON in {options.out}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
