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


def _generate_against(browser, job: dict, stream: str, until: str,
                      more: dict | None = None) -> tuple[object, object, list]:
    """The page against the events contract, every API answer faked in the browser (``more`` adds or replaces
    answers; a (status, body) pair is an error), the page's files served with the service's own headers (its
    Content-Security-Policy): Generate clicked, then waited on until the JavaScript condition ``until`` holds.
    ``submitted`` gets the body of each generate call and the path and query of each image and job view asked
    for. An image path that ends ``gone.png`` answers 410. The caller closes the context."""
    answers = {
        "/models": {"models": [{"id": "m", "type": "base"}]}, "/sdapi/v1/samplers": [{"name": "Euler a"}],
        "/sdapi/v1/loras": [], "/sdapi/v1/upscalers": [], "/generate/batch-sizes": {"sizes": {}, "bases": {}},
        "/jobs": {"jobs": [], "total": 0, "offset": 0, "limit": 12}, "/jobs/job_1": job, **(more or {}),
    }
    submitted: list = []

    def answer(route):
        path = urlsplit(route.request.url).path
        if path == "/ui" or path.startswith("/ui/"):
            name = "index.html" if path == "/ui" else path.removeprefix("/ui/")
            types = {"html": "text/html", "js": "text/javascript", "css": "text/css"}
            return route.fulfill(body=_packaged(name), content_type=types[name.rsplit(".", 1)[1]], headers=ui.HEADERS)
        if path == "/generate/text2img":
            submitted.append(route.request.post_data_json)
            return route.fulfill(status=202, json={**job, "status": "queued", "progress": 0})
        if path == "/jobs/job_1/events":
            return route.fulfill(body=stream, content_type="text/event-stream")
        if path.startswith("/jobs/"):
            query = urlsplit(route.request.url).query
            submitted.append(f"{path}?{query}" if query else path)
        if "/images/" in path:
            if path.endswith("gone.png"):
                return route.fulfill(status=410, json={"error": "expired", "code": "RESULT_EXPIRED", "details": {}})
            return route.fulfill(body=_png(24, 16), content_type="image/png")
        if isinstance(answers[path], tuple):
            return route.fulfill(status=answers[path][0], json=answers[path][1])
        return route.fulfill(json=answers[path])

    context = browser.new_context()
    context.route("http://ui.test/**", answer)
    page = context.new_page()
    page.goto("http://ui.test/ui")
    page.wait_for_selector("body[data-ready=true]")
    page.evaluate(WATCH)
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
    context.close()
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
