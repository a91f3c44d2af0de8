"""Pure ASGI middlewares (no BaseHTTPMiddleware: it would hide client disconnects from
streaming responses): request metrics, body size cap, API key."""

from __future__ import annotations

import hmac
from collections.abc import Callable
from typing import Any

from mistral7b.server.errors import raw_error
from mistral7b.server.metrics import Metrics

Scope = dict[str, Any]
ASGIApp = Any

# Paths with their own metrics label; anything else counts as "other" (bounded cardinality).
KNOWN_PATHS = frozenset({"/health", "/metrics", "/v1/models", "/v1/completions",
                         "/v1/chat/completions", "/tokenize", "/detokenize"})


async def _answer(send: Any, status: int, message: str, code: str | None = None,
                  headers: dict[str, str] | None = None) -> None:
    status, raw_headers, body = raw_error(status, message, code, headers)
    await send({"type": "http.response.start", "status": status, "headers": raw_headers})
    await send({"type": "http.response.body", "body": body})


class RequestMetrics:
    """Counts HTTP requests by endpoint and status code."""

    def __init__(self, app: ASGIApp, metrics: Metrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope["path"]
        endpoint = path if path in KNOWN_PATHS else "other"
        # 499 (nginx's "client closed request"): the app ended without answering, because
        # the client went away; an exception escaping the app becomes uvicorn's 500.
        status = {"code": 499}

        async def counting_send(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, counting_send)
        except BaseException:
            if status["code"] == 499:
                status["code"] = 500
            raise
        finally:
            self.metrics.requests.labels(endpoint, str(status["code"])).inc()


class BodyLimit:
    """Refuses bodies over max_bytes with 413, before anything parses them.

    A declared Content-Length is checked up front; a chunked body is buffered up to the limit
    and replayed to the app. Later `receive` calls (the disconnect) pass straight through.
    """

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Any, send: Any) -> None:
        if scope["type"] != "http" or scope["method"] in ("GET", "HEAD", "OPTIONS"):
            return await self.app(scope, receive, send)
        too_big = f"the request body is larger than this server's limit of {self.max_bytes} bytes"
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None:
            try:
                declared = int(length)
            except ValueError:
                return await _answer(send, 400, "invalid Content-Length header")
            if declared > self.max_bytes:
                return await _answer(send, 413, too_big, "request_too_large")
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] != "http.request":
                return                                   # the client left mid-body
            size += len(message.get("body", b""))
            if size > self.max_bytes:
                return await _answer(send, 413, too_big, "request_too_large")
            chunks.append(message.get("body", b""))
            if not message.get("more_body", False):
                break
        replayed = False

        async def replay() -> dict[str, Any]:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": b"".join(chunks), "more_body": False}
            return await receive()

        await self.app(scope, replay, send)


class APIKey:
    """`Authorization: Bearer <key>` on every path but the open ones (and CORS preflights);
    `is_open` opens more paths by rule (the chat page and its static files)."""

    def __init__(self, app: ASGIApp, api_key: str, open_paths: frozenset[str],
                 is_open: Callable[[str], bool] = lambda path: False) -> None:
        self.app = app
        self.key = api_key.encode()
        self.open_paths = open_paths
        self.is_open = is_open

    async def __call__(self, scope: Scope, receive: Any, send: Any) -> None:
        if (scope["type"] != "http" or scope["path"] in self.open_paths
                or self.is_open(scope["path"]) or scope["method"] == "OPTIONS"):
            return await self.app(scope, receive, send)
        auth = dict(scope["headers"]).get(b"authorization", b"")
        scheme, _, token = auth.partition(b" ")
        if scheme.lower() != b"bearer" or not hmac.compare_digest(token.strip(), self.key):
            return await _answer(send, 401, "Incorrect API key provided: pass it as "
                                 "'Authorization: Bearer <key>'", "invalid_api_key",
                                 {"WWW-Authenticate": "Bearer"})
        await self.app(scope, receive, send)
