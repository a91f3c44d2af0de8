"""The thread/asyncio bridge: scheduler outputs into the event loop, and back out as SSE.

A handler turns its request into `GenerationRequest`s and reads their outputs from an
asyncio queue (`Job`). The scheduler thread hands outputs over with
`loop.call_soon_threadsafe`, so nothing on the event loop blocks on torch. A non-streaming
request watches for the client's disconnect while it waits (`collect`); a streaming one is
cancelled by Starlette when the client goes away (`sse`). Either way the scheduler drops the
request within one step.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

from starlette.requests import Request
from starlette.responses import StreamingResponse

from mistral7b.grammar import Grammar
from mistral7b.request import (
    GenerationRequest,
    Output,
    QueueFullError,
    RequestFailed,
    ShuttingDownError,
)
from mistral7b.sampling import SamplingParams
from mistral7b.scheduler import KVCacheTooSmall, Scheduler
from mistral7b.server.errors import APIError, bad_request, overloaded
from mistral7b.server.metrics import Metrics
from mistral7b.server.settings import ServerSettings

_FAILURE_STATUS = {"timeout": 504, "shutdown": 503, "model": 500, "internal": 500}


class ClientGone(Exception):
    """The client disconnected before its answer was ready."""


class Job:
    """The asyncio side of one API request: its scheduler requests and their outputs.

    outputs() yields (prompt index, Output) until every choice of every prompt has finished,
    and raises APIError when the scheduler fails the request.
    """

    def __init__(self, scheduler: Scheduler, settings: ServerSettings,
                 grammar: Grammar | None = None) -> None:
        self.scheduler = scheduler
        self.settings = settings
        self.grammar = grammar
        self.loop = asyncio.get_running_loop()
        self.queue: asyncio.Queue[tuple[int, Output]] = asyncio.Queue()
        self.requests: list[GenerationRequest] = []
        self.arrival = time.monotonic()
        self.first_token_at: float | None = None
        self.finished_at: float | None = None

    def add(self, prompt: list[int], params: list[SamplingParams], max_tokens: int,
            prompt_logprobs: int | None = None, *, adapter: int = 0) -> None:
        k = len(self.requests)

        def emit(out: Output) -> None:       # runs on the scheduler thread
            try:
                self.loop.call_soon_threadsafe(self.queue.put_nowait, (k, out))
            except RuntimeError:             # the event loop is closed: nobody is listening
                pass

        self.requests.append(GenerationRequest(prompt, params, emit, max_tokens,
                                               prompt_logprobs, self.settings.timeout,
                                               arrival=self.arrival, grammar=self.grammar,
                                               adapter=adapter))

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
                if not open_choices:
                    self.finished_at = time.monotonic()
            yield k, out

    def timings(self, prompt_tokens: int, cached_tokens: int, completion_tokens: int
                ) -> dict[str, float]:
        """llama.cpp's `timings` object: pre-fill (arrival to first token, queueing
        included) and decode (first token to the end) times and rates, in ms and tok/s."""
        first = self.first_token_at or self.arrival
        prompt_s = first - self.arrival
        decode_s = (self.finished_at or time.monotonic()) - first
        computed = prompt_tokens - cached_tokens
        return {
            "prompt_n": computed, "cached_n": cached_tokens,
            "prompt_ms": round(prompt_s * 1000, 3),
            "prompt_per_second": round(computed / prompt_s, 2) if prompt_s > 0 else 0.0,
            "predicted_n": completion_tokens, "predicted_ms": round(decode_s * 1000, 3),
            # the first token comes out of the pre-fill; decode steps make the rest
            "predicted_per_second": round((completion_tokens - 1) / decode_s, 2)
            if decode_s > 0 and completion_tokens > 1 else 0.0,
        }


def _failed(error: RequestFailed) -> APIError:
    status = _FAILURE_STATUS.get(error.kind, 500)
    return APIError(status, str(error), code=error.kind)


async def wait_for_disconnect(request: Request) -> None:
    """Returns when the client closes the connection (the body was already read)."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


async def collect(job: Job, request: Request, metrics: Metrics
                  ) -> AsyncIterator[tuple[int, Output]]:
    """job.outputs(), abandoned (and the job cancelled) if the client disconnects."""
    gone = asyncio.ensure_future(wait_for_disconnect(request))
    outputs = job.outputs()
    try:
        while True:
            nxt = asyncio.ensure_future(outputs.__anext__())
            done, _ = await asyncio.wait({nxt, gone}, return_when=asyncio.FIRST_COMPLETED)
            if nxt not in done:
                nxt.cancel()
                metrics.finished.labels("cancelled").inc()
                raise ClientGone
            try:
                yield nxt.result()
            except StopAsyncIteration:
                return
    except APIError:
        metrics.finished.labels("error").inc()
        raise
    finally:
        gone.cancel()
        job.cancel()


def sse(events: AsyncIterator[str], job: Job, metrics: Metrics,
        keepalive: float | None = None) -> StreamingResponse:
    """A server-sent-event response over `events`; a failure mid-stream becomes an error
    event, and the job is cancelled however the stream ends (a disconnect frees its rows).

    With `keepalive` seconds, a comment line (": keep-alive") goes out whenever no event has
    for that long, e.g. during a long pre-fill, so that proxies and clients with read
    timeouts keep the connection; SSE readers (the openai client too) skip comments.
    """

    async def guarded() -> AsyncIterator[str]:
        ended = False
        try:
            async for item in _with_keepalive(events, keepalive):
                yield item
            ended = True
        except APIError as exc:
            ended = True
            metrics.finished.labels("error").inc()
            yield exc.sse()
            yield "data: [DONE]\n\n"
        finally:     # normal end: nothing left to cancel; disconnect: frees the rows
            job.cancel()
            if not ended:
                metrics.finished.labels("cancelled").inc()

    return StreamingResponse(guarded(), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


KEEPALIVE_COMMENT = ": keep-alive\n\n"


async def _with_keepalive(events: AsyncIterator[str], every: float | None
                          ) -> AsyncIterator[str]:
    if not every:
        async for item in events:
            yield item
        return
    it = events.__aiter__()
    nxt: asyncio.Future[str] = asyncio.ensure_future(it.__anext__())
    try:
        while True:
            done, _ = await asyncio.wait({nxt}, timeout=every)
            if not done:
                yield KEEPALIVE_COMMENT
                continue
            try:
                item = nxt.result()
            except StopAsyncIteration:
                return
            yield item
            nxt = asyncio.ensure_future(it.__anext__())
    finally:
        nxt.cancel()
