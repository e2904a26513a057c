"""The service's own log lines in Serve's replica logs: routed through Serve's handlers as a replica has them (its
formatter, its request id, its file), following a ``logging_config`` change, and never outside a replica."""

from __future__ import annotations

import ast
import builtins
import importlib
import inspect
import json
import logging
import pkgutil
import re
import sys
import textwrap
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
from ray import serve

from deployments.support.logs import PACKAGES, SERVE_LOGGER, replica_logging
from tests.conftest import ROOT


@pytest.fixture
def replica(monkeypatch, tmp_path):
    """This process made a Serve replica's logging: ``configure(**logging_config)`` sets Serve's handlers up as a
    replica's start (or a later ``logging_config`` change) does, writing under ``tmp_path``. Every logger it
    touches is put back afterwards, for the tests that capture logs after this one."""
    from ray.serve._private.common import ServeComponentType
    from ray.serve._private.logging_utils import configure_component_logger
    from ray.serve.schema import LoggingConfig

    monkeypatch.setattr(serve, "get_replica_context", lambda: SimpleNamespace())
    saved = {name: (lg.handlers[:], lg.level, lg.propagate)
             for name in (SERVE_LOGGER, *PACKAGES) for lg in [logging.getLogger(name)]}
    streams = builtins.print, sys.stdout, sys.stderr

    def configure(**config) -> None:
        configure_component_logger(component_name="SDXLBase", component_id="replica-1",
                                   logging_config=LoggingConfig(logs_dir=str(tmp_path), **config),
                                   component_type=ServeComponentType.REPLICA, max_bytes=1 << 20, backup_count=1)

    yield configure
    for name, (handlers, level, propagate) in saved.items():
        lg = logging.getLogger(name)
        for handler in lg.handlers:
            if handler not in handlers:
                handler.close()
        lg.handlers[:], lg.level, lg.propagate = handlers, level, propagate
    builtins.print, sys.stdout, sys.stderr = streams


def request(request_id: str):
    """Serve's request context, as a replica sets it while it runs one request."""
    from ray.serve.context import _RequestContext, _serve_request_context

    return _serve_request_context.set(_RequestContext(request_id=request_id, app_name="imagegen"))


def lines(folder: Path) -> list[str]:
    for handler in logging.getLogger(SERVE_LOGGER).handlers:
        handler.flush()
    return [line for file in sorted(folder.glob("*.log")) for line in file.read_text().splitlines()]


def test_a_modules_info_line_reaches_the_replica_log_with_its_request_id(replica, tmp_path):
    from ray.serve.context import _serve_request_context

    replica()
    replica_logging()
    token = request("req-123")
    try:
        logging.getLogger("deployments.support.pipelines").info("checkpoint %s loaded in %.2fs", "tiny", 0.5)
        logging.getLogger("graphs.jobs.runner").debug("below INFO: dropped")
    finally:
        _serve_request_context.reset(token)
    logging.getLogger("graphs.api.errors").warning("outside any request")
    (loaded,), (outside,) = ([line for line in lines(tmp_path) if words in line]
                             for words in ("checkpoint tiny loaded in 0.50s", "outside any request"))
    assert re.match(r"INFO \S+ \S+ SDXLBase replica-1 req-123 -- checkpoint", loaded), loaded
    assert outside.startswith("WARNING ") and "req-123" not in outside
    assert not [line for line in lines(tmp_path) if "below INFO" in line]
    assert not logging.getLogger("deployments").propagate  # once, not again through a root handler added later


def test_a_logging_config_change_that_replaces_serves_handlers_is_followed(replica, tmp_path):
    from ray.serve.context import _serve_request_context

    replica()
    replica_logging()
    replica_logging()  # a second __init__ in the process adds no second route
    replica(encoding="JSON", log_level="WARNING")  # a redeploy with another logging_config
    token = request("req-456")
    try:
        logging.getLogger("deployments.upscaler").info("quieted by log_level")
        logging.getLogger("deployments.upscaler").warning("tile too large")
    finally:
        _serve_request_context.reset(token)
    records = [json.loads(line) for line in lines(tmp_path) if line.startswith("{")]
    assert [(r["levelname"], r["message"], r["request_id"]) for r in records if r.get("request_id")] == [
        ("WARNING", "tile too large", "req-456")]


def test_outside_a_replica_the_callers_logging_is_left_alone(caplog):
    """Serve's local testing mode builds deployments in the caller's process (pytest here)."""
    replica_logging()
    assert all(logging.getLogger(name).propagate for name in PACKAGES)
    with caplog.at_level(logging.INFO, logger="deployments"):
        logging.getLogger("deployments.support.pipelines").info("seen by the caller")
    assert "seen by the caller" in caplog.text


def deployments() -> dict[str, object]:
    """Every Serve deployment the project defines, by name."""
    modules = [f"deployments.{m.name}" for m in pkgutil.iter_modules([str(ROOT / "deployments")]) if not m.ispkg]
    found = {}
    for module in [*modules, "graphs.app", "graphs.board", "graphs.jobs.runner"]:
        for value in vars(importlib.import_module(module)).values():
            if isinstance(value, serve.Deployment):
                found[value.name] = value
    return found


def test_every_deployment_routes_its_logs_before_anything_else():
    found = deployments()
    assert {"SDXLBase", "SDXLRefiner", "Upscaler", "FaceRestorer", "FocalCropper", "SafetyChecker", "Provenance",
            "JobRunner", "ProgressBoard", "Ingress"} <= found.keys()
    for name, deployment in found.items():
        # Its own __init__ (Serve's ingress wraps Ingress in a class of its own, whose file may lie under ROOT too,
        # in a virtual environment there).
        ours = (str(ROOT / "deployments"), str(ROOT / "graphs"))
        init = next(c.__dict__["__init__"] for c in deployment.func_or_class.__mro__
                    if getattr(c.__dict__.get("__init__"), "__code__", None)
                    and c.__dict__["__init__"].__code__.co_filename.startswith(ours))
        (definition,) = ast.parse(textwrap.dedent(inspect.getsource(init))).body
        first = definition.body[0]
        assert isinstance(first, ast.Expr) and isinstance(first.value, ast.Call) \
            and getattr(first.value.func, "id", None) == "replica_logging", name


# --- integration: a real replica ----------------------------------------------------------------------------------

def replica_logs() -> Path:
    import ray

    return Path(ray._private.worker._global_node.get_logs_dir_path()) / "serve"


@pytest.mark.integration
def test_a_replicas_module_lines_are_in_its_serve_log(service):
    """Logged inside a request, with its request id; logged at start-up, in the replica's own file."""
    generated = service.post("/generate", json={"prompt": "x", "width": 64, "height": 64, "num_inference_steps": 2,
                                                "use_refiner": False})
    assert generated.status_code == 200, generated.text
    request_id = generated.headers["x-request-id"]
    deadline = time.monotonic() + 30
    while True:
        found = [(path.name, line) for path in replica_logs().glob("replica_imagegen_*.log")
                 for line in path.read_text().splitlines() if request_id in line and "no invisible watermark" in line]
        if found or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    # The 64 x 64 image is too small for the watermark: the stage that encoded it said so, in that request.
    assert found, f"no line of request {request_id} in {sorted(p.name for p in replica_logs().iterdir())}"
    assert all(line.startswith("INFO ") for _, line in found)
    started = {"SDXLBase": "SDXL base ready on", "Upscaler": "upscaler 'R-ESRGAN 4x+'",
               "FaceRestorer": "face restorer:"}
    for deployment, words in started.items():
        files = list(replica_logs().glob(f"replica_imagegen_{deployment}_*.log"))
        assert any(words in path.read_text() for path in files), (deployment, [p.name for p in files])
