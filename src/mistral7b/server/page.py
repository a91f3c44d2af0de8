"""The chat page at `/`: static files shipped in the package (server/static), no CDN.

The page is open even with `--api-key` (it holds no data; its API calls carry the key the
user types), and it shows untrusted model text, so its HTML goes out with a
Content-Security-Policy that allows only this server's own scripts, styles and fetches.
"""

from __future__ import annotations

from importlib.resources import files

from fastapi import FastAPI
from starlette.responses import Response
from starlette.staticfiles import StaticFiles

PAGE_PATH = "/"
STATIC_PREFIX = "/static/"
CSP = ("default-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'; "
       "object-src 'none'")
_HEADERS = {"Content-Security-Policy": CSP, "X-Content-Type-Options": "nosniff",
            "Cache-Control": "no-cache"}


def is_page_path(path: str) -> bool:
    """The page and its static files: what `--api-key` leaves open."""
    return path == PAGE_PATH or (path.startswith(STATIC_PREFIX) and ".." not in path)


def add_page(app: FastAPI) -> None:
    static = files("mistral7b.server") / "static"
    html = (static / "index.html").read_bytes()

    async def index() -> Response:
        return Response(html, media_type="text/html; charset=utf-8", headers=_HEADERS)

    app.add_api_route(PAGE_PATH, index, methods=["GET"], include_in_schema=False)
    app.mount(STATIC_PREFIX.rstrip("/"), StaticFiles(packages=[("mistral7b.server", "static")]),
              name="static")
