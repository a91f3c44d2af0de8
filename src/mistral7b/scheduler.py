"""Continuous batching: many requests share one KV cache and one forward per step.

The server submits `GenerationRequest`s; one background thread runs the step loop, so torch
work never blocks the asyncio event loop. The cache has `max_concurrency` rows; every choice
of a request (`n` of them) is one `SequenceState` in one row. At each step boundary the loop:

    1. drops cancelled requests and fails expired ones (their rows are free again);
    2. admits waiting requests into free rows, first come first served (`cache.reset(row)`);
    3. decodes: one forward feeds every decoding row its last token (B_d x 1);
    4. pre-fills: one forward feeds waiting prompts their next chunk (B_p x T), up to
       `prefill_budget` prompt tokens per step, so running streams are never starved;
    5. samples each row with its own parameters and generator, and hands every row's event
       to its request's `emit` callback (the server forwards it to asyncio thread-safely).

Decode rows and pre-fill rows go through separate `Engine.step` calls because a step pads
every row to its longest chunk: 8 decode rows beside one 128-token chunk would compute
9 x 128 tokens instead of 8 + 128. Measured on SmolLM2-135M, one CPU thread: separate calls
0.41 s per step, merged 3.2 s; even 16-token chunks merged cost 2.5x the separate calls.

Prompt chunks start at fixed offsets (multiples of `prefill_chunk`) whatever else is running,
so a prompt is cut the same way alone or under load.

Failures stay with their request: NaN/inf logits fail the rows that produced them
(`NonFiniteLogitsError.rows`), any other exception in a step fails the requests of that step,
and the loop goes on. Every request ends with exactly one of: a final `Output` per choice
(`finish_reason` set), or one `Output` with `error` set. A cancelled request ends silently.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from mistral7b.engine import Engine, SequenceState, TokenLogprob
from mistral7b.errors import Mistral7BError
from mistral7b.sampling import (
    NonFiniteLogitsError,
    SamplingParams,
    TokenHistory,
    make_generator,
    sample_batch,
)

if TYPE_CHECKING:
    from mistral7b.tokenizer.base import IncrementalDecoder

log = logging.getLogger("mistral7b.scheduler")

DEFAULT_PREFILL_CHUNK = 256
THROUGHPUT_WINDOW_S = 10.0
_SEED_SPAN = 2**64


class QueueFullError(Mistral7BError):
    """The waiting queue holds max_queue requests: try again later (HTTP 503)."""


class ShuttingDownError(Mistral7BError):
    """The scheduler no longer admits requests (HTTP 503)."""


class RequestFailed(Mistral7BError):
    """A request that could not finish. kind: "timeout" | "shutdown" | "model" | "internal"."""

    def __init__(self, kind: str, message: str) -> None:
        self.kind = kind
        super().__init__(message)


@dataclass
class Output:
    """What one step did for one choice of a request, as handed to `emit`.

    `logprob` is the generated token's (only when the request asked for logprobs);
    `prompt_logprobs` arrives once, before any token, when the request asked for them:
    entry i is prompt token i's log-probability given tokens 0..i-1 (entry 0 is None).
    """

    choice: int
    text: str = ""
    token_id: int | None = None
    logprob: TokenLogprob | None = None
    finish_reason: str | None = None
    completion_tokens: int = 0
    prompt_logprobs: list[TokenLogprob | None] | None = None
    error: RequestFailed | None = None


@dataclass(eq=False)
class GenerationRequest:
    """One API request: a prompt and one SamplingParams per choice (n = len(params)).

    max_tokens is already clamped to the context left; 0 means "score the prompt only" (with
    prompt_logprobs set). `emit` is called from the scheduler thread and must not block.
    """

    prompt: list[int]
    params: list[SamplingParams]
    emit: Callable[[Output], None]
    max_tokens: int
    prompt_logprobs: int | None = None     # top-n per prompt position, None = not wanted
    timeout: float | None = None           # seconds from submission
    arrival: float = field(default_factory=time.monotonic)
    cancelled: bool = False
    done: bool = False
    _admitted: int = 0                     # choices that got a cache row
    _open: int = 0                         # choices not finished yet

    @property
    def n(self) -> int:
        return len(self.params)

    def expired(self, now: float) -> bool:
        return self.timeout is not None and now - self.arrival > self.timeout


def choice_params(params: SamplingParams, n: int) -> list[SamplingParams]:
    """n copies of params; choice i of a seeded request uses seed + i (wrapped to 64 bits)."""
    if params.seed is None:
        return [params] * n
    out = []
    for i in range(n):
        seed = params.seed + i
        if seed >= _SEED_SPAN:
            seed -= _SEED_SPAN
        out.append(dataclasses.replace(params, seed=seed))
    return out


@dataclass(eq=False)
class _Seq:
    """One choice of a request in one cache row."""

    req: GenerationRequest
    choice: int
    state: SequenceState
    prompt_lps: list[TokenLogprob | None] | None = None   # being filled during pre-fill

    @property
    def row(self) -> int:
        return self.state.index

    @property
    def prefilled(self) -> bool:
        return self.state.fed == len(self.state.prompt)


class Scheduler:
    """Owns a KV cache of max_concurrency rows and the thread that steps it.

    `stop_ids` and `new_decoder` come from the tokenizer (EOS/end-of-turn ids; a fresh
    streaming detokenizer per choice).
    """

    def __init__(self, engine: Engine, *, stop_ids: frozenset[int],
                 new_decoder: Callable[[], IncrementalDecoder], max_concurrency: int = 8,
                 max_queue: int = 64, max_model_len: int,
                 prefill_chunk: int = DEFAULT_PREFILL_CHUNK,
                 prefill_budget: int | None = None) -> None:
        if max_concurrency < 1 or max_queue < 0 or max_model_len < 2 or prefill_chunk < 1:
            raise ValueError("max_concurrency >= 1, max_queue >= 0, max_model_len >= 2 and "
                             "prefill_chunk >= 1 are required")
        self.engine = engine
        self.stop_ids = stop_ids
        self.new_decoder = new_decoder
        self.max_concurrency = max_concurrency
        self.max_queue = max_queue
        self.max_model_len = max_model_len
        self.prefill_chunk = prefill_chunk
        self.prefill_budget = prefill_budget or prefill_chunk
        self.cache = engine.new_cache(max_concurrency, max_model_len)
        self._free = list(range(max_concurrency - 1, -1, -1))    # pop() gives row 0 first
        self._running: list[_Seq] = []
        self._waiting: collections.deque[GenerationRequest] = collections.deque()
        self._cond = threading.Condition()
        self._accepting = True
        self._abort_at: float | None = None     # running requests fail after this time
        self._stop = False
        self._thread: threading.Thread | None = None
        # figures for /metrics, written by the loop thread only
        self.generated_tokens = 0
        self.prompt_tokens = 0
        self.steps = 0
        self.failed = 0
        self._recent: collections.deque[tuple[float, int]] = collections.deque()

    # ------------------------------------------------------------ public API

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="mistral7b-scheduler",
                                        daemon=True)
        self._thread.start()

    def submit(self, req: GenerationRequest) -> None:
        """Queue a request; raises QueueFullError or ShuttingDownError (nothing is queued)."""
        if not req.params or (req.max_tokens < 1 and req.prompt_logprobs is None):
            raise ValueError("a request needs choices and max_tokens >= 1 (or prompt_logprobs)")
        if not req.prompt or len(req.prompt) + max(req.max_tokens, 1) > self.max_model_len + 1:
            raise ValueError("prompt + max_tokens exceed max_model_len")
        with self._cond:
            if not self._accepting:
                raise ShuttingDownError("the server is shutting down")
            # Requests the loop has not admitted yet may still have a free row waiting for
            # them: only those beyond the free rows count against max_queue.
            if len(self._waiting) - len(self._free) >= self.max_queue:
                raise QueueFullError(f"the queue is full ({self.max_queue} requests waiting)")
            req._open = req.n
            self._waiting.append(req)
            self._cond.notify()

    def cancel(self, req: GenerationRequest) -> None:
        """The client went away: stop the request; its rows are free within one step."""
        with self._cond:
            if req.done:
                return
            req.cancelled = True
            if req._admitted == 0 and req in self._waiting:
                self._waiting.remove(req)
                req.done = True
            self._cond.notify()

    def drain(self, grace: float) -> None:
        """Stop admitting: waiting requests fail now, running ones get `grace` seconds."""
        with self._cond:
            self._accepting = False
            deadline = time.monotonic() + grace
            self._abort_at = deadline if self._abort_at is None else min(self._abort_at, deadline)
            self._cond.notify()

    def close(self, timeout: float | None = None) -> None:
        """Abort everything still running and stop the thread."""
        self.drain(0.0)
        with self._cond:
            self._stop = True
            self._cond.notify()
        if self._thread is not None:
            self._thread.join(timeout)

    @property
    def accepting(self) -> bool:
        return self._accepting

    @property
    def queue_depth(self) -> int:
        return len(self._waiting)

    @property
    def running(self) -> int:
        return len(self._running)

    def idle(self) -> bool:
        return not self._waiting and not self._running

    def throughput(self) -> float:
        """Generated tokens per second over the last THROUGHPUT_WINDOW_S seconds."""
        now = time.monotonic()
        recent = list(self._recent)
        return sum(n for t, n in recent if now - t <= THROUGHPUT_WINDOW_S) / THROUGHPUT_WINDOW_S

    # -------------------------------------------------------------- the loop

    def _loop(self) -> None:
        while True:
            with self._cond:
                while not self._waiting and not self._running and not self._stop:
                    self._cond.wait()
                if self._stop and not self._running and not self._waiting:
                    return
            try:
                self._iteration()
            except Exception:  # a bug in the loop itself: fail what runs, keep serving
                log.exception("scheduler iteration failed")
                for s in list(self._running):
                    self._fail(s.req, RequestFailed("internal", "internal error in the "
                                                    "scheduler; see the server log"))

    @torch.inference_mode()
    def _iteration(self) -> None:
        self._reap()
        self._admit()
        decode = [s for s in self._running if s.prefilled]
        if decode:
            logits = self._step(decode, [[s.state.output[-1]] for s in decode])
            if logits is not None:
                self._sample(decode, logits)
        self._reap()            # cancellations that arrived during the decode step
        prefill = self._pick_prefill()
        if prefill:
            self._prefill(prefill)

    def _reap(self) -> None:
        """Drop cancelled requests; fail expired ones and, when draining, everything left."""
        now = time.monotonic()
        abort = self._abort_at is not None and now >= self._abort_at
        with self._cond:
            keep: collections.deque[GenerationRequest] = collections.deque()
            doomed = []
            for req in self._waiting:
                if req.cancelled:       # its running choices, if any, are dropped below
                    req.done = True
                elif not self._accepting or req.expired(now):
                    doomed.append(req)
                else:
                    keep.append(req)
            self._waiting = keep
        for req in doomed:
            kind = "timeout" if req.expired(now) else "shutdown"
            self._fail(req, _failure(kind))
        for s in list(self._running):
            req = s.req
            if s not in self._running:      # dropped with another choice of its request
                continue
            if req.cancelled:
                self._drop(req)
            elif req.expired(now):
                self._fail(req, _failure("timeout"))
            elif abort:
                self._fail(req, _failure("shutdown"))

    def _admit(self) -> None:
        with self._cond:
            while self._free and self._waiting:
                req = self._waiting[0]
                choice = req._admitted
                req._admitted += 1
                if req._admitted == req.n:
                    self._waiting.popleft()
                row = self._free.pop()
                self.cache.reset([row])
                params = req.params[choice]
                state = SequenceState(row, req.prompt, params, self.stop_ids, self.new_decoder(),
                                      max(req.max_tokens, 1), make_generator(params.seed))
                lps: list[TokenLogprob | None] | None = (
                    [None] if req.prompt_logprobs is not None and choice == 0 else None)
                self._running.append(_Seq(req, choice, state, lps))

    def _pick_prefill(self) -> list[_Seq]:
        """Pre-filling rows in admission order, up to prefill_budget tokens (at least one row)."""
        picked: list[_Seq] = []
        total = 0
        for s in self._running:
            if s.prefilled:
                continue
            n = min(self.prefill_chunk, len(s.state.prompt) - s.state.fed)
            if picked and total + n > self.prefill_budget:
                break
            picked.append(s)
            total += n
        return picked

    def _prefill(self, seqs: list[_Seq]) -> None:
        chunks = [s.state.prompt[s.state.fed: s.state.fed + self.prefill_chunk] for s in seqs]
        plain = [i for i, s in enumerate(seqs) if s.prompt_lps is None]
        last: dict[int, torch.Tensor] = {}
        if plain:
            logits = self._step([seqs[i] for i in plain], [chunks[i] for i in plain])
            if logits is not None:
                last.update({i: logits[j] for j, i in enumerate(plain)})
        for i, s in enumerate(seqs):
            if s.prompt_lps is not None:   # scoring: this row needs every position's logits
                logits = self._step([s], [chunks[i]], all_logits=True)
                if logits is not None and self._score(s, logits[0]):
                    last[i] = logits[0, -1]
        done = []
        for i, s in enumerate(seqs):
            if i not in last or s.req.done:
                continue
            s.state.fed += len(chunks[i])
            self.prompt_tokens += len(chunks[i])
            if s.prefilled:
                done.append(i)
        if not done:
            return
        for i in done:
            s = seqs[i]
            if s.prompt_lps is not None:
                s.req.emit(Output(s.choice, prompt_logprobs=s.prompt_lps))
        sampled = [i for i in done if seqs[i].req.max_tokens > 0]
        for i in done:
            if seqs[i].req.max_tokens == 0:   # scoring only: nothing to generate
                self._finish(seqs[i], Output(seqs[i].choice, finish_reason="length"))
        if sampled:
            self._sample([seqs[i] for i in sampled], torch.stack([last[i] for i in sampled]))

    def _score(self, s: _Seq, logits: torch.Tensor) -> bool:
        """Log-probabilities of the prompt tokens this chunk predicts; False if it failed."""
        fed, prompt = s.state.fed, s.state.prompt
        n = min(self.prefill_chunk, len(prompt) - fed)
        targets = prompt[fed + 1: fed + n + 1]          # position t predicts token t + 1
        if not targets or s.prompt_lps is None:
            return True
        lp = torch.log_softmax(logits[: len(targets)].float(), dim=-1)      # (t, V)
        if not bool(torch.isfinite(lp.amax(dim=-1)).all()):
            self._fail(s.req, RequestFailed("model", str(NonFiniteLogitsError([s.row]))))
            return False
        chosen = lp.gather(1, torch.tensor(targets, device=lp.device)[:, None])[:, 0].tolist()
        top_n = s.req.prompt_logprobs or 0
        if top_n:
            values, ids = lp.topk(min(top_n, lp.shape[-1]), dim=-1)
            tops = [list(zip(i, v)) for i, v in zip(ids.tolist(), values.tolist())]
        else:
            tops = [[] for _ in targets]
        s.prompt_lps.extend(TokenLogprob(t, c, top) for t, c, top in zip(targets, chosen, tops))
        return True

    def _step(self, seqs: list[_Seq], chunks: list[list[int]],
              all_logits: bool = False) -> torch.Tensor | None:
        t0 = time.perf_counter()
        try:
            logits = self.engine.step(self.cache, [s.row for s in seqs], chunks,
                                      all_logits=all_logits)
            if log.isEnabledFor(logging.DEBUG):
                log.debug("step: %d row(s), %d token(s), padded to %d, %.3f s", len(seqs),
                          sum(map(len, chunks)), max(map(len, chunks)),
                          time.perf_counter() - t0)
        except Exception as exc:
            log.exception("model step failed for %d row(s)", len(seqs))
            for s in seqs:
                self._fail(s.req, RequestFailed("internal", f"the model step failed: {exc}"))
            return None
        self.steps += 1
        return logits

    def _sample(self, seqs: list[_Seq], logits: torch.Tensor) -> None:
        live = [i for i, s in enumerate(seqs) if not s.req.done]
        tokens: list[int] = []
        while live:
            try:
                tokens = sample_batch(
                    logits[live], [seqs[i].state.params for i in live],
                    [seqs[i].state.generator for i in live],
                    [_history(seqs[i].state) for i in live])
                break
            except NonFiniteLogitsError as exc:
                for j in exc.rows:
                    self._fail(seqs[live[j]].req, RequestFailed("model", str(exc)))
                live = [i for i in live if not seqs[i].req.done]
            except Exception as exc:
                log.exception("sampling failed")
                for i in live:
                    self._fail(seqs[i].req, RequestFailed("internal", f"sampling failed: {exc}"))
                return
        now = time.monotonic()
        for i, token in zip(live, tokens):
            s = seqs[i]
            if s.req.done:     # another choice of its request failed in this loop
                continue
            try:
                event = s.state.accept(token, logits[i])
            except Exception as exc:
                log.exception("accepting a token failed")
                self._fail(s.req, RequestFailed("internal", f"decoding failed: {exc}"))
                continue
            self.generated_tokens += 1
            lp = None
            if s.state.params.logprobs and event.token_id is not None:
                lp = s.state.logprobs[-1]
            out = Output(s.choice, event.text, event.token_id, lp, event.finish_reason,
                         len(s.state.output))
            if event.finish_reason:
                self._finish(s, out)
            else:
                s.req.emit(out)
        if tokens:
            self._recent.append((now, len(tokens)))
            while self._recent and now - self._recent[0][0] > THROUGHPUT_WINDOW_S:
                self._recent.popleft()

    # ------------------------------------------------------------ bookkeeping

    def _release(self, s: _Seq) -> None:
        self._running.remove(s)
        self._free.append(s.row)

    def _finish(self, s: _Seq, out: Output) -> None:
        self._release(s)
        s.req._open -= 1
        if s.req._open == 0:
            s.req.done = True
        s.req.emit(out)

    def _drop(self, req: GenerationRequest) -> None:
        """Free every row of a request and forget it (it stays out of the queue)."""
        with self._cond:
            req.done = True
            if req in self._waiting:
                self._waiting.remove(req)
        for s in [s for s in self._running if s.req is req]:
            self._release(s)

    def _fail(self, req: GenerationRequest, error: RequestFailed) -> None:
        if req.done:
            return
        self._drop(req)
        self.failed += 1
        if error.kind in ("model", "internal"):
            log.warning("request failed: %s", error)
        req.emit(Output(-1, error=error))


def _failure(kind: str) -> RequestFailed:
    messages = {
        "timeout": "the request took longer than the server's timeout",
        "shutdown": "the server is shutting down",
    }
    return RequestFailed(kind, messages[kind])


def _history(state: SequenceState) -> TokenHistory | None:
    return TokenHistory(state.prompt, state.output) if state.params.has_penalties else None

