"""The job routes without Ray: the ingress's own app in-process, its job routes answered by an object holding a real
SQLite store and result folder, as the Ingress replica would (the same routes, middleware and error handlers).
Covers what happens to a job's view, its seed-002 result and its image URLs once an image is gone or the result
store is down."""

from __future__ import annotations

import base64
import io
import shutil
from types import SimpleNamespace

import httpx
import pytest
from PIL import Image
from ray import serve

from deployments.support import settings
from deployments.support.errors import StorageUnavailable
from graphs.api import edge, jobs, ratelimit
from graphs.app import app
from graphs.jobs.events import Streams
from graphs.jobs.results import LocalResults
from graphs.jobs.sqlite_store import SQLiteJobStore
from graphs.jobs.store import Job, new_job_id

pytestmark = pytest.mark.anyio
TOKENS = {"alice": {"Authorization": "Bearer alice"}, "bob": {"Authorization": "Bearer bob"}}


def png(width: int, height: int) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (width, height), (10, 120, 200)).save(buffer, format="PNG")
    return buffer.getvalue()


class Down:
    """A result store that cannot be reached."""

    def load(self, key: str) -> bytes:
        raise StorageUnavailable("result storage unavailable")

    size = load


class Service:
    """The job routes' state, and a client of the app that serves them."""

    def __init__(self, tmp_path, monkeypatch) -> None:
        monkeypatch.setenv("RATE_LIMITS_ENABLED", "false")
        monkeypatch.setenv("JOBS_DATA_DIR", str(tmp_path))
        settings.current.cache_clear()
        self.routes = jobs.JobRoutes()
        self.routes.settings = settings.current()
        self.routes.jobs = SQLiteJobStore(tmp_path / "jobs.sqlite3")
        self.routes.results = self.files = LocalResults(tmp_path / "results")
        self.routes.streams = Streams(0)
        # The app itself: @serve.ingress made its routes methods of the replica's object, which Serve looks up here.
        monkeypatch.setattr(serve, "get_replica_context", lambda: SimpleNamespace(servable_object=self.routes))
        transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
        self.client = httpx.AsyncClient(transport=transport, base_url="http://test")

    def completed(self, kind: str = "text2img", images: int = 2, owner: str | None = None) -> Job:
        """A job run and published as the runner does: its images stored under its attempt's names."""
        job = Job(id=new_job_id(), type=kind, request={"prompt": "p"}, owner=owner)
        store = self.routes.jobs
        store.create(job)
        claimed = store.claim("w", 30)
        assert claimed is not None and claimed.id == job.id
        save = self.files.save
        if kind == "batch-sizes":
            result: dict = {"images": {
                name: {"key": save(job.id, f"1-{name}", png(w, h)), "width": w, "height": h, "aspect": "square",
                       "box": [0, 0, w, h], "upscaled": False, "nsfw": None,
                       "derivatives": {"16": save(job.id, f"1-{name}_16w", b"RIFF-webp", "webp")}}
                for name, (w, h) in {"avatar": (32, 32), "hero": (48, 24)}.items()},
                "bases_generated": 1, "seed": 4}
        else:
            result = {"images": [save(job.id, f"1-image_{i}", png(24, 16)) for i in range(images)], "seed": 4,
                      "parameters": {}, "warnings": [], "nsfw": None}
        assert store.finish(job.id, "w", "completed", result)
        return store.get(job.id) or job


@pytest.fixture
async def service(tmp_path, monkeypatch):
    service = Service(tmp_path, monkeypatch)
    yield service
    await service.client.aclose()


async def test_a_job_whose_image_is_gone_still_shows_its_status(service):
    job = service.completed()
    (service.files.root / job.result["images"][0]).unlink()  # a lifecycle rule, a purge, a lost disk
    view = (await service.client.get(f"/jobs/{job.id}")).json()
    assert view["status"] == "completed"
    first, second = view["result"]["images"]
    assert first is None and second.startswith("data:image/png;base64,")  # the list keeps its positions
    assert view["result"]["warnings"] == ["image 1 of 2 is unavailable (RESULT_EXPIRED): it expired or was removed"]
    answer = await service.client.get(f"/jobs/{job.id}/result")
    assert answer.status_code == 410 and answer.json()["code"] == "RESULT_EXPIRED"
    gone = await service.client.get(view["result"]["urls"][0])
    assert gone.status_code == 410 and gone.json()["code"] == "RESULT_EXPIRED"


async def test_a_job_whose_store_is_down_still_shows_its_status(service):
    job = service.completed(images=1)
    batch = service.completed("batch-sizes")
    service.routes.results = Down()
    view = (await service.client.get(f"/jobs/{job.id}")).json()
    assert view["status"] == "completed" and view["result"]["images"] == [None]
    assert view["result"]["warnings"] == [
        "image 1 of 1 is unavailable for now (STORAGE_UNAVAILABLE): result storage unavailable"]
    answer = await service.client.get(f"/jobs/{job.id}/result")
    assert answer.status_code == 503 and answer.json()["code"] == "STORAGE_UNAVAILABLE"
    assert answer.json()["error"] == "result storage unavailable" and answer.headers["retry-after"]
    view = (await service.client.get(f"/jobs/{batch.id}")).json()
    assert view["status"] == "completed" and view["images"]["avatar"]["imageData"] is None
    assert view["images"]["avatar"]["derivatives"] == {"16": None} and view["images"]["avatar"]["width"] == 32
    assert "size avatar is unavailable for now (STORAGE_UNAVAILABLE): result storage unavailable" in \
        view["result"]["warnings"]


async def test_a_view_without_bytes_names_its_images_by_url_and_reads_no_storage(service):
    """``?images=false``: what a page that lists jobs reads (it fetches the images it shows by URL)."""
    job = service.completed(images=2)
    batch = service.completed("batch-sizes")
    whole = (await service.client.get(f"/jobs/{job.id}")).json()
    service.routes.results = Down()  # nothing may be read: a store down changes nothing here
    view = (await service.client.get(f"/jobs/{job.id}", params={"images": "false"})).json()
    assert "images" not in view["result"] and not view["result"]["warnings"]
    assert view["result"]["urls"] == whole["result"]["urls"] and len(view["result"]["urls"]) == 2
    sizes = (await service.client.get(f"/jobs/{batch.id}", params={"images": "false"})).json()
    for entries in (sizes["images"], sizes["result"]["images"]):
        assert set(entries) == {"avatar", "hero"} and entries["avatar"]["width"] == 32
        assert entries["avatar"]["url"].startswith(f"/jobs/{batch.id}/images/")
        assert "imageData" not in entries["avatar"] and "derivatives" not in entries["avatar"]
        assert list(entries["avatar"]["derivativeUrls"]) == ["16"]
    refused = await service.client.get(f"/jobs/{job.id}", params={"images": "maybe"})
    assert refused.status_code == 422 and refused.json()["details"]["field"] == "images"


async def test_images_are_served_by_url_with_validators_and_never_change(service):
    job = service.completed()
    view = (await service.client.get(f"/jobs/{job.id}")).json()
    urls = view["result"]["urls"]
    assert urls == [f"/jobs/{job.id}/images/1-image_{i}.png" for i in range(2)]
    first = await service.client.get(urls[0])
    assert first.status_code == 200 and first.headers["content-type"] == "image/png"
    assert first.content == base64.b64decode(view["result"]["images"][0].split(",", 1)[1])
    assert first.headers["content-length"] == str(len(first.content))
    assert first.headers["cache-control"] == "private, max-age=31536000, immutable"
    etag = first.headers["etag"]
    assert etag.startswith('"') and etag != (await service.client.get(urls[1])).headers["etag"]
    head = await service.client.head(urls[0])
    assert head.status_code == 200 and head.content == b"" and head.headers["content-length"] == str(len(first.content))
    assert head.headers["etag"] == etag
    for header in (etag, f'W/{etag}, "other"', "*"):
        again = await service.client.get(urls[0], headers={"If-None-Match": header})
        assert again.status_code == 304 and again.content == b"" and again.headers["etag"] == etag
    assert (await service.client.get(urls[0], headers={"If-None-Match": '"other"'})).status_code == 200
    assert ratelimit.classify("GET", urls[0]) == ratelimit.READ  # the cheap budget, as other reads


async def test_an_image_url_serves_only_that_jobs_published_images(service, tmp_path):
    job, other = service.completed(), service.completed()
    service.files.save(job.id, "2-image_0", png(8, 8))  # a later attempt's leftover, never published
    (tmp_path / "secret.png").write_bytes(b"secret")
    for name in ("2-image_0.png", other.result["images"][0].split("/")[1].replace("image_0", "image_9"),
                 "..%2F..%2Fsecret.png", "1-image_0.sh", ".hidden.png", "1-image_0.png%00.png"):
        answer = await service.client.get(f"/jobs/{job.id}/images/{name}")
        assert answer.status_code in (404, 422) and answer.json()["code"] in ("NOT_FOUND", "INVALID_INPUT"), name
        assert answer.content != b"secret"
    name = other.result["images"][0].split("/")[1]
    assert (await service.client.get(f"/jobs/{job.id}/images/{name}")).status_code == 200  # its own 1-image_0
    shutil.rmtree(service.files.root / other.id)
    assert (await service.client.get(f"/jobs/{job.id}/images/{name}")).status_code == 200


async def test_image_urls_keep_the_owners_isolation(service, monkeypatch):
    monkeypatch.setenv("JOBS_PER_TOKEN", "true")
    settings.current.cache_clear()
    service.routes.settings = settings.current()
    owner = edge.token_owner(TOKENS["alice"]["Authorization"])
    job = service.completed(owner=owner)
    url = f"/jobs/{job.id}/images/{job.result['images'][0].split('/')[1]}"
    assert (await service.client.get(url, headers=TOKENS["alice"])).status_code == 200
    for headers in (TOKENS["bob"], {}):
        answer = await service.client.get(url, headers=headers)
        assert answer.status_code == 404 and answer.json()["details"]["field"] == "id"
        assert (await service.client.head(url, headers=headers)).status_code == 404


async def test_a_batch_is_sent_once_in_its_view_with_urls_for_every_file(service):
    job = service.completed("batch-sizes")
    view = (await service.client.get(f"/jobs/{job.id}")).json()
    avatar = view["images"]["avatar"]
    assert Image.open(io.BytesIO(base64.b64decode(avatar["imageData"]))).size == (32, 32)
    assert avatar["url"] == f"/jobs/{job.id}/images/1-avatar.png"
    assert avatar["derivativeUrls"] == {"16": f"/jobs/{job.id}/images/1-avatar_16w.webp"}
    assert avatar["derivatives"]["16"].startswith("data:image/webp;base64,")
    listed = view["result"]["images"]["avatar"]
    assert "imageData" not in listed and "derivatives" not in listed  # the bytes travel once, at the top level
    assert {k: v for k, v in avatar.items() if k not in ("imageData", "derivatives")} == listed
    webp = await service.client.get(avatar["derivativeUrls"]["16"])
    assert webp.headers["content-type"] == "image/webp" and webp.content == b"RIFF-webp"
