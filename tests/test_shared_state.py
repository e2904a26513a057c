"""Two ingress replicas agree: A1111's options and who runs what (for /progress and /interrupt) live in the job
store, not in a replica's memory. Runs on the shared local Ray cluster with the ingress scaled to two."""

from __future__ import annotations

import concurrent.futures
import time

import pytest

from tests.conftest import DEPLOYMENT_OPTIONS
from tests.helpers import error, interrupted

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def two_ingresses(service):
    from tests import cluster

    cluster.deploy({**DEPLOYMENT_OPTIONS, "Ingress": {"num_replicas": 2}})
    yield service
    service.post("/sdapi/v1/options", json={"samples_format": "png"})
    cluster.deploy(DEPLOYMENT_OPTIONS)


def test_options_set_on_one_replica_are_read_on_every_one(two_ingresses):
    service = two_ingresses
    assert service.post("/sdapi/v1/options", json={"samples_format": "webp"}).status_code == 200
    seen = {service.get("/sdapi/v1/options").json()["samples_format"] for _ in range(12)}
    assert seen == {"webp"}
    error(service.post("/sdapi/v1/options", json={"samples_format": "tiff"}), 422, "INVALID_INPUT", "samples_format")
    # The answers' format again: the later tests of the module read PNGs.
    assert service.post("/sdapi/v1/options", json={"samples_format": "png"}).status_code == 200


@pytest.mark.parametrize("attempt", range(3))
def test_an_interrupt_reaches_the_request_whichever_replica_answers(two_ingresses, attempt):
    service = two_ingresses
    slow = {"prompt": "x", "width": 512, "height": 512, "steps": 150, "seed": attempt}
    owner = {"authorization": f"Bearer owner-{attempt}"}
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        victim = pool.submit(service.post, "/sdapi/v1/txt2img", json=slow, headers=owner)
        deadline, progress = time.monotonic() + 60, {}
        while time.monotonic() < deadline:
            # polled through both replicas: each must see the request the other one runs
            progress = service.get("/sdapi/v1/progress", headers=owner).json()
            if progress["state"]["sampling_step"] > 0:
                break
            time.sleep(0.2)
        assert 0 < progress["progress"] < 1
        service.post("/sdapi/v1/interrupt", headers=owner)
        interrupted(victim.result(timeout=120))
    assert service.get("/sdapi/v1/progress", headers=owner).json()["state"]["job_count"] == 0
