"""The page at /ui. Without Ray: its files, their labels and local-only references, and that it stays open when
bearer auth is on. On the live service (integration): headless Chromium generates, watches progress, gets the
image, cancels a job and upscales an upload, saving screenshots under ``$TEST_ARTIFACTS`` (default
``test-artifacts/``). The browser tests skip, saying why, without playwright or Debian's chromium."""

from __future__ import annotations

import base64
import io
import json
import os
import re
import shutil
from html.parser import HTMLParser
from importlib import resources
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import pytest
from PIL import Image

from deployments.support import settings
from graphs.api import edge, ui
from tests.cluster import ROOT

PAGE_FILES = ("index.html", "app.js", "app.css")
CONTROLS = {"input", "select", "textarea"}


class _Controls(HTMLParser):
    """Form controls and the ``for`` targets of labels in one HTML document."""

    def __init__(self) -> None:
        super().__init__()
        self.controls: list[dict] = []
        self.labelled: set[str] = set()
        self.references: list[str] = []

    def handle_starttag(self, tag, attrs):
        attributes = dict(attrs)
        if tag in CONTROLS and attributes.get("type") != "hidden":
            self.controls.append(attributes)
        if tag == "label" and attributes.get("for"):
            self.labelled.add(attributes["for"])
        self.references += [attributes[a] for a in ("src", "href") if attributes.get(a)]


def _packaged(name: str) -> str:
    return (resources.files("graphs") / "ui" / name).read_text()


def test_every_control_has_a_label_and_every_reference_is_local():
    page = _Controls()
    page.feed(_packaged("index.html"))
    assert len(page.controls) >= 15
    unlabelled = [c for c in page.controls if c.get("id") not in page.labelled]
    assert not unlabelled, unlabelled
    assert {"ui/app.js", "ui/app.css"} <= set(page.references)
    for reference in page.references:
        if reference == "data:,":
            continue  # the empty icon: no /favicon.ico request, which answers 401 where auth is on
        assert not re.match(r"[a-z]+:|//", reference), reference  # relative: no CDN, works under a route prefix
    for name in PAGE_FILES:
        assert not re.search(r"https?://", _packaged(name)), f"{name} names another origin"


@pytest.fixture
def edge_client(monkeypatch):
    monkeypatch.setenv("AUTH_ENABLED", "true")
    monkeypatch.setenv("AUTH_TOKEN", "secret")
    settings.current.cache_clear()
    app = edge.create_app()
    app.include_router(ui.router)

    @app.get("/jobs")
    async def jobs():
        return {"jobs": []}

    # A ServiceError reaches Starlette's outermost handler, which answers and then re-raises it: keep the answer.
    transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
    yield httpx.AsyncClient(transport=transport, base_url="http://test")
    settings.current.cache_clear()


@pytest.mark.anyio
async def test_the_page_is_open_under_auth_and_serves_only_its_files(edge_client):
    page = await edge_client.get("/ui")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    policy = dict(part.strip().split(" ", 1) for part in page.headers["content-security-policy"].split(";"))
    assert policy["default-src"] == "'self'" and policy["object-src"] == "'none'"
    # Results and the gallery show as blob: URIs, previews and the tools' answers as data: URIs; nothing else.
    assert sorted(policy["img-src"].split()) == ["'self'", "blob:", "data:"]
    script = await edge_client.get("/ui/app.js")
    assert script.status_code == 200 and script.headers["content-type"].startswith("text/javascript")
    assert script.text == _packaged("app.js")
    assert (await edge_client.get("/ui/app.css")).headers["content-type"].startswith("text/css")
    for name in ("index.py", "..%2Fapi%2Fui.py", "ui.py"):
        missing = await edge_client.get(f"/ui/{name}")
        assert missing.status_code == 404 and missing.json()["code"] == "NOT_FOUND", name
    assert (await edge_client.get("/jobs")).status_code == 401  # the API behind the page is not


# --- in Chromium: the page against faked answers (no Ray), then on the live service ------------------------

@pytest.fixture(scope="module")
def browser():
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed (pip install '.[test]')")
    executable = shutil.which("chromium")
    if executable is None:
        pytest.skip("chromium is not installed (.ci/run installs Debian's chromium)")
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=executable)
        yield browser
        browser.close()


# Records every state the status line shows and every value the progress bar takes, as the page sets them (old
# values from the mutation records, so that changes made within one task are all seen).
WATCH = """() => {
  window.seen = { states: [], values: [], previews: 0 };
  const watch = (id, attribute, list) => new MutationObserver((records) => {
    for (const record of records) list.push(record.oldValue);
  }).observe(document.getElementById(id), { attributes: true, attributeOldValue: true, attributeFilter: [attribute] });
  watch("status", "data-state", window.seen.states);
  watch("progress", "value", window.seen.values);
  new MutationObserver((records) => { window.seen.previews += records.length; })
    .observe(document.getElementById("preview"), { attributes: true, attributeFilter: ["src"] });
  window.texts = [];
  const status = document.getElementById("status");
  new MutationObserver((records) => {
    for (const record of records) {
      if (!record.addedNodes.length) continue;
      window.texts.push({ text: [...record.addedNodes].map((node) => node.textContent).join(""),
        cancel: !document.getElementById("cancel").disabled, generate: !document.getElementById("generate").disabled });
    }
  }).observe(status, { childList: true });
}"""


def _seen(page) -> dict:
    """The states and progress values the page went through, repeats folded, ending with the current ones."""
    seen = page.evaluate("""() => ({ ...window.seen,
        states: [...window.seen.states, document.getElementById("status").dataset.state],
        values: [...window.seen.values, document.getElementById("progress").getAttribute("value")] })""")

    def fold(items):
        return [item for i, item in enumerate(items) if i == 0 or item != items[i - 1]]

    return {"states": fold(seen["states"]), "values": fold([int(v) for v in seen["values"]]),
            "previews": seen["previews"]}


RESULT = "#result img.result-image"


def _png(width: int, height: int, fmt: str = "PNG") -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (width, height), (200, 80, 40)).save(buffer, format=fmt)
    return buffer.getvalue()


def _stream(job_id: str, end: tuple[str, dict] = ("completed", {"images": ["image_0"], "seed": 5})) -> str:
    """The event stream of one job as GET /jobs/{id}/events sends it: named events, JSON data, a comment."""
    preview = "data:image/jpeg;base64," + base64.b64encode(_png(8, 8, "JPEG")).decode()
    events = [("queued", {"position": 1}), ("started", {"attempt": 1}),
              ("progress", {"step": 5, "total": 10, "eta_s": 1.5, "progress": 50.0}),
              ("preview", {"step": 5, "total": 10, "image": preview}),
              ("progress", {"step": 10, "total": 10, "eta_s": 0.0, "progress": 100.0}), end]
    status = {"queued": "queued", "completed": "completed", "failed": "failed"}
    blocks = [": keep-alive"]
    for i, (name, data) in enumerate(events, 1):
        body = {"job_id": job_id, "status": status.get(name, "processing"), **data}
        blocks.append(f"id: {i}\nevent: {name}\ndata: {json.dumps(body)}")
    return "\n\n".join(blocks) + "\n\n"


def _job(**result) -> dict:
    """A completed text2img job's view by URL, as ``GET /jobs/{id}?images=false`` gives it."""
    return {"id": "job_1", "jobId": "job_1", "job_id": "job_1", "type": "text2img", "status": "completed",
            "request": {"prompt": "p", "width": 24, "height": 16}, "progress": 100,
            "result": {"urls": ["/jobs/job_1/images/1-image_0.png"], "seed": 5, **result}}


DOWN = "down"  # an answer that never comes: the connection is refused


class _Seq(list):
    """Answers given one per request, in turn; the last one repeats."""

    def next(self):
        return self.pop(0) if len(self) > 1 else self[0]


class _Stream(str):
    """An answer that is an event stream."""


def _reply(route, spec):
    while isinstance(spec, _Seq) or callable(spec):
        spec = spec.next() if isinstance(spec, _Seq) else spec()
    if spec == DOWN:
        return route.abort("connectionrefused")
    if isinstance(spec, _Stream):
        return route.fulfill(body=str(spec), content_type="text/event-stream")
    if isinstance(spec, tuple):
        status, body, *headers = spec
        if isinstance(body, str):
            return route.fulfill(status=status, body=body, content_type="text/html", headers=(headers or [{}])[0])
        return route.fulfill(status=status, json=body, headers=(headers or [{}])[0])
    return route.fulfill(json=spec)


# Records, from page load, every Content-Security-Policy violation.
VIOLATIONS = """window.violations = [];
document.addEventListener("securitypolicyviolation",
  (e) => window.violations.push(`${e.violatedDirective} ${e.blockedURI}`));"""


def _open(browser, job: dict, stream: str, more: dict | None = None,
          token: str | None = None) -> tuple[object, object, list]:
    """The page against the events contract, every API answer faked in the browser (``more`` adds or replaces
    answers: a (status, body[, headers]) tuple is an error, ``DOWN`` a refused connection, a ``_Seq`` answers in
    turn, a callable is asked each time), the page's files served with the service's own headers (its
    Content-Security-Policy), and waited on until ready. With ``token``, every API call without it answers 401.
    ``submitted`` gets the body of each generate call, the path and query of each job view, image and cancel
    asked for, and ``events <Last-Event-ID>`` for each stream. An image path that ends ``gone.png`` answers 410.
    The caller closes the context."""
    answers = {
        "/models": {"models": [{"id": "m", "type": "base"}]}, "/sdapi/v1/samplers": [{"name": "Euler a"}],
        "/sdapi/v1/loras": [], "/sdapi/v1/upscalers": [], "/generate/batch-sizes": {"sizes": {}, "bases": {}},
        "/jobs": {"jobs": [], "total": 0, "offset": 0, "limit": 12}, "/jobs/job_1": job,
        "/generate/text2img": (202, {**job, "status": "queued", "progress": 0}),
        "/jobs/job_1/events": _Stream(stream), "/sdapi/v1/progress": {"state": {"job": ""}, "current_image": None},
        **(more or {}),
    }
    submitted: list = []

    def answer(route):
        path = urlsplit(route.request.url).path
        if path == "/ui" or path.startswith("/ui/"):
            name = "index.html" if path == "/ui" else path.removeprefix("/ui/")
            types = {"html": "text/html", "js": "text/javascript", "css": "text/css"}
            return route.fulfill(body=_packaged(name), content_type=types[name.rsplit(".", 1)[1]], headers=ui.HEADERS)
        if token and route.request.headers.get("authorization") != f"Bearer {token}":
            return route.fulfill(status=401, json={"error": "missing or invalid bearer token", "code": "UNAUTHORIZED",
                                                   "details": {}})
        if path == "/generate/text2img":
            submitted.append(route.request.post_data_json)
        elif path.endswith("/events"):
            submitted.append(f"events {route.request.headers.get('last-event-id', '')}".strip())
        elif path.startswith("/jobs/"):
            query = urlsplit(route.request.url).query
            submitted.append(f"{path}?{query}" if query else path)
        if "/images/" in path:
            if path.endswith("gone.png"):
                return route.fulfill(status=410, json={"error": "expired", "code": "RESULT_EXPIRED", "details": {}})
            return route.fulfill(body=_png(24, 16), content_type="image/png")
        return _reply(route, answers[path])

    context = browser.new_context()
    context.add_init_script(VIOLATIONS)
    context.route("http://ui.test/**", answer)
    page = context.new_page()
    page.goto("http://ui.test/ui")
    page.wait_for_selector("body[data-ready=true]")
    page.evaluate(WATCH)
    return context, page, submitted


def _generate_against(browser, job: dict, stream: str, until: str,
                      more: dict | None = None) -> tuple[object, object, list]:
    """``_open``, then Generate clicked and waited on until the JavaScript condition ``until`` holds."""
    context, page, submitted = _open(browser, job, stream, more)
    page.get_by_label("Prompt", exact=True).fill("p")
    page.get_by_role("button", name="Generate").click()
    page.wait_for_function(until)
    return context, page, submitted


def test_the_event_stream_drives_the_page(browser):
    """Without Ray: the page against the events contract, every API answer faked in the browser."""
    until = f"() => document.querySelector('{RESULT}')?.naturalWidth > 0"
    context, page, submitted = _generate_against(browser, _job(), _stream("job_1"), until)
    seen = _seen(page)
    mode = page.evaluate("document.body.dataset.updates")
    flags = page.locator("#result .flagged").count()
    link = page.locator("#result a[download]")
    saved = link.get_attribute("download"), link.get_attribute("href")
    named = page.locator(RESULT).get_attribute("alt"), link.get_attribute("aria-label")
    context.close()
    assert named == ("Result: “p”", "Download “p” (job_1_0.png)")  # the prompt, not only the job id
    assert submitted[0]["sampler"] == "Euler a" and submitted[0]["model"] == "m" and submitted[0]["width"] == 512
    assert seen == {"states": ["idle", "queued", "processing", "completed"], "values": [0, 50, 100], "previews": 1}
    assert mode == "events" and flags == 0
    # The result comes by URL: the view without bytes, then the image, shown and saved from a blob: URI.
    assert "/jobs/job_1?images=false" in submitted and "/jobs/job_1/images/1-image_0.png" in submitted
    assert "/jobs/job_1" not in submitted, "the view with every image's bytes was read"
    assert saved[0] == "job_1_0.png" and saved[1].startswith("blob:")


def test_a_failed_stream_shows_why(browser):
    failed = ("failed", {"code": "GPU_OOM", "message": "GPU out of memory"})
    until = "() => document.getElementById('status').dataset.state === 'failed'"
    context, page, _ = _generate_against(browser, _job(), _stream("job_1", failed), until)
    status = page.locator("#status").inner_text()
    context.close()
    assert status == "Failed: GPU_OOM: GPU out of memory"


def test_a_flagged_image_says_so_with_the_warnings(browser):
    warning = "image 1 of 1 flagged by the safety checker: replaced by a black image"
    until = f"() => document.querySelector('{RESULT}')?.naturalWidth > 0"
    context, page, _ = _generate_against(browser, _job(nsfw=[True], warnings=[warning]), _stream("job_1"), until)
    flag = page.locator("#result figcaption .flagged").inner_text()
    warnings = page.locator("#result ul.warnings li").all_inner_texts()
    context.close()
    assert flag == "flagged by the safety checker: replaced" and warnings == [warning]


def test_a_batch_with_an_unreadable_size_shows_the_rest_and_why(browser):
    """A batch's view by URL: one entry per size; an image whose URL answers 410 (expired) shows as unavailable,
    beside the sizes that load."""
    sizes = {"avatar": (24, 16), "hero": (16, 24)}
    entries = {name: {"format": "png", "width": w, "height": h, "aspect": "square",
                      "url": f"/jobs/job_1/images/{name}{'-gone' if name == 'hero' else ''}.png"}
               for name, (w, h) in sizes.items()}
    warning = "hires: 3 of 4 second-pass steps ran"
    job = {**_job(), "type": "batch-sizes", "result": {"images": entries, "seed": 5, "warnings": [warning]},
           "images": entries}
    until = ("() => document.querySelector('#result .unreadable')"
             f" && document.querySelector('{RESULT}')?.naturalWidth > 0")
    context, page, _ = _generate_against(browser, job, _stream("job_1"), until)
    shown = page.locator(RESULT).count()
    missing = page.locator("#result .unreadable").all_inner_texts()
    labels = page.locator("#result figcaption span").all_inner_texts()
    warnings = page.locator("#result ul.warnings li").all_inner_texts()
    context.close()
    assert shown == 1 and missing == ["image unavailable"] and warnings == [warning]
    assert labels == ["avatar 24 × 16 seed 5", "hero 16 × 24 seed 5"]


def test_a_job_whose_details_fail_does_not_empty_the_list(browser):
    """The gallery reads each job's view without its bytes (``?images=false``: URLs alone) and fetches the images
    it shows, so a view here carries no image data at all."""
    listed = [{"id": f"job_{i}", "type": "text2img", "status": "completed", "createdAt": "", "progress": 100}
              for i in (1, 2)]
    more = {"/jobs": {"jobs": listed, "total": 2, "offset": 0, "limit": 12},
            "/jobs/job_2": (503, {"error": "result storage unavailable", "code": "STORAGE_UNAVAILABLE", "details": {}})}
    until = ("() => document.querySelectorAll('#gallery li').length === 2"
             " && document.querySelector('#gallery li[data-job=job_1] img')?.naturalWidth === 24")
    context, page, _ = _generate_against(browser, _job(), _stream("job_1"), until, more)
    note = page.locator("#gallery-note").inner_text()
    images = page.locator("#gallery li[data-job=job_1] img").count()
    saved = page.locator("#gallery li[data-job=job_1] a[download]").get_attribute("download")
    failed = page.locator("#gallery li[data-job=job_2] .unreadable").inner_text()
    context.close()
    assert note == "" and images == 1 and saved == "job_1_0.png"
    assert failed == "Details unavailable: result storage unavailable"


def _running(job_id: str = "job_1", **request) -> dict:
    """A job's view while it runs, as ``GET /jobs/{id}?images=false`` gives it."""
    return {"id": job_id, "jobId": job_id, "type": "text2img", "status": "processing", "progress": 40,
            "createdAt": "2025-03-04T05:06:07Z", "request": {"prompt": "p", "width": 24, "height": 16, **request}}


def _split(stream: str, events: int) -> tuple[str, str]:
    """A stream cut after its first ``events`` events (a connection that broke), and the rest of it."""
    blocks = stream.split("\n\n")
    return "\n\n".join(blocks[:events + 1]) + "\n\n", "\n\n".join(blocks[events + 1:])


def _texts(page) -> list[dict]:
    """Every text the status line showed, with whether Cancel and Generate were enabled then."""
    return page.evaluate("window.texts")


COMPLETED = f"() => document.querySelector('{RESULT}')?.naturalWidth > 0"


def test_polling_rides_out_failed_requests(browser):
    """No event stream (503): polling. A refused connection, a 503 and a gateway's 502 while the job runs are
    retried with backoff, the job kept, Cancel still offered; only the service's word ends it."""
    views = _Seq([_running(), DOWN, (503, {"error": "busy", "code": "UNAVAILABLE", "details": {}}),
                  (502, "<html>Bad Gateway</html>"), _running(), _job()])
    more = {"/jobs/job_1/events": (503, {"error": "too many streams", "code": "STREAMS_BUSY", "details": {}}),
            "/jobs/job_1": views}
    context, page, submitted = _generate_against(browser, _job(), _stream("job_1"), COMPLETED, more)
    seen, texts = _seen(page), _texts(page)
    mode, violations = page.evaluate("document.body.dataset.updates"), page.evaluate("window.violations")
    context.close()
    assert mode == "polling" and "failed" not in seen["states"] and seen["states"][-1] == "completed"
    lost = [t for t in texts if "connection lost" in t["text"]]
    assert len(lost) == 3 and all(t["cancel"] and not t["generate"] for t in lost), texts
    assert "Running: connection lost (Cannot reach the service" in lost[0]["text"]
    assert "gateway" in lost[2]["text"] and "retrying in" in lost[2]["text"]
    assert "/jobs/job_1" not in submitted and violations == []


def test_a_broken_stream_reconnects_where_it_left_off(browser):
    """The stream refused, then cut after four events: reconnected with Last-Event-ID, nothing shown twice, no
    failure shown; the queued event's position is shown."""
    first, rest = _split(_stream("job_1"), 4)
    more = {"/jobs/job_1/events": _Seq([DOWN, _Stream(first), _Stream(rest)])}
    context, page, submitted = _generate_against(browser, _job(), "", COMPLETED, more)
    seen, texts = _seen(page), [t["text"] for t in _texts(page)]
    context.close()
    assert [s for s in submitted if isinstance(s, str) and s.startswith("events")] == ["events", "events", "events 4"]
    assert seen == {"states": ["idle", "queued", "processing", "completed"], "values": [0, 50, 100], "previews": 1}
    assert "Queued: position 1 in the queue" in texts
    assert sum("connection lost" in t for t in texts) == 2


def test_a_reload_follows_the_job_again(browser):
    """Reloaded mid-job: the job id (never the token) kept in sessionStorage, followed again, the form refilled from
    the job's request, the preview shown at the job's aspect."""
    request = {"prompt": "a red kite", "width": 768, "height": 512, "steps": 33, "guidanceScale": 5.5, "seed": 9,
               "sampler": "Euler a", "model": "m"}
    first, _ = _split(_stream("job_1"), 4)  # never ends: the page keeps reconnecting
    more = {"/jobs/job_1": _running(**request), "/jobs/job_1/events": _Stream(first)}
    until = "() => document.getElementById('status').dataset.state === 'processing'"
    context, page, _ = _generate_against(browser, _job(), "", until, more)
    page.reload()
    page.wait_for_function("() => document.getElementById('prompt').value === 'a red kite'"
                           " && !document.getElementById('preview-figure').hidden")
    form = {name: page.locator(f"#{name}").input_value() for name in ("width", "height", "steps", "guidance", "seed")}
    stored = page.evaluate("[sessionStorage.getItem('imagegen.job'), location.href]")
    box = page.locator("#preview").bounding_box()
    job = page.locator("#status").get_attribute("data-job")
    buttons = page.locator("#cancel").is_enabled(), page.locator("#generate").is_enabled()
    context.close()
    assert form == {"width": "768", "height": "512", "steps": "33", "guidance": "5.5", "seed": "9"}
    assert stored == ["job_1", "http://ui.test/ui"] and job == "job_1" and buttons == (True, False)
    assert box["width"] > 400 and abs(box["width"] / box["height"] - 1.5) < 0.02, box  # not the JPEG's 8 × 8


def test_the_gallery_follows_and_cancels_unfinished_jobs(browser):
    """Unfinished jobs in the gallery: Follow makes one current, Cancel cancels it, and the list shows how it ended
    without a click. Every entry shows its prompt; a failed one its error; times in the user's locale."""
    views = {"job_2": _running("job_2", prompt="a slow one", steps=40),
             "job_3": {**_running("job_3", prompt="a broken one"), "status": "failed",
                       "error": "GPU_OOM: GPU out of memory"}}
    listed = [{"id": j, "type": "text2img", "status": v["status"], "createdAt": v["createdAt"], "progress": 0}
              for j, v in views.items()]

    def cancel():
        views["job_2"] = {**views["job_2"], "status": "cancelled"}
        return {"id": "job_2", "status": "cancelled"}

    more = {"/jobs": lambda: {"jobs": [{**j, "status": views[j["id"]]["status"]} for j in listed]},
            "/jobs/job_2": lambda: views["job_2"], "/jobs/job_3": views["job_3"], "/jobs/job_2/cancel": cancel,
            "/jobs/job_2/events": (503, {"error": "busy", "code": "STREAMS_BUSY", "details": {}})}
    context, page, submitted = _open(browser, _job(), "", more)
    entry = page.locator("#gallery li[data-job=job_2]")
    entry.get_by_role("button", name="Follow job job_2 as the current job").click()
    page.wait_for_function("() => document.getElementById('status').dataset.job === 'job_2'"
                           " && document.getElementById('prompt').value === 'a slow one'")
    failed = page.locator("#gallery li[data-job=job_3]")
    shown = failed.locator(".prompt").inner_text(), failed.locator(".job-error").inner_text()
    time = failed.locator("time").inner_text()
    local = page.evaluate("new Date('2025-03-04T05:06:07Z').toLocaleString()")
    assert failed.get_by_role("button").count() == 0
    entry.get_by_role("button", name="Cancel job job_2").click()
    page.wait_for_selector("#gallery li[data-job=job_2][data-status=cancelled]")
    page.wait_for_selector("#status[data-state=cancelled]")
    actions = entry.get_by_role("button").count()
    steps = page.locator("#steps").input_value()
    context.close()
    assert shown == ("a broken one", "GPU_OOM: GPU out of memory") and time == local
    assert "/jobs/job_2/cancel" in submitted and actions == 0 and steps == "40"


def test_errors_say_what_to_do(browser, astronaut):
    """The service down, a gateway's 502, a 503 with Retry-After, a 422 naming its field (focused, marked, the
    message beside it); a 413 from a tool in MiB; a face restorer that found no face says so."""
    refusal = (422, {"error": "width: must be a multiple of 8", "code": "INVALID_INPUT", "details": {"field": "width"}})
    busy = (503, {"error": "model unavailable", "code": "MODEL_UNAVAILABLE", "details": {}}, {"Retry-After": "30"})
    tiny = base64.b64encode(_png(8, 8)).decode()
    more = {"/generate/text2img": _Seq([DOWN, (502, "<html>Bad Gateway</html>"), busy, refusal]),
            "/sdapi/v1/extra-single-image": _Seq([
                (413, {"error": "request body exceeds 1048576 bytes", "code": "PAYLOAD_TOO_LARGE",
                       "details": {"limit": 1048576}}),
                # html_info as the service writes it: HTML, escaped.
                {"html_info": "<p>no face detected: image unchanged</p>", "image": tiny},
                {"html_info": "<p>restorer &#x27;x&#x27; fell back</p>", "image": tiny}])}
    context, page, _ = _open(browser, _job(), "", more)
    page.get_by_label("Prompt", exact=True).fill("p")
    said = []
    for _ in range(4):
        page.evaluate("document.getElementById('form-error').textContent = ''")
        page.get_by_role("button", name="Generate").click()
        page.wait_for_function("() => document.getElementById('form-error').textContent !== ''")
        said.append(page.locator("#form-error").inner_text())
    focused = page.evaluate("[document.activeElement.id, document.activeElement.getAttribute('aria-invalid')]")
    beside = page.locator("#width-error").inner_text()
    described = page.locator("#width").get_attribute("aria-describedby")
    buffer = io.BytesIO()
    astronaut.resize((64, 64)).save(buffer, format="PNG")
    page.get_by_label("Image (PNG, JPEG or WebP)", exact=True).set_input_files(
        files=[{"name": "face.png", "mimeType": "image/png", "buffer": buffer.getvalue()}])
    page.get_by_role("button", name="Restore faces").click()
    page.wait_for_function("() => document.getElementById('tool-error').textContent !== ''")
    too_large = page.locator("#tool-error").inner_text()
    page.get_by_role("button", name="Restore faces").click()
    page.wait_for_selector("#tool-output figcaption")
    label = page.locator("#tool-output figcaption span").inner_text()
    page.get_by_role("button", name="Restore faces").click()
    page.wait_for_function("() => document.querySelector('#tool-output figcaption span').innerText.includes('fell')")
    warned = page.locator("#tool-output figcaption span").inner_text()
    context.close()
    assert said[0].startswith("Cannot reach the service")
    assert said[1].startswith("The gateway in front of the service cannot reach it (HTTP 502)")
    assert said[2] == "model unavailable; retry in 30 s"
    assert said[3] == "width: must be a multiple of 8" and focused == ["width", "true"] and beside == said[3]
    assert "width-error" in described
    assert re.match(r"The request is 0\.\d MiB, over the service's limit of 1\.0 MiB: .*base64.* a third", too_large)
    assert label == "No face found: image unchanged"
    assert warned == "Faces restored (restorer 'x' fell back)"  # the text, not its markup


def test_a_token_is_checked_before_it_is_saved_and_forget_clears_the_page(browser):
    listed = {"jobs": [{"id": "job_1", "type": "text2img", "status": "completed", "createdAt": "", "progress": 100}]}
    context, page, _ = _open(browser, _job(), "", {"/jobs": listed}, token="good")
    first = page.locator("#access-note").inner_text()
    page.get_by_label("Prompt", exact=True).fill("p")
    page.get_by_role("button", name="Generate").click()
    page.wait_for_function("() => document.getElementById('form-error').textContent !== ''")
    token = page.get_by_label("Token", exact=True)
    token.fill("wrong")
    page.get_by_role("button", name="Save token").click()
    page.wait_for_function("() => /refused/.test(document.getElementById('access-note').textContent)")
    kept = page.evaluate("localStorage.getItem('imagegen.token')")
    token.fill("good")
    page.get_by_role("button", name="Save token").click()
    page.wait_for_selector("#gallery li[data-job=job_1] img")
    saved = page.evaluate("localStorage.getItem('imagegen.token')"), page.locator("#form-error").inner_text()
    page.get_by_role("button", name="Forget").click()
    left = page.locator("#gallery li").count()
    page.get_by_role("button", name="Refresh").click()
    page.wait_for_function("() => document.getElementById('gallery-note').textContent !== ''")
    after = page.locator("#gallery li").count()
    context.close()
    assert first.startswith("This service needs a bearer token") and kept is None
    assert saved == ("good", "") and left == 0 and after == 0


def test_controls_that_would_be_ignored_are_greyed_and_inputs_checked(browser):
    """A named size ticked greys out the size, sampler, hires fix and faces, saying why; hires fix greys out the
    size and sampler but not the checkpoint, which the hint says applies. A LoRA weight out of range is refused
    beside its field. The icon is a data: URI that the page's policy allows."""
    sizes = {"sizes": {"avatar": {"width": 512, "height": 512, "aspect": "square"}}, "bases": {}}
    more = {"/generate/batch-sizes": sizes, "/sdapi/v1/loras": [{"name": "ink"}]}
    context, page, _ = _open(browser, _job(), "", more)
    greyable = ("size-preset", "width", "height", "sampler", "hires", "faces", "checkpoint")

    def disabled():
        return [name for name in greyable if page.locator(f"#{name}").is_disabled()]

    page.get_by_label("avatar 512 × 512 (square)").check()
    named, note = disabled(), page.locator("#named-sizes-note").inner_text()
    page.get_by_label("avatar 512 × 512 (square)").uncheck()
    page.get_by_label("Hires fix").check()
    hires, hint = disabled(), page.locator("#plan-hint").inner_text()
    page.get_by_label("LoRA", exact=True).select_option("ink")
    page.get_by_label("LoRA weight").fill("5")
    page.get_by_role("button", name="Add LoRA to prompt").click()
    refused = page.locator("#prompt").input_value(), page.locator("#lora-weight").get_attribute("aria-invalid")
    page.get_by_label("LoRA weight").fill("0.5")
    page.get_by_role("button", name="Add LoRA to prompt").click()
    added = page.locator("#prompt").input_value(), page.locator("#lora-weight").get_attribute("aria-invalid")
    icon, violations = page.locator("link[rel=icon]").get_attribute("href"), page.evaluate("window.violations")
    context.close()
    assert named == ["size-preset", "width", "height", "sampler", "hires", "faces"]
    assert "not used" in note and "Sampler" in note
    assert hires == ["size-preset", "width", "height", "sampler"]
    assert "checkpoint above applies" in " ".join(hint.split())
    assert refused == ("", "true") and added == ("<lora:ink:0.5>", None)
    assert icon == "data:," and violations == []


def test_the_keyboard_runs_and_cancels_a_job(browser):
    """Focus goes from Generate to Cancel while the job runs and back to Generate after; Ctrl+Enter in the prompt
    submits."""
    first, _ = _split(_stream("job_1"), 4)
    _, cancelled = _split(_stream("job_1", ("cancelled", {})), 4)
    more = {"/jobs/job_1/events": _Seq([_Stream(first), _Stream(cancelled)]),
            "/jobs/job_1/cancel": {"id": "job_1", "status": "cancelled"}}
    context, page, submitted = _open(browser, _job(), "", more)
    prompt = page.get_by_label("Prompt", exact=True)
    prompt.fill("p")
    page.locator("#generate").focus()
    page.keyboard.press("Enter")
    page.wait_for_function("() => document.activeElement.id === 'cancel'")  # not lost with Generate disabled
    page.keyboard.press("Enter")
    page.wait_for_selector("#status[data-state=cancelled]")
    focused = page.evaluate("document.activeElement.id")
    prompt.press("Control+Enter")
    for _ in range(50):
        if len([s for s in submitted if isinstance(s, dict)]) == 2:
            break
        page.wait_for_timeout(100)
    context.close()
    assert [s for s in submitted if isinstance(s, dict)] == [submitted[0]] * 2
    assert submitted[0]["prompt"] == "p" and "/jobs/job_1/cancel" in submitted and focused == "generate"


@pytest.fixture(scope="module")
def artifacts() -> Path:
    out = Path(os.environ.get("TEST_ARTIFACTS") or ROOT / "test-artifacts") / "ui"
    out.mkdir(parents=True, exist_ok=True)
    return out


@pytest.fixture
def page(browser, service):
    context = browser.new_context(viewport={"width": 1280, "height": 1000})
    page = context.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda error: errors.append(str(error)))
    page.goto(f"{str(service.base_url).rstrip('/')}/ui")
    page.wait_for_selector("body[data-ready=true]", timeout=60_000)
    yield page
    context.close()
    assert not errors, f"uncaught errors in the page: {errors}"


@pytest.mark.integration
def test_generate_shows_progress_then_the_image(page, service, artifacts):
    assert "Euler a" in page.locator("#sampler option").all_inner_texts()
    assert page.locator("#checkpoint").input_value() == "tiny-sdxl-base"
    assert page.locator("#named-size-list input[value=hero]").count() == 1
    page.evaluate(WATCH)
    page.get_by_label("Prompt", exact=True).fill("a lighthouse at dusk")
    page.get_by_label("Width", exact=True).fill("192")
    page.get_by_label("Height", exact=True).fill("128")
    assert page.locator("#size-preset").input_value() == "custom"
    page.get_by_label("Steps", exact=True).fill("100")  # a few seconds even on a fast machine
    page.get_by_label("Seed", exact=True).fill("7")
    page.get_by_role("button", name="Generate").click()
    page.wait_for_function(f"() => document.querySelector('{RESULT}')?.naturalWidth > 0", timeout=120_000)
    page.screenshot(path=artifacts / "generated.png", full_page=True)

    size = page.eval_on_selector(RESULT, "img => [img.naturalWidth, img.naturalHeight]")
    assert size == [192, 128]
    seen = _seen(page)
    assert seen["states"][-1] == "completed" and "processing" in seen["states"], seen
    assert seen["values"] == sorted(seen["values"]) and seen["values"][-1] == 100, seen
    assert any(0 < v < 100 for v in seen["values"]), f"no progress between 0 and 100: {seen}"
    assert page.locator("#status").inner_text().startswith("Completed")
    link = page.locator("#result a[download]")
    assert link.get_attribute("href").startswith("blob:")  # fetched by URL, with the page's token

    job_id = page.locator("#status").get_attribute("data-job")
    assert link.get_attribute("download") == f"{job_id}_0.png"
    job = service.get(f"/jobs/{job_id}").json()
    assert job["status"] == "completed" and job["result"]["seed"] == 7
    entry = page.locator(f"#gallery li[data-job='{job_id}']")
    entry.locator("a[download]").wait_for(timeout=30_000)  # the gallery lists it, with parameters and download
    assert "192 × 128" in entry.inner_text() and "a lighthouse at dusk" in entry.inner_text()
    # Shown, not only linked: the service's Content-Security-Policy lets the page show the blob: it fetched.
    shown = f"#gallery li[data-job='{job_id}'] img"
    page.wait_for_function(f"() => document.querySelector(\"{shown}\")?.complete", timeout=30_000)
    assert page.eval_on_selector(shown, "img => [img.naturalWidth, img.naturalHeight]") == [192, 128]
    page.screenshot(path=artifacts / "gallery.png", full_page=True)
    mode = page.evaluate("document.body.dataset.updates")
    print(f"updates by {mode}: {len(seen['values'])} progress values, {seen['previews']} previews")  # noqa: T201
    assert mode == "events" and seen["previews"] > 0  # GET /jobs/{id}/events, a preview every 5 steps


@pytest.mark.integration
def test_cancel_stops_a_running_job(page, service, artifacts):
    page.get_by_label("Prompt", exact=True).fill("a long one")
    page.get_by_label("Size", exact=True).select_option("512x512")
    page.get_by_label("Steps", exact=True).fill("150")
    page.get_by_role("button", name="Generate").click()
    page.wait_for_selector("#status[data-state=processing]", timeout=60_000)
    page.get_by_role("button", name="Cancel").click()
    page.wait_for_selector("#status[data-state=cancelled]", timeout=60_000)
    page.screenshot(path=artifacts / "cancelled.png", full_page=True)
    assert page.get_by_role("button", name="Generate").is_enabled()
    assert page.locator(RESULT).count() == 0
    job = service.get(f"/jobs/{page.locator('#status').get_attribute('data-job')}").json()
    assert job["status"] == "cancelled" and job["progress"] < 100 and job.get("result") is None


@pytest.mark.integration
def test_upscale_tool(page, astronaut, artifacts):
    buffer = io.BytesIO()
    astronaut.resize((96, 80)).save(buffer, format="PNG")
    page.get_by_label("Image (PNG, JPEG or WebP)", exact=True).set_input_files(
        files=[{"name": "astronaut.png", "mimeType": "image/png", "buffer": buffer.getvalue()}])
    page.get_by_label("Upscaler", exact=True).select_option("R-ESRGAN 2x+")
    page.get_by_label("Factor", exact=True).select_option("2")
    page.get_by_role("button", name="Upscale").click()
    page.wait_for_function("() => document.querySelector('#tool-output img')?.naturalWidth > 0", timeout=60_000)
    page.screenshot(path=artifacts / "upscaled.png", full_page=True)
    size = page.eval_on_selector("#tool-output img", "img => [img.naturalWidth, img.naturalHeight]")
    assert size == [192, 160]
    assert page.locator("#tool-output a[download]").get_attribute("download") == "astronaut_x2.png"
    assert page.locator("#tool-error").inner_text() == ""
