"""The ``imagegen`` CLI: ``graphs.cli.main([...])`` against the shared live service (integration), and its error
lines against canned answers (no service needed)."""

from __future__ import annotations

import argparse
import base64
import io
import json
import re
import shlex
import subprocess
import sys
from collections.abc import Callable

import httpx
import pytest
from PIL import Image

from graphs.cli import main
from graphs.client import CliError, Service
from tests.cluster import ROOT, free_port
from tests.helpers import LONG, SMALL, drain, submit, wait

integration = pytest.mark.integration


@pytest.fixture
def url(service) -> str:
    return str(service.base_url)


def run(capsys, *argv: str) -> tuple[int, str, str]:
    status = main(list(argv))
    captured = capsys.readouterr()
    return status, captured.out, captured.err


@integration
def test_generate_writes_a_png_of_the_requested_size(url, tmp_path, capsys):
    out = tmp_path / "apple.png"
    status, stdout, stderr = run(capsys, "--url", url, "generate", "a red apple", "--size", "128x96", "--steps", "4",
                                 "--seed", "3", "-o", str(out))
    assert status == 0, stderr
    with Image.open(out) as image:
        assert image.format == "PNG" and image.size == (128, 96)
    assert stdout.startswith(f"{out} 128x96 (job_")
    lines = stderr.splitlines()
    assert "queued, position" in lines[0] and lines[-1].endswith(": completed")


@integration
def test_the_readme_commands_run(url, tmp_path, capsys, monkeypatch):
    section = (ROOT / "README.md").read_text().split("## Command line")[1].split("\n## ")[0]
    commands = [shlex.split(line)[1:] for line in section.splitlines() if line.startswith("imagegen ")]
    assert len(commands) >= 5, "the README lost its command-line examples"
    # The first screen's example is one of these.
    start = (ROOT / "README.md").read_text().split("## Set up on a fresh machine")[1].split("\n## ")[0]
    quick = re.search(r"`\.venv/bin/imagegen ([^`]+)`", start)
    assert quick and shlex.split(quick.group(1)) in commands
    monkeypatch.chdir(tmp_path)
    for argv in commands:
        status, _out, err = run(capsys, "--url", url, *argv)
        assert status == 0, f"{argv}: {err}"
    sizes = {name: Image.open(tmp_path / name).size for name in ("lighthouse.png", "karras.png",
                                                                 "lighthouse-2x.png", "lighthouse-faces.png")}
    assert sizes == {"lighthouse.png": (256, 256), "karras.png": (256, 256), "lighthouse-2x.png": (512, 512),
                     "lighthouse-faces.png": (256, 256)}
    assert Image.open(tmp_path / "sizes" / "avatar.png").size == (512, 512)


@integration
def test_jobs_wait_shows_progress_then_show_list_and_cancel(service, url, tmp_path, capsys):
    drain(service)
    job = submit(service, body={**LONG, "steps": 150})
    out = tmp_path / "waited.png"
    status, stdout, stderr = run(capsys, "--url", url, "jobs", "wait", job["id"], "-o", str(out))
    assert status == 0, stderr
    steps = [int(line.split("step ")[1].split("/")[0]) for line in stderr.splitlines() if "step " in line]
    assert len(steps) >= 2 and steps == sorted(steps) and steps[-1] <= 150, stderr
    assert stderr.splitlines()[-1] == f"{job['id']}: completed"
    assert Image.open(out).size == (256, 256)

    status, stdout, _ = run(capsys, "--url", url, "jobs", "show", job["id"])
    shown = json.loads(stdout)
    assert status == 0 and shown["status"] == "completed" and shown["result"]["urls"][0].startswith("/jobs/")
    status, stdout, _ = run(capsys, "--url", url, "jobs", "list", "--status", "completed", "--limit", "500")
    assert status == 0 and any(line.startswith(job["id"]) for line in stdout.splitlines())
    status, _, stderr = run(capsys, "--url", url, "jobs", "cancel", job["id"])
    assert status == 2 and stderr.startswith("imagegen: 409 CONFLICT: job already completed")


@integration
def test_bad_values_name_the_field_and_the_flag(url, tmp_path, capsys):
    out = str(tmp_path / "never.png")
    status, _, stderr = run(capsys, "--url", url, "generate", "x", "--width", "130", "-o", out)
    assert status == 2 and len(stderr.splitlines()) == 1
    assert stderr.startswith("imagegen: 422 INVALID_INPUT: width") and "(field width, --width/--size)" in stderr
    status, _, stderr = run(capsys, "--url", url, "generate", "x", "--hires", "--steps", "0", "-o", out)
    assert status == 2 and "(field num_inference_steps, --steps)" in stderr
    status, _, stderr = run(capsys, "--url", url, "generate", "x", "--sampler", "Nonesuch", "-o", out)
    assert status == 2 and "unknown sampler 'Nonesuch'" in stderr and "Euler a" in stderr
    status, _, stderr = run(capsys, "--url", url, "generate", "x", "--checkpoint", "sd_xl_base_1.0", "-o", out)
    assert status == 2 and "unknown checkpoint 'sd_xl_base_1.0' (field model, --checkpoint; choices: " in stderr
    assert "tiny-sdxl-base, tiny-sdxl-base-b" in stderr and "anime" in stderr
    status, _, stderr = run(capsys, "--url", url, "upscale", str(tmp_path / "missing.png"), "-o", out)
    assert status == 2 and "cannot read" in stderr
    assert not (tmp_path / "never.png").exists()


@integration
def test_a_full_queue_says_when_to_retry(service, url, tmp_path, capsys):
    drain(service)
    try:
        wait(service, submit(service, body={**LONG, "steps": 150})["id"], until=("processing",))
        for _ in range(8):  # MAX_QUEUE_SIZE
            submit(service, body=SMALL)
        status, _, stderr = run(capsys, "--url", url, "generate", "x", "--size", "64", "-o", str(tmp_path / "x.png"))
        assert status == 5 and stderr.startswith("imagegen: 429 QUEUE_FULL:") and "retry after 5 s" in stderr
    finally:
        drain(service)


def test_connection_refused_is_one_clear_line(tmp_path, capsys):
    url = f"http://127.0.0.1:{free_port()}"
    status, _, stderr = run(capsys, "--url", url, "generate", "x", "-o", str(tmp_path / "x.png"))
    assert status == 3
    assert stderr == f"imagegen: cannot reach {url}: connection refused (is the service running? --url or " \
                     "IMAGEGEN_URL)\n"
    assert run(capsys, "--url", url, "jobs", "wait", "job_1_a")[0] == 3


@pytest.mark.parametrize(("status", "headers", "body", "exit_status", "line"), [
    (401, {}, {"error": "missing or invalid bearer token", "code": "UNAUTHORIZED", "details": {}}, 4,
     "401 unauthorized: missing or invalid bearer token (pass --token or set IMAGEGEN_TOKEN)"),
    (503, {"Retry-After": "7"}, {"error": "the service is busy", "code": "MODEL_UNAVAILABLE", "details": {}}, 5,
     "503 MODEL_UNAVAILABLE: the service is busy; retry after 7 s"),
    (404, {}, {"error": "Job not found", "code": "NOT_FOUND", "details": {"field": "id"}}, 2,
     "404 NOT_FOUND: Job not found (field id)"),
    (429, {"Retry-After": "1"}, {"error": "too many read requests: retry in 1 s", "code": "RATE_LIMITED",
                                 "details": {}}, 5, "429 RATE_LIMITED: too many read requests: retry in 1 s"),
    (413, {}, {"error": "request body exceeds 33554432 bytes", "code": "PAYLOAD_TOO_LARGE",
               "details": {"limit": 33554432}}, 2, "413 PAYLOAD_TOO_LARGE: the request is over the service's 32 MiB "
     "limit (an image travels as base64, a third larger than its file)"),
    # Not the service's answers: a gateway's, a proxy's, another server's pages are one line and never "failed"
    (502, {}, "<html>bad gateway</html>", 3,
     "502 Bad Gateway (a gateway got no answer from the service: is it running?)"),
    (504, {"Content-Type": "text/html"}, "<html>\n<head><title>504 Gateway Time-out</title></head>\n<body>\n"
     "<center><h1>504 Gateway Time-out</h1></center>\n<hr><center>nginx/1.25.3</center>\n</body>\n</html>\n", 3,
     "504 Gateway Timeout (a gateway got no answer from the service: is it running?)"),
    (501, {"Content-Type": "text/html;charset=utf-8"}, "<!DOCTYPE HTML>\n<html lang='en'>\n  <head>\n    <meta "
     "charset='utf-8'>\n    <title>Error response</title>\n  </head>\n  <body>\n    <h1>Error response</h1>\n"
     "    <p>Error code: 501</p>\n    <p>Message: Unsupported method ('GET').</p>\n  </body>\n</html>\n", 3,
     "501 Not Implemented: Error response (not the service's answer: is --url or IMAGEGEN_URL the service?)"),
    (404, {"Content-Type": "text/plain"}, "Path '/jobs/job_1_a' not found. Ping http://127.0.0.1:8000/-/routes for "
     "available routes.", 3, "404 Not Found: Path '/jobs/job_1_a' not found. Ping http://127.0.0.1:8000/-/routes for "
     "available routes. (not the service's answer: is --url or IMAGEGEN_URL the service?)"),
    (503, {"Content-Type": "text/plain"}, "Service Unavailable", 5, "503 Service Unavailable; retry after a few s"),
    (413, {"Content-Type": "text/html"}, "<html><head><title>413 Request Entity Too Large</title></head></html>", 2,
     "413 Request Entity Too Large (a proxy's body limit; an image travels as base64, a third larger than its "
     "file)"),
])
def test_error_answers_become_one_line_and_an_exit_status(status, headers, body, exit_status, line):
    def answer(request: httpx.Request) -> httpx.Response:
        assert request.headers["authorization"] == "Bearer t0ken"
        content = json.dumps(body) if isinstance(body, dict) else body
        return httpx.Response(status, headers=headers, content=content)

    service = Service("http://imagegen.test", "t0ken", transport=httpx.MockTransport(answer))
    with pytest.raises(CliError) as e:
        service.call("GET", "/jobs/job_1_a")
    assert (e.value.status, str(e.value)) == (exit_status, line)


def fake(answer) -> Callable[..., Service]:
    """What ``graphs.cli`` builds its ``Service`` with, answering through ``answer`` instead of the network."""
    return lambda url, token, **options: Service(url, token, transport=httpx.MockTransport(answer), **options)


def test_the_cli_imports_no_model_libraries():
    code = "import sys, graphs.cli; print(sorted(m for m in ('torch', 'ray', 'diffusers') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True)
    assert out.stdout.strip() == "[]"


def png_base64() -> str:
    png = io.BytesIO()
    Image.new("RGB", (8, 8)).save(png, "PNG")
    return base64.b64encode(png.getvalue()).decode()


def canned_service(monkeypatch, streams: list[str], result: dict, routes: dict | None = None) -> list[int]:
    """``graphs.cli.main`` against canned answers: connection n of the job's event stream answers ``streams[n]``
    (the last one again past the end); returns the Last-Event-ID each connection sent. ``routes`` maps a path to a
    function of the request that answers it first (or raises, as a refused connection does); None goes on to the
    canned answer."""
    import graphs.cli
    import graphs.client

    sent: list[int] = []

    def answer(request: httpx.Request) -> httpx.Response:
        own = (routes or {}).get(request.url.path)
        answered = own(request) if own else None
        if answered is not None:
            return answered
        if request.url.path in ("/generate/text2img", "/jobs/job_1/events"):
            sent.append(int(request.headers.get("last-event-id", 0)))
            body = streams[min(len(sent), len(streams)) - 1]
            return httpx.Response(200, text=body, headers={"content-type": "text/event-stream"})
        if request.url.path == "/jobs/job_1/result":
            return httpx.Response(200, json={"imageData": png_base64(), "width": 8, "height": 8, **result})
        if request.url.path == "/jobs/job_1":
            return httpx.Response(200, json={"id": "job_1", "type": "text2img", "status": "processing"})
        return httpx.Response(404, json={"error": "no such route", "code": "NOT_FOUND", "details": {}})

    monkeypatch.setattr(graphs.client, "RECONNECT_PAUSE_S", 0.0)
    monkeypatch.setattr(graphs.cli, "Service", fake(answer))
    return sent


def frame(event_id: int, name: str, **data) -> str:
    return f"id: {event_id}\nevent: {name}\ndata: {json.dumps({'job_id': 'job_1', 'status': 'x', **data})}\n\n"


def test_a_long_job_is_followed_across_any_number_of_cut_streams(monkeypatch, tmp_path, capsys):
    """The service cuts each stream at its deadline: ten connections that each bring one event are followed to the
    end; only connections that bring nothing, six in a row, give up."""
    progress = [frame(n, "progress", step=n, total=11) for n in range(1, 11)]
    sent = canned_service(monkeypatch, [*progress, frame(11, "completed")], {"nsfw": None})
    status, out, _ = run(capsys, "--quiet", "generate", "x", "-o", str(tmp_path / "x.png"))
    assert status == 0 and out.startswith(str(tmp_path / "x.png")) and sent == list(range(11))
    sent = canned_service(monkeypatch, [frame(1, "queued", position=1), ""], {})
    status, _, err = run(capsys, "--quiet", "generate", "x", "-o", str(tmp_path / "y.png"))
    assert status == 3 and "keeps closing" in err and sent == [0, 1, 1, 1, 1, 1, 1]


def test_a_flagged_image_is_saved_with_its_warning_and_exit_status_6(monkeypatch, tmp_path, capsys):
    warning = "image 1 of 1 flagged by the safety checker: replaced by a black image"
    canned_service(monkeypatch, [frame(1, "completed", nsfw=[True], warnings=[warning])], {"nsfw": True})
    status, _, err = run(capsys, "--quiet", "generate", "x", "-o", str(tmp_path / "x.png"))
    assert status == 6 and (tmp_path / "x.png").is_file() and f"imagegen: job_1: {warning}\n" in err


def test_while_the_service_has_no_stream_to_spare_the_job_is_polled(monkeypatch, tmp_path, capsys):
    """A watcher refused its stream (503 STREAMS_BUSY) follows the job by polling it to its end."""
    import graphs.cli
    import graphs.client

    polls = []

    def answer(request: httpx.Request) -> httpx.Response:
        if request.url.path == "/jobs/job_1/events":
            return httpx.Response(503, headers={"Retry-After": "5"}, json={
                "error": "this replica serves 32 event streams", "code": "STREAMS_BUSY", "details": {"limit": 32}})
        if request.url.path == "/jobs/job_1":
            polls.append(1)
            if len(polls) == 2:  # rate limited like the stream: the client waits its turn
                return httpx.Response(429, headers={"Retry-After": "1"}, json={
                    "error": "too many requests", "code": "RATE_LIMITED", "details": {}})
            if len(polls) < 4:  # the first: jobs wait's look at the job before it follows it
                return httpx.Response(200, json={"id": "job_1", "status": "processing"})
            return httpx.Response(200, json={"id": "job_1", "status": "failed", "error": "GPU_OOM: out of memory"})
        return httpx.Response(404, json={"error": "no such route", "code": "NOT_FOUND", "details": {}})

    monkeypatch.setattr(graphs.client, "BUSY_POLL_S", 0.0)
    monkeypatch.setattr(graphs.cli, "Service", fake(answer))
    status, _, err = run(capsys, "--quiet", "jobs", "wait", "job_1")
    assert status == 1 and len(polls) == 4 and err == "imagegen: job job_1 failed: GPU_OOM: out of memory\n"


def test_an_output_that_cannot_be_written_is_refused_before_the_job_is_queued(monkeypatch, tmp_path, capsys):
    sent = canned_service(monkeypatch, [frame(1, "completed")], {})
    (tmp_path / "afile").write_text("")
    for argv, says in [(["generate", "x", "-o", str(tmp_path)], "a folder; name the image file to write"),
                       (["generate", "x", "-o", str(tmp_path / "afile" / "x.png")], "afile is a file, not a folder"),
                       (["batch-sizes", "x", "--sizes", "hero", "-o", str(tmp_path / "afile")], "not a folder")]:
        status, _, err = run(capsys, "--quiet", *argv)
        assert status == 2 and says in err, err
    assert sent == []  # nothing was submitted


def test_a_result_that_cannot_be_written_names_the_job_to_fetch_it_again(monkeypatch, tmp_path, capsys):
    out = tmp_path / "x.png"
    canned_service(monkeypatch, [frame(1, "completed")], {}, routes={"/jobs/job_1/result": lambda _: out.mkdir()})
    status, _, err = run(capsys, "--quiet", "generate", "x", "-o", str(out))
    assert status == 7 and err.startswith(f"imagegen: cannot write {out}: ") and "imagegen jobs wait job_1 -o" in err


def refused(_request: httpx.Request) -> httpx.Response:
    raise httpx.ConnectError("[Errno 111] Connection refused")


def test_a_service_that_goes_away_mid_job_is_waited_for(monkeypatch, tmp_path, capsys):
    """A restart or a load balancer's failover: once the job is queued, refused connections are retried (six tries,
    the pauses doubling) and every error names the job."""
    import graphs.client

    attempts = iter(range(3))  # three refused reconnects, then the service is back
    sent = canned_service(monkeypatch, [frame(1, "queued", position=1), frame(2, "completed")], {},
                          routes={"/jobs/job_1/events": lambda r: refused(r) if next(attempts, None) is not None
                                  else None})
    pauses: list[float] = []
    monkeypatch.setattr(graphs.client, "RECONNECT_PAUSE_S", 1.0)
    monkeypatch.setattr(graphs.client.time, "sleep", pauses.append)
    status, _, err = run(capsys, "--quiet", "generate", "x", "-o", str(tmp_path / "x.png"))
    assert (status, err, sent, pauses) == (0, "", [0, 1], [1, 1, 2, 4])

    canned_service(monkeypatch, [frame(1, "queued", position=1)], {}, routes={"/jobs/job_1/events": refused})
    monkeypatch.setattr(graphs.client, "RECONNECT_PAUSE_S", 1.0)
    pauses.clear()
    status, _, err = run(capsys, "--quiet", "generate", "x", "-o", str(tmp_path / "y.png"))
    assert status == 3 and pauses == [1, 1, 2, 4, 8, 16]
    assert "connection refused" in err and err.endswith("the job may still run: imagegen jobs wait job_1\n")

    canned_service(monkeypatch, [frame(1, "completed")], {}, routes={"/jobs/job_1/result": refused})
    status, _, err = run(capsys, "--quiet", "generate", "x", "-o", str(tmp_path / "z.png"))
    assert status == 3 and err.startswith("imagegen: job job_1: cannot reach")


def test_a_first_connection_refused_exits_3_at_once(monkeypatch, tmp_path, capsys):
    """A refused first connection is a wrong --url or no service: waiting could only delay the one clear line. The
    job id ``jobs wait`` names is not yet a job the service answered about."""
    import graphs.client

    pauses: list[float] = []
    monkeypatch.setattr(graphs.client.time, "sleep", pauses.append)
    for argv in (["generate", "x", "-o", str(tmp_path / "x.png")], ["jobs", "wait", "job_1"]):
        canned_service(monkeypatch, [frame(1, "completed")], {},
                       routes={"/generate/text2img": refused, "/jobs/job_1/events": refused})
        monkeypatch.setattr(graphs.client, "RECONNECT_PAUSE_S", 1.0)
        status, _, err = run(capsys, "--quiet", *argv)
        assert (status, pauses) == (3, []), argv
        assert "cannot reach" in err and "connection refused" in err


def test_jobs_wait_writes_every_size_of_a_batch_into_the_output_folder(monkeypatch, tmp_path, capsys):
    image = {"imageData": png_base64(), "width": 8, "height": 8, "nsfw": False}
    job = {"id": "job_1", "type": "batch-sizes", "status": "completed", "images": {"hero": image, "og": image}}
    canned_service(monkeypatch, [frame(1, "completed")], {},
                   routes={"/jobs/job_1": lambda _: httpx.Response(200, json=job)})
    status, out, _ = run(capsys, "--quiet", "jobs", "wait", "job_1", "-o", str(tmp_path / "sizes"))
    assert status == 0 and sorted(p.name for p in (tmp_path / "sizes").iterdir()) == ["hero.png", "og.png"]
    assert out == f"{tmp_path / 'sizes' / 'hero.png'} 8x8\n{tmp_path / 'sizes' / 'og.png'} 8x8\n"
    (tmp_path / "afile").write_text("")
    status, _, err = run(capsys, "--quiet", "jobs", "wait", "job_1", "-o", str(tmp_path / "afile"))
    assert status == 2 and "not a folder (the images go into it as <size>.png)" in err


def test_jobs_wait_on_a_batch_whose_first_look_was_busy_still_saves_every_size(monkeypatch, tmp_path, capsys):
    """A 503 on the first look at the job leaves its kind unknown until it ends: a batch is then still saved into
    the folder, size by size, not asked for as one image."""
    image = {"imageData": png_base64(), "width": 8, "height": 8, "nsfw": False}
    job = {"id": "job_1", "type": "batch-sizes", "status": "completed", "images": {"hero": image, "og": image},
           "request": {"sizes": ["hero", "og"]}}
    looks = iter([httpx.Response(503, json={"error": "busy", "code": "MODEL_UNAVAILABLE", "details": {}},
                                 headers={"Retry-After": "1"})])
    canned_service(monkeypatch, [frame(1, "completed")], {},
                   routes={"/jobs/job_1": lambda _: next(looks, None) or httpx.Response(200, json=job)})
    status, out, err = run(capsys, "--quiet", "jobs", "wait", "job_1", "-o", str(tmp_path / "sizes"))
    assert (status, err) == (0, "")
    assert sorted(p.name for p in (tmp_path / "sizes").iterdir()) == ["hero.png", "og.png"]


def test_jobs_wait_on_a_batch_exits_6_when_any_size_was_flagged(monkeypatch, tmp_path, capsys):
    """The flags of a batch's sizes are in its view, not in the completed event: a script saving the batch with
    ``jobs wait -o`` must not take a replaced size for clean."""
    for flags, exit_status in (((False, True), 6), ((False, False), 0)):
        images = {name: {"imageData": png_base64(), "width": 8, "height": 8, "nsfw": flagged}
                  for name, flagged in zip(("avatar", "hero"), flags, strict=True)}
        job = {"id": "job_1", "type": "batch-sizes", "status": "completed", "images": images}
        canned_service(monkeypatch, [frame(1, "completed")], {},
                       routes={"/jobs/job_1": lambda _, job=job: httpx.Response(200, json=job)})
        out = tmp_path / "-".join(map(str, flags))
        status, _, _ = run(capsys, "--quiet", "jobs", "wait", "job_1", "-o", str(out))
        assert status == exit_status and sorted(p.name for p in out.iterdir()) == ["avatar.png", "hero.png"]


def batch_service(monkeypatch, view: dict) -> None:
    """A service whose batch-sizes job completes at once and whose view of it is ``view``."""
    import graphs.cli

    def answer(request: httpx.Request) -> httpx.Response:
        if request.url.path == "/generate/batch-sizes":
            return httpx.Response(200, text=frame(1, "completed"), headers={"content-type": "text/event-stream"})
        return httpx.Response(200, json=view)

    monkeypatch.setattr(graphs.cli, "Service", fake(answer))


def test_a_batch_writes_the_sizes_it_can_read_and_names_the_others(monkeypatch, tmp_path, capsys):
    """A size the view gives as null (expired, or the store down) is named, not a crash; the others are written."""
    import base64
    import io


    png = io.BytesIO()
    Image.new("RGB", (8, 8)).save(png, "PNG")
    sizes = {"avatar": base64.b64encode(png.getvalue()).decode(), "hero": None}
    view = {"id": "job_1", "status": "completed", "images": {
        name: {"imageData": data, "width": 8, "height": 8, "nsfw": None} for name, data in sizes.items()}}

    batch_service(monkeypatch, view)
    status, out, err = run(capsys, "--quiet", "batch-sizes", "x", "--sizes", "avatar,hero", "-o", str(tmp_path))
    assert status == 1 and out == f"{tmp_path / 'avatar.png'} 8x8\n" and not (tmp_path / "hero.png").exists()
    assert "job_1: hero could not be read; see GET /jobs/job_1" in err


@pytest.mark.parametrize(("nsfw", "exit_status"), [([False, True], 6), ([True, False], 6), ([False, False], 0),
                                                   (None, 0)], ids=["last", "first", "none", "filter-off"])
def test_a_job_exits_6_when_any_of_its_images_was_flagged(monkeypatch, capsys, nsfw, exit_status):
    """One replaced image among several is enough: a script must not take the batch for clean."""
    canned_service(monkeypatch, [frame(1, "completed", nsfw=nsfw)], {})
    status, _, _ = run(capsys, "--quiet", "jobs", "wait", "job_1")
    assert status == exit_status


def test_batch_sizes_exits_6_when_any_size_was_flagged_and_writes_them_all(monkeypatch, tmp_path, capsys):
    """The sizes of a batch come from a base per aspect: one flagged base replaces only its own sizes."""

    view = {"id": "job_1", "status": "completed", "images": {
        name: {"imageData": png_base64(), "width": 8, "height": 8, "nsfw": flagged}
        for name, flagged in (("avatar", False), ("hero", True))}}

    batch_service(monkeypatch, view)
    status, _, _ = run(capsys, "--quiet", "batch-sizes", "x", "--sizes", "avatar,hero", "-o", str(tmp_path))
    assert status == 6 and sorted(p.name for p in tmp_path.iterdir()) == ["avatar.png", "hero.png"]


def recording_service(monkeypatch, answers: dict) -> list[httpx.Request]:
    """``graphs.cli.main`` against ``answers``: a path (or "METHOD path") -> a function of the request, or a canned
    response; returns the requests sent, in order."""
    import graphs.cli
    import graphs.client

    sent: list[httpx.Request] = []

    def answer(request: httpx.Request) -> httpx.Response:
        sent.append(request)
        own = answers.get(f"{request.method} {request.url.path}", answers.get(request.url.path))
        if own is None:
            return httpx.Response(404, json={"error": "no such route", "code": "NOT_FOUND", "details": {}})
        return own(request) if callable(own) else own

    monkeypatch.setattr(graphs.client, "RECONNECT_PAUSE_S", 0.0)
    monkeypatch.setattr(graphs.cli, "Service", fake(answer))
    return sent


def stream(*frames: str) -> httpx.Response:
    return httpx.Response(200, text="".join(frames), headers={"content-type": "text/event-stream"})


@pytest.mark.parametrize("argv", [["jobs", "list"], ["generate", "x", "-o", "{tmp}/x.png"]], ids=["call", "stream"])
def test_a_redirect_or_a_page_that_is_not_json_is_one_line_exit_3(monkeypatch, tmp_path, capsys, argv):
    """httpx follows no redirect (http -> https, a trailing slash): the answer is named, never a traceback."""
    argv = [a.replace("{tmp}", str(tmp_path)) for a in argv]
    page = {"content-type": "text/html; charset=utf-8"}
    for response, says in [
        (httpx.Response(301, headers={**page, "location": "https://imagegen.test/jobs"}, text="<html>moved</html>"),
         "(HTTP 301, text/html, to https://imagegen.test/jobs): is --url the service?"),
        (httpx.Response(200, headers=page, text="<html><body>welcome</body></html>"),
         "(HTTP 200, text/html): is --url the service?")]:
        recording_service(monkeypatch, {"/jobs": response, "/generate/text2img": response})
        status, _, err = run(capsys, "--url", "http://imagegen.test", *argv)
        assert status == 3 and err == f"imagegen: unexpected answer from http://imagegen.test {says}\n"


def test_an_existing_output_is_refused_before_the_job_unless_force(monkeypatch, tmp_path, capsys):
    sent = canned_service(monkeypatch, [frame(1, "completed")], {})
    out = tmp_path / "a.png"
    out.write_bytes(b"mine")
    (tmp_path / "sizes").mkdir()
    (tmp_path / "sizes" / "avatar.png").write_bytes(b"mine")
    for argv in (["generate", "x", "-o", str(out)], ["upscale", str(out), "-o", str(out)],
                 ["batch-sizes", "x", "--sizes", "hero,avatar", "-o", str(tmp_path / "sizes")]):
        status, _, err = run(capsys, "--quiet", *argv)
        assert status == 2 and "exists (--force replaces it)" in err, err
    assert sent == [] and out.read_bytes() == b"mine"
    status, _, err = run(capsys, "--quiet", "generate", "x", "-o", str(out), "--force")
    assert status == 0 and Image.open(out).size == (8, 8), err


def test_dash_is_stdin_and_stdout_and_other_extensions_are_converted(monkeypatch, tmp_path, capsysbinary):
    png = base64.b64decode(png_base64())
    sent = recording_service(monkeypatch, {"/sdapi/v1/extra-single-image": lambda r: httpx.Response(
        200, json={"image": json.loads(r.content)["image"], "html_info": ""})})
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(png)))
    assert main(["--quiet", "upscale", "-", "-o", "-"]) == 0
    captured = capsysbinary.readouterr()
    assert captured.out == png and captured.err == b"" and len(sent) == 1
    (tmp_path / "in.png").write_bytes(png)
    assert main(["upscale", str(tmp_path / "in.png"), "-o", str(tmp_path / "out.jpg")]) == 0
    assert Image.open(tmp_path / "out.jpg").format == "JPEG"
    capsysbinary.readouterr()
    assert main(["upscale", str(tmp_path / "in.png"), "-o", str(tmp_path / "out.xyz")]) == 2
    assert b"cannot write .xyz images" in capsysbinary.readouterr().err and len(sent) == 2


def test_generate_prints_the_seed_and_sends_every_flag(monkeypatch, tmp_path, capsys):
    bodies: list[dict] = []

    def submitted(request: httpx.Request) -> httpx.Response:
        bodies.append(json.loads(request.content))
        return stream(frame(1, "completed", seed=1234))

    view = {"id": "job_1", "status": "completed", "images": {"avatar": {
        "imageData": png_base64(), "width": 8, "height": 8, "nsfw": None}}}
    recording_service(monkeypatch, {
        "/generate/text2img": submitted, "/generate/async": submitted, "/generate/batch-sizes": submitted,
        "/jobs/job_1/result": httpx.Response(200, json={"imageData": png_base64(), "width": 8, "height": 8}),
        "/jobs/job_1": httpx.Response(200, json=view)})
    status, out, _ = run(capsys, "--quiet", "generate", "x", "--guidance", "4.5", "-o", str(tmp_path / "a.png"))
    assert status == 0 and out == f"{tmp_path / 'a.png'} 8x8 (job_1, seed 1234)\n"
    assert run(capsys, "--quiet", "generate", "x", "--hires", "--guidance", "5", "-o", str(tmp_path / "b.png"))[0] == 0
    assert run(capsys, "--quiet", "batch-sizes", "x", "--sizes", "avatar", "--negative", "blur", "--checkpoint",
               "anime", "--guidance", "6", "-o", str(tmp_path / "c"))[0] == 0
    assert bodies == [{"prompt": "x", "guidanceScale": 4.5}, {"prompt": "x", "guidance_scale": 5.0,
                                                            "hires_fix": True, "use_face_restoration": False},
                      {"prompt": "x", "negativePrompt": "blur", "sizes": ["avatar"], "guidanceScale": 6.0,
                       "model": "anime"}]
    status, _, err = run(capsys, "--quiet", "generate", "x", "--hires", "--size", "512", "-o", str(tmp_path / "d.png"))
    assert status == 2 and "takes no --size" in err and len(bodies) == 3


def test_sizes_lists_the_named_sizes_and_the_bases(monkeypatch, capsys):
    config = {"sizes": {"hero": {"width": 1920, "height": 640, "aspect": "landscape"},
                        "avatar": {"width": 512, "height": 512, "aspect": "square"}},
              "bases": {"landscape": [1344, 768], "square": [1024, 1024]}}
    recording_service(monkeypatch, {"GET /generate/batch-sizes": httpx.Response(200, json=config)})
    status, out, _ = run(capsys, "sizes")
    assert status == 0 and out.splitlines() == [
        "hero             1920x640    landscape", "avatar           512x512    square",
        "bases (one rendered per aspect class, --base-size overrides): landscape 1344x768, square 1024x1024"]


def test_jobs_show_asks_for_no_images_and_shortens_base64(monkeypatch, capsys):
    view = {"id": "job_1", "type": "batch-sizes", "status": "completed",
            "images": {"hero": {"imageData": "QUJD" * 100_000, "url": "/jobs/job_1/images/hero.png"}}}
    sent = recording_service(monkeypatch, {"/jobs/job_1": httpx.Response(200, json=view)})
    status, out, _ = run(capsys, "jobs", "show", "job_1")
    assert status == 0 and sent[0].url.params["images"] == "false" and len(out) < 500
    assert json.loads(out)["images"]["hero"] == {"imageData": "<base64, 400000 characters>",
                                                 "url": "/jobs/job_1/images/hero.png"}


def test_jobs_wait_on_a_finished_job_prints_its_end_alone(monkeypatch, tmp_path, capsys):
    view = {"id": "job_1", "type": "text2img", "status": "completed", "result": {"seed": 9, "warnings": []}}
    sent = recording_service(monkeypatch, {
        "/jobs/job_1": httpx.Response(200, json=view),
        "/jobs/job_1/result": httpx.Response(200, json={"imageData": png_base64(), "width": 8, "height": 8})})
    status, out, err = run(capsys, "jobs", "wait", "job_1", "-o", str(tmp_path / "w.png"))
    assert (status, err) == (0, "job_1: completed\n") and out.endswith("8x8 (job_1, seed 9)\n")
    assert [r.url.path for r in sent] == ["/jobs/job_1", "/jobs/job_1/result"]  # no event stream replayed


def test_progress_off_a_terminal_skips_previews_and_names_the_pass(monkeypatch, capsys):
    """A 150-step job with previews is a dozen lines, not 300; a hires fix's second pass is named."""
    first = [frame(n, "progress", step=n, total=150) + frame(n, "preview", step=n, total=150) for n in range(1, 151)]
    second = [frame(150 + n, "progress", step=n, total=4) for n in range(1, 5)]
    recording_service(monkeypatch, {"/jobs/job_1": httpx.Response(200, json={"id": "job_1", "status": "queued"}),
                                    "/jobs/job_1/events": stream(*first, *second, frame(155, "completed"))})
    status, _, err = run(capsys, "jobs", "wait", "job_1")
    lines = err.splitlines()
    assert status == 0 and len(lines) == 11 + 4 + 1 and lines[-1] == "job_1: completed"
    assert lines[10].endswith("] step 150/150") and lines[11].endswith("] pass 2, step 1/4")


def test_jobs_cancel_waits_briefly_for_a_running_job_to_stop(monkeypatch, capsys):
    import graphs.cli_commands

    states = iter(["processing", "cancelled"])
    recording_service(monkeypatch, {
        "POST /jobs/job_1/cancel": httpx.Response(200, json={"success": True, "id": "job_1", "status": "processing"}),
        "GET /jobs/job_1": lambda _: httpx.Response(200, json={"id": "job_1", "status": next(states, "processing")})})
    monkeypatch.setattr(graphs.cli_commands, "CANCEL_POLL_S", 0.0)
    assert run(capsys, "jobs", "cancel", "job_1")[1] == "job_1: cancelled\n"
    monkeypatch.setattr(graphs.cli_commands, "CANCEL_WAIT_S", 0.0)
    assert run(capsys, "jobs", "cancel", "job_1")[1] == (
        "job_1: cancel requested; still processing (it stops at its next step: imagegen jobs wait job_1)\n")


def test_a_service_that_never_answers_is_a_timeout_not_unreachable(tmp_path, capsys, monkeypatch):
    """A listening socket that accepts (the kernel does) and never answers: the wait is --timeout or
    IMAGEGEN_TIMEOUT, and the message says so."""
    import socket

    with socket.create_server(("127.0.0.1", 0)) as silent:
        url = f"http://127.0.0.1:{silent.getsockname()[1]}"
        status, _, err = run(capsys, "--url", url, "--timeout", "0.2", "jobs", "list")
        assert status == 3 and err == f"imagegen: no answer from {url} within 0.2 s (--timeout or IMAGEGEN_TIMEOUT)\n"
        monkeypatch.setenv("IMAGEGEN_TIMEOUT", "0.3")
        status, _, err = run(capsys, "--url", url, "generate", "x", "-o", str(tmp_path / "x.png"))
        assert status == 3 and "within 0.3 s" in err and "a job may have been queued: imagegen jobs list" in err


def test_ctrl_c_cancels_a_submitted_job_and_leaves_a_watched_one_running(monkeypatch, tmp_path, capsys):
    def interrupt(_request: httpx.Request) -> httpx.Response:
        raise KeyboardInterrupt

    sent = recording_service(monkeypatch, {
        "/generate/text2img": stream(frame(1, "queued", position=1)), "/jobs/job_1/events": interrupt,
        "/jobs/job_1": httpx.Response(200, json={"id": "job_1", "status": "processing"}),
        "POST /jobs/job_1/cancel": httpx.Response(200, json={"success": True, "id": "job_1", "status": "cancelled"})})
    status, _, err = run(capsys, "--quiet", "generate", "x", "-o", str(tmp_path / "x.png"))
    assert (status, err) == (130, "imagegen: interrupted: job_1 cancelled\n")
    assert sent[-1].url.path == "/jobs/job_1/cancel"
    sent.clear()
    status, _, err = run(capsys, "--quiet", "jobs", "wait", "job_1")
    assert (status, err) == (130, "imagegen: interrupted; job_1 runs on: imagegen jobs wait job_1\n")
    assert all(r.method == "GET" for r in sent)


def test_the_help_names_every_argument_and_the_exit_statuses(capsys):
    from graphs.cli import parser

    top = parser()
    commands = next(a for a in top._actions if isinstance(a, argparse._SubParsersAction)).choices
    for name, command in [("imagegen", top), *commands.items()]:
        for action in command._actions:
            if not isinstance(action, argparse._SubParsersAction):
                assert action.help, f"{name}: {action.dest} has no help"
        text = command.format_help()
        assert "\n  130  interrupted (Ctrl-C)" in text and "\n  6    done, but the safety" in text, name
        assert not re.search(r"seed 00\d|configs/", text), name
    assert "Ctrl-C cancels the job" in commands["generate"].format_help()
    assert "Ctrl-C cancels the job" in commands["batch-sizes"].format_help()
    assert "leaves the job running" in commands["jobs"].format_help()
    assert "at most 500" in commands["jobs"].format_help()
