"""Hard edges on the shared local Ray cluster: overload, deadlines, disconnects, hostile input, isolation, and
Ray itself failing (a wedged replica, a corrupt checkpoint, the controller and the proxy killed).

Each case asserts its pass criterion and prints what the fault cost (run with ``-s`` to see the figures).
"""

from __future__ import annotations

import base64
import io
import os
import signal
import struct
import threading
import time
import zlib
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx
import pytest
from PIL import Image

from tests.helpers import LONG, SMALL, b64, drain, error, seconds_until, submit, wait

pytestmark = pytest.mark.integration
SLOW_SYNC = {"prompt": "slow", "width": 512, "height": 512, "num_inference_steps": 150, "use_refiner": False}


def base_running(service) -> int:
    return service.get("/models").json()["base"]["running"]


def report(text: str) -> None:
    print(f"\n[fault figures] {text}")  # noqa: T201


# --- overload, deadlines, disconnects ------------------------------------------------------------------------


def test_overload_sheds_exactly_beyond_the_queue(service):
    """MAX_QUEUE_SIZE=8: of 20 simultaneous submits, exactly 8 are accepted, 12 get 429 with Retry-After."""
    drain(service)
    blocker = submit(service, body=LONG)
    wait(service, blocker["id"], until=("processing",))
    with ThreadPoolExecutor(20) as pool:
        responses = list(pool.map(lambda _: service.post("/generate/text2img", json=SMALL), range(20)))
    codes = Counter(r.status_code for r in responses)
    assert codes == {202: 8, 429: 12}, codes
    assert all(int(r.headers["retry-after"]) > 0 for r in responses if r.status_code == 429)
    assert service.get("/queue/status").json()["queuedJobs"] == 8
    report(f"overload: 20 submits against a free queue of 8 -> {dict(codes)}")
    for job in [blocker, *(r.json() for r in responses if r.status_code == 202)]:
        service.post(f"/jobs/{job['id']}/cancel")


def test_deadline_is_408_and_the_denoising_stops(service):
    drain(service)
    seconds_until(lambda: base_running(service) == 0, 30)
    started = time.monotonic()
    response = service.post("/generate", json=SLOW_SYNC, headers={"X-Request-Timeout": "2"})
    answered = time.monotonic() - started
    error(response, 408, "REQUEST_TIMEOUT")
    assert 2 <= answered < 6
    freed = seconds_until(lambda: base_running(service) == 0, 10)
    report(f"deadline 2 s: 408 after {answered:.2f} s, base replica idle {freed:.2f} s later")


def test_client_disconnect_frees_the_replica(service):
    drain(service)
    seconds_until(lambda: base_running(service) == 0, 30)
    with httpx.Client(base_url=str(service.base_url), timeout=3) as impatient, pytest.raises(httpx.ReadTimeout):
        impatient.post("/generate", json=SLOW_SYNC)
    freed = seconds_until(lambda: base_running(service) == 0, 15)
    assert service.post("/generate", json={**SMALL, "num_inference_steps": 2, "use_refiner": False}).status_code == 200
    report(f"client gone after 3 s: base replica idle {freed:.2f} s later")


# --- hostile input ---------------------------------------------------------------------------------------------


def png_bomb(width: int, height: int) -> bytes:
    """A valid PNG header for ``width x height`` greyscale over a few kB of compressed zeros."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    rows = zlib.compress(b"\0" * (width + 1) * 64, 9)  # only the first rows: the header alone claims the size
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0))
            + chunk(b"IDAT", rows) + chunk(b"IEND", b""))


def alive_actors() -> list[dict]:
    """From the GCS directly (the test cluster runs without the dashboard that ``ray.util.state`` asks)."""
    from ray._private.state import actors

    return [a for a in actors().values() if a["State"] == "ALIVE"]


def ingress_rss() -> int:
    import psutil

    pid = next(a["Pid"] for a in alive_actors() if a["ActorClassName"].endswith(":Ingress"))
    return psutil.Process(pid).memory_info().rss


def test_decompression_bomb_costs_no_memory(service):
    bomb = png_bomb(60_000, 60_000)  # 3.6 gigapixels: 3.6 GB once decoded
    assert len(bomb) < 20_000
    before = ingress_rss()
    for path, body, field in [
        ("/generate/img2img", {"prompt": "x", "initImage": base64.b64encode(bomb).decode()}, "initImage"),
        ("/sdapi/v1/img2img", {"prompt": "x", "init_images": [base64.b64encode(bomb).decode()]}, "init_images"),
        ("/derivatives/clip-focal", {"image": base64.b64encode(bomb).decode(), "sizes": ["100x100"]}, "image"),
    ]:
        started = time.monotonic()
        body_ = error(service.post(path, json=body), 400, "INVALID_IMAGE")
        assert field in body_["details"]["field"] and time.monotonic() - started < 5
    growth = ingress_rss() - before
    assert growth < 50 * 2**20, growth
    report(f"decompression bomb ({len(bomb)} B claiming 60000x60000): ingress RSS {growth / 2**20:+.1f} MiB")


def encoded(fmt: str) -> str:
    image = Image.new("RGB", (64, 64), (200, 30, 30))
    buffer = io.BytesIO()
    image.save(buffer, format=fmt)
    return base64.b64encode(buffer.getvalue()).decode()


@pytest.mark.parametrize("payload", [
    pytest.param(encoded("GIF"), id="gif"), pytest.param(encoded("BMP"), id="bmp"),
    pytest.param(encoded("TIFF"), id="tiff"), pytest.param(encoded("ICO"), id="ico"),
    pytest.param(base64.b64encode(b'<svg xmlns="http://www.w3.org/2000/svg"/>').decode(), id="svg"),
    pytest.param(base64.b64encode(b"%PDF-1.7\n%\xe2\xe3").decode(), id="pdf"),
    pytest.param(base64.b64encode(base64.b64decode(encoded("PNG"))[:80]).decode(), id="truncated-png"),
    pytest.param("data:image/png;base64,@@@@", id="not-base64"),
])
def test_only_png_jpeg_webp_are_decoded(service, payload):
    before = service.get("/queue/status").json()
    error(service.post("/generate/img2img", json={"prompt": "x", "initImage": payload}), 400, "INVALID_IMAGE",
          "initImage")
    error(service.post("/derivatives/clip-focal", json={"image": payload, "sizes": ["64x64"]}), 400,
          "INVALID_IMAGE", "image")
    after = service.get("/queue/status").json()
    assert after["queuedJobs"] + after["processingJobs"] <= before["queuedJobs"] + before["processingJobs"]


@pytest.mark.parametrize("path,body,field", [
    ("/generate", {"prompt": "x", "width": 1001}, "width"),
    ("/generate", {"prompt": "x", "width": 4096}, "width"),
    ("/generate", {"prompt": "x", "num_inference_steps": 0}, "num_inference_steps"),
    ("/generate", {"prompt": "x", "num_inference_steps": 10_000}, "num_inference_steps"),
    ("/generate", {"prompt": "x", "guidance_scale": -1}, "guidance_scale"),
    ("/generate", {"prompt": "x", "seed": 2**40}, "seed"),
    ("/generate", {"prompt": "x", "face_restoration_weight": 2}, "face_restoration_weight"),
    ("/generate", {"prompt": ""}, "prompt"),
    ("/generate/text2img", {"prompt": "x", "height": 63}, "height"),
    ("/generate/text2img", {"prompt": "x", "steps": 151}, "steps"),
    ("/generate/text2img", {"prompt": "x", "guidanceScale": 31}, "guidanceScale"),
    ("/generate/text2img", {"prompt": "x", "priority": "urgent"}, "priority"),
    ("/generate/text2img", {"prompt": "x" * 10_001}, "prompt"),
    ("/generate/batch-sizes", {"prompt": "x", "sizes": ["avatar"] * 17}, "sizes"),
    ("/generate/batch-sizes", {"prompt": "x", "sizes": ["avatar"], "derivatives": [100_000]}, "derivatives.0"),
    ("/generate/batch-sizes", {"prompt": "x", "sizes": ["avatar"], "baseSizes": {"square": [65536, 8]}},
     "baseSizes.square.0"),
    ("/generate/batch-sizes", {"prompt": "x", "sizes": ["99999x99999"]}, "sizes"),
    ("/sdapi/v1/txt2img", {"prompt": "x", "batch_size": 16, "n_iter": 2}, "batch_size"),
    ("/sdapi/v1/txt2img", {"prompt": "x", "hr_scale": 8, "enable_hr": True}, "hr_scale"),
    ("/sdapi/v1/txt2img", {"prompt": "x", "cfg_scale": 99}, "cfg_scale"),
    ("/sdapi/v1/extra-single-image", {"image": encoded("PNG"), "upscaling_resize": 64}, "upscaling_resize"),
    ("/jobs", None, "limit"),
])
def test_parameters_out_of_bounds_are_422_and_create_nothing(service, path, body, field):
    before = service.get("/jobs", params={"limit": 1}).json()["total"]
    response = service.get(path, params={"limit": 100000}) if body is None else service.post(path, json=body)
    found = error(response, 422, "INVALID_INPUT")
    assert found["details"]["field"] == field, found
    assert service.get("/jobs", params={"limit": 1}).json()["total"] == before


@pytest.fixture
def canary(tmp_path):
    """A secret file outside every folder the service may read; its text must never come back."""
    secret = f"CANARY-{os.urandom(8).hex()}"
    path = tmp_path / "canary.safetensors"
    path.write_text(secret)
    (tmp_path / "canary.png").write_text(secret)
    return path, secret


def test_path_traversal_never_reaches_a_canary(service, canary, tiny):
    path, secret = canary
    relative = os.path.relpath(path, tiny / "loras")
    attempts = [
        service.post("/sdapi/v1/txt2img", json={"prompt": f"x <lora:{relative.removesuffix('.safetensors')}:1>",
                                                "steps": 1, "width": 64, "height": 64}),
        service.post("/sdapi/v1/txt2img", json={"prompt": "x", "steps": 1, "width": 64, "height": 64,
                                                "override_settings": {"sd_model_checkpoint": str(path)}}),
        service.post("/sdapi/v1/options", json={"sd_model_checkpoint": f"../../{path.name}"}),
        service.post("/sdapi/v1/extra-single-image", json={"image": encoded("PNG"), "upscaler_1": relative}),
        service.post("/v1/images/memory", json={"user_id": "../../canary", "prompt": "x"}),
        service.post("/v1/images/subject", json={"user_id": "/etc/passwd"}),
        service.get(f"/jobs/..%2F..%2F{path.parent.name}%2Fcanary"),
        service.get("/jobs/../../../etc/passwd"),
        service.get(f"/jobs/job_1_{'0' * 9}%2F..%2F..%2Fcanary.png/result"),
        service.post("/generate/text2img", json={"prompt": "x", "model": str(path)}),
    ]
    for response in attempts:
        assert 400 <= response.status_code < 500 or response.status_code == 200, response.text
        assert secret not in response.text
    assert path.read_text() == secret


class Canary(BaseHTTPRequestHandler):
    hits: list[str] = []

    def do_GET(self):  # noqa: N802 - http.server's name
        Canary.hits.append(self.path)
        self.send_response(200)
        self.end_headers()

    do_POST = do_GET

    def log_message(self, *args) -> None:
        pass


@pytest.fixture
def loopback_canary():
    server = ThreadingHTTPServer(("0.0.0.0", 0), Canary)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    Canary.hits = []
    yield server.server_address[1]
    server.shutdown()


def test_no_request_reaches_a_loopback_canary(service, loopback_canary):
    """Only the exact host 127.0.0.1 is allow-listed here: every other spelling of this machine is refused."""
    port = loopback_canary
    hosts = ["localhost", "127.0.0.2", "127.1", "0x7f000001", "2130706433", "0.0.0.0", "[::1]",
             "[::ffff:127.0.0.1]", "169.254.169.254", "10.0.0.1", "192.168.1.1", "LOCALHOST."]
    for host in hosts:
        for path in ("/generate/text2img", "/generate/async", "/generate/batch-sizes"):
            body = {"prompt": "x", "webhookUrl": f"http://{host}:{port}/hook", "sizes": ["avatar"]}
            error(service.post(path, json=body), 422, "INVALID_INPUT", "webhookUrl")
    for url in ("file:///etc/passwd", f"gopher://localhost:{port}/", f"http://user@localhost:{port}/"):
        error(service.post("/generate/text2img", json={"prompt": "x", "webhookUrl": url}), 422, "INVALID_INPUT",
              "webhookUrl")
    time.sleep(1)
    assert Canary.hits == []


def test_jobs_are_visible_only_to_the_token_that_made_them(service):
    """JOBS_PER_TOKEN=true on the test cluster: another bearer token sees 404, never the job."""
    alice, bob = {"Authorization": "Bearer alice"}, {"Authorization": "Bearer bob"}
    job = submit(service, body={**SMALL, "steps": 2}, **alice)
    error(service.get(f"/jobs/{job['id']}", headers=bob), 404, "NOT_FOUND")
    error(service.get(f"/jobs/{job['id']}/result", headers=bob), 404, "NOT_FOUND")
    error(service.post(f"/jobs/{job['id']}/cancel", headers=bob), 404, "NOT_FOUND")
    assert job["id"] not in [j["id"] for j in service.get("/jobs", headers=bob).json()["jobs"]]
    error(service.get(f"/jobs/{job['id']}"), 404, "NOT_FOUND")  # no token is not a wildcard
    assert job["id"] not in [j["id"] for j in service.get("/jobs", params={"limit": 500}).json()["jobs"]]
    done = wait(service, job["id"], headers=alice)
    assert done["status"] == "completed"  # bob's cancel touched nothing
    assert job["id"] in [j["id"] for j in service.get("/jobs", headers=alice).json()["jobs"]]


# --- Ray failing underneath --------------------------------------------------------------------------------------


def replicas(deployment: str) -> dict[str, int]:
    """Alive replica actors of a deployment: actor id -> pid."""
    return {a["ActorID"]: a["Pid"] for a in alive_actors() if a["ActorClassName"].endswith(f":{deployment}")}


def app_running() -> bool:
    from ray import serve

    status = serve.status().applications["imagegen"]
    return status.status == "RUNNING" and all(d.status == "HEALTHY" for d in status.deployments.values())


def clip_focal(service, astronaut) -> int:
    return service.post("/derivatives/clip-focal", json={"image": b64(astronaut.resize((128, 128))),
                                                         "sizes": ["64x64"]}).status_code


def test_a_wedged_replica_is_replaced_by_health_checks(service, astronaut):
    """SIGSTOP the FocalCropper replica: its health check times out, Serve kills it and starts another."""
    assert clip_focal(service, astronaut) == 200
    (actor, pid), = replicas("FocalCropper").items()
    os.kill(pid, signal.SIGSTOP)
    started = time.monotonic()
    try:
        replaced = seconds_until(lambda: any(a != actor for a in replicas("FocalCropper")), 90, every=1)
        seconds_until(app_running, 60, every=1)
        assert clip_focal(service, astronaut) == 200
        seconds_until(lambda: not _alive(pid), 60, every=1)  # Serve killed the wedged process
    finally:
        if _alive(pid):
            os.kill(pid, signal.SIGCONT)
    report(f"wedged replica: replacement alive after {replaced:.1f} s, serving after "
           f"{time.monotonic() - started:.1f} s")


def _alive(pid: int) -> bool:
    import psutil

    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def test_a_corrupt_checkpoint_fails_its_deployment_while_the_others_serve(service, tmp_path):
    from ray import serve

    from deployments.sdxl_base import SDXLBase

    corrupt = tmp_path / "broken.safetensors"
    corrupt.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00" + os.urandom(4096))
    broken = SDXLBase.options(name="BrokenBase", ray_actor_options={"num_cpus": 0.1}).bind(
        {"model": {"source": str(corrupt)}, "name": "broken"})
    outcome: dict = {}

    def deploy() -> None:
        started = time.monotonic()
        try:
            serve.run(broken, name="broken", route_prefix=None)
            outcome["error"] = None
        except RuntimeError as e:
            outcome["error"] = str(e)
        outcome["seconds"] = time.monotonic() - started

    thread = threading.Thread(target=deploy)
    thread.start()
    served = 0
    while thread.is_alive():  # the main application keeps answering while the broken one retries
        assert service.post("/generate", json={**SMALL, "num_inference_steps": 2,
                                               "use_refiner": False}).status_code == 200
        served += 1
    thread.join()
    try:
        status = serve.status().applications["broken"]
        assert outcome["error"] is not None and status.status == "DEPLOY_FAILED", outcome
        message = status.deployments["BrokenBase"].message
        assert "UNSAFE_WEIGHTS" in message or "safetensors" in message.lower(), message
        assert outcome["seconds"] < 120
        assert app_running()
    finally:
        serve.delete("broken")
    report(f"corrupt checkpoint: DEPLOY_FAILED after {outcome['seconds']:.1f} s; {served} /generate served meanwhile")


def poller(service, job_id: str, stop: threading.Event, outcomes: Counter) -> None:
    with httpx.Client(base_url=str(service.base_url), timeout=10) as client:
        while not stop.is_set():
            try:
                response = client.get(f"/jobs/{job_id}")
                outcomes[response.status_code] += 1
            except httpx.TransportError as e:
                outcomes[type(e).__name__] += 1
            time.sleep(0.05)


@pytest.mark.parametrize("target", ["controller", "proxy"])
def test_controller_or_proxy_killed_while_clients_poll(service, target):
    import ray

    drain(service)
    job = submit(service, body={**SMALL, "steps": 40})
    stop, outcomes = threading.Event(), Counter()
    threads = [threading.Thread(target=poller, args=(service, job["id"], stop, outcomes)) for _ in range(3)]
    for thread in threads:
        thread.start()
    time.sleep(0.5)
    name = "ServeController" if target == "controller" else "ProxyActor"
    victim = next(a for a in alive_actors() if a["ActorClassName"] == name)
    ray.kill(ray.get_actor(victim["Name"], namespace="serve"), no_restart=False)
    killed = time.monotonic()
    back = seconds_until(lambda: _answers(service), 120, every=0.5)
    seconds_until(app_running, 120, every=1)
    done = wait(service, job["id"], timeout=180)
    stop.set()
    for thread in threads:
        thread.join()
    assert done["status"] == "completed"
    assert service.get(f"/jobs/{job['id']}/result").status_code == 200
    failures = sum(n for code, n in outcomes.items() if code != 200)
    assert all(code in (200, "ConnectError", "RemoteProtocolError", "ReadError") for code in outcomes), outcomes
    if target == "controller":
        assert failures == 0, outcomes  # the data path never goes through the controller
    report(f"{target} killed: HTTP back after {back:.1f} s, all healthy after {time.monotonic() - killed:.1f} s; "
           f"polls {dict(outcomes)}")


def _answers(service) -> bool:
    try:
        return service.get("/health", timeout=2).status_code == 200
    except httpx.TransportError:
        return False
