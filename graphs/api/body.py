"""How every route reads a JSON body, before FastAPI validates it against the declared model, and how the routes
that answer with images write theirs.

- Seed 003's curl examples post JSON with curl's default form content type: a body is read as JSON whatever its
  content type says, so that the declared model (and the OpenAPI page) still applies.
- Anything that is not plain, finite, reasonably nested UTF-8 JSON is a 422 naming ``body``: invalid Unicode
  (a lone surrogate escape such as ``"\\ud800"`` too, which no answer could carry back), ``NaN`` / ``Infinity``
  (valid Python, not JSON), nesting deep enough to exhaust the parser's recursion, more than ``MAX_VALUES``
  values (counted before parsing: 32 MB of ``[],`` would cost 1.5 GB as Python lists). A large body is parsed off
  the event loop.
- An answer carrying base64 images is written once, by pydantic-core (``json_answer``): FastAPI's own path
  validates the model again and encodes it twice, about 20 ms of the ingress's core for a 1536² PNG. A large
  payload goes in as bytes, spliced where its ``blob`` placeholder was (about 10 ms less again).
"""

from __future__ import annotations

import asyncio
import base64
import json
import re
import secrets
from collections.abc import Callable, Coroutine
from typing import Any

import pydantic_core
from fastapi import Request, Response
from fastapi.routing import APIRoute
from pydantic import BaseModel

from deployments.support.errors import InvalidInput

MAX_DEPTH = 64  # far beyond any request model here; keeps a hostile body off the recursion limit
MAX_VALUES = 100_000  # far beyond any request model here too; keeps a body's Python objects near its own size
OFF_LOOP_BYTES = 64 * 1024  # a larger body is parsed in a thread, so the event loop keeps serving
# A string, or an unterminated one running to the end: nothing is tried twice, so striking them is linear in the
# body, however many escaped quotes it holds.
_STRING = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*(?:"|\Z)', re.DOTALL)


def _refuse_constant(name: str) -> float:
    raise ValueError(f"{name} is not a JSON number")


def _count_values(raw: bytes) -> int:
    """At least the number of values in ``raw`` (each but the first opens its container or follows a comma),
    without parsing it."""
    count = raw.count(b",") + raw.count(b"[") + raw.count(b"{") + 1
    if count > MAX_VALUES:  # commas and brackets inside strings count too: strike the strings and count again
        bare = _STRING.sub(b"", raw)
        count = bare.count(b",") + bare.count(b"[") + bare.count(b"{") + 1
    return count


def _check(value: Any, escapes: bool) -> None:
    """Refuse nesting past ``MAX_DEPTH`` and, where the body held ``\\u`` escapes, strings that are not Unicode
    (a lone surrogate): UTF-8 cannot carry them, so the answer echoing them would fail after the work was done."""
    stack = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if depth > MAX_DEPTH:
            raise InvalidInput(f"body is nested deeper than {MAX_DEPTH} levels", field="body")
        if isinstance(item, dict):
            if escapes:
                stack.extend((k, depth) for k in item)
            stack.extend((v, depth + 1) for v in item.values())
        elif isinstance(item, list):
            stack.extend((v, depth + 1) for v in item)
        elif escapes and isinstance(item, str):
            try:
                item.encode("utf-8")
            except UnicodeEncodeError as e:
                raise InvalidInput("body holds a string that is not valid Unicode (a lone surrogate escape)",
                                   field="body") from e


def parse_json(raw: bytes) -> Any:
    if _count_values(raw) > MAX_VALUES:
        raise InvalidInput(f"body holds more than {MAX_VALUES} values", field="body",
                           details={"limit_values": MAX_VALUES})
    try:
        text = raw.decode("utf-8")
        value = json.loads(text, parse_constant=_refuse_constant)
    except UnicodeDecodeError as e:
        raise InvalidInput("body is not valid UTF-8", field="body") from e
    except RecursionError as e:
        raise InvalidInput(f"body is nested deeper than {MAX_DEPTH} levels", field="body") from e
    except ValueError as e:  # JSONDecodeError and the refused constants
        raise InvalidInput(f"body is not JSON: {e}", field="body") from e
    _check(value, escapes=b"\\u" in raw)
    return value


class JSONBodyRoute(APIRoute):
    """An APIRoute whose body is parsed by ``parse_json`` (any content type) before FastAPI sees it."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()
        if self.body_field is None:
            return handler

        async def read_json_first(request: Request) -> Response:
            raw = await request.body()
            if raw:
                parsed = await asyncio.to_thread(parse_json, raw) if len(raw) > OFF_LOOP_BYTES else parse_json(raw)
                request._json = parsed  # FastAPI's request.json() returns this cached value
                headers = [(k, v) for k, v in request.scope["headers"] if k != b"content-type"]
                request.scope["headers"] = [*headers, (b"content-type", b"application/json")]
                request.__dict__.pop("_headers", None)
            return await handler(request)

        return read_json_first


_NONCE = secrets.token_hex(8)  # per process: a client cannot write a placeholder into its own fields


def blob(name: str) -> str:
    """A placeholder for a base64 payload in a response model, which ``json_answer`` replaces with the bytes:
    a megabyte-sized string is then neither validated by the model nor escaped by the serialiser."""
    return f"@@{_NONCE}:{name}@@"


def blobs(files: list[bytes]) -> tuple[list[str], dict[str, bytes]]:
    """For each file, the placeholder that stands for it in a response model, and the base64 payloads by name,
    for ``json_answer``."""
    names = [f"file{i}" for i in range(len(files))]
    return [blob(n) for n in names], {n: base64.b64encode(data) for n, data in zip(names, files, strict=True)}


def json_answer(model: BaseModel, **blobs: bytes) -> Response:
    """``model`` as the response body, serialised once, with each ``blob(name)`` placeholder replaced by
    ``blobs[name]``, base64 text, which JSON needs no escaping for. The route keeps its ``response_model`` for the
    OpenAPI page; the model was validated when it was built."""
    body = pydantic_core.to_json(model)
    for name, data in blobs.items():
        body = body.replace(blob(name).encode(), data)
    return Response(body, media_type="application/json")
