"""A local Ray cluster serving configs/cpu.yaml's application: for the integration tests, `make bench` and
`make soak` alike (logical GPUs on a CPU machine, as `make demo` starts it)."""

from __future__ import annotations

import hashlib
import socket
from pathlib import Path
from typing import Any

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
    app = build_app(merged)
    _pin_versions(app)
    serve.run(app, name="imagegen", route_prefix="/")


def _pin_versions(app: Any) -> None:
    """Give every deployment of the graph a version drawn from its constructor arguments.

    Unversioned, every ``serve.run`` restarts every replica of the application, and a module that changes one
    deployment's options pays for reloading all the models twice (once for it, once to put the default back).
    Versioned, Serve restarts only what changed: a deployment whose arguments or actor options differ; a new
    ``user_config`` is a reconfigure in place and a new replica count a scale. Within one test session the code
    does not change, so the arguments are all a version has to tell apart. Serve 2.60 keeps the version on the
    bound deployment (the public ``options(version=)`` was removed)."""
    from ray.serve import Application

    def stable(value: Any) -> str:
        if isinstance(value, Application):
            return f"<{value._bound_deployment.name}>"
        if isinstance(value, dict):
            return "{" + ",".join(f"{stable(k)}:{stable(v)}" for k, v in sorted(value.items(), key=str)) + "}"
        if isinstance(value, list | tuple):
            return "[" + ",".join(stable(v) for v in value) + "]"
        return repr(value)

    seen: set[int] = set()

    def visit(node: Any) -> None:
        if not isinstance(node, Application) or id(node) in seen:
            return
        seen.add(id(node))
        deployment = node._bound_deployment
        arguments = stable([deployment.init_args, deployment.init_kwargs])
        deployment._version = hashlib.sha256(arguments.encode()).hexdigest()[:16]
        for value in [*deployment.init_args, *deployment.init_kwargs.values()]:
            for child in value.values() if isinstance(value, dict) else value if isinstance(value, list | tuple) \
                    else [value]:
                visit(child)

    visit(app)


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
