"""Exact cancellation with several replicas: two replicas each of the ingress, SDXLBase and SDXLRefiner. An
interrupt, a deadline or a job cancel stops the request on the replica that runs it, in whichever stage it is;
requests on the other replicas run on; progress comes from the replica running the request."""

from __future__ import annotations

import concurrent.futures
import time

import pytest

from tests.conftest import DEPLOYMENT_OPTIONS
from tests.helpers import error, interrupted, until, within

pytestmark = pytest.mark.integration

SLOW = {"prompt": "x", "width": 512, "height": 512, "steps": 150}


@pytest.fixture(scope="module")
def replicas(service):
    from ray import serve

    from tests import cluster

    cluster.deploy({**DEPLOYMENT_OPTIONS, "Ingress": {"num_replicas": 2}, "SDXLBase": {"num_replicas": 2},
                    "SDXLRefiner": {"num_replicas": 2}})
    handles = {name: serve.get_deployment_handle(name, app_name="imagegen") for name in ("SDXLBase", "SDXLRefiner")}
    yield service, handles
    cluster.deploy(DEPLOYMENT_OPTIONS)


def running(handle, polls: int = 16) -> int:
    """Requests in the denoising loops of the deployment's replicas (each poll reaches a random replica)."""
    return max(handle.describe.remote().result(timeout_s=30)["running"] for _ in range(polls))


def progress(service, owner) -> dict:
    return service.get("/sdapi/v1/progress", headers=owner, params={"skip_current_image": "true"}).json()


def test_an_interrupt_stops_one_request_and_leaves_the_other_replica_running(replicas):
    service, handles = replicas
    owners = [{"authorization": f"Bearer cancel-{name}"} for name in ("a", "b")]
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        for _attempt in range(4):
            # Sizes apart, so that they never share a batch (and so a replica): this is about two replicas.
            pending = [pool.submit(service.post, "/sdapi/v1/txt2img", json={**SLOW, "seed": i, "width": 512 - 8 * i},
                                   headers=owner) for i, owner in enumerate(owners)]
            # Both run at once, one per base replica, and each one's progress is seen through either ingress.
            if within(lambda: all(progress(service, o)["state"]["sampling_step"] > 0 for o in owners), 30):
                break
            # Serve's router sent both to one replica (two routing choices made at the same moment see the same
            # queue lengths), where the second waits for the first: stop both and send them again.
            for owner in owners:
                service.post("/sdapi/v1/interrupt", headers=owner)
            for request in pending:
                request.result(timeout=120)
        else:
            pytest.fail("the two requests never ran on the two base replicas at once")
        service.post("/sdapi/v1/interrupt", headers=owners[0])
        interrupted(pending[0].result(timeout=60))
        before = progress(service, owners[1])["state"]["sampling_step"]
        until(lambda: progress(service, owners[1])["state"]["sampling_step"] > before + 2)  # untouched
        assert not pending[1].done()
        service.post("/sdapi/v1/interrupt", headers=owners[1])
        interrupted(pending[1].result(timeout=60))
    until(lambda: running(handles["SDXLBase"]) == 0, timeout=10)


def test_an_interrupt_reaches_the_refiner_stage(replicas):
    service, handles = replicas
    owner = {"authorization": "Bearer refiner-stage"}
    body = {**SLOW, "refiner_checkpoint": "tiny-sdxl-refiner", "refiner_switch_at": 0.05}
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        pending = pool.submit(service.post, "/sdapi/v1/txt2img", json=body, headers=owner)
        until(lambda: running(handles["SDXLRefiner"], polls=4) > 0)  # the base handed over: the refiner runs
        service.post("/sdapi/v1/interrupt", headers=owner)
        interrupted(pending.result(timeout=60))
    until(lambda: running(handles["SDXLRefiner"]) == 0, timeout=10)


def test_a_deadline_stops_the_work_below_it(replicas):
    service, handles = replicas
    body = {"prompt": "x", "width": 512, "height": 512, "num_inference_steps": 150, "use_refiner": False}
    started = time.monotonic()
    error(service.post("/generate", json=body, headers={"X-Request-Timeout": "4"}), 408, "REQUEST_TIMEOUT")
    assert time.monotonic() - started < 20
    until(lambda: running(handles["SDXLBase"]) == 0, timeout=10)


def test_a_job_cancel_stops_its_refiner_pass(replicas):
    service, handles = replicas
    job = service.post("/generate/async", json={"prompt": "x", "width": 512, "height": 512,
                                                "num_inference_steps": 150, "use_refiner": True}).json()
    job_id = job.get("job_id") or job.get("id")
    until(lambda: running(handles["SDXLBase"], polls=4) > 0)
    service.post(f"/jobs/{job_id}/cancel")
    until(lambda: service.get(f"/jobs/{job_id}").json()["status"] == "cancelled", timeout=30)
    until(lambda: running(handles["SDXLBase"]) + running(handles["SDXLRefiner"]) == 0, timeout=10)
