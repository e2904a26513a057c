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

    base = serve.get_deployment_handle("SDXLBase", app_name="imagegen")
    before = base.describe.remote().result(timeout_s=30)["batching"]
    seeds = [101, 102, 103, 104, 105, 106]
    with concurrent.futures.ThreadPoolExecutor(len(seeds)) as pool:
        together = list(pool.map(lambda s: service.post("/generate", json={**BODY, "seed": s}), seeds))
    after = base.describe.remote().result(timeout_s=30)["batching"]
    items, batches = after["items"] - before["items"], after["batches"] - before["batches"]
    assert items == len(seeds) and batches < items  # some requests shared a pipeline call
    for seed, response in zip(seeds, together, strict=True):
        assert response.status_code == 200, response.text
        alone = service.post("/generate", json={**BODY, "seed": seed}).json()
        mine, theirs = (pixels(decode_b64(r["imageData"])) for r in (response.json(), alone))
        assert np.abs(mine - theirs).mean() < 1.0
