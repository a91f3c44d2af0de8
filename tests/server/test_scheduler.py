"""The continuous-batching scheduler on a tiny random model, in-process: batched results equal
each request alone, failures stay with their request, cancellation frees rows, drain ends
everything. (The server tests drive the same scheduler through HTTP on the real model.)"""

from __future__ import annotations

import queue
import time

import pytest
import torch

from mistral7b.batch import run_batch
from mistral7b.config import ModelConfig
from mistral7b.engine import Engine
from mistral7b.model import Transformer
from mistral7b.request import (
    GenerationRequest,
    QueueFullError,
    ShuttingDownError,
    choice_params,
)
from mistral7b.sampling import SamplingParams
from mistral7b.scheduler import Scheduler

EOS = 2
NAN = [95, 95]      # a pre-fill chunk starting with these gets NaN logits (FaultyEngine)
CRASH = [94, 94]    # a step with a pre-fill chunk starting with these raises


class Decoder:
    """Token ids as text: '<5><17>'."""

    def push(self, token: int) -> str:
        return f"<{token}>"

    def flush(self) -> str:
        return ""


class FaultyEngine(Engine):
    def step(self, tables, chunks, all_logits=False):
        if any(c[:2] == CRASH for c in chunks):
            raise RuntimeError("injected failure")
        logits = super().step(tables, chunks, all_logits)
        for b, chunk in enumerate(chunks):
            if chunk[:2] == NAN:
                logits[b] = float("nan")
        return logits


def tiny_model(window: int | None = 16, max_seq_len: int = 256, *, seed: int = 0,
               vocab: int = 96) -> tuple[Transformer, ModelConfig]:
    """A random float32 decoder small enough to step in milliseconds (vocab 96)."""
    config = ModelConfig(dim=64, n_layers=2, head_dim=16, hidden_dim=96, n_heads=4,
                         n_kv_heads=2, norm_eps=1e-5, vocab_size=vocab, rope_theta=10000.0,
                         sliding_window=window, max_seq_len=max_seq_len)
    torch.manual_seed(seed)
    model = Transformer(config).float().eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.copy_(torch.randn_like(p) * (1.5 / p.shape[1] ** 0.5))
    return model, config


@pytest.fixture(scope="module")
def engine():
    model, config = tiny_model()
    return FaultyEngine(model, config, kv_cache_memory=2**24, kv_block_size=4)


def make(engine, **kw) -> Scheduler:
    kw = {"max_concurrency": 3, "max_queue": 16, "max_model_len": 128, "prefill_chunk": 8,
          **kw}
    s = Scheduler(engine, stop_ids=frozenset({EOS}), new_decoder=Decoder, **kw)
    s.start()
    return s


class Client:
    """Submits a request and collects its outputs (what the server's handler does)."""

    def __init__(self, sched: Scheduler, prompt, max_tokens=6, n=1, prompt_logprobs=None,
                 timeout=None, **sampling):
        self.q: queue.Queue = queue.Queue()
        params = SamplingParams(max_tokens=max(max_tokens, 1), **sampling)
        self.req = GenerationRequest(list(prompt), choice_params(params, n), self.q.put,
                                     max_tokens, prompt_logprobs, timeout)
        self.seen: list = []
        sched.submit(self.req)

    def first(self, timeout: float = 10.0):
        """Wait for the first output (the request is running then)."""
        self.seen.append(self.q.get(timeout=timeout))
        return self.seen[-1]

    def result(self, timeout: float = 30.0):
        tokens = {i: [] for i in range(self.req.n)}
        finish, prompt_lps = {}, None
        deadline = time.monotonic() + timeout
        while len(finish) < self.req.n:
            if self.seen:
                out = self.seen.pop(0)
            else:
                out = self.q.get(timeout=max(deadline - time.monotonic(), 0.01))
            if out.error is not None:
                return out.error
            if out.prompt_logprobs is not None:
                prompt_lps = out.prompt_logprobs
            if out.token_id is not None:
                tokens[out.choice].append(out.token_id)
            if out.finish_reason:
                finish[out.choice] = out.finish_reason
        return tokens, finish, prompt_lps


def alone(engine, prompt, max_tokens, **sampling):
    """The same request alone, through the Python API's driver, on an engine of its own
    (the same weights, a cold cache of its own: the scheduler's thread owns the other)."""
    solo = Engine(engine.model, engine.config, kv_cache_memory=2**24, kv_block_size=4)
    params = SamplingParams(max_tokens=max_tokens, **sampling)
    outs = run_batch(solo, [list(prompt)], [params], stop_ids=frozenset({EOS}),
                     new_decoder=Decoder, chunk_size=8)
    return [out.token_id for _, out in outs if out.token_id is not None]


def wait_idle(sched: Scheduler, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not sched.idle():
        assert time.monotonic() < deadline, "scheduler did not become idle"
        time.sleep(0.01)


PROMPTS = [[1, 5, 9], list(range(3, 30)), [1] + list(range(40, 60)), [7], [1, 3] * 11,
           list(range(10, 19))]


def test_continuous_batching_equals_each_request_alone(engine):
    sched = make(engine)
    try:
        clients = [Client(sched, p, max_tokens=4 + i) for i, p in enumerate(PROMPTS)]
        for i, (c, p) in enumerate(zip(clients, PROMPTS)):
            tokens, _, _ = c.result()
            assert tokens[0] == alone(engine, p, 4 + i)
        wait_idle(sched)
        assert sched.running == 0 and sched.queue_depth == 0
    finally:
        sched.close()


def test_n_choices_use_consecutive_seeds(engine):
    sched = make(engine, max_concurrency=2)
    try:
        tokens, finish, _ = Client(sched, PROMPTS[1], max_tokens=5, n=3, temperature=1.0,
                                   seed=1234).result()
        for i in range(3):
            assert tokens[i] == alone(engine, PROMPTS[1], 5, temperature=1.0, seed=1234 + i)
        assert set(finish) == {0, 1, 2}
        assert len({tuple(t) for t in tokens.values()}) > 1      # the seeds differ
    finally:
        sched.close()


def test_non_finite_logits_fail_only_that_request(engine):
    sched = make(engine)
    try:
        good = Client(sched, PROMPTS[1], max_tokens=8)
        bad = Client(sched, NAN + [1, 2, 3])
        other = Client(sched, PROMPTS[0], max_tokens=5)
        err = bad.result()
        assert err.kind == "model" and "NaN" in str(err)
        assert good.result()[0][0] == alone(engine, PROMPTS[1], 8)
        assert other.result()[0][0] == alone(engine, PROMPTS[0], 5)
    finally:
        sched.close()


def test_an_exception_in_a_step_fails_that_steps_requests_only(engine):
    sched = make(engine)
    try:
        running = Client(sched, PROMPTS[0], max_tokens=30, ignore_eos=True)
        running.first()                   # decoding now
        crash = Client(sched, CRASH + [5])
        assert crash.result().kind == "internal"
        tokens, _, _ = running.result()
        assert tokens[0] == alone(engine, PROMPTS[0], 30, ignore_eos=True)
        assert Client(sched, PROMPTS[3]).result()[0][0] == alone(engine, PROMPTS[3], 6)
    finally:
        sched.close()


def test_cancel_frees_the_row_within_a_step(engine):
    sched = make(engine, max_concurrency=1, max_queue=1)
    try:
        long = Client(sched, PROMPTS[0], max_tokens=100, ignore_eos=True)
        long.first()
        waiting = Client(sched, PROMPTS[1])         # no free row: queued
        assert sched.queue_depth == 1
        with pytest.raises(QueueFullError):
            Client(sched, PROMPTS[2])
        sched.cancel(waiting.req)
        assert sched.queue_depth == 0               # leaves the queue at once
        sched.cancel(long.req)
        wait_idle(sched, timeout=2.0)
        assert Client(sched, PROMPTS[3]).result()[0][0] == alone(engine, PROMPTS[3], 6)
    finally:
        sched.close()


def test_the_queue_bound_counts_requests_beyond_the_free_rows(engine):
    sched = make(engine, max_concurrency=2, max_queue=1)
    try:
        # submitted faster than the loop admits them: two free rows + one queue place
        clients = [Client(sched, PROMPTS[0], max_tokens=50, ignore_eos=True) for _ in range(3)]
        with pytest.raises(QueueFullError):
            Client(sched, PROMPTS[1])
        for c in clients:
            sched.cancel(c.req)
        wait_idle(sched)
    finally:
        sched.close()


def test_timeout_fails_the_request(engine):
    sched = make(engine)
    try:
        err = Client(sched, PROMPTS[0], max_tokens=100, ignore_eos=True, timeout=0.05).result()
        assert err.kind == "timeout"
        wait_idle(sched)
    finally:
        sched.close()


def test_prompt_logprobs_equal_a_full_forward(engine):
    sched = make(engine)
    prompt = PROMPTS[2]                              # 21 tokens: three chunks of 8
    try:
        tokens, finish, lps = Client(sched, prompt, max_tokens=0, prompt_logprobs=2).result()
        assert tokens == {0: []} and finish == {0: "length"}
        ref = torch.log_softmax(engine.logits(prompt, chunk_size=8), dim=-1)
        assert lps[0] is None and len(lps) == len(prompt)
        for i in range(1, len(prompt)):
            assert lps[i].token_id == prompt[i]
            assert lps[i].logprob == pytest.approx(float(ref[i - 1, prompt[i]]), abs=1e-5)
            top_ids = ref[i - 1].topk(2).indices.tolist()
            assert [t for t, _ in lps[i].top] == top_ids
        # with generation too, and logprobs of the generated tokens
        tokens, _, lps2 = Client(sched, prompt, max_tokens=3, prompt_logprobs=0,
                                 logprobs=True).result()
        assert tokens[0] == alone(engine, prompt, 3)
        assert [e.logprob for e in lps2[1:]] == pytest.approx([e.logprob for e in lps[1:]],
                                                             abs=1e-5)
    finally:
        sched.close()


def test_drain_ends_running_and_waiting_requests_then_refuses(engine):
    sched = make(engine, max_concurrency=1)
    try:
        running = Client(sched, PROMPTS[0], max_tokens=100, ignore_eos=True)
        running.first()
        waiting = Client(sched, PROMPTS[1])
        sched.drain(grace=0.0)
        assert waiting.result().kind == "shutdown"
        assert running.result().kind == "shutdown"
        with pytest.raises(ShuttingDownError):
            Client(sched, PROMPTS[0])
    finally:
        sched.close(timeout=5)
    assert not sched._thread.is_alive()
