"""The KubeRay manifests without a cluster: the RayService against KubeRay's own CRD schema (as strict as
``kubectl apply``), its ``serveConfigV2`` against Ray Serve's config schema and ``serve_config.yaml``, the Redis
wiring, the image, and the README's deploy commands.

KubeRay's CRD is kept outside the repository, in the ``shared/kuberay`` folder beside the checkout; the CRD tests
skip, saying so, where it is absent.
"""

from __future__ import annotations

import copy
import re
import tomllib
import typing
from pathlib import Path

import pytest
import yaml
from pydantic import BaseModel

ROOT = Path(__file__).resolve().parents[1]
CRD_DIR = Path(__file__).resolve().parents[2] / "shared" / "kuberay"


def documents(name: str) -> dict[str, dict]:
    """The manifests of ``configs/<name>`` by ``Kind/name``."""
    docs = yaml.safe_load_all((ROOT / "configs" / name).read_text())
    return {f"{d['kind']}/{d['metadata']['name']}": d for d in docs}


def project_version() -> str:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]


def rayservice() -> dict:
    return documents("kuberay-rayservice.yaml")["RayService/imagegen"]


def redis() -> dict[str, dict]:
    return documents("kuberay-redis.yaml")


def serve_config_v2(manifest: dict | None = None) -> dict:
    return yaml.safe_load((manifest or rayservice())["spec"]["serveConfigV2"])


def pods(manifest: dict) -> list[dict]:
    """The head's pod spec, then each worker group's."""
    cluster = manifest["spec"]["rayClusterConfig"]
    return [cluster["headGroupSpec"]["template"]["spec"]] + [
        group["template"]["spec"] for group in cluster["workerGroupSpecs"]]


# --- the RayService against KubeRay's CRD -------------------------------------------------------------------

def strict(schema):
    """The schema with unknown fields refused, as the API server does under kubectl's default
    ``--validate=strict`` (plain JSON Schema would let a misspelt field through)."""
    if isinstance(schema, list):
        return [strict(item) for item in schema]
    if not isinstance(schema, dict):
        return schema
    out = {key: strict(value) for key, value in schema.items()}
    if "properties" in out and "additionalProperties" not in out \
            and not out.get("x-kubernetes-preserve-unknown-fields"):
        out["additionalProperties"] = False
    return out


@pytest.fixture(scope="module")
def crd_validator():
    import jsonschema

    path = CRD_DIR / "ray.io_rayservices.yaml"
    if not path.exists():
        pytest.skip(f"KubeRay's RayService CRD is not at {path} (the shared folder beside the checkout)")
    crd = yaml.safe_load(path.read_text())
    (version,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1"]
    return jsonschema.Draft4Validator(strict(version["schema"]["openAPIV3Schema"]))


def crd_errors(validator, manifest: dict) -> list[str]:
    return [f"{'.'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(manifest)]


def test_rayservice_passes_the_crd_schema(crd_validator):
    manifest = rayservice()
    assert manifest["apiVersion"] == "ray.io/v1"
    assert crd_errors(crd_validator, manifest) == []


def _misspell_top(m):
    m["spec"]["serveConfigv2"] = m["spec"].pop("serveConfigV2")


def _misspell_worker(m):
    group = m["spec"]["rayClusterConfig"]["workerGroupSpecs"][0]
    group["maxReplica"] = group.pop("maxReplicas")


def _misspell_pod(m):
    pod = m["spec"]["rayClusterConfig"]["workerGroupSpecs"][0]["template"]["spec"]
    pod["nodeSelecter"] = pod.pop("nodeSelector")


def _bad_quantity(m):
    m["spec"]["rayClusterConfig"]["headGroupSpec"]["template"]["spec"]["containers"][0]["resources"]["limits"][
        "memory"] = "16 gigabytes"


def _bad_enum(m):
    m["spec"]["rayClusterConfig"]["gcsFaultToleranceOptions"]["backend"] = "postgres"


@pytest.mark.parametrize("spoil,where,says", [
    (_misspell_top, "spec", "'serveConfigv2' was unexpected"),
    (_misspell_worker, "spec.rayClusterConfig.workerGroupSpecs.0", "'maxReplica' was unexpected"),
    (_misspell_pod, "spec.rayClusterConfig.workerGroupSpecs.0.template.spec", "'nodeSelecter' was unexpected"),
    (_bad_quantity, "spec.rayClusterConfig.headGroupSpec.template.spec.containers.0.resources.limits.memory",
     "'16 gigabytes'"),
    (_bad_enum, "spec.rayClusterConfig.gcsFaultToleranceOptions.backend", "'postgres' is not one of"),
])
def test_the_crd_check_catches_a_mistake(crd_validator, spoil, where, says):
    manifest = copy.deepcopy(rayservice())
    spoil(manifest)
    errors = crd_errors(crd_validator, manifest)
    assert errors and all(e.startswith(f"{where}: ") for e in errors), errors
    assert any(says in e for e in errors), errors


# --- serveConfigV2 against Ray Serve ------------------------------------------------------------------------

def test_serve_config_v2_is_serve_config_yaml():
    """One deployment, two ways to start it: `serve deploy serve_config.yaml` and the RayService."""
    assert serve_config_v2() == yaml.safe_load((ROOT / "serve_config.yaml").read_text())


def _models(annotation) -> list[type[BaseModel]]:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    return [m for arg in typing.get_args(annotation) for m in _models(arg)]


def unknown_fields(value: dict, model: type[BaseModel], path: str = "") -> list[str]:
    """Fields Ray's Serve schema does not know: it ignores them, so a misspelt option would silently do nothing."""
    found = []
    for key, item in value.items():
        field = model.model_fields.get(key) or next(
            (f for f in model.model_fields.values() if f.alias == key), None)
        if field is None:
            found.append(f"{path}{key}")
            continue
        inner = _models(field.annotation)
        for i, element in enumerate(item if isinstance(item, list) else [item]):
            if isinstance(element, dict) and len(inner) == 1:
                where = f"{path}{key}.{i}." if isinstance(item, list) else f"{path}{key}."
                found += unknown_fields(element, inner[0], where)
    return found


def serve_problems(config: dict, monkeypatch) -> list[str]:
    """What Ray Serve (types and bounds), its field names and the application's own ``AppArgs`` refuse."""
    from pydantic import ValidationError
    from ray.serve.schema import ServeDeploySchema

    from graphs.app import AppArgs

    monkeypatch.setenv("MODEL_DIR", "/models")
    problems = [f"unknown field {name}" for name in unknown_fields(config, ServeDeploySchema)]
    try:
        ServeDeploySchema.model_validate(config)
    except ValidationError as e:
        problems += [f"{'.'.join(map(str, err['loc']))}: {err['msg']}" for err in e.errors()]
    for app in config.get("applications", []):
        try:
            AppArgs.model_validate(app.get("args", {}))
        except ValidationError as e:
            problems += [f"args.{'.'.join(map(str, err['loc']))}: {err['msg']}" for err in e.errors()]
    return problems


def test_serve_config_v2_passes_rays_serve_schema(monkeypatch):
    config = serve_config_v2()
    assert serve_problems(config, monkeypatch) == []
    assert config["http_options"]["port"] == 8000  # the port of KubeRay's serve service


@pytest.mark.parametrize("spoil,expected", [
    (lambda c: c["applications"][0]["deployments"][0].update(max_ongoing_request=2),
     "unknown field applications.0.deployments.0.max_ongoing_request"),
    (lambda c: c["applications"][0]["deployments"][2]["autoscaling_config"].update(max_replica=9),
     "unknown field applications.0.deployments.2.autoscaling_config.max_replica"),
    (lambda c: c["applications"][0]["deployments"][0]["ray_actor_options"].update(num_gpus=-1),
     "applications.0.deployments.0.ray_actor_options.num_gpus"),
    (lambda c: c["applications"][0].pop("import_path"), "applications.0.import_path"),
    (lambda c: c["applications"][0]["args"].update(hires_upscalr="x"), "args.hires_upscalr"),
])
def test_the_serve_check_catches_a_mistake(monkeypatch, spoil, expected):
    config = serve_config_v2()
    spoil(config)
    problems = serve_problems(config, monkeypatch)
    assert len(problems) == 1 and problems[0].startswith(expected), problems


def test_a_gpu_worker_holds_one_replica_of_every_deployment():
    """What serveConfigV2 starts with (minimum replicas) fits one GPU worker; the head takes no replicas."""
    manifest = rayservice()
    cluster = manifest["spec"]["rayClusterConfig"]
    assert cluster["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"
    group = worker_groups(manifest)["gpu"]
    (container,) = group["template"]["spec"]["containers"]
    resources = container["resources"]
    assert resources["requests"] == resources["limits"] and resources["limits"]["nvidia.com/gpu"] == 1
    cpus, gpus = asked(manifest, "min_replicas")
    assert cpus <= float(resources["limits"]["cpu"]) and gpus <= 1
    assert group["minReplicas"] >= 1 and group["maxReplicas"] > group["minReplicas"]


def test_every_deployment_at_its_maximum_fits_the_cluster_at_its_maximum():
    """Serve's autoscaling never asks for replicas the cluster's autoscaler could not place; the CPU-only
    deployments (and a rolling update's new replicas) have a worker group without a GPU."""
    manifest = rayservice()
    groups = worker_groups(manifest)
    cpus, gpus = asked(manifest, "max_replicas")
    limit = {name: group["template"]["spec"]["containers"][0]["resources"]["limits"] for name, group in groups.items()}
    assert gpus <= groups["gpu"]["maxReplicas"] * limit["gpu"]["nvidia.com/gpu"]
    assert cpus <= sum(group["maxReplicas"] * float(limit[name]["cpu"]) for name, group in groups.items())
    assert "nvidia.com/gpu" not in limit["cpu"] and groups["cpu"]["minReplicas"] == 0
    deployments = serve_config_v2(manifest)["applications"][0]["deployments"]
    longest_drain = max(d.get("graceful_shutdown_timeout_s", 20) for d in deployments)
    for group in groups.values():  # a pod waits for its longest drain
        assert group["template"]["spec"]["terminationGracePeriodSeconds"] > longest_drain


def test_the_proxy_leaves_the_deadline_to_the_api():
    """The proxy's clock starts first: at equal limits it, not the API, would answer (a plain-text 408)."""
    from deployments.support.settings import Settings

    for config in (serve_config_v2(), yaml.safe_load((ROOT / "serve_config.yaml").read_text())):
        assert config["http_options"]["request_timeout_s"] > Settings().request_timeout_seconds
        (ingress,) = [d for d in config["applications"][0]["deployments"] if d["name"] == "Ingress"]
        assert ingress["graceful_shutdown_timeout_s"] >= Settings().request_timeout_seconds


def test_the_progress_boards_calls_stay_out_of_its_log():
    """Five report calls a second from every generating replica, and a hold every 2 s from every base replica:
    the board's access log would bury its other lines. Ray's own schema reads the option as written."""
    from ray.serve.schema import DeploymentSchema

    for serve in (serve_config_v2(), yaml.safe_load((ROOT / "serve_config.yaml").read_text()),
                  yaml.safe_load((ROOT / "configs" / "cpu.yaml").read_text())):
        (board,) = [d for d in serve["applications"][0]["deployments"] if d["name"] == "ProgressBoard"]
        assert unknown_fields(board, DeploymentSchema) == []
        assert DeploymentSchema.model_validate(board).logging_config.enable_access_log is False


def test_a_stopping_job_runner_drains_within_its_grace_period(monkeypatch):
    """A stopping JobRunner lets its running jobs finish for JOB_DRAIN_SECONDS, then releases the rest (a store
    call each, up to a third of a lease): past its graceful_shutdown_timeout_s Serve kills it first, and a job it
    was running waits out its lease and spends an attempt, the very cost the drain avoids. The code's defaults,
    both configs and the manifest's pod environment all keep the drain inside the grace period."""
    from deployments.support.settings import Settings
    from graphs.jobs.runner import JobRunner

    def drain(env: dict[str, str]) -> float:
        for name in ("JOB_DRAIN_SECONDS", "JOB_LEASE_SECONDS"):
            if name in env:
                monkeypatch.setenv(name, env[name])
        settings = Settings()
        return settings.job_drain_seconds + settings.job_lease_seconds / 3

    secrets = {("imagegen-redis", "password"): "x"}
    envs = [environment(pod["containers"][0], secrets) for pod in pods(rayservice())]
    assert envs and all(env == envs[0] for env in envs)  # one environment: the drain is the same everywhere
    longest = drain(envs[0])
    config = JobRunner._deployment_config
    assert config.graceful_shutdown_timeout_s > config.graceful_shutdown_wait_loop_s + longest
    for serve in (serve_config_v2(), yaml.safe_load((ROOT / "serve_config.yaml").read_text()),
                  yaml.safe_load((ROOT / "configs" / "cpu.yaml").read_text())):
        (runner,) = [d for d in serve["applications"][0]["deployments"] if d["name"] == "JobRunner"]
        wait_loop = runner.get("graceful_shutdown_wait_loop_s", 2)
        assert wait_loop <= 0.5  # it stops claiming soon after Serve begins to stop it
        assert runner.get("graceful_shutdown_timeout_s", 20) > wait_loop + longest


def test_the_job_runners_own_shutdown_settings_stop_its_claims_soon():
    """Without a config file's overrides (serve.run in code), the runner still stops claiming soon after Serve
    begins to stop it, and its grace period covers the default drain."""
    from deployments.support.settings import Settings
    from graphs.jobs.runner import JobRunner

    config = JobRunner._deployment_config
    assert config.graceful_shutdown_wait_loop_s <= 0.5
    assert config.graceful_shutdown_timeout_s > Settings().job_drain_seconds


def worker_groups(manifest: dict) -> dict[str, dict]:
    return {group["groupName"]: group for group in manifest["spec"]["rayClusterConfig"]["workerGroupSpecs"]}


def asked(manifest: dict, bound: str) -> tuple[float, float]:
    """The CPUs and GPUs serveConfigV2's deployments ask for at their minimum or maximum replicas."""
    cpus = gpus = 0.0
    for deployment in serve_config_v2(manifest)["applications"][0]["deployments"]:
        replicas = deployment.get("num_replicas") or deployment["autoscaling_config"][bound]
        cpus += replicas * deployment["ray_actor_options"].get("num_cpus", 1)
        gpus += replicas * deployment["ray_actor_options"].get("num_gpus", 0)
    return cpus, gpus


# --- pods, Redis and the image ------------------------------------------------------------------------------

def environment(container: dict, secrets: dict[tuple[str, str], str]) -> dict[str, str]:
    """The container's environment as Kubernetes builds it: secrets resolved, ``$(VAR)`` expanded."""
    env: dict[str, str] = {}
    for var in container["env"]:
        if "valueFrom" in var:
            ref = var["valueFrom"]["secretKeyRef"]
            env[var["name"]] = secrets[ref["name"], ref["key"]]
        else:
            env[var["name"]] = re.sub(r"\$\((\w+)\)", lambda m: env.get(m.group(1), m.group(0)), var["value"])
    return env


def test_the_cluster_reaches_redis_for_jobs_and_gcs(monkeypatch):
    from deployments.support.settings import Settings
    from graphs.jobs.store import open_store

    manifest, store = rayservice(), redis()
    service, deployment = store["Service/imagegen-redis"], store["Deployment/imagegen-redis"]
    template = deployment["spec"]["template"]
    assert service["spec"]["selector"].items() <= template["metadata"]["labels"].items()
    assert deployment["spec"]["selector"]["matchLabels"] == service["spec"]["selector"]
    (port,) = service["spec"]["ports"]
    (redis_container,) = template["spec"]["containers"]
    assert port["targetPort"] in [p["name"] for p in redis_container["ports"]]

    gcs = manifest["spec"]["rayClusterConfig"]["gcsFaultToleranceOptions"]
    assert gcs["redisAddress"] == f"imagegen-redis:{port['port']}"
    secret = gcs["redisPassword"]["valueFrom"]["secretKeyRef"]
    assert environment(redis_container, {(secret["name"], secret["key"]): "s3cret"})["REDIS_PASSWORD"] == "s3cret"

    environments = [environment(c, {(secret["name"], secret["key"]): "s3cret"})
                    for pod in pods(manifest) for c in pod["containers"]]
    assert all(env == environments[0] for env in environments)  # the app may be built on any node
    job_store = open_store(Settings(**{k.lower(): v for k, v in environments[0].items()
                                       if k in ("JOB_STORE_URL", "JOBS_DATA_DIR")}))
    connection = job_store.redis.connection_pool.connection_kwargs  # type: ignore[attr-defined]
    assert (connection["host"], connection["port"], connection["password"]) == ("imagegen-redis", port["port"],
                                                                                "s3cret")
    assert connection["db"] != 0  # database 0 is the GCS's


def test_every_volume_is_declared_and_weights_are_read_only():
    claims = {d["metadata"]["name"] for name in ("kuberay-rayservice.yaml", "kuberay-redis.yaml")
              for d in documents(name).values() if d["kind"] == "PersistentVolumeClaim"}
    for pod in pods(rayservice()):
        volumes = {v["name"]: v for v in pod["volumes"]}
        for v in volumes.values():
            assert "persistentVolumeClaim" not in v or v["persistentVolumeClaim"]["claimName"] in claims
        for mount in pod["containers"][0]["volumeMounts"]:
            assert mount["name"] in volumes
        (models,) = [m for m in pod["containers"][0]["volumeMounts"] if m["name"] == "models"]
        assert models["readOnly"] and {"name": "MODEL_DIR", "value": models["mountPath"]} in pod["containers"][0]["env"]


def test_the_image_is_this_project_on_the_clusters_ray():
    manifest = rayservice()
    ray_version = manifest["spec"]["rayClusterConfig"]["rayVersion"]
    (base,) = re.findall(r"^FROM (\S+)$", (ROOT / "Dockerfile").read_text(), re.MULTILINE)
    assert base == f"rayproject/ray:{ray_version}-py311-gpu"
    assert {c["image"] for pod in pods(manifest) for c in pod["containers"]} == {f"imagegen-serve:{project_version()}"}


def test_readme_deploys_these_manifests():
    section = (ROOT / "README.md").read_text().split("## Kubernetes (KubeRay)")[1].split("\n## ")[0]
    applied = re.findall(r"^kubectl apply -f (\S+)$", section, re.MULTILINE)
    assert applied == ["configs/kuberay-redis.yaml", "configs/kuberay-rayservice.yaml"]
    secret = rayservice()["spec"]["rayClusterConfig"]["gcsFaultToleranceOptions"]["redisPassword"]["valueFrom"]
    name, key = secret["secretKeyRef"]["name"], secret["secretKeyRef"]["key"]
    assert re.search(rf"^kubectl create secret generic {name} --from-literal={key}=", section, re.MULTILINE)
    assert f"docker build -t imagegen-serve:{project_version()} ." in section


def test_every_pod_detects_a_lost_node_as_the_readme_advises():
    """The health-check settings that tests/test_two_nodes.py measured (a node declared dead in about 5 s)."""
    section = (ROOT / "README.md").read_text().split("## Several nodes")[1].split("\n## ")[0]
    advised = dict(re.findall(r"(RAY_health_check_\w+)=(\d+)", section))
    assert set(advised) == {"RAY_health_check_period_ms", "RAY_health_check_failure_threshold"}
    for pod in pods(rayservice()):
        (container,) = pod["containers"]
        env = {var["name"]: var.get("value") for var in container["env"]}
        assert {name: env.get(name) for name in advised} == advised


def test_the_shipped_manifest_believes_no_x_forwarded_for_until_its_proxies_are_named():
    """A Service's node address is the peer of every outside client, so trusting the cluster's range would let
    anyone name themselves anyone; the operator lists the ingress controller's pods (README: "Kubernetes")."""
    from deployments.support.settings import Settings

    for pod in pods(rayservice()):
        (container,) = pod["containers"]
        env = {var["name"]: var.get("value") for var in container["env"]}
        assert Settings(trusted_proxies=env["TRUSTED_PROXIES"]).trusted_networks == ()
    section = (ROOT / "README.md").read_text().split("## Kubernetes (KubeRay)")[1].split("\n## ")[0]
    assert "TRUSTED_PROXIES" in section and "controller's pod" in section


def test_a_deleted_pod_drains_its_node_before_it_stops():
    """On SIGTERM `ray start --block` drains its node for RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S (Ray's default, 30 s,
    is shorter than the Ingress's drain): Serve stops a draining node's replicas at the deadline less their
    graceful_shutdown_timeout_s, so the deadline must leave the longest of those whole, and the pod's grace period
    must outlast the deadline (Kubernetes kills the pod at its end)."""
    manifest = rayservice()
    deployments = serve_config_v2(manifest)["applications"][0]["deployments"]
    longest_drain = max(d.get("graceful_shutdown_timeout_s", 20) for d in deployments)
    head = manifest["spec"]["rayClusterConfig"]["headGroupSpec"]
    for name, group in {"head": head, **worker_groups(manifest)}.items():
        spec = group["template"]["spec"]
        env = {e["name"]: e.get("value") for e in spec["containers"][0]["env"]}
        drain = float(env["RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S"])
        assert longest_drain < drain < spec["terminationGracePeriodSeconds"], name
