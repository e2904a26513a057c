"""The checkpoints a base deployment serves: those its config names and those found in its checkpoint folder.

Light on purpose (no torch, no diffusers): the ingress resolves a request's checkpoint with the same catalogue the
base replicas load from, so an unknown name is refused before any work starts, and lists them for A1111 clients.
Every process rescans ``checkpoint_dir`` when the folder changes (a file dropped, renamed or removed changes its
modification time), so all of them agree on what is selectable without sharing any state or a redeploy.

A1111 lists a checkpoint with the SHA-256 of its file and a short hash (the first ten hex digits); here a
diffusers folder is hashed as the SHA-256 of its weight files' hashes (by relative path). Hashes are computed once
per file version (path, size, modification time) and kept in ``MODEL_CACHE_DIR/checkpoint-hashes.json``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import threading
from dataclasses import dataclass
from pathlib import Path

from deployments.support.config import CHECKPOINT_NAME, Checkpoint, SDXLBaseConfig
from deployments.support.errors import UnknownModel
from deployments.support.settings import Settings, current

logger = logging.getLogger(__name__)

_NAME = re.compile(CHECKPOINT_NAME)
_SUFFIX = re.compile(r"\.(safetensors|ckpt)$", re.IGNORECASE)  # what A1111 titles and saved settings carry
_HASH = re.compile(r"^([0-9a-f]{10}|[0-9a-f]{64})$")  # A1111's short hash, or the full SHA-256
_CHUNK = 8 << 20


@dataclass(frozen=True)
class Entry:
    """One selectable checkpoint; ``origin`` says whether the config named it or the folder held it."""

    checkpoint: Checkpoint
    origin: str  # "config" or "folder"

    @property
    def name(self) -> str:
        return self.checkpoint.name

    @property
    def filename(self) -> str:
        """The file or folder name of its source, without the host's folders."""
        return self.checkpoint.source.rstrip("/").rsplit("/", 1)[-1]


def model_hash(path: Path) -> str:
    """A1111's old model hash (``sd_models.model_hash``), the one the ControlNet extension lists its models with as
    ``name [hash]``: the first eight hex digits of the SHA-256 of the 64 KiB at 1 MiB into the file (of nothing,
    for a file shorter than 1 MiB, as A1111 reads it). One small read: no cache needed."""
    with path.open("rb") as f:
        f.seek(0x100000)
        return hashlib.sha256(f.read(0x10000)).hexdigest()[:8]


class HashCache:
    """SHA-256 per file version, kept across restarts in one JSON file (rewritten atomically) that every process on
    the host shares: a version one process hashed (a base replica loading it) is read by the others (an ingress
    listing it) instead of hashed again, and a file is hashed once in a process however many ask at once."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._lock = threading.Lock()
        self._known: dict[str, str] = self._stored()
        self._hashing: dict[str, threading.Lock] = {}

    def _stored(self) -> dict[str, str]:
        try:
            known = json.loads(self.path.read_text())
        except (OSError, ValueError):
            return {}
        return known if isinstance(known, dict) else {}

    def file(self, path: Path) -> str:
        stat = path.stat()
        key = f"{path.resolve()}:{stat.st_size}:{stat.st_mtime_ns}"
        with self._lock:
            known = self._known.get(key)
            flight = self._hashing.setdefault(key, threading.Lock())
        if known:
            return known
        with flight:  # the first asker hashes; the others wait for its answer
            with self._lock:
                self._known = {**self._stored(), **self._known}  # what other processes hashed meanwhile
                known = self._known.get(key)
            if known:
                return known
            digest = hashlib.sha256()
            with path.open("rb") as f:
                while chunk := f.read(_CHUNK):
                    digest.update(chunk)
            value = digest.hexdigest()
            with self._lock:
                self._known = {**self._stored(), **self._known, key: value}
                self._save()
                self._hashing.pop(key, None)
        return value

    def folder(self, path: Path) -> str:
        digest = hashlib.sha256()
        for weights in sorted(path.rglob("*.safetensors")):
            digest.update(f"{weights.relative_to(path)}:{self.file(weights)}\n".encode())
        return digest.hexdigest()

    def _save(self) -> None:
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            part = self.path.with_name(f"{self.path.name}.{os.getpid()}.{threading.get_ident()}")
            part.write_text(json.dumps(self._known))
            os.replace(part, self.path)
        except OSError as e:  # a read-only cache costs a rehash next time, nothing more
            logger.debug("checkpoint hashes not saved: %s", e)


class Catalog:
    def __init__(self, config: SDXLBaseConfig, settings: Settings | None = None) -> None:
        self.config = config
        self.settings = settings or current()
        self.hashes = HashCache(self.settings.model_cache_dir / "checkpoint-hashes.json")
        self._lock = threading.Lock()
        self._scanned: dict[str, Entry] = {}
        self._stamp: int | None = None  # the folder's modification time at the last scan

    @property
    def folder(self) -> Path | None:
        return Path(self.config.checkpoint_dir).expanduser() if self.config.checkpoint_dir else None

    def entries(self, rescan: bool = False) -> dict[str, Entry]:
        """Every selectable checkpoint by name: the configured ones first, then the folder's (sorted)."""
        self._scan(force=rescan)
        configured = {c.name: Entry(c, "config") for c in self.config.configured}
        with self._lock:
            found = {n: e for n, e in self._scanned.items() if n not in configured}
        return {**configured, **found}

    def entry(self, name: str, field: str = "checkpoint") -> Entry:
        entries = self.entries()
        if name not in entries:
            raise UnknownModel(f"unknown checkpoint {name!r}", field=field, details={"choices": self.choices()})
        return entries[name]

    @property
    def default(self) -> str:
        if self.config.default_checkpoint:
            return self.config.default_checkpoint
        entries = self.entries()
        if not entries:
            raise UnknownModel("no checkpoint is configured or in checkpoint_dir", field="checkpoint")
        return next(iter(entries))

    def choices(self) -> list[str]:
        """What a client may send: every checkpoint name, then the aliases."""
        return [*self.entries(), *self.config.checkpoint_aliases]

    def resolve(self, wanted: str, field: str) -> str:
        """A client's checkpoint -> its name. Accepted as A1111 accepts them: a name or an alias, the file name with
        or without ``.safetensors`` / ``.ckpt``, an A1111 title ``name [hash]`` (of either), or the short hash (ten
        hex digits) or full SHA-256 of a checkpoint this host can hash. An unknown one is an ``UnknownModel`` naming
        ``field`` and listing the choices."""
        name, _, bracket = wanted.strip().partition(" [")
        name = name.strip()
        entries = self.entries()
        for candidate in (name, _SUFFIX.sub("", name)):
            candidate = self.config.checkpoint_aliases.get(candidate, candidate)
            if candidate in entries:
                return candidate
        for entry in entries.values():  # a configured checkpoint's file name may differ from its name
            if name in (entry.filename, _SUFFIX.sub("", entry.filename)):
                return entry.name
        for digest in (bracket.rstrip("]").strip().lower(), name.lower()):
            if _HASH.match(digest):
                found = self._by_hash(digest, entries)
                if found is not None:
                    return found
        return self.entry(name, field).name  # unknown: the structured error

    def _by_hash(self, digest: str, entries: dict[str, Entry]) -> str | None:
        """The checkpoint whose SHA-256 (``digest`` of 64 hex digits) or short hash (10) it is, among those this host
        can hash (kept per file version, so each file is hashed once)."""
        for entry in entries.values():
            sha = self.sha256(entry.checkpoint.source)
            if sha is not None and (sha == digest or sha[:10] == digest):
                return entry.name
        return None

    def sha256(self, source: str) -> str | None:
        """The hash of a checkpoint's weights, when they are on this host (not for a hub id or an S3 source)."""
        path = Path(source).expanduser()
        try:
            if path.is_file():
                return self.hashes.file(path)
            if path.is_dir():
                return self.hashes.folder(path)
        except OSError as e:
            logger.warning("%s not hashed: %s", source, e)
        return None

    def title(self, name: str) -> str:
        """A1111's title of a checkpoint, ``name [short hash]`` (the name alone when it cannot be hashed here)."""
        sha = self.sha256(self.entry(name).checkpoint.source)
        return f"{name} [{sha[:10]}]" if sha else name

    def _scan(self, force: bool) -> None:
        folder = self.folder
        if folder is None:
            return
        try:
            stamp = folder.stat().st_mtime_ns
        except OSError:
            stamp = None
        with self._lock:
            if stamp == self._stamp and not force:
                return
            self._scanned = self._read(folder) if stamp is not None else {}
            self._stamp = stamp
        logger.info("checkpoint folder %s: %s", folder, ", ".join(self._scanned) or "no checkpoints")

    def _read(self, folder: Path) -> dict[str, Entry]:
        found: dict[str, Entry] = {}
        for path in sorted(folder.iterdir()):
            if path.is_file() and path.suffix.lower() == ".safetensors":
                name, config = path.stem, self.config.checkpoint_config
            elif path.is_dir() and (path / "model_index.json").is_file():
                name, config = path.name, None
            else:
                continue  # pickles, partial downloads and anything else are not checkpoints
            if not _NAME.match(name):
                logger.warning("checkpoint %s skipped: its name is not a valid checkpoint name", path.name)
                continue
            found[name] = Entry(Checkpoint(name=name, source=str(path), config=config), "folder")
        return found
