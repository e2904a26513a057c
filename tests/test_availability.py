"""Stage calls to a deployment that failed to deploy are refused at once, naming it, instead of waiting in Serve's
queue for the caller's deadline (graphs/availability.py), on Serve's own status objects."""

from __future__ import annotations

import logging

import pytest
from ray.serve._private.common import DeploymentStatus, DeploymentStatusTrigger, ReplicaState
from ray.serve.schema import ApplicationStatus, ApplicationStatusOverview, DeploymentStatusOverview, ServeStatus

from deployments.support.errors import ModelLoadError
from graphs import availability, flights
from graphs.api.errors import status_of

TRACEBACK = ("The deployment failed to start 3 times in a row.\nTraceback (most recent call last):\n"
             "  File \"deployments/sdxl_refiner.py\", line 80, in __init__\n"
             "deployments.support.errors.ModelLoadError: model source '/nonexistent/refiner-model' not found\n")


def deployment(status: DeploymentStatus, replicas: dict[ReplicaState, int], message: str = ""):
    return DeploymentStatusOverview(status=status, status_trigger=DeploymentStatusTrigger.UNSPECIFIED,
                                    replica_states=replicas, message=message)


def serve_status(**deployments) -> ServeStatus:
    app = ApplicationStatusOverview(status=ApplicationStatus.DEPLOY_FAILED, message="", last_deployed_time_s=0.0,
                                    deployments=deployments)
    return ServeStatus(applications={"imagegen": app})


@pytest.fixture(autouse=True)
def nothing_down():
    availability.update({})
    yield
    availability.update({})


def test_only_a_deployment_that_failed_with_no_replica_running_is_down():
    status = serve_status(
        SDXLRefiner=deployment(DeploymentStatus.DEPLOY_FAILED, {}, TRACEBACK),
        # A replica of the last version still serves: calls go to it.
        Upscaler=deployment(DeploymentStatus.DEPLOY_FAILED, {ReplicaState.RUNNING: 1}, "failed"),
        # Starting (a slow model load) or unhealthy for a moment: calls wait as ever.
        SDXLBase=deployment(DeploymentStatus.UPDATING, {ReplicaState.STARTING: 1}),
        FaceRestorer=deployment(DeploymentStatus.UNHEALTHY, {ReplicaState.STARTING: 1}),
        FocalCropper=deployment(DeploymentStatus.DEPLOY_FAILED, {ReplicaState.STOPPING: 1}, ""),
    )
    assert availability.failed(status) == {
        "SDXLRefiner": "deployments.support.errors.ModelLoadError: model source '/nonexistent/refiner-model' not "
                       "found",
        "FocalCropper": "its replicas failed to start"}


class Method:
    """A deployment handle's method as a plan calls it."""

    def __init__(self, deployment_name: str) -> None:
        self.deployment_name = deployment_name
        self.calls = 0

    def remote(self, *args, **kwargs):
        self.calls += 1
        return object()


def test_a_call_to_a_failed_deployment_is_a_503_naming_it_and_others_go_through(caplog):
    refiner, base = Method("SDXLRefiner"), Method("SDXLBase")
    with caplog.at_level(logging.INFO, logger="graphs.availability"):
        availability.update(availability.failed(serve_status(
            SDXLRefiner=deployment(DeploymentStatus.DEPLOY_FAILED, {}, TRACEBACK))))
        availability.update(availability.failed(serve_status(
            SDXLRefiner=deployment(DeploymentStatus.DEPLOY_FAILED, {}, TRACEBACK))))
    assert [r.levelname for r in caplog.records] == ["ERROR"]  # said once, not at every poll
    with pytest.raises(ModelLoadError) as refused:
        flights.RecordedMethod(refiner).remote("request")
    assert refiner.calls == 0 and status_of(refused.value) == 503
    assert refused.value.details == {"deployment": "SDXLRefiner"}
    assert "SDXLRefiner" in refused.value.message and "/nonexistent/refiner-model" in refused.value.message
    flights.RecordedMethod(base).remote("request")
    assert base.calls == 1
    # Redeployed and running: its calls go through again, and the log says so.
    with caplog.at_level(logging.INFO, logger="graphs.availability"):
        availability.update(availability.failed(serve_status(
            SDXLRefiner=deployment(DeploymentStatus.HEALTHY, {ReplicaState.RUNNING: 1}))))
    flights.RecordedMethod(refiner).remote("request")
    assert refiner.calls == 1 and caplog.records[-1].levelname == "INFO"
