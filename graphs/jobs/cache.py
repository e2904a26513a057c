"""The result cache: an identical fixed-seed request, on the same weights, is answered from the result store.

Opt-in (``RESULT_CACHE``, or the app's ``result_cache`` argument). The key is a SHA-256 over the API family, the
request's canonical JSON (with the checkpoint the ingress resolved), what every model deployment reports it runs
(``fingerprint()``: content hashes of the request's checkpoint, as the checkpoint catalogue computes them, and of the
VAE, LoRAs, IP-Adapter, refiner, upscalers, face restorer and safety checker, with the precision and defaults that
change pixels) and how files are marked (watermark and content-credential settings), so a replaced file, once
loaded, misses. The base answers for the checkpoint named, whichever replica answers and whatever it holds, so a key
never depends on where Serve's multiplexing routed a call. A random seed (-1) is never cached.

Entries live where job results do: files under ``JOBS_DATA_DIR/cache`` or objects under ``cache/`` of
``JOB_RESULTS_URL``'s prefix. One object per entry holds its facts (JSON) and its files, so an entry is whole or
absent, and a listing is all eviction needs. A hit renews the entry's time in the store (at most once a minute), so
the store's times order entries by use. Eviction drops entries unused for ``RESULT_CACHE_MAX_AGE_S``, then the least
recently used until the total is within ``RESULT_CACHE_MAX_BYTES`` (down to 90 % of it, so that the next stores
fit without a listing). It lists the store only when this replica's count of the bytes there passes the bound, or
a minute after its last listing (what other replicas wrote meanwhile is not counted). An entry made longer ago
than the age bound is a miss, used or not. A cache that cannot be read or written never fails a request: it is a
miss, logged.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import os
import re
import struct
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from deployments.support.settings import Settings
from deployments.weights.loader import s3_client

if TYPE_CHECKING:
    from graphs.plans import Handles

logger = logging.getLogger(__name__)

MAGIC = b"IGC1"
NAME = re.compile(r"^[0-9a-f]{64}\.entry$")
LOW_WATER = 0.9  # eviction past the size bound goes down to this share of it
# Bump when a plan's output for the same request changes (2: watermarks and content credentials; 3: the refiner's
# ensemble sampler, scheduler defaults, exact hires steps, the face restorers' range and paste-back, upscaler passes,
# an overlay screened and credited).
KEY_VERSION = 3


@dataclass
class Entry:
    facts: dict
    files: list[bytes]
    created: float


def pack(facts: dict, files: list[bytes], created: float) -> bytes:
    header = json.dumps({"facts": facts, "sizes": [len(f) for f in files], "created": created}).encode()
    return b"".join([MAGIC, struct.pack("<I", len(header)), header, *files])


def unpack(data: bytes) -> Entry:
    if data[:4] != MAGIC or len(data) < 8:
        raise ValueError("not a cache entry")
    (length,) = struct.unpack("<I", data[4:8])
    header = json.loads(data[8:8 + length])
    files, at = [], 8 + length
    for size in header["sizes"]:
        files.append(data[at:at + size])
        at += size
    if at != len(data):
        raise ValueError("cache entry truncated or padded")
    return Entry(header["facts"], files, header["created"])


def request_key(kind: str, request: dict, models: dict) -> str:
    """The cache key of one request of one API family on the models now loaded."""
    canonical = json.dumps({"v": KEY_VERSION, "kind": kind, "request": request, "models": models},
                           sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(canonical.encode()).hexdigest()


class Entries(Protocol):
    def read(self, name: str) -> tuple[bytes, float] | None: ...  # the data and its time in the store

    def touch(self, name: str) -> None: ...  # its time in the store becomes now

    def write(self, name: str, data: bytes) -> None: ...

    def delete(self, name: str) -> None: ...

    def listing(self) -> list[tuple[str, int, float]]: ...  # name, bytes, modified (epoch seconds)


class LocalEntries:
    """Files in one folder, written to a temporary name and renamed: readers see a whole entry or none."""

    def __init__(self, root: Path) -> None:
        self.root = root
        root.mkdir(parents=True, exist_ok=True)

    def read(self, name: str) -> tuple[bytes, float] | None:
        try:
            with open(self.root / name, "rb") as f:
                return f.read(), os.fstat(f.fileno()).st_mtime
        except FileNotFoundError:
            return None

    def touch(self, name: str) -> None:
        with contextlib.suppress(FileNotFoundError):  # evicted meanwhile
            os.utime(self.root / name)

    def write(self, name: str, data: bytes) -> None:
        temp = self.root / f".{name}.{uuid.uuid4().hex}.tmp"
        try:
            temp.write_bytes(data)
            os.replace(temp, self.root / name)
        except BaseException:  # a full disk: no partial file left behind, uncounted by the size bound
            temp.unlink(missing_ok=True)
            raise

    def delete(self, name: str) -> None:
        (self.root / name).unlink(missing_ok=True)

    def listing(self) -> list[tuple[str, int, float]]:
        out = []
        for path in self.root.iterdir():
            if NAME.match(path.name):
                try:
                    stat = path.stat()
                except FileNotFoundError:  # evicted meanwhile by another replica
                    continue
                out.append((path.name, stat.st_size, stat.st_mtime))
        return out


class S3Entries:
    """Objects under ``prefix`` (one ``PutObject`` each, whole or absent)."""

    def __init__(self, bucket: str, prefix: str, client) -> None:
        self.bucket, self.prefix, self.client = bucket, prefix, client

    def read(self, name: str) -> tuple[bytes, float] | None:
        from botocore.exceptions import ClientError

        try:
            answer = self.client.get_object(Bucket=self.bucket, Key=self.prefix + name)
        except ClientError as e:
            if e.response.get("Error", {}).get("Code") in ("NoSuchKey", "404"):
                return None
            raise
        return answer["Body"].read(), answer["LastModified"].timestamp()

    def touch(self, name: str) -> None:
        """A copy onto itself (inside the store, no bytes travel) renews ``LastModified``."""
        key = self.prefix + name
        self.client.copy_object(Bucket=self.bucket, Key=key, CopySource={"Bucket": self.bucket, "Key": key},
                                MetadataDirective="REPLACE")

    def write(self, name: str, data: bytes) -> None:
        self.client.put_object(Bucket=self.bucket, Key=self.prefix + name, Body=data)

    def delete(self, name: str) -> None:
        self.client.delete_object(Bucket=self.bucket, Key=self.prefix + name)

    def listing(self) -> list[tuple[str, int, float]]:
        pages = self.client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=self.prefix)
        return [(o["Key"].removeprefix(self.prefix), o["Size"], o["LastModified"].timestamp())
                for page in pages for o in page.get("Contents", []) if NAME.match(o["Key"].removeprefix(self.prefix))]


class ResultCache:
    TOUCH_S = 60.0  # a hit renews an entry's time when it is older than this
    SWEEP_S = 60.0  # the longest a replica goes without listing the store after a store

    def __init__(self, entries: Entries, max_bytes: int, max_age_s: float, clock=time.time) -> None:
        self.entries, self.max_bytes, self.max_age_s, self.clock = entries, max_bytes, max_age_s, clock
        self.counted = 0  # the bytes in the store as this replica knows them: the last listing's, plus its stores
        self.swept = -float("inf")  # when it last listed

    def get(self, key: str) -> Entry | None:
        name = _name(key)
        read = self.entries.read(name)
        if read is None:
            return None
        data, stamped = read
        try:
            entry = unpack(data)
        except (ValueError, KeyError) as e:
            logger.warning("cache entry %s unreadable (%s): dropped", name, e)
            self.entries.delete(name)
            return None
        now = self.clock()
        if now - entry.created > self.max_age_s:
            self.entries.delete(name)
            return None
        if now - stamped > self.TOUCH_S:
            self.entries.touch(name)
        return entry

    def put(self, key: str, facts: dict, files: list[bytes]) -> None:
        data = pack(facts, files, self.clock())
        if len(data) > self.max_bytes:
            return  # it would evict everything else and itself
        self.entries.write(_name(key), data)
        self.counted += len(data)
        if self.counted > self.max_bytes or self.clock() - self.swept >= self.SWEEP_S:
            self.evict()

    def evict(self) -> list[str]:
        """Drop the entries unused for the age bound, then, past the size bound, the least recently used until the
        rest fill at most ``LOW_WATER`` of it; the names dropped."""
        now = self.clock()
        listed = sorted(self.entries.listing(), key=lambda e: e[2])
        dropped = [name for name, _, used in listed if now - used > self.max_age_s]
        kept = [(name, size) for name, size, used in listed if now - used <= self.max_age_s]
        total = sum(size for _, size in kept)
        if total > self.max_bytes:  # down to the low-water mark, so that the next stores fit without a listing
            for name, size in kept:
                if total <= self.max_bytes * LOW_WATER:
                    break
                dropped.append(name)
                total -= size
        for name in dropped:
            self.entries.delete(name)
        self.counted, self.swept = total, now
        return dropped


def _name(key: str) -> str:
    name = f"{key}.entry"
    if not NAME.match(name):
        raise ValueError("bad cache key")
    return name


def open_cache(settings: Settings, enabled: bool | None = None) -> ResultCache | None:
    """The cache beside the job results, or None when it is off (``enabled``, else RESULT_CACHE)."""
    if not (settings.result_cache if enabled is None else enabled):
        return None
    url = settings.job_results_url
    entries: Entries
    if url and url.startswith("s3://"):
        bucket, _, prefix = url.removeprefix("s3://").partition("/")
        prefix = f"{prefix.rstrip('/')}/cache/" if prefix else "cache/"
        entries = S3Entries(bucket, prefix, s3_client(settings.aws_endpoint_url, settings.aws_region,
                                                      read_timeout=30, attempts=2))
    else:
        entries = LocalEntries(settings.jobs_data_dir / "cache")
    return ResultCache(entries, settings.result_cache_max_bytes, settings.result_cache_max_age_s)


async def fingerprints(h: Handles, checkpoint: str | None) -> dict[str, Any]:
    """What every model deployment of the plans runs, asked of one replica of each at once; the base answers for
    ``checkpoint`` (a plain call, no multiplexed routing: every base replica gives the same answer)."""
    from graphs.api.errors import call

    stages = {"base": h.base, "refiner": h.refiner, "upscaler": h.upscaler, "faces": h.faces, "safety": h.safety}
    present = {name: handle for name, handle in stages.items() if handle is not None}
    answers = await asyncio.gather(*(call(handle.fingerprint.remote(checkpoint) if name == "base" else
                                          handle.fingerprint.remote()) for name, handle in present.items()))
    return {**{name: None for name in stages}, **dict(zip(present, answers, strict=True))}


def marks(settings: Settings) -> dict[str, Any]:
    """How the encoding stage marks the files (``deployments.support.provenance``): a cached file keeps the marks it
    was made with, so other marks are another key."""
    return {"watermark": [settings.watermark_enabled, settings.watermark_bits, settings.watermark_luma_scale,
                          settings.watermark_chroma_scale],
            "credentials": [str(settings.c2pa_cert_file), settings.c2pa_algorithm, settings.c2pa_tsa_url]}


class RequestCache:
    """The cache as the API families use it: ``key`` is None when the cache is off or the seed is random; a
    failing store is a miss (logged), never a failed request."""

    def __init__(self, cache: ResultCache | None, handles: Handles, settings: Settings) -> None:
        self.cache, self.handles, self.marks = cache, handles, marks(settings)

    async def key(self, kind: str, request: dict, checkpoint: str | None) -> str | None:
        """``checkpoint``: the base checkpoint the request runs on, resolved by the ingress (its name is in
        ``request`` too)."""
        if self.cache is None or request.get("seed", -1) == -1:
            return None
        try:
            models = await fingerprints(self.handles, checkpoint)
        except Exception as e:  # noqa: BLE001 - a replica that cannot say what it loaded: no caching this time
            logger.warning("model fingerprints unavailable (%s): not cached", type(e).__name__)
            return None
        # Off the event loop: an edit's request holds its uploads (up to MAX_BODY_BYTES of base64) to hash.
        return await asyncio.to_thread(request_key, kind, request, {**models, "marks": self.marks})

    async def get(self, key: str | None) -> Entry | None:
        if key is None or self.cache is None:
            return None
        try:
            return await asyncio.to_thread(self.cache.get, key)
        except Exception as e:  # noqa: BLE001 - OSError, botocore's errors: the cache never fails a request
            logger.warning("result cache unreadable (%s): a miss", type(e).__name__)
            return None

    async def put(self, key: str | None, facts: dict, files: list[bytes]) -> None:
        """Keep an answer; one that says it is ``degraded`` (a stage left out after failing) is not kept, since the
        next try may do better."""
        if key is None or self.cache is None or facts.get("degraded"):
            return
        try:
            await asyncio.to_thread(self.cache.put, key, facts, files)
        except Exception as e:  # noqa: BLE001 - as above: the answer goes out uncached
            logger.warning("result cache not written (%s)", type(e).__name__)
