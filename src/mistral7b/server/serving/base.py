"""What every generating endpoint shares: checks, budgets, sampling parameters, metrics,
and the small helpers that accumulate outputs into OpenAI's choices and usage."""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

from starlette.responses import JSONResponse

from mistral7b.errors import InputError, TokenizerError
from mistral7b.grammar import Grammar, GrammarCompiler
from mistral7b.request import Output
from mistral7b.sampling import SamplingParams
from mistral7b.scheduler import Scheduler
from mistral7b.sequence import TokenLogprob
from mistral7b.server.errors import bad_request
from mistral7b.server.metrics import Metrics
from mistral7b.server.protocol import (
    ChatMessage,
    FinishReason,
    PromptTokensDetails,
    SamplingFields,
    ToolDef,
    Usage,
)
from mistral7b.server.serving.bridge import Job
from mistral7b.server.serving.logprobs import LogprobFormatter
from mistral7b.server.serving.models import ServingModels
from mistral7b.server.serving.moderations import ServingModerations
from mistral7b.server.settings import ServerSettings
from mistral7b.tools import check_tools

if TYPE_CHECKING:
    from mistral7b.api import LLM

COMPLETIONS_DEFAULT_TEMPERATURE = 1.0   # OpenAI's default for both endpoints


@dataclasses.dataclass(frozen=True)
class ServingContext:
    """The objects one server's endpoints share."""

    llm: LLM
    scheduler: Scheduler
    settings: ServerSettings
    metrics: Metrics
    max_model_len: int
    models: ServingModels
    logprobs: LogprobFormatter
    grammars: GrammarCompiler
    moderations: ServingModerations    # /v1/moderations, and serve --moderate screening


@dataclasses.dataclass
class Choice:
    """What one choice accumulated (non-streaming) or is accumulating (streaming)."""

    text: list[str] = dataclasses.field(default_factory=list)
    logprobs: list[TokenLogprob] = dataclasses.field(default_factory=list)
    finish_reason: FinishReason | None = None
    completion_tokens: int = 0
    cached_tokens: int = 0


class ServingBase:
    def __init__(self, ctx: ServingContext) -> None:
        self.ctx = ctx
        self.llm = ctx.llm
        self.tok = ctx.llm.require_tokenizer()
        self.scheduler = ctx.scheduler
        self.settings = ctx.settings
        self.metrics = ctx.metrics
        self.max_model_len = ctx.max_model_len
        self.models = ctx.models
        self.logprobs = ctx.logprobs
        self.grammars = ctx.grammars
        self.moderations = ctx.moderations

    def new_job(self, grammar: Grammar | None = None) -> Job:
        return Job(self.scheduler, self.settings, grammar)

    def record(self, job: Job, choices: Iterable[Choice]) -> None:
        now = time.monotonic()
        if job.first_token_at is not None:
            self.metrics.time_to_first_token.observe(job.first_token_at - job.arrival)
        self.metrics.request_seconds.observe(now - job.arrival)
        for c in choices:
            self.metrics.finished.labels(c.finish_reason or "length").inc()

    def check_n(self, n: int) -> None:
        if n > self.settings.max_n:
            raise bad_request(f"n must be <= {self.settings.max_n}, got {n}", "n")

    def check_ids(self, ids: list[int], param: str) -> None:
        try:
            self.llm.check_ids(ids)  # the rule and message of generate()
        except InputError as exc:
            raise bad_request(str(exc), param, "invalid_token_id") from None

    def chat_ids(self, messages: list[ChatMessage], add_generation_prompt: bool = True,
                 tools: list[ToolDef] | None = None, safe_prompt: bool = False) -> list[int]:
        try:
            checked = check_tools([t.model_dump(exclude_none=True) for t in tools]) \
                if tools else None
            if checked and not self.tok.supports_tools:
                raise InputError("this model's chat format has no tool calling", param="tools")
            ids = self.tok.encode_chat(chat_messages(messages),
                                       add_generation_prompt=add_generation_prompt,
                                       tools=checked, safe_prompt=safe_prompt)
        except InputError as exc:
            raise bad_request(str(exc), exc.param) from None
        except TokenizerError as exc:
            raise bad_request(str(exc), "messages") from None
        if not ids:
            raise bad_request("the messages encode to no tokens", "messages")
        return ids

    def grammar(self, body: SamplingFields) -> Grammar | None:
        """The compiled response_format (or vLLM's guided_* field) of a request, or None."""
        fmt = response_format(body)
        if fmt is None:
            return None
        try:
            return self.grammars.response_format(fmt)
        except InputError as exc:
            raise bad_request(str(exc), exc.param) from None

    def budget(self, n_prompt: int, requested: int | None, param: str) -> int:
        """max_tokens clamped to the context left; over-long prompts are refused."""
        limit = self.max_model_len
        if n_prompt > limit or (n_prompt == limit and requested != 0):
            raise bad_request(
                f"This model's maximum context length is {limit} tokens, but the prompt has "
                f"{n_prompt} tokens; shorten the prompt (at least one token must be left for "
                "the completion)", param, "context_length_exceeded")
        left = limit - n_prompt
        return left if requested is None else min(requested, left)

    def sampling_params(self, body: SamplingFields, max_tokens: int, *, logprobs: bool,
                        top_logprobs: int, bans: tuple[tuple[int, float], ...] = ()
                        ) -> SamplingParams:
        """The request's sampling fields; `bans` (id, bias) pairs go on top of its
        logit_bias (tool_choice "none" bans Mistral's [TOOL_CALLS])."""
        def pick(value: Any, default: Any) -> Any:
            return default if value is None else value

        try:
            return SamplingParams(
                max_tokens=max(max_tokens, 1),
                temperature=pick(body.temperature, COMPLETIONS_DEFAULT_TEMPERATURE),
                top_p=pick(body.top_p, 1.0),
                top_k=max(pick(body.top_k, 0), 0),
                min_p=pick(body.min_p, 0.0),
                repetition_penalty=pick(body.repetition_penalty, 1.0),
                frequency_penalty=pick(body.frequency_penalty, 0.0),
                presence_penalty=pick(body.presence_penalty, 0.0),
                seed=body.seed,
                stop=(body.stop,) if isinstance(body.stop, str) else tuple(body.stop or ()),
                logprobs=logprobs,
                top_logprobs=top_logprobs,
                ignore_eos=body.ignore_eos,
                logit_bias=tuple({**self._logit_bias(body.logit_bias), **dict(bans)}.items()),
            )
        except InputError as exc:
            raise bad_request(str(exc), exc.param) from None

    def _logit_bias(self, bias: dict[str, float] | None) -> dict[int, float]:
        """OpenAI's {"token id": bias} with every id checked against the vocabulary."""
        if not bias:
            return {}
        ids = {}
        for key, value in bias.items():
            if not key.strip().isdigit():
                raise bad_request(f"logit_bias keys are token ids, got {key!r}", "logit_bias")
            ids[int(key)] = value
        self.check_ids(list(ids), "logit_bias")
        return ids


def chat_messages(messages: list[ChatMessage]) -> list[dict[str, Any]]:
    """OpenAI messages as the tokenizers take them: "developer" is the system role (OpenAI's
    newer name for it), text content parts are joined, tool calls and ids kept."""
    plain = []
    for i, m in enumerate(messages):
        content = m.content
        if isinstance(content, list):
            texts = []
            for j, part in enumerate(content):
                if part.type != "text" or part.text is None:
                    raise bad_request(
                        f"messages[{i}].content[{j}] is a {part.type!r} part; this model reads "
                        "text only (content parts of type 'text')", f"messages.{i}.content")
                texts.append(part.text)
            content = "".join(texts)
        message: dict[str, Any] = {"role": "system" if m.role == "developer" else m.role,
                                   "content": content or ""}
        if m.name is not None:
            message["name"] = m.name
        if m.tool_calls:
            message["tool_calls"] = [
                {"id": c.id, "type": "function",
                 "function": {"name": c.function.name, "arguments": c.function.arguments
                              if isinstance(c.function.arguments, str)
                              else json.dumps(c.function.arguments)}}
                for c in m.tool_calls]
        if m.tool_call_id is not None:
            message["tool_call_id"] = m.tool_call_id
        plain.append(message)
    return plain


def response_format(body: SamplingFields) -> dict[str, Any] | None:
    """The request's structured-output format in the core's shape (mistral7b.grammar), from
    `response_format` or one of vLLM's guided_json / guided_regex / guided_grammar."""
    given = [name for name in ("response_format", "guided_json", "guided_regex",
                               "guided_grammar") if getattr(body, name) is not None]
    if len(given) > 1:
        raise bad_request(f"give one of {' and '.join(given)}, not several", given[1])
    if body.guided_json is not None:
        schema = body.guided_json
        if isinstance(schema, str):
            try:
                schema = json.loads(schema)
            except json.JSONDecodeError as exc:
                raise bad_request(f"guided_json is not valid JSON: {exc}", "guided_json") \
                    from None
        return {"type": "json_schema", "json_schema": {"schema": schema}}
    if body.guided_regex is not None:
        return {"type": "regex", "regex": body.guided_regex}
    if body.guided_grammar is not None:
        return {"type": "grammar", "grammar": body.guided_grammar}
    fmt = body.response_format
    if fmt is None or fmt.type == "text":
        return None
    out: dict[str, Any] = {"type": fmt.type}
    if fmt.type == "json_schema":
        if fmt.json_schema is None:
            raise bad_request("response_format json_schema needs a json_schema object with "
                              "its schema", "response_format")
        out["json_schema"] = {"name": fmt.json_schema.name, "schema": fmt.json_schema.schema_}
    elif fmt.type in ("regex", "grammar"):
        out[fmt.type] = getattr(fmt, fmt.type)
    return out


def accumulate(c: Choice, out: Output) -> None:
    c.text.append(out.text)
    c.cached_tokens = max(c.cached_tokens, out.cached_tokens)
    if out.logprob is not None:
        c.logprobs.append(out.logprob)
    if out.finish_reason:
        c.finish_reason = finish_reason(out.finish_reason)
        c.completion_tokens = out.completion_tokens


def finish_reason(reason: str | None) -> FinishReason | None:
    """The scheduler's reason under OpenAI's type ("tool_calls" is set by the chat endpoint)."""
    if reason is None:
        return None
    if reason == "stop":
        return "stop"
    if reason == "length":
        return "length"
    if reason == "tool_calls":
        return "tool_calls"
    raise ValueError(f"unknown finish reason {reason!r}")


def usage(prompt_tokens: int, completion_tokens: int, cached_tokens: int) -> Usage:
    return Usage(prompt_tokens=prompt_tokens, completion_tokens=completion_tokens,
                 total_tokens=prompt_tokens + completion_tokens,
                 prompt_tokens_details=PromptTokensDetails(cached_tokens=cached_tokens))


def json_response(model: Any) -> JSONResponse:
    return JSONResponse(model.model_dump(mode="json"))


def event(model: Any, timings: dict[str, float] | None = None) -> str:
    """One server-sent event carrying `model` as JSON. `timings` (the stream's last event,
    with its usage) goes beside `usage`, as llama.cpp's server sends it."""
    data = model.model_dump(mode="json")
    if timings is not None:
        data["timings"] = timings
    return f"data: {json.dumps(data, ensure_ascii=False)}\n\n"


DONE_EVENT = "data: [DONE]\n\n"
