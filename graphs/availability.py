"""Which model deployments can take a call. A deployment whose replicas all failed to start (a model file that is
not there, weights that do not load) has none running, and Serve queues every call to it until the caller's
deadline: a client would wait minutes for a 408 that names nothing. The ingress and the job runner each watch the
application's status instead, and a stage call to a deployment that failed to deploy is refused at once with a 503
``MODEL_LOAD_FAILED`` naming it and Serve's reason. A deployment still starting, or one with a replica running, is
called as ever.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from deployments.support.errors import ModelLoadError

logger = logging.getLogger(__name__)

WATCH_EVERY_S = 5.0  # one controller call per replica that watches; a fixed deployment is callable again within it

_down: dict[str, str] = {}  # deployment name -> the reason Serve gives, while it has failed to deploy


def failed(status: Any) -> dict[str, str]:
    """The deployments of a ``serve.status()`` that failed to deploy and have no replica running, each with the
    last line of Serve's message (a replica's traceback ends with the error that stopped it)."""
    down = {}
    for application in status.applications.values():
        for name, deployment in application.deployments.items():
            running = sum(count for state, count in deployment.replica_states.items()
                          if getattr(state, "value", state) == "RUNNING")
            if getattr(deployment.status, "value", deployment.status) == "DEPLOY_FAILED" and not running:
                lines = [line.strip() for line in (deployment.message or "").splitlines() if line.strip()]
                down[name] = lines[-1][:300] if lines else "its replicas failed to start"
    return down


def check(handle: Any) -> None:
    """Refuse a call to ``handle``'s deployment while it has failed to deploy."""
    name = getattr(handle, "deployment_name", None)
    reason = _down.get(name) if isinstance(name, str) else None
    if reason is not None:
        raise ModelLoadError(f"the {name} deployment has no replica running: it failed to deploy ({reason})",
                             details={"deployment": name})


def update(down: dict[str, str]) -> None:
    """Replace what is known to be down, logging each change once."""
    for name in down.keys() - _down.keys():
        logger.error("deployment %s failed to deploy: its calls are refused until it runs (%s)", name, down[name])
    for name in _down.keys() - down.keys():
        logger.info("deployment %s is deployed again: its calls go through", name)
    _down.clear()
    _down.update(down)


async def watch() -> None:
    """Follow the application's status for as long as the replica lives (started once per process)."""
    from ray import serve

    while True:
        try:
            update(failed(await asyncio.to_thread(serve.status)))
        except Exception as e:  # noqa: BLE001 - a controller that does not answer must not stop the watch
            logger.debug("serve status unavailable: %s", e)
        await asyncio.sleep(WATCH_EVERY_S)


_watching: list[asyncio.Task] = []


def start() -> None:
    """Start the watch in this replica's event loop, once. Not where Ray is not running: Serve's local testing mode
    runs the graph in one process, with no controller to ask, and asking would start a Ray instance for it."""
    import ray

    if not _watching and ray.is_initialized():
        _watching.append(asyncio.get_event_loop().create_task(watch()))
