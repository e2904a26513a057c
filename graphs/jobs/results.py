"""Where job images live: a local directory by default, an S3 bucket when ``JOB_RESULTS_URL=s3://bucket/prefix``.

Either way an image is complete or absent: local files are written to a temporary name, synced and renamed; S3
objects are sent in one ``PutObject`` carrying their length and MD5, which S3 rejects unless every byte arrived,
then checked by a ``HeadObject``. A job is marked completed only after every save returned. Keys are
``<job id>/<name>.<suffix>`` and are checked against a strict pattern before they reach a path or a bucket.

A store that fails raises ``StorageUnavailable`` saying only that: the endpoint, bucket, path and key go to the log,
never into an answer or a job's error. An image that is gone raises ``ResultExpired``.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import logging
import os
import re
import uuid
from pathlib import Path
from typing import Protocol

from deployments.support.errors import InvalidInput, ResultExpired, StorageUnavailable
from deployments.support.settings import Settings
from deployments.weights.loader import s3_client

logger = logging.getLogger(__name__)

JOB_ID = r"job_[0-9]+_[0-9a-f]+"
KEY = re.compile(rf"^{JOB_ID}/[A-Za-z0-9][A-Za-z0-9_-]{{0,63}}\.(png|webp)$")
MIME = {"png": "image/png", "webp": "image/webp"}
EXPIRED = "the job's image has expired or was removed"


def result_key(job_id: str, name: str, suffix: str) -> str:
    key = f"{job_id}/{name}.{suffix}"
    if not KEY.match(key):
        raise InvalidInput(f"bad result name {name!r}", field="name")
    return key


def image_url(key: str) -> str:
    """Where ``GET /jobs/{id}/images/{name}`` serves a stored image."""
    job_id, _, name = key.partition("/")
    return f"/jobs/{job_id}/images/{name}"


def stored_keys(result: dict | None) -> list[str]:
    """Every key a job's result holds: its images in order, or a batch's sizes each with its derivatives."""
    images = (result or {}).get("images") or []
    if isinstance(images, list):
        return list(images)
    return [k for e in images.values() for k in (e["key"], *e.get("derivatives", {}).values())]


def _checked(key: str) -> str:
    if not KEY.match(key):
        raise InvalidInput("bad result key", field="key")
    return key


def _unavailable(doing: str, where: str, error: object) -> StorageUnavailable:
    """The detail (endpoint, bucket, path) for the log; clients and job records get the bare reason."""
    logger.warning("result storage: %s %s failed: %s", doing, where, error)
    return StorageUnavailable("result storage unavailable")


class ResultStore(Protocol):
    def save(self, job_id: str, name: str, data: bytes, suffix: str = "png") -> str: ...

    def load(self, key: str) -> bytes: ...

    def size(self, key: str) -> int: ...

    def delete(self, job_id: str) -> None:
        """Every image of the job; raises unless each is gone (one already missing counts as gone)."""
        ...


class LocalResults:
    """Files under ``root``: written to a temporary name, synced, then renamed into place."""

    def __init__(self, root: Path) -> None:
        self.root = root
        root.mkdir(parents=True, exist_ok=True)

    def save(self, job_id: str, name: str, data: bytes, suffix: str = "png") -> str:
        key = result_key(job_id, name, suffix)
        final = self.root / key
        temp = final.parent / f".{final.name}.{uuid.uuid4().hex}.tmp"
        try:
            final.parent.mkdir(parents=True, exist_ok=True)
            with temp.open("wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(temp, final)
        except BaseException as e:
            with contextlib.suppress(OSError):
                temp.unlink(missing_ok=True)  # a full disk must not also keep the part it took
            if isinstance(e, OSError):
                raise _unavailable("save of", str(final), e) from e
            raise
        return key

    def load(self, key: str) -> bytes:
        path = self.root / _checked(key)
        try:
            return path.read_bytes()
        except FileNotFoundError as e:
            raise ResultExpired(EXPIRED) from e
        except OSError as e:
            raise _unavailable("read of", str(path), e) from e

    def size(self, key: str) -> int:
        path = self.root / _checked(key)
        try:
            return path.stat().st_size
        except FileNotFoundError as e:
            raise ResultExpired(EXPIRED) from e
        except OSError as e:
            raise _unavailable("stat of", str(path), e) from e

    def delete(self, job_id: str) -> None:
        if not re.fullmatch(JOB_ID, job_id):
            return
        folder = self.root / job_id
        try:
            for path in folder.iterdir():  # flat: one file per key
                path.unlink(missing_ok=True)
            folder.rmdir()
        except FileNotFoundError:
            pass  # never stored, or deleted meanwhile
        except OSError as e:
            raise _unavailable("delete of", str(folder), e) from e


class S3Results:
    """Objects under ``s3://bucket/prefix``; any S3-compatible endpoint (``AWS_ENDPOINT_URL``)."""

    def __init__(self, bucket: str, prefix: str, client) -> None:
        self.bucket, self.prefix, self.client = bucket, prefix, client

    def save(self, job_id: str, name: str, data: bytes, suffix: str = "png") -> str:
        from botocore.exceptions import BotoCoreError, ClientError

        key = result_key(job_id, name, suffix)
        md5 = base64.b64encode(hashlib.md5(data, usedforsecurity=False).digest()).decode()
        where = f"s3://{self.bucket}/{self.prefix}{key}"
        try:
            self.client.put_object(Bucket=self.bucket, Key=self.prefix + key, Body=data, ContentMD5=md5,
                                   ContentType=MIME[suffix])
            head = self.client.head_object(Bucket=self.bucket, Key=self.prefix + key)
        except (BotoCoreError, ClientError) as e:
            raise _unavailable("upload to", where, e) from e
        if head["ContentLength"] != len(data):
            raise _unavailable("upload to", where, f"{head['ContentLength']} of {len(data)} bytes stored")
        return key

    def load(self, key: str) -> bytes:
        return self._read(key, lambda k: self.client.get_object(Bucket=self.bucket, Key=k)["Body"].read())

    def size(self, key: str) -> int:
        return self._read(key, lambda k: self.client.head_object(Bucket=self.bucket, Key=k)["ContentLength"])

    def _read(self, key: str, read):
        from botocore.exceptions import BotoCoreError, ClientError

        where = f"s3://{self.bucket}/{self.prefix}{_checked(key)}"
        try:
            return read(self.prefix + key)
        except ClientError as e:
            if e.response.get("Error", {}).get("Code") in ("NoSuchKey", "404"):
                raise ResultExpired(EXPIRED) from e
            raise _unavailable("read of", where, e) from e
        except BotoCoreError as e:
            raise _unavailable("read of", where, e) from e

    def delete(self, job_id: str) -> None:
        from botocore.exceptions import BotoCoreError, ClientError

        if not re.fullmatch(JOB_ID, job_id):
            return
        where = f"s3://{self.bucket}/{self.prefix}{job_id}/"
        try:
            listing = self.client.list_objects_v2(Bucket=self.bucket, Prefix=f"{self.prefix}{job_id}/")
            objects = [{"Key": o["Key"]} for o in listing.get("Contents", [])]
            if not objects:
                return
            answer = self.client.delete_objects(Bucket=self.bucket, Delete={"Objects": objects, "Quiet": True})
        except (BotoCoreError, ClientError) as e:
            raise _unavailable("delete of", where, e) from e
        # A quiet delete answers 200 whatever happened to each key: its Errors name the ones still there.
        failed = [e for e in answer.get("Errors", []) if e.get("Code") != "NoSuchKey"]
        if failed:
            raise _unavailable("delete of", where, f"{len(failed)} objects kept, first {failed[0]}")


def open_results(settings: Settings) -> ResultStore:
    """``None`` or a path: local files; ``s3://bucket/prefix``: S3 (the endpoint and region that model downloads
    use) with short, bounded retries."""
    url = settings.job_results_url
    if url and url.startswith("s3://"):
        bucket, _, prefix = url.removeprefix("s3://").partition("/")
        if prefix and not prefix.endswith("/"):
            prefix += "/"
        client = s3_client(settings.aws_endpoint_url, settings.aws_region, read_timeout=30, attempts=3)
        return S3Results(bucket, prefix, client)
    if (settings.job_store_url or "").startswith(("redis://", "rediss://")):
        logger.warning("jobs are shared through Redis but their images stay on this node's disk (JOB_RESULTS_URL "
                       "is not s3://): ingress replicas on other nodes cannot serve them unless the folder is shared")
    return LocalResults(Path(url) if url else settings.jobs_data_dir / "results")
