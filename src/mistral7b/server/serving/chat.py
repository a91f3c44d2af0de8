"""POST /v1/chat/completions: a conversation encoded with the model's chat format."""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator

from starlette.requests import Request
from starlette.responses import Response

from mistral7b.request import choice_params
from mistral7b.server.errors import bad_request
from mistral7b.server.protocol import (
    AssistantMessage,
    ChatChoice,
    ChatChunkChoice,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    DeltaMessage,
    Usage,
)
from mistral7b.server.serving.base import (
    DONE_EVENT,
    Choice,
    ServingBase,
    accumulate,
    event,
    finish_reason,
    json_response,
    refuse_unsupported,
    usage,
)
from mistral7b.server.serving.bridge import Job, collect, sse


class ServingChat(ServingBase):
    async def create(self, body: ChatCompletionRequest, request: Request) -> Response:
        adapter = self.models.check(body.model)
        refuse_unsupported(body)
        if body.tools:
            raise bad_request("tools are not supported by this server", "tools")
        if body.response_format is not None and body.response_format.type != "text":
            raise bad_request(f"response_format {body.response_format.type!r} is not "
                              "supported; only 'text'", "response_format")
        self.check_n(body.n)
        ids = self.chat_ids(body.messages, safe_prompt=body.safe_prompt)
        await self.moderations.check_input(self.plain_messages(body.messages), "messages")
        requested = body.max_completion_tokens or body.max_tokens
        max_tokens = self.budget(len(ids), requested, "messages")
        params = self.sampling_params(body, max_tokens, logprobs=body.logprobs,
                                      top_logprobs=body.top_logprobs or 0)
        job = self.new_job()
        job.add(ids, choice_params(params, body.n), max_tokens, adapter=adapter)
        job.submit()
        rid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        if body.stream:
            return sse(self._stream(job, body, len(ids), rid, created), job, self.metrics)
        choices = [Choice() for _ in range(body.n)]
        async for _, out in self.moderations.screen(collect(job, request, self.metrics)):
            accumulate(choices[out.choice], out)
        result = [
            ChatChoice(index=j, message=AssistantMessage(content="".join(c.text)),
                       logprobs=self.logprobs.chat(c.logprobs) if body.logprobs else None,
                       finish_reason=c.finish_reason)
            for j, c in enumerate(choices)]
        use = usage(len(ids), sum(c.completion_tokens for c in choices),
                    max(c.cached_tokens for c in choices))
        self.record(job, choices)
        return json_response(ChatCompletionResponse(id=rid, created=created,
                                                    model=self.settings.model_name,
                                                    choices=result, usage=use))

    async def _stream(self, job: Job, body: ChatCompletionRequest, n_prompt: int,
                      rid: str, created: int) -> AsyncIterator[str]:
        def chunk(choices: list[ChatChunkChoice], use: Usage | None = None) -> str:
            return event(ChatCompletionChunk(id=rid, created=created,
                                             model=self.settings.model_name, choices=choices,
                                             usage=use))

        choices = [Choice() for _ in range(body.n)]
        for j in range(body.n):
            yield chunk([ChatChunkChoice(index=j, delta=DeltaMessage(role="assistant",
                                                                     content=""))])
        async for _, out in self.moderations.screen(job.outputs()):
            accumulate(choices[out.choice], out)
            lps = None
            if body.logprobs and out.logprob is not None:
                lps = self.logprobs.chat([out.logprob])
            if out.text or out.finish_reason or lps is not None:
                delta = DeltaMessage(content=out.text or None)
                yield chunk([ChatChunkChoice(index=out.choice, delta=delta, logprobs=lps,
                                             finish_reason=finish_reason(out.finish_reason))])
        self.record(job, choices)
        if body.stream_options is not None and body.stream_options.include_usage:
            use = usage(n_prompt, sum(c.completion_tokens for c in choices),
                        max(c.cached_tokens for c in choices))
            yield chunk([], use)
        yield DONE_EVENT
