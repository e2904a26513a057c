"""Job result stores: local files and S3, with faults injected between the store and a real S3 server."""

import errno
import hashlib
import logging
import os

import pytest

from deployments.support.errors import InvalidInput, NotFound, ResultExpired, StorageUnavailable
from deployments.support.settings import Settings
from deployments.weights.loader import s3_client
from graphs.jobs.results import LocalResults, S3Results, open_results
from tests.netfaults import TruncatingProxy

JOB = "job_1700000000000_0123abcde"
DATA = os.urandom(300_000)  # incompressible and larger than one socket read


@pytest.fixture
def bucket(s3_server):
    import boto3

    client = boto3.client("s3", endpoint_url=s3_server, region_name="us-east-1")
    name = f"results-{os.urandom(4).hex()}"
    client.create_bucket(Bucket=name)
    return client, name


@pytest.fixture
def proxy(s3_server):
    host, port = s3_server.removeprefix("http://").split(":")
    proxy = TruncatingProxy((host, int(port)))
    yield proxy
    proxy.close()


def objects(client, name: str) -> dict[str, int]:
    return {o["Key"]: o["Size"] for o in client.list_objects_v2(Bucket=name).get("Contents", [])}


def test_local_results_round_trip_and_refuse_escapes(tmp_path):
    store = LocalResults(tmp_path / "results")
    key = store.save(JOB, "hero", DATA)
    assert key == f"{JOB}/hero.png" and store.load(key) == DATA
    assert [p.name for p in (tmp_path / "results" / JOB).iterdir()] == ["hero.png"]  # no temporary left
    (tmp_path / "canary.png").write_bytes(b"secret")
    for bad in ("../canary.png", f"{JOB}/../../canary.png", "/etc/passwd", f"{JOB}/x.sh", f"{JOB}/.hidden.png"):
        with pytest.raises(InvalidInput):
            store.load(bad)
    for name in ("../x", "a/b", "", ".x"):
        with pytest.raises(InvalidInput):
            store.save(JOB, name, b"x")
    store.delete("../")  # not a job id: nothing happens
    assert (tmp_path / "canary.png").exists()
    assert store.size(key) == len(DATA)
    store.delete(JOB)
    with pytest.raises(NotFound) as gone:
        store.load(key)
    assert gone.value.code == "RESULT_EXPIRED"


def test_s3_results_round_trip_under_a_prefix(bucket, s3_server):
    client, name = bucket
    settings = Settings(AWS_ENDPOINT_URL=s3_server, AWS_DEFAULT_REGION="us-east-1", JOB_RESULTS_URL=f"s3://{name}/jobs")
    store = open_results(settings)
    assert isinstance(store, S3Results)
    key = store.save(JOB, "hero", DATA)
    store.save(JOB, "hero_320w", b"RIFF-webp", "webp")
    assert objects(client, name) == {f"jobs/{JOB}/hero.png": len(DATA), f"jobs/{JOB}/hero_320w.webp": 9}
    assert store.load(key) == DATA
    assert store.size(key) == len(DATA)
    store.delete(JOB)
    assert objects(client, name) == {}
    with pytest.raises(ResultExpired):
        store.load(key)
    with pytest.raises(ResultExpired):
        store.size(key)


def test_s3_objects_carry_the_content_type_of_their_format(bucket, s3_server):
    """Browsers and CDNs serving a bucket (a presigned or public URL) go by the object's Content-Type: without
    it, an image is binary/octet-stream and downloads instead of showing."""
    client, name = bucket
    store = open_results(Settings(AWS_ENDPOINT_URL=s3_server, JOB_RESULTS_URL=f"s3://{name}/jobs"))
    png, webp = store.save(JOB, "hero", b"\x89PNG"), store.save(JOB, "hero_320w", b"RIFF-webp", "webp")
    assert client.head_object(Bucket=name, Key=f"jobs/{png}")["ContentType"] == "image/png"
    assert client.head_object(Bucket=name, Key=f"jobs/{webp}")["ContentType"] == "image/webp"


@pytest.mark.parametrize("fault", ["refuse", "reset", "cut_upload", "stall", "http_500"])
def test_s3_faults_never_publish_a_partial_object(bucket, proxy, fault, caplog):
    client, name = bucket
    proxy.inject(fault, upload_budget=120_000)
    store = S3Results(name, "r/", s3_client(proxy.url, "us-east-1", read_timeout=1, attempts=2))
    with caplog.at_level(logging.WARNING, logger="graphs.jobs.results"), pytest.raises(StorageUnavailable) as raised:
        store.save(JOB, "hero", DATA)
    assert proxy.faulted >= 2  # the retry met the fault too
    assert objects(client, name) == {}
    # Clients and job records get the reason alone; where the store is goes to the log.
    assert str(raised.value) == "result storage unavailable"
    assert f"s3://{name}/r/{JOB}/hero.png" in caplog.text


def test_a_full_disk_keeps_no_partial_file_and_is_storage_unavailable(tmp_path, monkeypatch):
    store = LocalResults(tmp_path / "results")

    def full(_fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", full)
    with pytest.raises(StorageUnavailable) as raised:
        store.save(JOB, "hero", DATA)
    assert str(raised.value) == "result storage unavailable" and str(tmp_path) not in str(raised.value)
    assert list((tmp_path / "results" / JOB).iterdir()) == []

    def interrupted(_fd):
        raise KeyboardInterrupt

    monkeypatch.setattr(os, "fsync", interrupted)
    with pytest.raises(KeyboardInterrupt):
        store.save(JOB, "hero", DATA)
    assert list((tmp_path / "results" / JOB).iterdir()) == []


def test_a_local_delete_that_fails_raises_so_the_purge_keeps_the_job(tmp_path, monkeypatch):
    store = LocalResults(tmp_path / "results")
    key = store.save(JOB, "hero", DATA)
    store.delete("job_1_0abc")  # never stored: nothing to delete, and that is no error
    real_unlink = os.unlink

    def refused(path, *args, **kwargs):
        raise PermissionError(errno.EACCES, "Permission denied", path)

    monkeypatch.setattr(os, "unlink", refused)
    with pytest.raises(StorageUnavailable):
        store.delete(JOB)
    assert store.load(key) == DATA
    monkeypatch.setattr(os, "unlink", real_unlink)
    store.delete(JOB)
    with pytest.raises(ResultExpired):
        store.load(key)


class QuietDeletes:
    """A client whose quiet DeleteObjects answers 200 with per-key ``Errors``, as S3 does."""

    def __init__(self, code: str) -> None:
        self.code = code

    def list_objects_v2(self, **_):
        return {"Contents": [{"Key": f"r/{JOB}/hero.png"}, {"Key": f"r/{JOB}/hero_64w.webp"}]}

    def delete_objects(self, **_):
        return {"Errors": [{"Key": f"r/{JOB}/hero.png", "Code": self.code, "Message": "no"}]}


def test_an_s3_delete_that_leaves_objects_raises():
    S3Results("b", "r/", QuietDeletes("NoSuchKey")).delete(JOB)  # already gone: deleted
    with pytest.raises(StorageUnavailable) as raised:
        S3Results("b", "r/", QuietDeletes("AccessDenied")).delete(JOB)
    assert str(raised.value) == "result storage unavailable"


@pytest.mark.parametrize("fault", ["reset", "cut_upload", "http_500"])
def test_s3_fault_then_retry_publishes_the_whole_object(bucket, proxy, fault):
    client, name = bucket
    proxy.inject(fault, faults=1, upload_budget=120_000)
    store = S3Results(name, "r/", s3_client(proxy.url, "us-east-1", read_timeout=5, attempts=3))
    key = store.save(JOB, "hero", DATA)
    assert proxy.faulted == 1
    body = client.get_object(Bucket=name, Key=f"r/{key}")["Body"].read()
    assert hashlib.sha256(body).digest() == hashlib.sha256(DATA).digest()
