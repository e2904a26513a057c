"""Two ingress replicas share one budget: the buckets live in the job store's backend (here the SQLite file both
replicas open), so whichever replica answers, a client gets its burst once, then 429 with the headers.

For this module the ingress runs two replicas with tight budgets and auth on (a per-deployment environment), so
that the budgets spent here are the token's, not the test machine's address; the session's generous budgets and
open auth come back afterwards. Serve routes each request to either replica at random: with separate
buckets twelve requests would let through up to twice the burst unless every one reached the same replica
(chance 2^-11), so exactly one burst proves the budget is shared.
"""

from __future__ import annotations

import pytest

from tests.conftest import DEPLOYMENT_OPTIONS
from tests.helpers import error, wait

pytestmark = pytest.mark.integration

SUBMIT_BURST, GENERATE_BURST = 3, 2
TIGHT = {"RATE_LIMIT_SUBMIT_BURST": str(SUBMIT_BURST), "RATE_LIMIT_SUBMIT_PER_SECOND": "0.001",
         "RATE_LIMIT_GENERATE_BURST": str(GENERATE_BURST), "RATE_LIMIT_GENERATE_PER_SECOND": "0.001"}
TINY_JOB = {"prompt": "x", "width": 64, "height": 64, "steps": 1, "seed": 5}
TOKEN = "rate-limits"
CALLER = {"authorization": f"Bearer {TOKEN}"}  # budgets, and a job list, of this module's own


@pytest.fixture(scope="module")
def two_tight_ingresses(service):
    from ray import serve

    from tests import cluster

    env = {**TIGHT, "AUTH_ENABLED": "true", "AUTH_TOKEN": TOKEN}
    ingress = {"num_replicas": 2, "ray_actor_options": {"num_cpus": 0.25, "runtime_env": {"env_vars": env}}}
    cluster.deploy({**DEPLOYMENT_OPTIONS, "Ingress": ingress})
    replicas = serve.status().applications["imagegen"].deployments["Ingress"].replica_states
    assert replicas.get("RUNNING") == 2, replicas
    yield service
    cluster.deploy(DEPLOYMENT_OPTIONS)


def test_a_spent_budget_is_refused_by_every_replica_and_creates_no_job(two_tight_ingresses):
    service = two_tight_ingresses
    owner = CALLER
    assert service.get("/jobs", headers=owner).json()["total"] == 0
    answers = [service.post("/generate/text2img", json=TINY_JOB, headers=owner) for _ in range(12)]
    assert [a.status_code for a in answers] == [202] * SUBMIT_BURST + [429] * (12 - SUBMIT_BURST)
    assert [a.headers["ratelimit-remaining"] for a in answers[:SUBMIT_BURST]] == ["2", "1", "0"]
    for refused in answers[SUBMIT_BURST:]:
        body = error(refused, 429, "RATE_LIMITED")
        assert body["details"]["budget"] == "submit"
        assert refused.headers["ratelimit-limit"] == str(SUBMIT_BURST)
        assert refused.headers["ratelimit-remaining"] == "0"
        assert 900 <= int(refused.headers["retry-after"]) <= 1000  # a token comes back after 1000 s
        assert int(refused.headers["ratelimit-reset"]) >= int(refused.headers["retry-after"])
    listing = service.get("/jobs", headers=owner).json()
    assert listing["total"] == SUBMIT_BURST  # the refused submits left nothing behind
    for job in listing["jobs"]:
        wait(service, job["id"], headers=owner)


def test_synchronous_generation_has_its_own_budget_spent_before_validation(two_tight_ingresses):
    service = two_tight_ingresses
    answers = [service.post("/generate", json={}, headers=CALLER) for _ in range(8)]
    assert [a.status_code for a in answers] == [422] * GENERATE_BURST + [429] * (8 - GENERATE_BURST)
    assert answers[0].headers["ratelimit-limit"] == str(GENERATE_BURST)  # an error answer carries them too
    assert error(answers[-1], 429, "RATE_LIMITED")["details"]["budget"] == "generate"
    # Another spelling of the token is the same client; the client's reads are untouched.
    assert service.post("/generate", json={}, headers={"authorization": f"bearer  {TOKEN}"}).status_code == 429
    assert service.get("/queue/status", headers=CALLER).status_code == 200


def test_health_and_the_docs_are_never_limited(two_tight_ingresses):
    service = two_tight_ingresses
    for _ in range(10):
        for path in ("/health/", "/openapi.json"):
            response = service.get(path)
            assert response.status_code == 200 and "ratelimit-limit" not in response.headers
