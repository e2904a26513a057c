"""Batching through Serve: concurrent compatible requests share pipeline calls, and each answer has the pixels
that request gets alone."""

from __future__ import annotations

import concurrent.futures

import numpy as np
import pytest

from tests.helpers import decode_b64, pixels

pytestmark = pytest.mark.integration

BODY = {"prompt": "a lighthouse", "width": 128, "height": 128, "num_inference_steps": 4, "use_refiner": False}


def test_concurrent_compatible_requests_are_batched_and_keep_their_pixels(service):
    from ray import serve

    from tests import cluster
    from tests.conftest import DEPLOYMENT_OPTIONS

    base = serve.get_deployment_handle("SDXLBase", app_name="imagegen")
    # A batch window: with none, a tiny 128² image can finish before the next request reaches the replica of a busy
    # two-core machine, and every request runs alone.
    cluster.deploy({**DEPLOYMENT_OPTIONS, "SDXLBase": {"user_config": {"max_batch_size": 8,
                                                                       "batch_wait_timeout_s": 0.5}}})
    seeds = [101, 102, 103, 104, 105, 106]
    try:
        before = base.describe.remote().result(timeout_s=30)["batching"]
        with concurrent.futures.ThreadPoolExecutor(len(seeds)) as pool:
            together = list(pool.map(lambda s: service.post("/generate", json={**BODY, "seed": s}), seeds))
        after = base.describe.remote().result(timeout_s=30)["batching"]
    finally:
        cluster.deploy(DEPLOYMENT_OPTIONS)
    items, batches = after["items"] - before["items"], after["batches"] - before["batches"]
    assert items == len(seeds) and batches < items  # some requests shared a pipeline call
    for seed, response in zip(seeds, together, strict=True):
        assert response.status_code == 200, response.text
        alone = service.post("/generate", json={**BODY, "seed": seed}).json()
        mine, theirs = (pixels(decode_b64(r["imageData"])) for r in (response.json(), alone))
        assert np.abs(mine - theirs).mean() < 1.0


def test_an_interrupted_request_answers_at_once_while_its_batch_mate_runs_on(service):
    """A1111's /interrupt on a request that shares its batch with another client's: it answers with its image as it
    stood straight away, not when the batch ends, and its batch mate runs on to its end."""
    from ray import serve

    from tests import cluster
    from tests.conftest import DEPLOYMENT_OPTIONS
    from tests.helpers import interrupted, until

    base = serve.get_deployment_handle("SDXLBase", app_name="imagegen")
    # A batch window, so that the two requests below surely share one pipeline call.
    cluster.deploy({**DEPLOYMENT_OPTIONS, "SDXLBase": {"user_config": {"max_batch_size": 8,
                                                                       "batch_wait_timeout_s": 1.0}}})
    owners = [{"authorization": f"Bearer batch-{name}"} for name in ("a", "b")]
    slow = {"prompt": "x", "width": 512, "height": 512, "steps": 150, "sampler_name": "Euler"}

    def step(owner) -> int:
        return service.get("/sdapi/v1/progress", headers=owner,
                           params={"skip_current_image": "true"}).json()["state"]["sampling_step"]

    try:
        before = base.describe.remote().result(timeout_s=30)["batching"]
        with concurrent.futures.ThreadPoolExecutor(2) as pool:
            pending = [pool.submit(service.post, "/sdapi/v1/txt2img", json={**slow, "seed": i}, headers=owner)
                       for i, owner in enumerate(owners)]
            until(lambda: all(step(o) > 2 for o in owners), timeout=60)
            after = base.describe.remote().result(timeout_s=30)["batching"]
            assert (after["items"] - before["items"], after["batches"] - before["batches"]) == (2, 1)
            service.post("/sdapi/v1/interrupt", headers=owners[0])
            info = interrupted(pending[0].result(timeout=30))
            mate = step(owners[1])
            assert not pending[1].done() and info["width"] == 512
            assert mate < 150 - 10, f"the batch was all but done ({mate} of 150) when the interrupted request answered"
            until(lambda: step(owners[1]) > mate + 2)  # its mate runs on
            service.post("/sdapi/v1/interrupt", headers=owners[1])
            interrupted(pending[1].result(timeout=60))
    finally:
        cluster.deploy(DEPLOYMENT_OPTIONS)
