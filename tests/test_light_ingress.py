"""The ingress and the job runner run no model, so their processes must not import torch or the model libraries
(issue 10, item 4): Serve imports the module of each deployment class in its replica, and every object a stage
sends back is unpickled there too."""

from __future__ import annotations

import json
import logging
import pkgutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import SMALL, b64, submit, wait

ROOT = Path(__file__).resolve().parent.parent
logger = logging.getLogger(__name__)

HEAVY = ("torch", "diffusers", "transformers", "spandrel", "mediapipe", "cv2", "facexlib")

# Run in a fresh interpreter: argv = [root, heavy names (comma-separated), modules...]. A finder placed first on
# sys.meta_path sees every import of a module not loaded yet, so it can name the project frames that first asked
# for each heavy library; it finds nothing itself. Prints {"loaded": [...], "chains": {name: [frames]}}.
PROBE = """
import importlib, json, sys, traceback
root, heavy, modules = sys.argv[1], sys.argv[2].split(","), sys.argv[3:]
chains = {}

class Witness:
    def find_spec(self, name, path=None, target=None):
        top = name.partition(".")[0]
        if top in heavy and top not in chains:
            chains[top] = [f"{f.filename.removeprefix(root + '/')}:{f.lineno}" for f in traceback.extract_stack()
                           if f.filename.startswith(root)]
        return None

sys.meta_path.insert(0, Witness())
for module in modules:
    importlib.import_module(module)
print(json.dumps({"loaded": sorted(n for n in heavy if n in sys.modules), "chains": chains}))
"""


def ingress_modules() -> list[str]:
    """What the ingress and runner replicas import: the app, the plans, every API router and the job package."""
    packages = [f"graphs.{package}.{m.name}" for package in ("api", "jobs")
                for m in pkgutil.iter_modules([str(ROOT / "graphs" / package)])]
    return ["graphs.app", "graphs.plans", "graphs.jobs.runner", *packages]


def test_ingress_and_runner_modules_import_no_model_library():
    modules = ingress_modules()
    assert "graphs.api.generate" in modules and "graphs.jobs.store" in modules
    done = subprocess.run([sys.executable, "-c", PROBE, str(ROOT), ",".join(HEAVY), *modules], cwd=ROOT,
                          capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout.splitlines()[-1])
    culprits = {name: " <- ".join(reversed(chain)) for name, chain in report["chains"].items()}
    assert report["loaded"] == [], f"loaded {report['loaded']}; first imported by {culprits}"


# --- integration: the running replicas --------------------------------------------------------------------------

def replica_pid(deployment: str) -> int:
    """From the GCS directly (the test cluster runs without the dashboard that ``ray.util.state`` asks)."""
    from ray._private.state import actors

    return next(a["Pid"] for a in actors().values()
                if a["State"] == "ALIVE" and a["ActorClassName"].endswith(f":{deployment}"))


def mapped_libraries(pid: int) -> set[str]:
    """Heavy packages with a file mapped into the process (their shared objects, once imported)."""
    maps = Path(f"/proc/{pid}/maps").read_text()
    return {name for name in HEAVY if f"/site-packages/{name}/" in maps}


@pytest.mark.integration
def test_ingress_and_runner_replicas_load_no_model_library(service, astronaut):
    import psutil

    # Every kind of answer the two processes unpickle: a plan's stage result, crops and their focus, a caption,
    # descriptions.
    assert service.post("/generate", json={"prompt": "red apple", "seed": 1, "width": 128, "height": 128,
                                           "num_inference_steps": 3}).status_code == 200
    assert service.post("/derivatives/clip-focal", json={"image": b64(astronaut.resize((128, 128))),
                                                         "sizes": ["64x32"]}).status_code == 200
    assert service.post("/sdapi/v1/interrogate", json={"image": b64(astronaut.resize((64, 64)))}).status_code == 200
    assert service.get("/sdapi/v1/sd-models").status_code == 200
    assert service.get("/sdapi/v1/memory").status_code == 200
    assert wait(service, submit(service, body=SMALL)["id"])["status"] == "completed"

    for deployment in ("Ingress", "JobRunner"):
        pid = replica_pid(deployment)
        rss_mb = psutil.Process(pid).memory_info().rss / 2**20
        logger.info("%s replica: %.0f MB resident", deployment, rss_mb)
        assert mapped_libraries(pid) == set(), deployment
        assert rss_mb <= 300, f"{deployment}: {rss_mb:.0f} MB resident, issue 10 asks at most 300"
