"""The request side of the step loop: the waiting queue, the loop's thread, cancellation,
timeouts and draining, and how a request ends (finished, dropped or failed). The scheduler
(scheduler.py) adds what a step does; this part knows nothing of the model or its cache."""

from __future__ import annotations

import collections
import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any

import torch

from mistral7b.request import (
    GenerationRequest,
    Output,
    QueueFullError,
    RequestFailed,
    ShuttingDownError,
    failure,
)
from mistral7b.sequence import Sequence, TokenLogprob

log = logging.getLogger("mistral7b.scheduler")

THROUGHPUT_WINDOW_S = 10.0


@dataclass(eq=False)
class ChoiceSeq:
    """One choice of a request, running or waiting to be (re-)admitted."""

    req: GenerationRequest
    choice: int
    seq: Sequence
    order: int                                             # admission order (preemption)
    prompt_lps: list[TokenLogprob | None] | None = None     # being filled during pre-fill
    first_logits: torch.Tensor | None = None               # a fork samples from these

    @property
    def scoring(self) -> bool:
        return self.prompt_lps is not None


class RequestQueue:
    """Requests waiting, sequences running (one per choice), and the thread that steps them.

    Subclasses define `_iteration` (one step of the loop) and `_free` (give a sequence's
    cache back).
    """

    def __init__(self, *, max_concurrency: int, max_queue: int) -> None:
        self.max_concurrency = max_concurrency
        self.max_queue = max_queue
        self._running: list[ChoiceSeq] = []
        self._waiting: collections.deque[GenerationRequest] = collections.deque()
        self._ready: collections.deque[ChoiceSeq] = collections.deque()   # forks, preempted
        self._cond = threading.Condition()
        self._accepting = True
        self._abort_at: float | None = None     # running requests fail after this time
        self._stop = False
        self._thread: threading.Thread | None = None
        self.failed = 0
        self._recent: collections.deque[tuple[float, int]] = collections.deque()
        # other work on the model (moderation scoring) run by the loop between two steps
        self._calls: collections.deque[tuple[Callable[[], Any], Future[Any]]] = \
            collections.deque()

    def _iteration(self) -> None:
        raise NotImplementedError

    def _free(self, s: ChoiceSeq) -> None:
        raise NotImplementedError

    # ------------------------------------------------------------ public API

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="mistral7b-scheduler",
                                        daemon=True)
        self._thread.start()

    def cancel(self, req: GenerationRequest) -> None:
        """The client went away: stop the request; its blocks are free within one step."""
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

    def submit(self, req: GenerationRequest) -> None:
        """Queue a request; raises QueueFullError or ShuttingDownError (nothing is queued)."""
        if not req.params or (req.max_tokens < 1 and req.prompt_logprobs is None):
            raise ValueError("a request needs choices and max_tokens >= 1 (or prompt_logprobs)")
        with self._cond:
            if not self._accepting:
                raise ShuttingDownError("the server is shutting down")
            # Requests the loop has not admitted yet may still have a free row waiting for
            # them: only those beyond the free rows count against max_queue.
            if len(self._waiting) - self._free_rows() >= self.max_queue:
                raise QueueFullError(f"the queue is full ({self.max_queue} requests waiting)")
            req._open = req.n
            self._waiting.append(req)
            self._cond.notify()

    def call(self, fn: Callable[[], Any]) -> Future[Any]:
        """Run fn() on the loop's thread between two steps (the model and its KV pool are the
        loop's alone while the thread runs); the Future holds its result or exception."""
        future: Future[Any] = Future()
        with self._cond:
            if not self._accepting:
                raise ShuttingDownError("the server is shutting down")
            self._calls.append((fn, future))
            self._cond.notify()
        return future

    def _run_calls(self) -> None:
        while True:
            with self._cond:
                if not self._calls:
                    return
                fn, future = self._calls.popleft()
            if future.set_running_or_notify_cancel():
                try:
                    future.set_result(fn())
                except BaseException as exc:  # noqa: BLE001 - handed to the caller
                    future.set_exception(exc)

    def run_once(self) -> None:
        """One iteration of the loop, on the caller's thread (the Python API's driver)."""
        self._iteration()

    def abort(self) -> None:
        """Drop every request and give their blocks back (the caller stopped reading)."""
        for req in {s.req for s in self._running} | {s.req for s in self._ready} | set(
                self._waiting):
            self._drop(req)

    @property
    def accepting(self) -> bool:
        return self._accepting

    @property
    def queue_depth(self) -> int:
        return len(self._waiting) + len(self._ready)

    @property
    def running(self) -> int:
        return len(self._running)

    def idle(self) -> bool:
        return not self._waiting and not self._running and not self._ready

    def throughput(self) -> float:
        """Generated tokens per second over the last THROUGHPUT_WINDOW_S seconds."""
        now = time.monotonic()
        recent = list(self._recent)
        return sum(n for t, n in recent if now - t <= THROUGHPUT_WINDOW_S) / THROUGHPUT_WINDOW_S

    def _free_rows(self) -> int:
        return self.max_concurrency - len(self._running)

    def _loop(self) -> None:
        while True:
            with self._cond:
                while self.idle() and not self._calls and not self._stop:
                    self._cond.wait()
                if self._stop and self.idle() and not self._calls:
                    return
            self._run_calls()
            if self.idle():
                continue
            try:
                self._iteration()
            except Exception:  # a bug in the loop itself: fail what runs, keep serving
                log.exception("scheduler iteration failed")
                for s in list(self._running):
                    self._fail(s.req, RequestFailed("internal", "internal error in the "
                                                    "scheduler; see the server log"))

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
            self._fail(req, failure("timeout" if req.expired(now) else "shutdown"))
        for s in [*self._running, *self._ready]:
            req = s.req
            if req.done:                # dropped with another choice of its request
                continue
            if req.cancelled:
                self._drop(req)
            elif req.expired(now):
                self._fail(req, failure("timeout"))
            elif abort:
                self._fail(req, failure("shutdown"))

    # ------------------------------------------------------------ bookkeeping

    def _release(self, s: ChoiceSeq) -> None:
        if s in self._running:
            self._running.remove(s)
        elif s in self._ready:
            self._ready.remove(s)
        self._free(s)

    def _finish(self, s: ChoiceSeq, out: Output) -> None:
        self._release(s)
        s.req._open -= 1
        if s.req._open == 0:
            s.req.done = True
        s.req.emit(out)

    def _drop(self, req: GenerationRequest) -> None:
        """Free every block of a request and forget it (it stays out of the queue)."""
        with self._cond:
            req.done = True
            if req in self._waiting:
                self._waiting.remove(req)
        for s in [s for s in [*self._running, *self._ready] if s.req is req]:
            self._release(s)

    def _fail(self, req: GenerationRequest, error: RequestFailed) -> None:
        if req.done:
            return
        self._drop(req)
        self.failed += 1
        if error.kind in ("model", "internal"):
            log.warning("request failed: %s", error)
        req.emit(Output(-1, error=error))


