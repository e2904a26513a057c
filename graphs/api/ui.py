"""The browser page at ``/ui``: plain HTML, one script and one stylesheet from ``graphs/ui/`` (package data).

The page is a client of the public API like any other (it holds no server state and no secrets), so it is open
when bearer auth is on: it asks for the token itself and sends it with every call. Only the three named files are
served, never a path from the request, and the page's Content-Security-Policy allows nothing from elsewhere.
The routes are plain functions (they use no deployment state), so the edge tests can mount them without Ray.
"""

from __future__ import annotations

from functools import cache
from importlib import resources

from fastapi import APIRouter
from fastapi.responses import Response

from deployments.support.errors import NotFound

router = APIRouter(tags=["ui"], include_in_schema=False)  # a page, not an API operation
ASSETS = {"app.js": "text/javascript; charset=utf-8", "app.css": "text/css; charset=utf-8"}
HEADERS = {
    # Results and the gallery come by URL and show as blob: URIs (fetched with the token, which an <img> cannot
    # send); previews and the tools' answers as data: URIs. Everything else comes from this origin.
    "Content-Security-Policy": "default-src 'self'; img-src 'self' data: blob:; connect-src 'self'; "
                               "object-src 'none'; base-uri 'none'; frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "Cache-Control": "no-cache",
}


@cache
def _read(name: str) -> bytes:
    return (resources.files("graphs") / "ui" / name).read_bytes()


@router.get("/ui")
async def ui_page() -> Response:
    """The generation page."""
    return Response(_read("index.html"), media_type="text/html; charset=utf-8", headers=HEADERS)


@router.get("/ui/{name}")
async def ui_asset(name: str) -> Response:
    """The page's script and stylesheet; any other name is a 404."""
    if name not in ASSETS:
        raise NotFound(f"no such file: {name!r}", field="name")
    return Response(_read(name), media_type=ASSETS[name], headers=HEADERS)
