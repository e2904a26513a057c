"""The Grafana dashboard (configs/grafana-dashboard.json): a well-formed import, and every metric it charts, with
every label it groups by, exported on the Prometheus endpoint of a real local Ray cluster after real traffic."""

from __future__ import annotations

import json
import re
import time
import typing

import httpx
import pytest

from tests.conftest import METRICS_PORT, ROOT
from tests.helpers import SMALL, b64, error, submit, wait


def dashboard() -> dict:
    return json.loads((ROOT / "configs" / "grafana-dashboard.json").read_text())


def queries() -> list[str]:
    return [target["expr"] for panel in dashboard()["panels"] for target in panel["targets"]]


def metric_names(expr: str) -> set[str]:
    return set(re.findall(r"\b(ray_[a-z0-9_]+)\b", expr))


def grouped_by(expr: str) -> set[str]:
    return {label.strip() for group in re.findall(r"\bby \(([^)]*)\)", expr) for label in group.split(",")}


def test_dashboard_is_a_grafana_import_on_a_chosen_prometheus():
    board = dashboard()
    (variable,) = board["templating"]["list"]
    assert (variable["name"], variable["type"], variable["query"]) == ("datasource", "datasource", "prometheus")
    ids = [panel["id"] for panel in board["panels"]]
    assert len(ids) == len(set(ids)) and board["uid"] and board["title"]
    for panel in board["panels"]:
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}
        refs = [target["refId"] for target in panel["targets"]]
        assert refs and len(refs) == len(set(refs))
        assert all(metric_names(target["expr"]) for target in panel["targets"]), panel["title"]
    titles = " ".join(panel["title"] for panel in board["panels"])
    for needed in ("p50", "p99", "Images per second", "Failures", "in flight", "queued", "Jobs by state"):
        assert needed in titles


def test_the_failures_panel_charts_the_servers_failures_alone():
    """A client's unknown model or cancel is counted, but it is no failure of the service's to chart."""
    (failures,) = [expr for expr in queries() if "ray_imagegen_failures_total" in expr]
    assert selectors(failures) == [("ray_imagegen_failures_total", "kind", "server")]


def scrape() -> dict[str, list[tuple[dict[str, str], float]]]:
    """Every series on Ray's Prometheus endpoint: name -> [(labels, value)]."""
    text = httpx.get(f"http://127.0.0.1:{METRICS_PORT}/metrics", timeout=10).text
    series: dict[str, list[tuple[dict[str, str], float]]] = {}
    for line in text.splitlines():
        match = re.match(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})? (\S+)", line)
        if match and not line.startswith("#"):
            labels = dict(re.findall(r'(\w+)="((?:[^"\\]|\\.)*)"', match.group(2) or ""))
            series.setdefault(match.group(1), []).append((labels, float(match.group(3))))
    return series


def selectors(expr: str) -> list[tuple[str, str, str]]:
    """The ``name{label="value"}`` matchers of a query, as (name, label, value)."""
    return [(name, label, value) for name, matchers in re.findall(r"\b(ray_[a-z0-9_]+)\{([^}]*)\}", expr)
            for label, value in re.findall(r'(\w+)="([^"]*)"', matchers)]


def label_values() -> dict[tuple[str, str], set[str]]:
    """Label values the code gives that one short test does not provoke all of (no server failure here)."""
    from deployments.support.errors import Kind

    return {("ray_imagegen_failures_total", "kind"): set(typing.get_args(Kind))}


def selects(series: dict, name: str, label: str, value: str) -> bool:
    """Whether a matcher selects a series: one exported, or a value the code gives of a label the metric carries."""
    carried = [labels for labels, _ in series.get(name, [])]
    return any(labels.get(label) == value for labels in carried) or (
        value in label_values().get((name, label), set()) and any(label in labels for labels in carried))


def unexported(series: dict) -> list[str]:
    """Each metric a query names that the endpoint lacks, each label a query groups by that none of the query's
    metrics carries, and each label matcher that selects no series."""
    missing = []
    for expr in queries():
        names = metric_names(expr)
        missing += [name for name in names if name not in series]
        carried = {label for name in names for labels, _ in series.get(name, []) for label in labels}
        missing += [f"{label} on {sorted(names)}" for label in grouped_by(expr) - carried]
        missing += [f'{name}{{{label}="{value}"}}' for name, label, value in selectors(expr)
                    if not selects(series, name, label, value)]
    return missing


@pytest.mark.integration
def test_every_dashboard_metric_is_exported(service, astronaut):
    generated = service.post("/generate", json={"prompt": "x", "width": 64, "height": 64, "num_inference_steps": 2,
                                                "use_refiner": False})
    assert generated.status_code == 200, generated.text
    error(service.post("/sdapi/v1/extra-single-image", json={"image": b64(astronaut.resize((64, 64))),
                                                             "upscaler_1": "Nope"}), 422, "UNKNOWN_MODEL", "upscaler_1")
    job = submit(service, "/generate/text2img", SMALL)
    assert wait(service, job["id"])["status"] == "completed"

    def completed_jobs(series) -> float:
        return max((v for labels, v in series.get("ray_imagegen_jobs", []) if labels["status"] == "completed"),
                   default=0.0)

    def upscaler_failed(series) -> bool:
        return any(labels.get("stage") == "upscaler" and labels.get("code") == "UNKNOWN_MODEL"
                   and labels.get("kind") == "client" and value >= 1
                   for labels, value in series.get("ray_imagegen_failures_total", []))

    # Each replica exports on its own clock: wait for every series this test made, not only for the names.
    deadline = time.monotonic() + 60
    series = scrape()
    while (unexported(series) or completed_jobs(series) < 1 or not upscaler_failed(series)) \
            and time.monotonic() < deadline:
        time.sleep(1)
        series = scrape()
    assert unexported(series) == []
    assert upscaler_failed(series)
    assert completed_jobs(series) >= 1
    assert {labels["status"] for labels, _ in series["ray_imagegen_jobs"]} >= {"queued", "processing", "completed"}
