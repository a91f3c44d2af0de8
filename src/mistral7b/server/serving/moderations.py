"""POST /v1/moderations, and `serve --moderate input|output|both`: self-reflection moderation
(mistral7b.moderation) in OpenAI's shapes.

Scoring runs on the scheduler's thread between two steps (`Scheduler.call`), so it shares the
model and its KV pool (the cached ~600-token classifier prompt above all) with generation
without a lock. The categories are Mistral's 13; a text is flagged when its most likely
label is one of them rather than "not moderated".
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Sequence
from typing import TYPE_CHECKING, Any

from mistral7b.errors import InputError, Mistral7BError, TokenizerError
from mistral7b.moderation import CATEGORIES, Moderation, moderate
from mistral7b.request import Output, ShuttingDownError
from mistral7b.scheduler import Scheduler
from mistral7b.server.errors import APIError, bad_request, overloaded
from mistral7b.server.protocol import ModerationRequest, ModerationResponse, ModerationResult
from mistral7b.server.serving.models import ServingModels
from mistral7b.server.settings import ServerSettings

if TYPE_CHECKING:
    from mistral7b.api import LLM

MODERATE_MODES = ("input", "output", "both")
FLAGGED_CODE = "content_policy_violation"

Moderated = str | list[dict[str, Any]]      # a text, or chat messages


class ServingModerations:
    """The endpoint, and the screening the generating endpoints call (`ctx.moderations`)."""

    def __init__(self, llm: LLM, scheduler: Scheduler, settings: ServerSettings,
                 models: ServingModels) -> None:
        self.llm = llm
        self.tok = llm.require_tokenizer()
        self.scheduler = scheduler
        self.settings = settings
        self.models = models

    async def classify(self, items: Sequence[Moderated], param: str) -> list[Moderation]:
        """Moderation of each item, computed on the scheduler's thread."""
        engine, tok = self.llm.engine, self.tok

        def run() -> list[Moderation]:
            return [moderate(engine, tok, item) for item in items]

        try:
            return await asyncio.wrap_future(self.scheduler.call(run))
        except (InputError, TokenizerError) as exc:
            raise bad_request(str(exc), param) from None
        except ShuttingDownError as exc:
            raise overloaded(str(exc), self.settings.retry_after) from None
        except Mistral7BError as exc:       # no KV room now, for one
            raise overloaded(f"moderation could not run now: {exc}",
                             self.settings.retry_after) from None

    async def create(self, body: ModerationRequest) -> ModerationResponse:
        self.models.check(body.model)
        if isinstance(body.input, str):
            items: list[Moderated] = [body.input]
        else:
            items = [x if isinstance(x, str) else x.text for x in body.input]
        results = await self.classify(items, "input")
        return ModerationResponse(
            id=f"modr-{uuid.uuid4().hex}", model=body.model or self.settings.model_name,
            results=[ModerationResult(
                flagged=m.flagged,
                categories={c: m.category == c for c in CATEGORIES},
                category_scores={c: m.scores[c] for c in CATEGORIES}) for m in results])

    # ------------------------------------------------------------ serve --moderate

    async def check_input(self, item: Moderated, param: str) -> None:
        """With --moderate input|both: refuse a request whose prompt is flagged (400)."""
        if self.settings.moderate not in ("input", "both"):
            return
        (m,) = await self.classify([item], param)
        if m.flagged:
            raise APIError(400, f"the request was flagged by moderation as '{m.category}' "
                                f"(probability {m.probability:.2f}) and was not processed",
                           param=param, code=FLAGGED_CODE)

    def screen(self, outputs: AsyncIterator[tuple[int, Output]]
               ) -> AsyncIterator[tuple[int, Output]]:
        """With --moderate output|both: hold the outputs back until every answer is
        complete, moderate each answer, and refuse the request (400) if one is flagged; else
        hand the outputs on unchanged (a stream then starts once the answers are checked).
        Without it, `outputs` itself."""
        if self.settings.moderate not in ("output", "both"):
            return outputs
        return self._screened(outputs)

    async def _screened(self, outputs: AsyncIterator[tuple[int, Output]]
                        ) -> AsyncIterator[tuple[int, Output]]:
        held = [item async for item in outputs]
        texts: dict[tuple[int, int], list[str]] = {}
        for k, out in held:
            texts.setdefault((k, out.choice), []).append(out.text)
        answers: list[Moderated] = [a for a in ("".join(p) for p in texts.values())
                                    if a.strip()]
        for m in await self.classify(answers, "messages") if answers else []:
            if m.flagged:
                raise APIError(400, f"the answer was flagged by moderation as '{m.category}' "
                                    f"(probability {m.probability:.2f}) and was withheld",
                               code=FLAGGED_CODE)
        for item in held:
            yield item
