"""How every route reads a JSON body, before FastAPI validates it against the declared model, and how the routes
that answer with images write theirs.

- Seed 003's curl examples post JSON with curl's default form content type: a body is read as JSON whatever its
  content type says, so that the declared model (and the OpenAPI page) still applies.
- Anything that is not plain, finite, reasonably nested UTF-8 JSON is a 422 naming ``body``: invalid Unicode,
  ``NaN`` / ``Infinity`` (valid Python, not JSON), nesting deep enough to exhaust the parser's recursion.
- An answer carrying base64 images is written once, by pydantic-core (``json_answer``): FastAPI's own path
  validates the model again and encodes it twice, about 20 ms of the ingress's core for a 1536² PNG. A large
  payload goes in as bytes, spliced where its ``blob`` placeholder was (about 10 ms less again).
"""

from __future__ import annotations

import base64
import json
import secrets
from collections.abc import Callable, Coroutine
from typing import Any

import pydantic_core
from fastapi import Request, Response
from fastapi.routing import APIRoute
from pydantic import BaseModel

from deployments.support.errors import InvalidInput

MAX_DEPTH = 64  # far beyond any request model here; keeps a hostile body off the recursion limit


def _refuse_constant(name: str) -> float:
    raise ValueError(f"{name} is not a JSON number")


def _depth(value: Any, limit: int) -> None:
    stack = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if depth > limit:
            raise InvalidInput(f"body is nested deeper than {limit} levels", field="body")
        if isinstance(item, dict):
            stack.extend((v, depth + 1) for v in item.values())
        elif isinstance(item, list):
            stack.extend((v, depth + 1) for v in item)


def parse_json(raw: bytes) -> Any:
    try:
        text = raw.decode("utf-8")
        value = json.loads(text, parse_constant=_refuse_constant)
    except UnicodeDecodeError as e:
        raise InvalidInput("body is not valid UTF-8", field="body") from e
    except RecursionError as e:
        raise InvalidInput(f"body is nested deeper than {MAX_DEPTH} levels", field="body") from e
    except ValueError as e:  # JSONDecodeError and the refused constants
        raise InvalidInput(f"body is not JSON: {e}", field="body") from e
    _depth(value, MAX_DEPTH)
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
                request._json = parse_json(raw)  # FastAPI's request.json() returns this cached value
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
