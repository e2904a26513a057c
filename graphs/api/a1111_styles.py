"""A1111's saved prompt styles: a ``styles.csv`` (columns ``name``, ``prompt``, ``negative_prompt``; A1111's older
``text`` column is read as ``prompt``), listed at ``/sdapi/v1/prompt-styles`` and applied by name through the
``styles`` field of txt2img and img2img, as A1111 merges them: a style's text holding ``{prompt}`` takes the
prompt in its place, any other is appended after a comma.

The file is the operator's to edit while the service runs: it is read again when it changes (a change that does
not parse keeps the styles read before, with a warning in the log).
"""

from __future__ import annotations

import csv
import io
import logging
import threading
from dataclasses import dataclass
from pathlib import Path

from deployments.support.errors import InvalidInput

logger = logging.getLogger(__name__)

MAX_STYLES_BYTES = 4 * 1024 * 1024  # A1111 users' collections run to thousands of styles, well under this
MAX_STYLES_PER_REQUEST = 64


@dataclass(frozen=True)
class Style:
    name: str
    prompt: str
    negative_prompt: str


def merge(style: str, prompt: str) -> str:
    """``prompt`` with one style's text: in place of its ``{prompt}``, else after it with a comma (empty parts
    dropped)."""
    if "{prompt}" in style:
        return style.replace("{prompt}", prompt)
    return ", ".join(part for part in (prompt.strip(), style.strip()) if part)


def parse(text: str) -> dict[str, Style]:
    """The styles of a ``styles.csv``'s text, by name (a later row of a name replaces an earlier one, as in A1111);
    a file without a ``name`` column is refused."""
    reader = csv.DictReader(io.StringIO(text), skipinitialspace=True)
    columns = set(reader.fieldnames or ())
    if "name" not in columns or not columns & {"prompt", "text"}:
        raise ValueError(f"a styles file needs a name and a prompt column; it has {sorted(columns)}")
    styles: dict[str, Style] = {}
    for row in reader:
        name = (row.get("name") or "").strip()
        if not name:
            continue
        prompt = row.get("prompt") if "prompt" in columns else row.get("text")
        styles[name] = Style(name, prompt or "", row.get("negative_prompt") or "")
    return styles


class PromptStyles:
    """The styles of one file, read again whenever its modification time or size changes; None: no file, no
    styles."""

    def __init__(self, path: Path | None) -> None:
        self.path = path
        self._lock = threading.Lock()
        self._seen: tuple[int, int] | None = None
        self._styles: dict[str, Style] = {}
        if path is not None and not path.exists():
            logger.warning("prompt styles: %s does not exist; no styles are served until it does", path)

    def styles(self) -> dict[str, Style]:
        if self.path is None:
            return {}
        with self._lock:
            try:
                stat = self.path.stat()
            except OSError:
                if self._seen is not None:
                    logger.warning("prompt styles: %s is gone; no styles are served until it is back", self.path)
                self._seen, self._styles = None, {}
                return self._styles
            seen = (stat.st_mtime_ns, stat.st_size)
            if seen != self._seen:
                self._seen = seen
                self._styles = self._read(self.path, stat.st_size)
            return self._styles

    def _read(self, path: Path, size: int) -> dict[str, Style]:
        try:
            if size > MAX_STYLES_BYTES:
                raise ValueError(f"{size} bytes, over the {MAX_STYLES_BYTES} read")
            # utf-8-sig: spreadsheet programs save a byte order mark that would rename the first column.
            styles = parse(path.read_text(encoding="utf-8-sig"))
        except (OSError, UnicodeDecodeError, ValueError, csv.Error) as e:
            logger.warning("prompt styles: %s was not read (%s); the %d styles read before stay",
                           path, e, len(self._styles))
            return self._styles
        logger.info("prompt styles: %d read from %s", len(styles), path)
        return styles

    def listing(self) -> list[dict]:
        """A1111's ``/prompt-styles`` answer."""
        return [{"name": s.name, "prompt": s.prompt, "negative_prompt": s.negative_prompt}
                for s in self.styles().values()]

    def apply(self, prompt: str, negative_prompt: str, names: list[str]) -> tuple[str, str, list[str]]:
        """The prompt and negative prompt with the named styles merged in, in their order, and a warning for each
        name no style has (A1111 passes such a name over without a word)."""
        if len(names) > MAX_STYLES_PER_REQUEST:
            raise InvalidInput(f"at most {MAX_STYLES_PER_REQUEST} styles a request", field="styles")
        styles = self.styles()
        warnings = []
        for name in names:
            style = styles.get(name)
            if style is None:
                warnings.append(f"styles: no style is named {name!r} (GET /sdapi/v1/prompt-styles); "
                                "it was not applied")
                continue
            prompt, negative_prompt = merge(style.prompt, prompt), merge(style.negative_prompt, negative_prompt)
        return prompt, negative_prompt, warnings
