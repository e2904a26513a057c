"""Live job events over HTTP on the shared local Ray cluster (MAX_CONCURRENT_JOBS=1, JOBS_PER_TOKEN=true):
``GET /jobs/{id}/events`` and submits sent with ``Accept: text/event-stream``, read as a client reads them."""

from __future__ import annotations

import base64
import io
import json
import re

import pytest
from PIL import Image

from tests.cluster import ROOT
from tests.helpers import LONG, drain, error, submit, wait

pytestmark = pytest.mark.integration

SLOW = {**LONG, "steps": 150}  # a few seconds on the tiny models: several progress polls
TERMINAL = ("completed", "failed", "cancelled")


def read(lines):
    """Server-sent events as {"id", "event", "data"}; ``: ping`` comments and ``retry:`` are skipped."""
    current: dict = {}
    for line in lines:
        if not line:
            if "data" in current:
                yield {**current, "data": json.loads(current["data"])}
            current = {}
        elif not line.startswith(":"):
            key, _, value = line.partition(": ")
            if key in ("id", "event", "data"):
                current[key] = int(value) if key == "id" else value


def collect(response, until: tuple[str, ...] = TERMINAL) -> list[dict]:
    assert response.status_code == 200, response.read()
    assert response.headers["content-type"].startswith("text/event-stream")
    events = []
    for event in read(response.iter_lines()):
        events.append(event)
        if event["event"] in until:
            break
    return events


def stream(service, job_id: str, headers: dict | None = None, until: tuple[str, ...] = TERMINAL) -> list[dict]:
    """The job's events from GET /jobs/{id}/events, read to the terminal event (or one of ``until``)."""
    with service.stream("GET", f"/jobs/{job_id}/events", headers=headers, timeout=300) as response:
        return collect(response, until)


def test_a_job_streams_its_progress_and_a_client_resumes_without_repeats(service):
    drain(service)
    job = submit(service, body=SLOW)
    events = stream(service, job["id"])
    names = [e["event"] for e in events]
    assert names[0] == "queued" and names[1] == "started" and names[-1] == "completed", names
    assert [e["id"] for e in events] == sorted({e["id"] for e in events})  # increasing, no repeats
    assert all(e["data"]["job_id"] == job["id"] for e in events)
    assert events[0]["data"]["status"] == "queued" and events[0]["data"]["position"] >= 1
    steps = [e["data"]["step"] for e in events if e["event"] == "progress"]
    assert len(steps) >= 2 and steps == sorted(steps) and len(set(steps)) == len(steps), steps
    assert all(e["data"]["total"] == 150 and e["data"]["status"] == "processing"
               for e in events if e["event"] == "progress")
    previews = [e for e in events if e["event"] == "preview"]
    assert all(p["data"]["image"].startswith("data:image/jpeg;base64,") for p in previews)
    done = events[-1]["data"]
    assert done["status"] == "completed" and done["images"] == ["image_0"] and done["seed"] == SLOW["seed"]
    result = service.get(done["links"]["result"]).json()
    image = Image.open(io.BytesIO(base64.b64decode(result["imageData"])))
    assert image.size == (256, 256)

    # A reconnecting client sends the last id it saw and gets exactly what followed.
    after = events[1]["id"]
    resumed = stream(service, job["id"], headers={"Last-Event-ID": str(after)})
    assert [(e["id"], e["event"]) for e in resumed] == [(e["id"], e["event"]) for e in events[2:]]
    # Past the terminal event the stream ends at once, empty.
    assert stream(service, job["id"], headers={"Last-Event-ID": str(events[-1]["id"])}) == []


def test_a_submit_that_accepts_an_event_stream_gets_the_stream(service):
    """The README's example: the job's events come back on the submit itself."""
    section = (ROOT / "README.md").read_text().split("## Jobs")[1]
    payload = json.loads(re.search(r"-d '(\{.*?\})'", section).group(1))
    with service.stream("POST", "/generate/text2img", json=payload, headers={"Accept": "text/event-stream"},
                        timeout=300) as response:
        events = collect(response)
    assert [e["event"] for e in events][:2] == ["queued", "started"] and events[-1]["event"] == "completed"
    job_id = events[0]["data"]["job_id"]
    assert service.get(f"/jobs/{job_id}").json()["status"] == "completed"
    # Seed 002's submit streams the same way.
    body = {"prompt": "red apple", "width": 128, "height": 128, "num_inference_steps": 3, "seed": 5}
    with service.stream("POST", "/generate/async", json=body, headers={"Accept": "text/event-stream"},
                        timeout=300) as response:
        assert collect(response)[-1]["event"] == "completed"


def test_cancelled_jobs_end_their_streams_and_the_queue_position_is_told(service):
    drain(service)
    running = submit(service, body=SLOW)
    # The queued event records the position at submit time: the others are submitted once the runner has it.
    assert stream(service, running["id"], until=("started",))[-1]["event"] == "started"
    waiting = submit(service)
    last = submit(service)
    positions = [stream(service, j["id"], until=("queued",))[0]["data"]["position"] for j in (waiting, last)]
    assert positions == [1, 2]
    service.post(f"/jobs/{last['id']}/cancel")
    assert [e["event"] for e in stream(service, last["id"])] == ["queued", "cancelled"]
    service.post(f"/jobs/{running['id']}/cancel")
    events = stream(service, running["id"])
    assert events[-1]["event"] == "cancelled" and events[-1]["data"]["status"] == "cancelled"
    assert stream(service, waiting["id"])[-1]["event"] == "completed"


def test_events_keep_the_job_routes_isolation_and_errors(service):
    mine = {"Authorization": "Bearer events-token-a"}
    job = submit(service, **mine)
    error(service.get(f"/jobs/{job['id']}/events", headers={"Authorization": "Bearer events-token-b"}), 404,
          "NOT_FOUND", "id")
    error(service.get(f"/jobs/{job['id']}/events"), 404, "NOT_FOUND", "id")
    error(service.get("/jobs/job_0_nothing/events", headers=mine), 404, "NOT_FOUND")
    error(service.get(f"/jobs/{job['id']}/events", headers={**mine, "Last-Event-ID": "soon"}), 422,
          "INVALID_INPUT", "Last-Event-ID")
    assert stream(service, job["id"], headers=mine)[-1]["event"] == "completed"
    assert wait(service, job["id"], headers=mine)["status"] == "completed"
