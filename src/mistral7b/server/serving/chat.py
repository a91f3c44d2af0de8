"""POST /v1/chat/completions: a conversation encoded with the model's chat format, with
tools (calls parsed out of the answer) and structured output (see mistral7b.chat_request).

Streaming follows OpenAI: a first chunk with the role, content deltas as they come, and for
a choice that called tools, one chunk per call with its id, type and name (arguments ""),
then one with its arguments, then a chunk with finish_reason "tool_calls". Calls are held
until the choice ends, so only calls that parse are ever sent.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator

from starlette.requests import Request
from starlette.responses import Response

from mistral7b.chat_request import ChatPlan, plan_chat
from mistral7b.errors import InputError, TokenizerError
from mistral7b.request import Output, choice_params
from mistral7b.server.errors import bad_request
from mistral7b.server.protocol import (
    AssistantMessage,
    ChatChoice,
    ChatChunkChoice,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatLogprobs,
    DeltaMessage,
    FinishReason,
    FunctionCallOut,
    FunctionDelta,
    ToolCallDelta,
    ToolCallOut,
)
from mistral7b.server.serving.base import (
    DONE_EVENT,
    Choice,
    ServingBase,
    accumulate,
    chat_messages,
    event,
    finish_reason,
    json_response,
    response_format,
    usage,
)
from mistral7b.server.serving.bridge import Job, collect, sse
from mistral7b.tools import ToolCall, ToolCallParser


class ServingChat(ServingBase):
    async def create(self, body: ChatCompletionRequest, request: Request) -> Response:
        adapter = self.models.check(body.model)
        self.check_n(body.n)
        plan = self._plan(body)
        await self.moderations.check_input(chat_messages(body.messages), "messages")
        requested = body.max_completion_tokens or body.max_tokens
        max_tokens = self.budget(len(plan.ids), requested, "messages")
        params = self.sampling_params(body, max_tokens, logprobs=body.logprobs,
                                      top_logprobs=body.top_logprobs or 0, bans=plan.logit_bias)
        job = self.new_job(plan.grammar)
        job.add(plan.ids, choice_params(params, body.n), max_tokens, adapter=adapter)
        job.submit()
        rid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        if body.stream:
            return sse(self._stream(job, body, plan, rid, created), job, self.metrics,
                       self.settings.sse_keepalive)
        choices = [_ChatChoice(plan) for _ in range(body.n)]
        async for _, out in self.moderations.screen(collect(job, request, self.metrics)):
            choices[out.choice].add(out)
        result = [
            ChatChoice(index=j, message=AssistantMessage(
                content="".join(c.text) or (None if c.calls else ""),
                tool_calls=_calls_out(c.calls)),
                logprobs=self.logprobs.chat(c.logprobs) if body.logprobs else None,
                finish_reason=c.finish_reason)
            for j, c in enumerate(choices)]
        use = usage(len(plan.ids), sum(c.completion_tokens for c in choices),
                    max(c.cached_tokens for c in choices))
        self.record(job, choices)
        return json_response(ChatCompletionResponse(id=rid, created=created,
                                                    model=self.settings.model_name,
                                                    choices=result, usage=use))

    def _plan(self, body: ChatCompletionRequest) -> ChatPlan:
        tools = [t.model_dump(exclude_none=True) for t in body.tools] if body.tools else None
        choice = body.tool_choice
        try:
            return plan_chat(self.tok, lambda: self.grammars,
                             chat_messages(body.messages), tools=tools,
                             tool_choice=choice if isinstance(choice, str) or choice is None
                             else choice.model_dump(), response_format=response_format(body),
                             safe_prompt=body.safe_prompt,
                             parallel_tool_calls=body.parallel_tool_calls is not False)
        except InputError as exc:
            raise bad_request(str(exc), exc.param) from None
        except TokenizerError as exc:
            raise bad_request(str(exc), "messages") from None

    async def _stream(self, job: Job, body: ChatCompletionRequest, plan: ChatPlan,
                      rid: str, created: int) -> AsyncIterator[str]:
        def chunk(index: int, delta: DeltaMessage, lps: ChatLogprobs | None = None,
                  finish: FinishReason | None = None) -> str:
            return event(ChatCompletionChunk(
                id=rid, created=created, model=self.settings.model_name,
                choices=[ChatChunkChoice(index=index, delta=delta, logprobs=lps,
                                         finish_reason=finish)]))

        choices = [_ChatChoice(plan) for _ in range(body.n)]
        for j in range(body.n):
            yield chunk(j, DeltaMessage(role="assistant", content=""))
        async for _, out in self.moderations.screen(job.outputs()):
            c = choices[out.choice]
            content = c.add(out)
            lps = None
            if body.logprobs and out.logprob is not None:
                lps = self.logprobs.chat([out.logprob])
            if c.parser is None:       # no tools: text and the end share a chunk
                if out.text or out.finish_reason or lps is not None:
                    yield chunk(out.choice, DeltaMessage(content=out.text or None), lps,
                                finish_reason(out.finish_reason))
                continue
            if content or lps is not None:
                yield chunk(out.choice, DeltaMessage(content=content or None), lps)
            if out.finish_reason:
                for k, call in enumerate(c.calls or []):
                    yield chunk(out.choice, DeltaMessage(tool_calls=[ToolCallDelta(
                        index=k, id=call.id, type="function",
                        function=FunctionDelta(name=call.name, arguments=""))]))
                    yield chunk(out.choice, DeltaMessage(tool_calls=[ToolCallDelta(
                        index=k, function=FunctionDelta(arguments=call.arguments))]))
                yield chunk(out.choice, DeltaMessage(), finish=c.finish_reason)
        self.record(job, choices)
        if body.stream_options is not None and body.stream_options.include_usage:
            cached = max(c.cached_tokens for c in choices)
            use = usage(len(plan.ids), sum(c.completion_tokens for c in choices), cached)
            yield event(ChatCompletionChunk(id=rid, created=created,
                                            model=self.settings.model_name, choices=[],
                                            usage=use),
                        job.timings(use.prompt_tokens, cached, use.completion_tokens))
        yield DONE_EVENT


class _ChatChoice(Choice):
    """A choice whose text may hold tool calls (when the request has tools)."""

    def __init__(self, plan: ChatPlan) -> None:
        super().__init__()
        self.parser = ToolCallParser(plan.tool_format) if plan.tool_format else None
        self.calls: list[ToolCall] | None = None

    def add(self, out: Output) -> str:
        """Take one output; return the content it adds (text outside tool calls)."""
        if self.parser is None:
            accumulate(self, out)
            return out.text
        content = self.parser.push(out.token_id, out.text)
        if out.finish_reason:
            calls, rest = self.parser.finish()
            content += rest
            if calls and out.finish_reason == "stop":
                self.calls = calls
                out = Output(out.choice, out.text, out.token_id, out.logprob, "tool_calls",
                             out.completion_tokens, cached_tokens=out.cached_tokens)
        accumulate(self, Output(out.choice, content, out.token_id, out.logprob,
                                out.finish_reason, out.completion_tokens,
                                cached_tokens=out.cached_tokens))
        return content


def _calls_out(calls: list[ToolCall] | None) -> list[ToolCallOut] | None:
    if not calls:
        return None
    return [ToolCallOut(id=c.id, function=FunctionCallOut(name=c.name, arguments=c.arguments))
            for c in calls]
