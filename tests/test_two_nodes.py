"""Two Ray nodes on this machine, the application spread over both, jobs in Redis; the worker node killed under
load (the README's "Several nodes", whose commands and ``deployments:`` block this module takes as they are).

Ray's own multi-node helper (``ray.cluster_utils.Cluster``) starts node A (the head) and node B (a worker) with the
README's custom resources and Ray settings. The ingress, SDXLBase and the JobRunner run one replica on each node,
the one-replica deployments on A; Serve runs a proxy on each node (B's on a port of its own: two proxies on one
machine cannot share one). The refiner is left out (``refiner: None``): no request here uses it, and a model fewer
loads faster.

Under load (three clients posting ``/generate`` through A's proxy, two of them with face restoration, whose input
is the base's response, and a queue of jobs worked by both runners, each holding a long one), node B is killed
without warning: its raylet and Ray's daemons SIGKILLed, its workers exiting as they do when their raylet dies
(about 1.5 s later here). Pass criteria: every answer is 200 or 503 ``MODEL_UNAVAILABLE`` with ``Retry-After``
(no 500, no cut connection), every request started a second after Ray has declared the node dead is a 200, and
every job completes exactly once (one terminal event, one image, the store's completed counter equal to the
number of jobs), the long job of B's runner taken over by A's runner when its lease runs out. Then a fresh node B
joins and Serve puts the missing replicas on it. A test of its own checks, deterministically, the watch that
keeps a stage fed by a lost one from waiting forever (``flights.settled``).

Its own pytest process (``pytest -m nodes``; ``make test`` runs it third): Ray allows one driver connection per
process, and the other integration modules share a single-node cluster. ``-s`` prints the figures.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import statistics
import threading
import time
from collections import Counter
from dataclasses import dataclass
from typing import Any

import httpx
import pytest
import yaml

from tests import cluster
from tests.helpers import decode_b64, seconds_until, submit, wait

pytestmark = [pytest.mark.integration, pytest.mark.nodes]

# Replicas' environment: one job at a time per runner, so that two jobs processing means both runners hold one.
ENV = {"MAX_CONCURRENT_JOBS": "1", "JOB_LEASE_SECONDS": "5", "JOB_POLL_SECONDS": "0.1", "MAX_QUEUE_SIZE": "100",
       "RATE_LIMITS_ENABLED": "false"}
SYNC = {"prompt": "a lighthouse", "width": 128, "height": 128, "num_inference_steps": 4, "use_refiner": False}
FACES = {**SYNC, "use_face_restoration": True}  # base -> face restorer: the restorer's input is the base's response
JOB = {"prompt": "a harbour", "width": 128, "height": 128, "steps": 24}
LONG_JOB = {**JOB, "steps": 120}  # the first two, one per runner: what each runner holds when node B dies
SPREAD = ("Ingress", "SDXLBase", "JobRunner")
SINGLE = ("Upscaler", "FaceRestorer", "FocalCropper", "ProgressBoard")


def report(text: str) -> None:
    print(f"\n[two nodes] {text}")  # noqa: T201


@dataclass
class Readme:
    """What the README's "Several nodes" tells every node: its exports, the resources of its ``ray start`` lines
    (the head's and the other machines'), and its ``deployments:`` block."""

    exports: dict[str, str]
    head: dict
    worker: dict
    options: dict[str, dict]


def readme() -> Readme:
    section = (cluster.ROOT / "README.md").read_text().split("## Several nodes")[1].split("\n## ")[0]
    lines = [shlex.split(line, comments=True) for line in section.splitlines() if line.startswith(("export ", "ray "))]
    exports = dict(a.split("=", 1) for line in lines if line[:1] == ["export"] for a in line[1:])
    resources = {"--head" in line: json.loads(next(a for a in line if a.startswith("--resources=")).split("=", 1)[1])
                 for line in lines if line[:2] == ["ray", "start"]}
    (block,) = re.findall(r"```yaml\n(.*?)```", section, re.DOTALL)
    options = {d.pop("name"): d for d in yaml.safe_load(block)["deployments"]}
    return Readme(exports, resources[True], resources[False], options)


def test_make_test_runs_this_module_in_a_process_of_its_own():
    section = (cluster.ROOT / "README.md").read_text().split("## Several nodes")[1].split("\n## ")[0]
    assert "\npython -m pytest -s -m nodes\n" in section
    recipe = (cluster.ROOT / "Makefile").read_text().split("\ntest:")[1].split("\n\n")[0]
    assert '-m "integration and not nodes"' in recipe and "-m nodes" in recipe


@dataclass
class TwoNodes:
    nodes: Any  # ray.cluster_utils.Cluster
    worker: Any  # node B
    worker_resources: dict
    head_url: str
    worker_url: str
    redis_url: str
    names: dict[str, str]  # node id -> the custom resource naming it
    started_s: float


@pytest.fixture(scope="module")
def two_nodes(tiny, redis_url, tmp_path_factory):
    import ray
    from ray import serve
    from ray.cluster_utils import Cluster

    config = readme()
    port, worker_port = cluster.free_port(), cluster.free_port()
    # The nodes' own environment, inherited by every process on them, as the README's exports before `ray start`:
    # its Ray settings as they are, this session's Redis, and results in one folder (both nodes are this machine).
    # RAY_SERVE_WORKER_PROXY_HTTP_PORT moves worker nodes' proxies off the head's port (one machine here too).
    assert "JOB_STORE_URL" in config.exports
    # TINY_MODELS too: the app's arguments name it, and build_app expands them in this process.
    node_env = {**{k: v for k, v in config.exports.items() if k.startswith("RAY_")}, "JOB_STORE_URL": redis_url,
                "RAY_SERVE_WORKER_PROXY_HTTP_PORT": str(worker_port), "TINY_MODELS": str(tiny)}
    saved = {name: os.environ.get(name) for name in node_env}
    env = {**ENV, "TINY_MODELS": str(tiny), "JOBS_DATA_DIR": str(tmp_path_factory.mktemp("jobs-data"))}
    started, nodes = time.monotonic(), None
    try:
        os.environ.update(node_env)
        nodes = Cluster(initialize_head=True, head_node_args={"num_cpus": 4, "resources": config.head,
                                                              "include_dashboard": False})
        worker = nodes.add_node(num_cpus=2, resources=config.worker)
        ray.init(address=nodes.address, runtime_env={"env_vars": env}, log_to_driver=False)
        serve.start(proxy_location="EveryNode", http_options={"host": "127.0.0.1", "port": port})
        cluster.deploy(config.options, {"refiner": None})
        names = {n["NodeID"]: next(r for r in (*config.head, *config.worker) if r in n["Resources"])
                 for n in ray.nodes()}
        yield TwoNodes(nodes, worker, config.worker, f"http://127.0.0.1:{port}", f"http://127.0.0.1:{worker_port}",
                       redis_url, names, time.monotonic() - started)
    finally:
        if ray.is_initialized():
            serve.shutdown()
            ray.shutdown()
        if nodes is not None:
            nodes.shutdown()
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def placement(names: dict[str, str]) -> dict[str, list[str]]:
    """Deployment (or ProxyActor) -> the nodes its live actors run on, from the GCS (no dashboard here)."""
    from ray._private.state import actors

    where: dict[str, list[str]] = {}
    for actor in actors().values():
        if actor["State"] == "ALIVE":
            role = actor["ActorClassName"].rsplit(":", 1)[-1]
            where.setdefault(role, []).append(names.get(actor["Address"]["NodeID"], "?"))
    return {role: sorted(nodes) for role, nodes in where.items()}


def running(deployment: str) -> int:
    from ray import serve

    return serve.status().applications["imagegen"].deployments[deployment].replica_states.get("RUNNING", 0)


def test_replicas_and_proxies_run_on_both_nodes(two_nodes):
    where = placement(two_nodes.names)
    for deployment in (*SPREAD, "ProxyActor"):
        assert where[deployment] == ["node_a", "node_b"], where
    for deployment in SINGLE:
        assert where[deployment] == ["node_a"], where
    for url in (two_nodes.head_url, two_nodes.worker_url):
        assert httpx.get(f"{url}/-/healthz", timeout=30).status_code == 200  # what a load balancer checks
        answer = httpx.post(f"{url}/generate", json=SYNC, timeout=120)
        assert answer.status_code == 200 and decode_b64(answer.json()["image"]).size == (128, 128)
    report(f"cluster up and deployed in {two_nodes.started_s:.0f} s; replicas by node: {where}")


class Response:
    """What a plan's flight holds (a DeploymentResponse): awaitable, an object ref once routed, cancellable. With no
    ref it never answers, as a stage whose input was lost does when Serve's router keeps sending it again."""

    def __init__(self, ref=None) -> None:
        self.ref, self.cancelled = ref, False

    async def _to_object_ref(self):
        return self.ref

    def __await__(self):
        import asyncio

        return (self.ref if self.ref is not None else asyncio.get_running_loop().create_future()).__await__()

    def cancel(self) -> None:
        self.cancelled = True


def test_a_stage_whose_input_was_lost_answers_instead_of_waiting(two_nodes):
    """flights.settled on real object refs: an earlier stage's result holding a lost-replica error (what a caller
    records when the node of the replica it called dies) ends the wait for the stage it fed, which is cancelled;
    a large earlier result (in the object store) is not read, and the stage's own answer comes back."""
    import asyncio

    import numpy as np
    import ray
    from ray.exceptions import ActorUnavailableError
    from ray.experimental import get_object_locations

    from graphs import flights

    @ray.remote(num_cpus=0)
    def unreachable():
        raise ActorUnavailableError("RPC error: Socket closed", None)

    async def plan(upstream: Response, stage: Response):
        async with flights.flight() as calls:
            calls += [upstream, stage]
            return await flights.settled(stage)

    stage = Response()
    started = time.monotonic()
    with pytest.raises(ActorUnavailableError):
        asyncio.run(plan(Response(unreachable.remote()), stage))
    assert stage.cancelled and time.monotonic() - started < 5

    large = ray.put(np.zeros(2**20, dtype=np.uint8))  # 1 MiB: in the object store, where errors never are
    assert get_object_locations([large])[large]["node_ids"]
    assert asyncio.run(plan(Response(large), Response(ray.put("stage answer")))) == "stage answer"


@dataclass
class Answer:
    started: float
    ended: float
    status: int | str  # an HTTP status, or the transport error's name
    retry_after: str | None = None
    code: str | None = None
    reason: str | None = None  # the Ray error behind a 503


def client(url: str, body: dict, stop: threading.Event, answers: list[Answer]) -> None:
    """POST /generate until stopped, recording every outcome."""
    with httpx.Client(base_url=url, timeout=120) as http:
        n = 0
        while not stop.is_set():
            n += 1
            started = time.monotonic()
            try:
                response = http.post("/generate", json={**body, "seed": n})
            except httpx.TransportError as e:
                answers.append(Answer(started, time.monotonic(), type(e).__name__))
                continue
            error = response.json() if response.status_code != 200 else {}
            answers.append(Answer(started, time.monotonic(), response.status_code,
                                  response.headers.get("retry-after"), error.get("code"),
                                  error.get("details", {}).get("reason")))


def test_the_worker_node_killed_under_load(two_nodes):
    import ray
    import redis

    http = httpx.Client(base_url=two_nodes.head_url, timeout=120)
    stop, answers = threading.Event(), []
    clients = [threading.Thread(target=client, args=(two_nodes.head_url, body, stop, answers))
               for body in (SYNC, FACES, FACES)]
    for thread in clients:
        thread.start()
    try:
        seconds_until(lambda: len(answers) >= 2, 120)  # under load
        held = [submit(http, body={**LONG_JOB, "seed": n})["id"] for n in range(2)]
        jobs = held + [submit(http, body={**JOB, "seed": n})["id"] for n in range(2, 12)]

        def both_runners_busy() -> bool:
            """Each runner holds one of the long jobs, far from done (neither finishes before the kill)."""
            busy = http.get("/jobs", params={"status": "processing"}).json()["jobs"]
            return sorted(j["id"] for j in busy if j["progress"] < 80) == sorted(held)

        seconds_until(both_runners_busy, 60)
        killed, killed_wall = time.monotonic(), time.time()
        two_nodes.nodes.remove_node(two_nodes.worker, allow_graceful=False)  # SIGKILL; its workers follow its raylet

        def node_b_alive() -> bool:
            return any(n["Alive"] for n in ray.nodes() if n["NodeID"] == two_nodes.worker.node_id)

        declared_dead = seconds_until(lambda: not node_b_alive(), 90, every=0.25)
        jobs += [submit(http, body={**JOB, "seed": 100 + n})["id"] for n in range(4)]  # new work after the loss
        finished = {job: wait(http, job, timeout=180) for job in jobs}
        time.sleep(max(0.0, killed + declared_dead + 5 - time.monotonic()))  # load well past the declared death
    finally:
        stop.set()
        for thread in clients:
            thread.join()
    statuses = {d: _status(d) for d in SPREAD}
    assert all(running(d) == 1 for d in SPREAD)  # B's replicas wait for a node that fits them

    # Synchronous requests: answered, or told to come back; all answered once Ray knows the node is gone.
    codes = Counter(a.status for a in answers)
    assert set(codes) <= {200, 503}, codes
    unavailable = [a for a in answers if a.status == 503]
    assert all(a.code == "MODEL_UNAVAILABLE" and int(a.retry_after or 0) > 0 for a in unavailable), unavailable
    after = [a for a in answers if a.started > killed]
    settled = [a for a in answers if a.started > killed + declared_dead + 1]
    assert settled and all(a.status == 200 for a in settled), Counter(a.status for a in settled)

    # Jobs: each completed exactly once; the long job of B's runner taken over by A's when its lease ran out.
    store = redis.Redis.from_url(two_nodes.redis_url, decode_responses=True)
    assert {j: f["status"] for j, f in finished.items() if f["status"] != "completed"} == {}
    events = {j: [(e["event"], json.loads(e["data"])) for _, e in store.xrange(f"imagegen:events:{j}")]
              for j in jobs}
    for job in jobs:
        assert [name for name, _ in events[job] if name in ("completed", "failed", "cancelled")] == ["completed"]
        assert len(finished[job]["result"]["images"]) == 1
        assert http.get(f"/jobs/{job}/result").json()["width"] == 128
    assert int(store.get("imagegen:stats:completed") or 0) == len(jobs)  # none published twice
    requeued = [(j, data["time"] - killed_wall) for j in jobs for name, data in events[j]
                if name == "queued" and data.get("requeued")]
    lease = float(ENV["JOB_LEASE_SECONDS"])
    assert any(j in held and at > lease - 1 for j, at in requeued), (held, requeued)

    took = [_epoch(f["completedAt"]) - _epoch(f["createdAt"]) for f in finished.values()]
    last_503 = max((a.ended - killed for a in unavailable), default=None)
    report(f"node B killed while both runners held a job; Ray declared it dead after {declared_dead:.1f} s; "
           f"the spread deployments then {statuses}")
    report(f"/generate through A's proxy: {dict(codes)} ({len(after)} started after the kill; 503 for "
           f"{dict(Counter(a.reason for a in unavailable))}); first 200 started after the kill answered "
           f"{min(a.ended for a in after if a.status == 200) - killed:.2f} s after it; last 503 "
           f"{'none' if last_503 is None else f'{last_503:.2f} s after it'}; {len(settled)} requests from "
           f"{declared_dead + 1:.1f} s on, all 200")
    report(f"jobs: {len(jobs)} completed once each, attempts {dict(Counter(f['attempts'] for f in finished.values()))}"
           f"; requeued {', '.join(f'{at:.1f} s' for _, at in requeued)} after the kill (lease {lease:.0f} s); "
           f"time from submit to completed p50 {statistics.median(took):.1f} s, max {max(took):.1f} s; last done "
           f"{max(_epoch(f['completedAt']) for f in finished.values()) - killed_wall:.1f} s after the kill")


def _status(deployment: str) -> str:
    from ray import serve

    return serve.status().applications["imagegen"].deployments[deployment].status.value


def _epoch(stamp: str) -> float:
    from datetime import datetime

    return datetime.fromisoformat(stamp.replace("Z", "+00:00")).timestamp()


def test_a_fresh_node_takes_the_missing_replicas(two_nodes):
    started = time.monotonic()
    two_nodes.nodes.add_node(num_cpus=2, resources=two_nodes.worker_resources)
    import ray

    names = {n["NodeID"]: next(r for r in ("node_a", "node_b") if r in n["Resources"])
             for n in ray.nodes() if n["Alive"]}
    seconds_until(lambda: all(running(d) == 2 for d in SPREAD), 240, every=1)
    back = time.monotonic() - started
    where = placement(names)
    for deployment in (*SPREAD, "ProxyActor"):
        assert where[deployment] == ["node_a", "node_b"], where
    seconds_until(lambda: _healthy(two_nodes.worker_url), 60, every=0.5)
    assert httpx.post(f"{two_nodes.worker_url}/generate", json=SYNC, timeout=120).status_code == 200
    report(f"a fresh node B joined: its replicas running after {back:.1f} s, its proxy serving after "
           f"{time.monotonic() - started:.1f} s")


def _healthy(url: str) -> bool:
    try:
        return httpx.get(f"{url}/-/healthz", timeout=5).status_code == 200
    except httpx.TransportError:
        return False


def test_a_drained_node_hands_its_work_over(two_nodes):
    """What a KubeRay pod's SIGTERM does with ``RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S`` set (``ray start --block``
    asks the GCS to drain its node, with that deadline, then waits for its raylet to finish): node B drained under
    load while each runner holds a long job. Serve stops B's replicas gracefully, before the deadline (their
    ``graceful_shutdown_timeout_s``): every synchronous answer is a 200, every job completes once on its first
    attempt (B's runner claims nothing more and finishes the job it holds, ``JOB_DRAIN_SECONDS``), and B's
    raylet, drained and idle, exits by itself before the deadline."""
    import ray
    from ray.core.generated import autoscaler_pb2

    http = httpx.Client(base_url=two_nodes.head_url, timeout=120)
    node_b = next(n["NodeID"] for n in ray.nodes() if n["Alive"] and "node_b" in n["Resources"])
    seconds_until(lambda: all(running(d) == 2 for d in SPREAD), 240, every=1)
    stop, answers = threading.Event(), []
    clients = [threading.Thread(target=client, args=(two_nodes.head_url, body, stop, answers))
               for body in (SYNC, FACES)]
    for thread in clients:
        thread.start()
    # Serve stops B's replicas at the deadline less their graceful_shutdown_timeout_s: the ingress and the base at
    # 40 s (their 20 s), the job runner at once (its 90 s), while it holds a long job.
    deadline_s = 60
    try:
        seconds_until(lambda: len(answers) >= 2, 120)
        held = [submit(http, body={**LONG_JOB, "seed": 200 + n})["id"] for n in range(2)]
        jobs = held + [submit(http, body={**JOB, "seed": 210 + n})["id"] for n in range(6)]

        def both_runners_busy() -> bool:
            busy = http.get("/jobs", params={"status": "processing"}).json()["jobs"]
            return sorted(j["id"] for j in busy if j["progress"] < 80) == sorted(held)

        seconds_until(both_runners_busy, 60)
        drained = time.monotonic()
        gcs = ray._private.worker.global_worker.gcs_client
        accepted, why = gcs.drain_node(node_b, autoscaler_pb2.DrainNodeReason.Value("DRAIN_NODE_REASON_PREEMPTION"),
                                       "pod terminating (test)", int(time.time() * 1000) + deadline_s * 1000)
        assert accepted, why

        def node_b_alive() -> bool:
            return any(n["Alive"] for n in ray.nodes() if n["NodeID"] == node_b)

        gone = seconds_until(lambda: not node_b_alive(), deadline_s + 30, every=0.5)
        jobs += [submit(http, body={**JOB, "seed": 220 + n})["id"] for n in range(2)]  # new work after it
        finished = {job: wait(http, job, timeout=180) for job in jobs}
    finally:
        stop.set()
        for thread in clients:
            thread.join()
    codes = Counter(a.status for a in answers)
    after = [a for a in answers if a.ended > drained]
    assert set(codes) == {200}, (codes, [a for a in answers if a.status != 200])
    assert {j: (f["status"], f["attempts"]) for j, f in finished.items()} == {j: ("completed", 1) for j in jobs}
    assert gone < deadline_s, f"node B's raylet outlived its deadline ({gone:.1f} s)"
    report(f"node B drained under load: its raylet exited {gone:.1f} s after the drain began (deadline "
           f"{deadline_s} s); /generate through A's proxy {dict(codes)}, {len(after)} ending after the drain began; "
           f"{len(jobs)} jobs completed, each on its first attempt")
