"""Request -> scheduler -> response: the OpenAI semantics of each endpoint, split as vLLM
splits its entrypoints.

    bridge.py        the thread/asyncio bridge (Job), disconnects, server-sent events
    base.py          what the generating endpoints share (checks, budgets, sampling params)
    logprobs.py      log-probabilities in OpenAI's completions and chat shapes
    models.py        /v1/models and the `model` check
    completions.py   /v1/completions
    chat.py          /v1/chat/completions
    tokenization.py  /tokenize, /detokenize
    moderations.py   /v1/moderations, and the screening of `serve --moderate`

`Serving` is one server's set of endpoint handlers; the routes call into it.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING

from mistral7b.scheduler import Scheduler
from mistral7b.server.metrics import Metrics
from mistral7b.server.serving.base import ServingContext
from mistral7b.server.serving.bridge import ClientGone
from mistral7b.server.serving.chat import ServingChat
from mistral7b.server.serving.completions import ServingCompletions
from mistral7b.server.serving.logprobs import LogprobFormatter
from mistral7b.server.serving.models import ServingModels
from mistral7b.server.serving.moderations import ServingModerations
from mistral7b.server.serving.tokenization import ServingTokenization
from mistral7b.server.settings import ServerSettings

if TYPE_CHECKING:
    from mistral7b.api import LLM

__all__ = ["ClientGone", "Serving"]


@dataclasses.dataclass(frozen=True)
class Serving:
    models: ServingModels
    completions: ServingCompletions
    chat: ServingChat
    tokenization: ServingTokenization
    moderations: ServingModerations

    @classmethod
    def build(cls, llm: LLM, scheduler: Scheduler, settings: ServerSettings,
              metrics: Metrics, max_model_len: int) -> Serving:
        models = ServingModels(settings, max_model_len, llm.adapters)
        moderations = ServingModerations(llm, scheduler, settings, models)
        # the vocabulary is adapted for structured output here, at start-up, not mid-request
        ctx = ServingContext(llm, scheduler, settings, metrics, max_model_len, models,
                             LogprobFormatter(llm.require_tokenizer()), llm.grammar_compiler,
                             moderations)
        return cls(models, ServingCompletions(ctx), ServingChat(ctx), ServingTokenization(ctx),
                   moderations)
