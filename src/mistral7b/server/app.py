"""The app factory: routes, OpenAI-shaped errors, middlewares, and the model's life cycle.

    app = create_app(llm, ServerSettings(max_concurrency=8))          # a loaded model
    app = create_app(lambda: mistral7b.load(path), settings)          # load after start-up

With a loader, the model loads in a background thread once the app starts (the socket is
already bound), and `/health` answers 503 until it is ready.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException
from starlette.middleware.cors import CORSMiddleware
from starlette.responses import JSONResponse, Response

from mistral7b.api import LLM
from mistral7b.server.errors import APIError
from mistral7b.server.middleware import APIKey, BodyLimit, RequestMetrics
from mistral7b.server.page import add_page, is_page_path
from mistral7b.server.routes import router
from mistral7b.server.serving import ClientGone
from mistral7b.server.settings import ServerSettings
from mistral7b.server.state import ServerState

log = logging.getLogger("mistral7b.server")

OPEN_PATHS = frozenset({"/health", "/version"})


def create_app(llm_or_loader: LLM | Callable[[], LLM],
               settings: ServerSettings | None = None, *,
               on_load_error: Callable[[BaseException], None] | None = None,
               on_ready: Callable[[LLM], None] | None = None) -> FastAPI:
    """An OpenAI-compatible app around a loaded LLM, or a zero-argument loader of one.
    `on_ready(llm)` runs once requests are served (`mistral7b serve` registers itself then)."""
    settings = settings or ServerSettings()
    state = ServerState(settings)

    def load(loader: Callable[[], LLM]) -> None:
        try:
            llm = loader()
            state.install(llm)
            if on_ready is not None:
                on_ready(llm)
        except BaseException as exc:  # noqa: BLE001 - reported to the operator, not raised
            state.load_error = str(exc) or type(exc).__name__
            log.error("the model failed to load: %s", state.load_error)
            if on_load_error is not None:
                on_load_error(exc)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        if isinstance(llm_or_loader, LLM):
            state.install(llm_or_loader)
            if on_ready is not None:
                on_ready(llm_or_loader)
        else:
            threading.Thread(target=load, args=(llm_or_loader,), name="mistral7b-load",
                             daemon=True).start()
        yield
        state.close()

    app = FastAPI(title="mistral7b", summary="OpenAI-compatible API for mistral7b models",
                  lifespan=lifespan)
    app.state.server = state
    app.include_router(router)
    add_page(app)
    _add_error_handlers(app)
    # add_middleware puts each one outside the previous: the last added runs first.
    if settings.api_key:
        app.add_middleware(APIKey, api_key=settings.api_key, open_paths=OPEN_PATHS,
                           is_open=is_page_path)
    app.add_middleware(BodyLimit, max_bytes=settings.max_body_bytes)
    if settings.cors_origins:
        app.add_middleware(CORSMiddleware, allow_origins=list(settings.cors_origins),
                           allow_methods=["GET", "POST", "OPTIONS"],
                           allow_headers=["Authorization", "Content-Type"])
    app.add_middleware(RequestMetrics, metrics=state.metrics)
    return app


def _add_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def api_error(request: Request, exc: APIError) -> JSONResponse:
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        message, param = validation_message(exc.errors())
        return APIError(400, message, param=param).response()

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException) -> JSONResponse:
        message = exc.detail if isinstance(exc.detail, str) else str(exc.detail)
        if exc.status_code == 404:
            message = f"no route {request.method} {request.url.path}"
        return APIError(exc.status_code, message, headers=dict(exc.headers or {})).response()

    @app.exception_handler(ClientGone)
    async def gone(request: Request, exc: ClientGone) -> Response:
        return Response(status_code=499)        # nobody reads it: the client left

    @app.exception_handler(Exception)
    async def internal(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error on %s %s", request.method, request.url.path)
        return APIError(500, "internal server error; see the server log").response()


def validation_message(errors: Any) -> tuple[str, str | None]:
    """One readable line for the first validation error, and the parameter it is about."""
    if not errors:
        return "invalid request", None
    # A union reports one error per member; a validator's own message (e.g. a lone
    # surrogate in a content part) says more than "Input should be a valid string".
    err = next((e for e in errors if e.get("type") == "value_error"), errors[0])
    if err.get("type") == "json_invalid":
        ctx = err.get("ctx") or {}
        return f"the body is not valid JSON: {ctx.get('error', err.get('msg'))}", None
    loc = [str(part) for part in err.get("loc", ()) if part != "body"]
    # unions add the member type to the location ("stop.str"); keep the field path
    loc = [p for p in loc if not _is_type_tag(p)]
    param = ".".join(loc) or None
    msg = err.get("msg", "invalid value")
    if err.get("type") == "missing":
        return f"missing required parameter: {param}", param
    if not loc:
        return f"the body must be a JSON object: {msg}", None
    return f"{param}: {msg}", param


def _is_type_tag(part: str) -> bool:
    return part in ("str", "int", "float", "bool") or part.startswith(("list[", "function-", "constrained-"))
