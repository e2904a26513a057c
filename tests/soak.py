"""Soak: clients submit, poll and fetch text2img jobs on a local Serve app while memory and the job store are sampled.

Run with ``make soak`` (tiny models, CPU); ``SOAK_SECONDS`` (600), ``SOAK_CLIENTS`` (4) and ``SOAK_REPORT``
(soak-report.json) tune it. Prints the figures, writes them as JSON, and exits 1 when a job is lost or fails, a
request errors (a 5xx other than a refused submit, an unexpected 4xx, no answer), the Ray workers' memory grows by
more than 25 % after the warm-up, or a finished job outlives its retention.
"""

from __future__ import annotations

import base64
import io
import json
import logging
import math
import os
import sys
import tempfile
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import psutil
from PIL import Image

from tests import cluster

logger = logging.getLogger("soak")

RETENTION_S = 60.0  # short, so finished jobs are purged during the soak and the store must stay flat
PURGE_EVERY_S = min(60.0, RETENTION_S / 4)  # graphs.jobs.runner.JobRunner._purge's period
SAMPLE_EVERY_S = 10.0
POLL_EVERY_S = 0.2
JOB_DEADLINE_S = 120.0
MAX_GROWTH = 0.25
SIZE = 64
PAYLOAD = {"prompt": "a lighthouse at dusk", "width": SIZE, "height": SIZE, "steps": 2}
TERMINAL = ("completed", "failed", "cancelled")
EXPECTED = {"submit": {202, 429, 503}, "poll": {200}, "fetch": {200}, "other": {200}}  # 429/503: refused
MIB = 1024 * 1024


@dataclass
class Tally:
    """Everything the clients saw; one lock guards it all."""

    lock: threading.Lock = field(default_factory=threading.Lock)
    sent: Counter[str] = field(default_factory=Counter)  # by kind
    latencies: dict[str, list[float]] = field(default_factory=lambda: {kind: [] for kind in EXPECTED})
    statuses: Counter[str] = field(default_factory=Counter)  # "poll 200"
    errors: Counter[str] = field(default_factory=Counter)  # "fetch 500", "poll ReadTimeout"
    refused: Counter[str] = field(default_factory=Counter)  # "429 QUEUE_FULL"
    jobs: Counter[str] = field(default_factory=Counter)  # submitted, accepted, completed, failed, cancelled
    lost: list[str] = field(default_factory=list)  # "job id: why"
    finished_at: dict[str, float] = field(default_factory=dict)  # completed job id -> monotonic time seen

    def request(self, client: httpx.Client, kind: str, method: str, url: str, **kwargs: Any) -> httpx.Response | None:
        """One timed HTTP call; None when no answer came back."""
        started = time.perf_counter()
        try:
            response = client.request(method, url, **kwargs)
        except httpx.HTTPError as e:
            with self.lock:
                self.sent[kind] += 1
                self.errors[f"{kind} {type(e).__name__}"] += 1
            return None
        elapsed = time.perf_counter() - started
        with self.lock:
            self.sent[kind] += 1
            self.latencies[kind].append(elapsed)
            self.statuses[f"{kind} {response.status_code}"] += 1
            if response.status_code not in EXPECTED[kind]:
                self.errors[f"{kind} {response.status_code}"] += 1
        return response

    def count(self, event: str) -> None:
        with self.lock:
            self.jobs[event] += 1

    def refuse(self, response: httpx.Response) -> None:
        with self.lock:
            self.refused[f"{response.status_code} {response.json().get('code', '?')}"] += 1

    def lose(self, job_id: str, why: str) -> None:
        logger.warning("lost job %s: %s", job_id, why)
        with self.lock:
            self.lost.append(f"{job_id}: {why}")


def wait_for(client: httpx.Client, tally: Tally, job_id: str, abort: threading.Event) -> str | None:
    """Poll the job until it is finished; its final status, or None past the deadline."""
    deadline = time.monotonic() + JOB_DEADLINE_S
    while time.monotonic() < deadline and not abort.is_set():
        response = tally.request(client, "poll", "GET", f"/jobs/{job_id}")
        if response is not None and response.status_code == 200 and response.json()["status"] in TERMINAL:
            return str(response.json()["status"])
        abort.wait(POLL_EVERY_S)
    return None


def check_result(client: httpx.Client, tally: Tally, job_id: str) -> str | None:
    """Fetch a completed job's image (seed 002 shape); what is wrong with it, or None."""
    response = tally.request(client, "fetch", "GET", f"/jobs/{job_id}/result")
    if response is None or response.status_code != 200:
        return f"result fetch answered {response.status_code if response is not None else 'nothing'}"
    try:
        body = response.json()
        with Image.open(io.BytesIO(base64.b64decode(body["imageData"]))) as image:
            image.load()
            size = image.size
    except (KeyError, ValueError, OSError) as e:  # a missing field, bad base64 or JSON, an undecodable image
        return f"result does not decode: {e!r}"
    if size != (SIZE, SIZE) or (body["width"], body["height"]) != (SIZE, SIZE):
        return f"result is {size[0]}x{size[1]}, body says {body['width']}x{body['height']}"
    return None


def run_job(client: httpx.Client, tally: Tally, abort: threading.Event) -> None:
    """Submit one job and follow it to its result."""
    tally.count("submitted")
    response = tally.request(client, "submit", "POST", "/generate/text2img", json=PAYLOAD)
    if response is None or response.status_code != 202:
        if response is not None and response.status_code in (429, 503):
            tally.refuse(response)
            abort.wait(min(1.0, float(response.headers.get("retry-after", "1"))))
        return
    tally.count("accepted")
    job_id = response.json()["id"]
    status = wait_for(client, tally, job_id, abort)
    if status is None:
        if not abort.is_set():
            tally.lose(job_id, f"not finished within {JOB_DEADLINE_S:.0f} s")
        return
    tally.count(status)
    if status == "completed":
        problem = check_result(client, tally, job_id)
        if problem:
            tally.lose(job_id, problem)
        else:
            with tally.lock:
                tally.finished_at[job_id] = time.monotonic()


def client_loop(base_url: str, tally: Tally, stop: threading.Event, abort: threading.Event) -> None:
    """Jobs back to back until told to stop (the job in hand is finished first); every fifth, the other routes."""
    with httpx.Client(base_url=base_url, timeout=30) as client:
        done = 0
        while not stop.is_set():
            run_job(client, tally, abort)
            done += 1
            if done % 5 == 0:
                tally.request(client, "other", "GET", "/queue/status")
                tally.request(client, "other", "GET", "/health")


def _size(path: str) -> int:
    try:
        return os.path.getsize(path)
    except OSError:  # purged between listing and stat
        return 0


def sample(data_dir: Path, elapsed: float) -> dict[str, float]:
    """Memory of this process and of the Ray cluster it started, and the job store's size on disk."""
    driver = psutil.Process()
    workers = cluster = 0
    for process in driver.children(recursive=True):  # our raylet, GCS and their workers, not other clusters
        try:
            rss = process.memory_info().rss
            is_worker = process.name().startswith("ray::")
        except psutil.Error:
            continue
        cluster += rss
        workers += rss if is_worker else 0
    results = data_dir / "results"
    result_bytes = sum(_size(os.path.join(top, name)) for top, _dirs, names in os.walk(results) for name in names)
    folders = sum(1 for p in results.iterdir() if p.is_dir()) if results.exists() else 0
    db_bytes = sum(_size(str(p)) for p in data_dir.glob("jobs.sqlite3*"))
    return {"t_s": round(elapsed, 1), "ray_workers_rss": workers, "ray_cluster_rss": cluster,
            "driver_rss": driver.memory_info().rss, "db_bytes": db_bytes, "result_bytes": result_bytes,
            "result_folders": folders}


def sampler(data_dir: Path, started: float, samples: list[dict[str, float]], stop: threading.Event) -> None:
    while True:
        samples.append(sample(data_dir, time.monotonic() - started))
        s = samples[-1]
        logger.info("t=%4.0f s  ray workers %5.0f MiB  driver %4.0f MiB  store %6.0f kB, %d result folders",
                    s["t_s"], s["ray_workers_rss"] / MIB, s["driver_rss"] / MIB,
                    (s["db_bytes"] + s["result_bytes"]) / 1024, s["result_folders"])
        if stop.wait(SAMPLE_EVERY_S):
            return


def start_service(tiny: Path, data_dir: Path) -> str:
    """A local Ray cluster serving configs/cpu.yaml's application; its base URL."""
    env = {"TINY_MODELS": str(tiny), "JOBS_DATA_DIR": str(data_dir), "MAX_CONCURRENT_JOBS": "2",
           "MAX_QUEUE_SIZE": "16", "JOB_RETENTION_SECONDS": str(RETENTION_S), "JOB_POLL_SECONDS": "0.1"}
    return cluster.start(env)


def soak(base_url: str, data_dir: Path, duration: float, clients: int) -> tuple[Tally, list[dict[str, float]], float]:
    """Run the clients for ``duration`` seconds, then let them finish their jobs; the tally, samples and run time."""
    tally, samples = Tally(), list[dict[str, float]]()
    stop, abort, sampled = threading.Event(), threading.Event(), threading.Event()
    started = time.monotonic()
    watcher = threading.Thread(target=sampler, args=(data_dir, started, samples, sampled), daemon=True)
    threads = [threading.Thread(target=client_loop, args=(base_url, tally, stop, abort), daemon=True)
               for _ in range(clients)]
    watcher.start()
    for thread in threads:
        thread.start()
    try:
        stop.wait(duration)
        stop.set()
        for thread in threads:
            thread.join()
    except KeyboardInterrupt:
        abort.set()
        stop.set()
        for thread in threads:
            thread.join(timeout=5)
        raise
    finally:
        sampled.set()
        watcher.join()
    elapsed = time.monotonic() - started
    samples.append(sample(data_dir, elapsed))
    return tally, samples, elapsed


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q * len(ordered)) - 1)]


def summarize(tally: Tally, samples: list[dict[str, float]], elapsed: float, duration: float, clients: int,
              data_dir: Path) -> dict[str, Any]:
    """The figures, and why the soak failed (an empty list when it passed)."""
    warmup = min(60.0, duration / 5)
    baseline = next((s for s in samples if s["t_s"] >= warmup), samples[-1])
    end = samples[-1]
    growth = (end["ray_workers_rss"] - baseline["ray_workers_rss"]) / max(1.0, baseline["ray_workers_rss"])
    # A job seen finished before this should have been purged, its folder with it.
    cutoff = time.monotonic() - (RETENTION_S + PURGE_EVERY_S + 5)
    results = data_dir / "results"
    on_disk = {p.name for p in results.iterdir()} if results.exists() else set()
    stale = sorted(job_id for job_id, seen in tally.finished_at.items() if seen < cutoff and job_id in on_disk)

    def store(s: dict[str, float]) -> dict[str, float]:
        return {"t_s": s["t_s"], "bytes": s["db_bytes"] + s["result_bytes"], "db_bytes": s["db_bytes"],
                "result_folders": s["result_folders"]}

    jobs = tally.jobs
    errors = sum(tally.errors.values())
    failures = []
    if tally.lost:
        failures.append(f"{len(tally.lost)} jobs lost")
    if jobs["failed"] or jobs["cancelled"]:
        failures.append(f"{jobs['failed']} jobs failed, {jobs['cancelled']} cancelled")
    if errors:
        failures.append(f"{errors} request errors: {dict(tally.errors)}")
    if growth > MAX_GROWTH:
        failures.append(f"ray workers' RSS grew {growth:.0%} after the warm-up (limit {MAX_GROWTH:.0%})")
    if stale:
        failures.append(f"{len(stale)} results outlived the {RETENTION_S:.0f} s retention")
    return {
        "duration_s": round(elapsed, 1), "soak_seconds": duration, "clients": clients,
        "requests": dict(tally.sent), "statuses": dict(sorted(tally.statuses.items())), "errors": dict(tally.errors),
        "jobs": {"submitted": jobs["submitted"], "accepted": jobs["accepted"], "refused": sum(tally.refused.values()),
                 "refused_by_code": dict(tally.refused), "completed": jobs["completed"], "failed": jobs["failed"],
                 "cancelled": jobs["cancelled"], "lost": len(tally.lost)},
        "lost": tally.lost,
        "latency_ms": {kind: {"n": len(v), "p50": round(_percentile(v, 0.5) * 1000, 1),
                              "p99": round(_percentile(v, 0.99) * 1000, 1), "max": round(max(v) * 1000, 1)}
                       for kind, v in tally.latencies.items() if v},
        "jobs_per_min": round(jobs["completed"] / (elapsed / 60), 1),
        "memory_mib": {"warmup_s": warmup, "baseline_t_s": baseline["t_s"],
                       "ray_workers_peak": round(max(s["ray_workers_rss"] for s in samples) / MIB),
                       "ray_workers_after_warmup": round(baseline["ray_workers_rss"] / MIB),
                       "ray_workers_end": round(end["ray_workers_rss"] / MIB), "growth_pct": round(growth * 100, 1),
                       "ray_cluster_peak": round(max(s["ray_cluster_rss"] for s in samples) / MIB),
                       "driver_peak": round(max(s["driver_rss"] for s in samples) / MIB)},
        "store": {"after_warmup": store(baseline), "end": store(end),
                  "peak_bytes": max(s["db_bytes"] + s["result_bytes"] for s in samples),
                  "peak_result_folders": max(s["result_folders"] for s in samples), "stale_results": len(stale)},
        "samples": samples,
        "failures": failures,
        "passed": not failures,
    }


def render(r: dict[str, Any]) -> str:
    """The figures block."""
    jobs, memory, store = r["jobs"], r["memory_mib"], r["store"]
    refused = ", ".join(f"{code}: {n}" for code, n in jobs["refused_by_code"].items()) or "none"
    lines = [
        f"soak: {r['duration_s']:.0f} s ({r['soak_seconds']:.0f} s of submits + drain), {r['clients']} clients, "
        f"text2img {SIZE}x{SIZE}, {PAYLOAD['steps']} steps, tiny models",
        "requests   " + "  ".join(f"{kind} {n}" for kind, n in r["requests"].items())
        + f"  (total {sum(r['requests'].values())})",
        "statuses   " + "  ".join(f"{key}: {n}" for key, n in r["statuses"].items()),
        f"jobs       submitted {jobs['submitted']}  accepted {jobs['accepted']}  refused {jobs['refused']} ({refused})"
        f"  completed {jobs['completed']}  failed {jobs['failed']}  cancelled {jobs['cancelled']}"
        f"  lost {jobs['lost']}",
        f"throughput {r['jobs_per_min']} jobs/min",
        "latency ms     n      p50      p99      max",
        *(f"  {kind:<7} {v['n']:>6} {v['p50']:>8} {v['p99']:>8} {v['max']:>8}" for kind, v in r["latency_ms"].items()),
        f"memory     ray workers RSS: peak {memory['ray_workers_peak']} MiB;"
        f" after warm-up (t={memory['baseline_t_s']:.0f} s) {memory['ray_workers_after_warmup']} MiB"
        f" -> end {memory['ray_workers_end']} MiB"
        f" ({memory['growth_pct']:+.1f} %); whole cluster peak {memory['ray_cluster_peak']} MiB;"
        f" driver peak {memory['driver_peak']} MiB",
        f"store      after warm-up {store['after_warmup']['bytes'] / 1024:.0f} kB,"
        f" {store['after_warmup']['result_folders']} result folders; end {store['end']['bytes'] / 1024:.0f} kB,"
        f" {store['end']['result_folders']} folders; peak {store['peak_bytes'] / 1024:.0f} kB,"
        f" {store['peak_result_folders']} folders; results past retention {store['stale_results']}",
        "result     " + ("PASS" if r["passed"] else "FAIL: " + "; ".join(r["failures"])),
    ]
    return "\n".join(lines) + "\n"


def main() -> int:
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(message)s")
    logger.setLevel(logging.INFO)
    tiny = os.environ.get("TINY_MODELS", "")
    if not (Path(tiny) / ".stamp").exists():
        logger.error("TINY_MODELS must name built tiny models (make models); got %r", tiny)
        return 2
    duration = float(os.environ.get("SOAK_SECONDS", "600"))
    clients = int(os.environ.get("SOAK_CLIENTS", "4"))
    report_path = Path(os.environ.get("SOAK_REPORT", "soak-report.json"))
    with tempfile.TemporaryDirectory(prefix="soak-jobs-") as folder:
        data_dir = Path(folder)
        try:
            base_url = start_service(Path(tiny), data_dir)
            logger.info("serving on %s; soaking for %.0f s with %d clients", base_url, duration, clients)
            tally, samples, elapsed = soak(base_url, data_dir, duration, clients)
            report = summarize(tally, samples, elapsed, duration, clients, data_dir)
        except KeyboardInterrupt:
            logger.warning("interrupted; no report")
            return 130
        finally:
            cluster.stop()
    report_path.write_text(json.dumps(report, indent=2) + "\n")
    sys.stdout.write(render(report))
    return 0 if report["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
