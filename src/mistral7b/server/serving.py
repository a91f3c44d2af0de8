"""Request -> scheduler -> response: the OpenAI semantics of each endpoint.

A handler validates and encodes the request, turns it into one `GenerationRequest` per prompt
(`n` choices each), and reads the scheduler's outputs from an asyncio queue (`Job`). The
scheduler thread hands outputs over with `loop.call_soon_threadsafe`, so nothing here
blocks on torch. A non-streaming request watches for the client's disconnect while it waits;
a streaming one is cancelled by Starlette when the client goes away. Either way the
scheduler drops the request within one step.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import time
import uuid
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse

from mistral7b.errors import InputError, TokenizerError
from mistral7b.request import (
    GenerationRequest,
    Output,
    QueueFullError,
    RequestFailed,
    ShuttingDownError,
    choice_params,
)
from mistral7b.sampling import SamplingParams
from mistral7b.scheduler import KVCacheTooSmall, Scheduler
from mistral7b.sequence import TokenLogprob
from mistral7b.server.errors import APIError, bad_request, overloaded
from mistral7b.server.metrics import Metrics
from mistral7b.server.protocol import (
    AssistantMessage,
    ChatChoice,
    ChatChunkChoice,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatLogprobs,
    ChatMessage,
    ChatTokenLogprob,
    CompletionChoice,
    CompletionLogprobs,
    CompletionRequest,
    CompletionResponse,
    DeltaMessage,
    DetokenizeRequest,
    DetokenizeResponse,
    FinishReason,
    ModelCard,
    ModelList,
    PromptTokensDetails,
    SamplingFields,
    TokenizeRequest,
    TokenizeResponse,
    TopLogprob,
    Usage,
)
from mistral7b.server.settings import ServerSettings

if TYPE_CHECKING:
    from mistral7b.api import LLM

COMPLETIONS_DEFAULT_TEMPERATURE = 1.0   # OpenAI's default for both endpoints
_FAILURE_STATUS = {"timeout": 504, "shutdown": 503, "model": 500, "internal": 500}


class ClientGone(Exception):
    """The client disconnected before its answer was ready."""


@dataclasses.dataclass
class Choice:
    """What one choice accumulated (non-streaming) or is accumulating (streaming)."""

    text: list[str] = dataclasses.field(default_factory=list)
    logprobs: list[TokenLogprob] = dataclasses.field(default_factory=list)
    finish_reason: FinishReason | None = None
    completion_tokens: int = 0
    cached_tokens: int = 0


class Job:
    """The asyncio side of one API request: its scheduler requests and their outputs.

    outputs() yields (prompt index, Output) until every choice of every prompt has finished,
    and raises APIError when the scheduler fails the request.
    """

    def __init__(self, scheduler: Scheduler, settings: ServerSettings) -> None:
        self.scheduler = scheduler
        self.settings = settings
        self.loop = asyncio.get_running_loop()
        self.queue: asyncio.Queue[tuple[int, Output]] = asyncio.Queue()
        self.requests: list[GenerationRequest] = []
        self.arrival = time.monotonic()
        self.first_token_at: float | None = None

    def add(self, prompt: list[int], params: list[SamplingParams], max_tokens: int,
            prompt_logprobs: int | None = None) -> None:
        k = len(self.requests)

        def emit(out: Output) -> None:       # runs on the scheduler thread
            try:
                self.loop.call_soon_threadsafe(self.queue.put_nowait, (k, out))
            except RuntimeError:             # the event loop is closed: nobody is listening
                pass

        self.requests.append(GenerationRequest(prompt, params, emit, max_tokens,
                                               prompt_logprobs, self.settings.timeout,
                                               arrival=self.arrival))

    def submit(self) -> None:
        try:
            for req in self.requests:
                self.scheduler.submit(req)
        except (QueueFullError, ShuttingDownError) as exc:
            self.cancel()
            raise overloaded(str(exc), self.settings.retry_after) from None
        except KVCacheTooSmall as exc:
            self.cancel()
            raise bad_request(str(exc), param="max_tokens") from None

    def cancel(self) -> None:
        for req in self.requests:
            self.scheduler.cancel(req)

    async def outputs(self) -> AsyncIterator[tuple[int, Output]]:
        open_choices = sum(r.n for r in self.requests)
        while open_choices:
            k, out = await self.queue.get()
            if out.error is not None:
                self.cancel()
                raise _failed(out.error)
            if out.token_id is not None and self.first_token_at is None:
                self.first_token_at = time.monotonic()
            if out.finish_reason:
                open_choices -= 1
            yield k, out


def _failed(error: RequestFailed) -> APIError:
    status = _FAILURE_STATUS.get(error.kind, 500)
    return APIError(status, str(error), code=error.kind)


async def wait_for_disconnect(request: Request) -> None:
    """Returns when the client closes the connection (the body was already read)."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


class Serving:
    def __init__(self, llm: LLM, scheduler: Scheduler, settings: ServerSettings,
                 metrics: Metrics, max_model_len: int) -> None:
        self.llm = llm
        self.tok = llm.require_tokenizer()
        self.scheduler = scheduler
        self.settings = settings
        self.metrics = metrics
        self.max_model_len = max_model_len
        self.created = int(time.time())
        self._token_text: dict[int, str] = {}

    # ------------------------------------------------------------ endpoints

    def models(self) -> ModelList:
        return ModelList(data=[self.model_card()])

    def model_card(self) -> ModelCard:
        return ModelCard(id=self.settings.model_name, created=self.created,
                         max_model_len=self.max_model_len)

    def check_model(self, name: str | None) -> None:
        if name is not None and name != self.settings.model_name:
            raise APIError(404, f"The model `{name}` does not exist; this server serves "
                                f"`{self.settings.model_name}`",
                           param="model", code="model_not_found")

    async def completions(self, body: CompletionRequest, request: Request) -> Response:
        self.check_model(body.model)
        _refuse_unsupported(body)
        if body.suffix:
            raise bad_request("suffix is not supported", "suffix")
        if body.best_of is not None and body.best_of != body.n:
            raise bad_request("best_of must equal n (or be left out)", "best_of")
        if body.max_tokens == 0 and not body.echo:
            raise bad_request("max_tokens must be >= 1 (0 only with echo, to score a prompt)",
                              "max_tokens")
        self._check_n(body.n)
        prompts = self._completion_prompts(body.prompt)
        if len(prompts) * body.n > self.settings.max_queue + self.settings.max_concurrency:
            raise bad_request(f"{len(prompts)} prompts x n={body.n} is more than this server "
                              "can queue; send fewer prompts per request", "prompt")
        want_prompt_lps = body.echo and body.logprobs is not None
        job = Job(self.scheduler, self.settings)
        skipped: set[int] = set()
        for k, (ids, _) in enumerate(prompts):
            max_tokens = self._budget(len(ids), body.max_tokens, "prompt")
            if max_tokens == 0 and not want_prompt_lps:
                skipped.add(k)          # echo without logprobs or tokens: nothing to compute
                continue
            params = self._params(body, max_tokens, logprobs=body.logprobs is not None,
                                  top_logprobs=body.logprobs or 0)
            job.add(ids, choice_params(params, body.n), max_tokens,
                    body.logprobs if want_prompt_lps else None)
        request_ids = [k for k in range(len(prompts)) if k not in skipped]
        job.submit()
        rid, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())
        if body.stream:
            return self._sse(self._completion_stream(job, body, prompts, request_ids, rid,
                                                     created), job)
        choices = {(k, j): Choice() for k in range(len(prompts)) for j in range(body.n)}
        prompt_lps: dict[int, list[TokenLogprob | None]] = {}
        async for k, out in self._collect(job, request):
            k = request_ids[k]
            if out.prompt_logprobs is not None:
                prompt_lps[k] = out.prompt_logprobs
            else:
                _accumulate(choices[k, out.choice], out)
        result = []
        for (k, j), c in choices.items():
            ids, text = prompts[k]
            if k in skipped:
                c.finish_reason = "length"
            lps = None
            out_text = "".join(c.text)
            if body.logprobs is not None:
                entries = (prompt_lps.get(k, []) if body.echo else []) + c.logprobs
                lps = self._completion_logprobs(ids if body.echo else [], entries)
            if body.echo:
                out_text = text + out_text
            result.append(CompletionChoice(index=k * body.n + j, text=out_text, logprobs=lps,
                                           finish_reason=c.finish_reason))
        usage = _usage(sum(len(ids) for ids, _ in prompts),
                       sum(c.completion_tokens for c in choices.values()), _cached(choices))
        self._record(job, choices.values())
        return _json(CompletionResponse(id=rid, created=created, model=self.settings.model_name,
                                        choices=result, usage=usage))

    async def chat(self, body: ChatCompletionRequest, request: Request) -> Response:
        self.check_model(body.model)
        _refuse_unsupported(body)
        if body.tools:
            raise bad_request("tools are not supported by this server", "tools")
        if body.response_format is not None and body.response_format.type != "text":
            raise bad_request(f"response_format {body.response_format.type!r} is not "
                              "supported; only 'text'", "response_format")
        self._check_n(body.n)
        ids = self._chat_ids(body.messages)
        requested = body.max_completion_tokens or body.max_tokens
        max_tokens = self._budget(len(ids), requested, "messages")
        params = self._params(body, max_tokens, logprobs=body.logprobs,
                              top_logprobs=body.top_logprobs or 0)
        job = Job(self.scheduler, self.settings)
        job.add(ids, choice_params(params, body.n), max_tokens)
        job.submit()
        rid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        if body.stream:
            return self._sse(self._chat_stream(job, body, len(ids), rid, created), job)
        choices = [Choice() for _ in range(body.n)]
        async for _, out in self._collect(job, request):
            _accumulate(choices[out.choice], out)
        result = [
            ChatChoice(index=j, message=AssistantMessage(content="".join(c.text)),
                       logprobs=self._chat_logprobs(c.logprobs) if body.logprobs else None,
                       finish_reason=c.finish_reason)
            for j, c in enumerate(choices)]
        usage = _usage(len(ids), sum(c.completion_tokens for c in choices),
                       max(c.cached_tokens for c in choices))
        self._record(job, choices)
        return _json(ChatCompletionResponse(id=rid, created=created,
                                            model=self.settings.model_name, choices=result,
                                            usage=usage))

    def tokenize(self, body: TokenizeRequest) -> TokenizeResponse:
        self.check_model(body.model)
        if (body.prompt is None) == (body.messages is None):
            raise bad_request("give exactly one of prompt and messages", "prompt")
        if body.messages is not None:
            ids = self._chat_ids(body.messages, body.add_generation_prompt)
        else:
            assert body.prompt is not None  # exactly one of the two, checked above
            ids = self.tok.encode(body.prompt, bos=body.add_special_tokens)
        return TokenizeResponse(tokens=ids, count=len(ids), max_model_len=self.max_model_len)

    def detokenize(self, body: DetokenizeRequest) -> DetokenizeResponse:
        self.check_model(body.model)
        self._check_ids(body.tokens, "tokens")
        return DetokenizeResponse(prompt=self.tok.decode(body.tokens))

    # ------------------------------------------------------------- streaming

    def _sse(self, events: AsyncIterator[str], job: Job) -> StreamingResponse:
        async def guarded() -> AsyncIterator[str]:
            ended = False
            try:
                async for event in events:
                    yield event
                ended = True
            except APIError as exc:
                ended = True
                self.metrics.finished.labels("error").inc()
                yield exc.sse()
                yield "data: [DONE]\n\n"
            finally:     # normal end: nothing left to cancel; disconnect: frees the rows
                job.cancel()
                if not ended:
                    self.metrics.finished.labels("cancelled").inc()

        return StreamingResponse(guarded(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    async def _completion_stream(self, job: Job, body: CompletionRequest,
                                 prompts: list[tuple[list[int], str]], request_ids: list[int],
                                 rid: str, created: int) -> AsyncIterator[str]:
        def chunk(index: int, text: str, lps: CompletionLogprobs | None = None,
                  finish: FinishReason | None = None) -> str:
            choice = CompletionChoice(index=index, text=text, logprobs=lps, finish_reason=finish)
            return _event(CompletionResponse(id=rid, created=created,
                                             model=self.settings.model_name, choices=[choice]))

        n = body.n
        choices = {(k, j): Choice() for k in range(len(prompts)) for j in range(n)}
        offsets = dict.fromkeys(choices, 0)
        started: set[int] = set()
        for k in range(len(prompts)):
            if k not in request_ids:     # echo of a prompt with max_tokens 0: done already
                for j in range(n):
                    yield chunk(k * n + j, prompts[k][1], None, "length")
                started.add(k)
        for k in request_ids:             # echo: the prompt first, once its logprobs are known
            if body.echo and body.logprobs is None:
                for j in range(n):
                    yield chunk(k * n + j, prompts[k][1])
                    offsets[k, j] = len(prompts[k][1])
                started.add(k)
        async for k, out in job.outputs():
            k = request_ids[k]
            if out.prompt_logprobs is not None:
                ids, text = prompts[k]
                prompt_lps = self._completion_logprobs(ids, out.prompt_logprobs)
                for j in range(n):
                    yield chunk(k * n + j, text, prompt_lps)
                    offsets[k, j] = len(text)
                continue
            c = choices[k, out.choice]
            _accumulate(c, out)
            lps: CompletionLogprobs | None = None
            if body.logprobs is not None and out.logprob is not None:
                lps = self._completion_logprobs([], [out.logprob], offsets[k, out.choice])
            offsets[k, out.choice] += len(out.text)
            if out.text or out.finish_reason or lps is not None:
                yield chunk(k * n + out.choice, out.text, lps,
                            _finish_reason(out.finish_reason))
        self._record(job, choices.values())
        if body.stream_options is not None and body.stream_options.include_usage:
            usage = _usage(sum(len(ids) for ids, _ in prompts),
                           sum(c.completion_tokens for c in choices.values()), _cached(choices))
            yield _event(CompletionResponse(id=rid, created=created,
                                            model=self.settings.model_name, choices=[],
                                            usage=usage))
        yield "data: [DONE]\n\n"

    async def _chat_stream(self, job: Job, body: ChatCompletionRequest, n_prompt: int,
                           rid: str, created: int) -> AsyncIterator[str]:
        def chunk(choices: list[ChatChunkChoice], usage: Usage | None = None) -> str:
            return _event(ChatCompletionChunk(id=rid, created=created,
                                              model=self.settings.model_name, choices=choices,
                                              usage=usage))

        choices = [Choice() for _ in range(body.n)]
        for j in range(body.n):
            yield chunk([ChatChunkChoice(index=j, delta=DeltaMessage(role="assistant",
                                                                     content=""))])
        async for _, out in job.outputs():
            _accumulate(choices[out.choice], out)
            lps = None
            if body.logprobs and out.logprob is not None:
                lps = self._chat_logprobs([out.logprob])
            if out.text or out.finish_reason or lps is not None:
                delta = DeltaMessage(content=out.text or None)
                yield chunk([ChatChunkChoice(index=out.choice, delta=delta, logprobs=lps,
                                             finish_reason=_finish_reason(out.finish_reason))])
        self._record(job, choices)
        if body.stream_options is not None and body.stream_options.include_usage:
            usage = _usage(n_prompt, sum(c.completion_tokens for c in choices),
                           max(c.cached_tokens for c in choices))
            yield chunk([], usage)
        yield "data: [DONE]\n\n"

    async def _collect(self, job: Job, request: Request) -> AsyncIterator[tuple[int, Output]]:
        """job.outputs(), abandoned (and the job cancelled) if the client disconnects."""
        gone = asyncio.ensure_future(wait_for_disconnect(request))
        outputs = job.outputs()
        try:
            while True:
                nxt = asyncio.ensure_future(outputs.__anext__())
                done, _ = await asyncio.wait({nxt, gone}, return_when=asyncio.FIRST_COMPLETED)
                if nxt not in done:
                    nxt.cancel()
                    self.metrics.finished.labels("cancelled").inc()
                    raise ClientGone
                try:
                    yield nxt.result()
                except StopAsyncIteration:
                    return
        except APIError:
            self.metrics.finished.labels("error").inc()
            raise
        finally:
            gone.cancel()
            job.cancel()

    # --------------------------------------------------------------- helpers

    def _record(self, job: Job, choices: Any) -> None:
        now = time.monotonic()
        if job.first_token_at is not None:
            self.metrics.time_to_first_token.observe(job.first_token_at - job.arrival)
        self.metrics.request_seconds.observe(now - job.arrival)
        for c in choices:
            self.metrics.finished.labels(c.finish_reason or "length").inc()

    def _check_n(self, n: int) -> None:
        if n > self.settings.max_n:
            raise bad_request(f"n must be <= {self.settings.max_n}, got {n}", "n")

    def _check_ids(self, ids: list[int], param: str) -> None:
        try:
            self.llm.check_ids(ids)  # the rule and message of generate()
        except InputError as exc:
            raise bad_request(str(exc), param, "invalid_token_id") from None

    def _completion_prompts(self, prompt: Any) -> list[tuple[list[int], str]]:
        """[(token ids, text to echo)] of a completions prompt (a batch of one or more)."""
        if isinstance(prompt, str) or isinstance(prompt[0], int):
            prompt = [prompt]
        out = []
        for p in prompt:
            if isinstance(p, str):
                ids = self.tok.encode(p, bos=True)
                text = p
            else:
                self._check_ids(p, "prompt")
                ids, text = list(p), self.tok.decode(p)
            if not ids:
                raise bad_request("the prompt is empty", "prompt")
            out.append((ids, text))
        return out

    def _chat_ids(self, messages: list[ChatMessage], add_generation_prompt: bool = True
                  ) -> list[int]:
        plain = []
        for m in messages:
            content = m.content
            if isinstance(content, list):
                content = "".join(part.text for part in content)
            message = {"role": "system" if m.role == "developer" else m.role,
                       "content": content or ""}
            if m.name is not None:
                message["name"] = m.name
            plain.append(message)
        try:
            ids = self.tok.encode_chat(plain, add_generation_prompt=add_generation_prompt)
        except TokenizerError as exc:
            raise bad_request(str(exc), "messages") from None
        if not ids:
            raise bad_request("the messages encode to no tokens", "messages")
        return ids

    def _budget(self, n_prompt: int, requested: int | None, param: str) -> int:
        """max_tokens clamped to the context left; over-long prompts are refused."""
        limit = self.max_model_len
        if n_prompt > limit or (n_prompt == limit and requested != 0):
            raise bad_request(
                f"This model's maximum context length is {limit} tokens, but the prompt has "
                f"{n_prompt} tokens; shorten the prompt (at least one token must be left for "
                "the completion)", param, "context_length_exceeded")
        left = limit - n_prompt
        return left if requested is None else min(requested, left)

    def _params(self, body: SamplingFields, max_tokens: int, *, logprobs: bool,
                top_logprobs: int) -> SamplingParams:
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
            )
        except InputError as exc:
            message = str(exc)
            # "top_p must be ...", "each stop string must be ...": name the parameter
            words = message.split(" ", 3)[:3]
            fields = {f.name for f in dataclasses.fields(SamplingParams)}
            param = next((w for w in words if w in fields), None)
            raise bad_request(message, param) from None

    def token_text(self, token_id: int) -> str:
        text = self._token_text.get(token_id)
        if text is None:
            text = self._token_text[token_id] = self.tok.decode([token_id])
        return text

    def _completion_logprobs(self, prompt: list[int], entries: list[TokenLogprob | None],
                             offset: int = 0) -> CompletionLogprobs:
        """OpenAI's legacy logprobs: parallel lists over (echoed prompt +) generated tokens.

        With an echoed prompt, `prompt` holds its ids and `entries` starts with their
        prompt logprobs (entry 0 None: the first token has no context).
        """
        tokens: list[str] = []
        token_lps: list[float | None] = []
        tops: list[dict[str, float] | None] = []
        offsets: list[int] = []
        # only the first prompt entry is None: generated tokens always have their logprob
        ids = list(prompt) + [e.token_id for e in entries[len(prompt):] if e is not None]
        for token_id, entry in zip(ids, entries):
            text = self.token_text(token_id)
            tokens.append(text)
            offsets.append(offset)
            offset += len(text)
            if entry is None:
                token_lps.append(None)
                tops.append(None)
                continue
            token_lps.append(entry.logprob)
            top = {self.token_text(i): lp for i, lp in entry.top}
            top.setdefault(text, entry.logprob)
            tops.append(top)
        return CompletionLogprobs(tokens=tokens, token_logprobs=token_lps, top_logprobs=tops,
                                  text_offset=offsets)

    def _chat_logprobs(self, entries: list[TokenLogprob]) -> ChatLogprobs:
        content = []
        for e in entries:
            text = self.token_text(e.token_id)
            top = [TopLogprob(token=self.token_text(i), logprob=lp,
                              bytes=list(self.token_text(i).encode()))
                   for i, lp in e.top]
            content.append(ChatTokenLogprob(token=text, logprob=e.logprob,
                                            bytes=list(text.encode()), top_logprobs=top))
        return ChatLogprobs(content=content)


def _refuse_unsupported(body: SamplingFields) -> None:
    if body.logit_bias:
        raise bad_request("logit_bias is not supported", "logit_bias")


def _accumulate(c: Choice, out: Output) -> None:
    c.text.append(out.text)
    c.cached_tokens = max(c.cached_tokens, out.cached_tokens)
    if out.logprob is not None:
        c.logprobs.append(out.logprob)
    if out.finish_reason:
        c.finish_reason = _finish_reason(out.finish_reason)
        c.completion_tokens = out.completion_tokens


def _finish_reason(reason: str | None) -> FinishReason | None:
    """The scheduler's reason under OpenAI's type (the engine has exactly these two)."""
    if reason is None:
        return None
    if reason == "stop":
        return "stop"
    if reason == "length":
        return "length"
    raise ValueError(f"unknown finish reason {reason!r}")


def _usage(prompt_tokens: int, completion_tokens: int, cached_tokens: int) -> Usage:
    return Usage(prompt_tokens=prompt_tokens, completion_tokens=completion_tokens,
                 total_tokens=prompt_tokens + completion_tokens,
                 prompt_tokens_details=PromptTokensDetails(cached_tokens=cached_tokens))


def _cached(choices: dict[tuple[int, int], Choice]) -> int:
    """Prompt tokens taken from the prefix cache, once per prompt (its n choices share it)."""
    per_prompt: dict[int, int] = {}
    for (k, _), c in choices.items():
        per_prompt[k] = max(per_prompt.get(k, 0), c.cached_tokens)
    return sum(per_prompt.values())


def _json(model: Any) -> JSONResponse:
    return JSONResponse(model.model_dump(mode="json"))


def _event(model: Any) -> str:
    return f"data: {json.dumps(model.model_dump(mode='json'), ensure_ascii=False)}\n\n"
