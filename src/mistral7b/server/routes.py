"""HTTP routes: thin, each one hands its validated body to the serving layer."""

from __future__ import annotations

from fastapi import APIRouter, Request
from starlette.responses import JSONResponse, Response

from mistral7b import __version__
from mistral7b.server.metrics import CONTENT_TYPE
from mistral7b.server.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    DetokenizeRequest,
    DetokenizeResponse,
    ModelCard,
    ModelList,
    ModerationRequest,
    ModerationResponse,
    TokenizeRequest,
    TokenizeResponse,
    VersionResponse,
)
from mistral7b.server.state import ServerState

router = APIRouter()


def _state(request: Request) -> ServerState:
    return request.app.state.server


@router.get("/health")
async def health(request: Request) -> JSONResponse:
    """{"status": "ok"}, and the draft model's name where one drafts (serve --draft-model)."""
    state = _state(request)
    state.require()
    draft = state.llm.draft if state.llm is not None else None
    return JSONResponse({"status": "ok", **({"draft_model": draft.name} if draft else {})})


@router.get("/version")
async def version() -> VersionResponse:
    """The package version (vLLM's and llama.cpp's servers answer this path too)."""
    return VersionResponse(version=__version__)


@router.get("/metrics")
async def metrics(request: Request) -> Response:
    return Response(_state(request).metrics.exposition(), media_type=CONTENT_TYPE)


@router.get("/v1/models")
async def models(request: Request) -> ModelList:
    return _state(request).require().models.list()


@router.get("/v1/models/{model_id:path}")
async def model(model_id: str, request: Request) -> ModelCard:
    return _state(request).require().models.card(model_id)


@router.post("/v1/completions")
async def completions(body: CompletionRequest, request: Request) -> Response:
    return await _state(request).require().completions.create(body, request)


@router.post("/v1/chat/completions")
async def chat_completions(body: ChatCompletionRequest, request: Request) -> Response:
    return await _state(request).require().chat.create(body, request)


@router.post("/v1/moderations")
async def moderations(body: ModerationRequest, request: Request) -> ModerationResponse:
    return await _state(request).require().moderations.create(body)


@router.post("/tokenize")
async def tokenize(body: TokenizeRequest, request: Request) -> TokenizeResponse:
    return _state(request).require().tokenization.tokenize(body)


@router.post("/detokenize")
async def detokenize(body: DetokenizeRequest, request: Request) -> DetokenizeResponse:
    return _state(request).require().tokenization.detokenize(body)
