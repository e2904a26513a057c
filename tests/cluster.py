"""A local Ray cluster serving configs/cpu.yaml's application: for the integration tests, `make bench` and
`make soak` alike (logical GPUs on a CPU machine, as `make demo` starts it)."""

from __future__ import annotations

import socket
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def app_args() -> dict:
    """configs/cpu.yaml's application arguments."""
    return yaml.safe_load((ROOT / "configs" / "cpu.yaml").read_text())["applications"][0]["args"]


def deploy(deployment_options: dict | None = None, args: dict | None = None) -> None:
    """(Re)deploy the application, with per-deployment option overrides and argument overrides (top-level keys
    of cpu.yaml's ``args:`` replaced, e.g. ``{"refiner": None}``; ``app_args()`` gives the ones replaced)."""
    from ray import serve

    from graphs.app import build_app

    merged = {**app_args(), **(args or {}), "deployment_options": deployment_options or {}}
    serve.run(build_app(merged), name="imagegen", route_prefix="/")


def start(env: dict[str, str], deployment_options: dict | None = None, **ray_options) -> str:
    """Start Ray (replicas see ``env``) and Serve on a free loopback port, deploy; the base URL."""
    import ray
    from ray import serve

    port = free_port()
    # address="local": always a cluster of our own, even while `make demo` (or any Ray head) runs on this machine.
    # Logical CPUs: room for two replicas each of the ingress, base and refiner (tests/test_cancellation.py)
    # beside one of everything else; the tiny models never keep more than the two real cores busy.
    ray.init(address="local", num_cpus=8, num_gpus=1, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": env}, **ray_options)
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    deploy(deployment_options)
    return f"http://127.0.0.1:{port}"


def stop() -> None:
    import ray
    from ray import serve

    if ray.is_initialized():
        serve.shutdown()
        ray.shutdown()
