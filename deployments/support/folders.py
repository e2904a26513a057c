"""A folder of weight files a deployment reads by name (LoRAs, textual-inversion embeddings): read again when the
folder changes, so that a file dropped there is usable without a redeploy."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Generic, TypeVar

from deployments.support.errors import ModelLoadError
from deployments.support.settings import Settings
from deployments.weights import loader

logger = logging.getLogger(__name__)

File = TypeVar("File")


class WatchedFolder(Generic[File]):
    """The files of ``source`` (a local folder, a repo id in the local cache, an S3 prefix) by name, as ``_read``
    makes them, read again when the folder's modification time changes or on ``rescan`` (which also lists an S3
    prefix again). ``missing_ok``: a source that cannot be resolved holds nothing, with a warning, rather than
    failing the caller."""

    kind = "files"
    missing_ok = False

    def __init__(self, source: str | None, settings: Settings | None) -> None:
        self.source, self.settings = source, settings
        self._folder: Path | None = None
        self._stamp: int | None = None
        self._files: dict[str, File] = {}

    def files(self, rescan: bool = False) -> dict[str, File]:
        if not self.source:
            return {}
        if self._folder is None or rescan:
            try:
                self._folder = loader.resolve(self.source, self.settings)
            except ModelLoadError as e:
                if not self.missing_ok:
                    raise
                if self._files or self._stamp is None:  # said once, not at every look
                    logger.warning("%s: %s; none", self.kind, e)
                self._files, self._stamp, self._folder = {}, -1, None
                return self._files
        stamp = self._folder.stat().st_mtime_ns
        if stamp != self._stamp or rescan:
            self._files, self._stamp = self._read(self._folder), stamp
        return self._files

    def _read(self, folder: Path) -> dict[str, File]:
        raise NotImplementedError
