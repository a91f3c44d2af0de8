"""KV memory on demand within a budget, the scheduler's side: admission by memory, requests
that can never fit, preemption that resumes exactly, `n` choices pre-filled once, and a churn
of requests with cancellations that leaves nothing behind but the prefix cache."""

from __future__ import annotations

import random
import re
import time

import httpx
import pytest
from conftest import ServerProcess
from test_scheduler import EOS, Client, Decoder, tiny_model, wait_idle

from mistral7b.batch import run_batch
from mistral7b.config import ModelConfig
from mistral7b.engine import Engine, default_kv_budget
from mistral7b.sampling import SamplingParams
from mistral7b.scheduler import KVCacheTooSmall, Scheduler

BS = 4


def _slot_bytes(config: ModelConfig) -> int:
    return 2 * config.n_layers * config.n_kv_heads * config.head_dim * 4


def _engine(tokens: int, window: int | None = None) -> Engine:
    model, config = tiny_model(window)
    return Engine(model, config, kv_cache_memory=tokens * _slot_bytes(config), kv_block_size=BS)


def _alone(engine: Engine, prompt: list[int], max_tokens: int, **sampling) -> list[int]:
    solo = Engine(engine.model, engine.config, kv_cache_memory=2**24, kv_block_size=BS)
    outs = run_batch(solo, [prompt], [SamplingParams(max_tokens=max_tokens, **sampling)],
                     stop_ids=frozenset({EOS}), new_decoder=Decoder, chunk_size=8)
    return [o.token_id for _, o in outs if o.token_id is not None]


def _sched(engine: Engine, **kw) -> Scheduler:
    kw = {"max_concurrency": 4, "max_queue": 64, "max_model_len": 200, "prefill_chunk": 8,
          **kw}
    s = Scheduler(engine, stop_ids=frozenset({EOS}), new_decoder=Decoder, **kw)
    s.start()
    return s


def test_a_long_context_model_reserves_nothing_at_start_up():
    """A no-window model with a 32768-token context and the default budget: the pool counts
    no more than the budget, and the process's resident memory does not grow by it."""
    import resource

    def rss() -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * resource.getpagesize()

    model, config = tiny_model(None, max_seq_len=32768)
    engine = Engine(model, config)
    before = rss()
    budget = default_kv_budget(engine.device)
    sched = Scheduler(engine, stop_ids=frozenset({EOS}), new_decoder=Decoder,
                      max_model_len=32768)
    assert 0 < sched.pool.nbytes <= budget
    assert sched.pool.used_bytes == 0
    assert rss() - before < 64 * 2**20


def test_a_request_that_does_not_fit_now_waits_and_one_that_never_fits_is_refused():
    engine = _engine(tokens=64)                     # 16 blocks of 4
    sched = _sched(engine)
    try:
        with pytest.raises(KVCacheTooSmall, match="--kv-cache-memory"):
            Client(sched, list(range(3, 40)), max_tokens=60)      # 97 tokens > 64
        first = Client(sched, list(range(3, 30)), max_tokens=20, ignore_eos=True)
        second = Client(sched, list(range(40, 70)), max_tokens=20, ignore_eos=True)
        assert first.result()[0][0] == _alone(engine, list(range(3, 30)), 20, ignore_eos=True)
        assert second.result()[0][0] == _alone(engine, list(range(40, 70)), 20, ignore_eos=True)
        wait_idle(sched)
    finally:
        sched.close()


@pytest.mark.parametrize("window", [None, 8])
def test_preempted_sequences_resume_with_the_same_tokens(window):
    """Four sequences that together outgrow the pool: the newest ones are preempted and
    re-filled from their tokens; every result equals the sequence run alone."""
    engine = _engine(tokens=96, window=window)      # 24 blocks; 4 x 45 tokens do not fit
    sched = _sched(engine)
    prompts = [list(range(3 + i, 18 + i)) for i in range(4)]
    try:
        clients = [Client(sched, p, max_tokens=30, ignore_eos=True) for p in prompts]
        results = [c.result(timeout=60) for c in clients]
        for p, r in zip(prompts, results):
            assert r[0][0] == _alone(engine, p, 30, ignore_eos=True)
        if window is None:
            assert sched.preemptions > 0            # with a window each holds <= 3 blocks
        wait_idle(sched)
    finally:
        sched.close()


def test_n_choices_prefill_the_prompt_once():
    engine = _engine(tokens=1024)
    sched = _sched(engine, max_concurrency=2)       # fewer rows than choices: forks wait
    prompt = list(range(3, 30))                     # 27 tokens: a partial last block
    try:
        tokens, finish, _ = Client(sched, prompt, max_tokens=5, n=4, temperature=1.0,
                                   seed=77).result()
        assert sched.prompt_tokens == len(prompt)
        for i in range(4):
            assert tokens[i] == _alone(engine, prompt, 5, temperature=1.0, seed=77 + i)
        assert set(finish) == {0, 1, 2, 3}
    finally:
        sched.close()


def test_a_repeated_prompt_reuses_the_cached_prefix():
    engine = _engine(tokens=1024, window=8)
    sched = _sched(engine)
    prompt = list(range(3, 40))
    try:
        want = _alone(engine, prompt, 6)
        assert Client(sched, prompt, max_tokens=6).result()[0][0] == want
        before = sched.prompt_tokens
        assert Client(sched, prompt, max_tokens=6).result()[0][0] == want
        assert sched.cached_tokens == len(prompt) - 1       # all but the last token
        assert sched.prompt_tokens - before == 1
    finally:
        sched.close()


def test_a_churn_of_requests_leaves_only_the_prefix_cache_behind():
    """200 requests of random lengths, a third of them cancelled at a random moment: after
    they end, no block is held by a sequence and the pool's count is within its budget."""
    engine = _engine(tokens=400)
    sched = _sched(engine, max_concurrency=6, max_queue=256)
    rng = random.Random(0)
    try:
        clients = []
        for i in range(200):
            prompt = [rng.randrange(3, 96) for _ in range(rng.randrange(1, 60))]
            clients.append(Client(sched, prompt, max_tokens=rng.randrange(1, 40)))
            if rng.random() < 0.33:
                victim = rng.choice(clients)
                if rng.random() < 0.5:
                    time.sleep(0.002)
                sched.cancel(victim.req)
        wait_idle(sched, timeout=120)
        pool = sched.pool
        assert pool.used_bytes == pool.cached_bytes          # held by no sequence
        assert pool.used_bytes <= pool.nbytes
        assert pool.available_blocks == pool.capacity_blocks
    finally:
        sched.close()


def test_requests_admitted_together_compute_a_shared_prompt_once():
    """Four requests with the same 26-token preamble arrive at once: the first computes it,
    the others take its blocks when their turn to pre-fill comes."""
    engine = _engine(tokens=1024, window=8)
    sched = _sched(engine)
    shared = list(range(10, 36))
    tails = [[50 + i, 60 + i, 70 + i] for i in range(4)]
    try:
        clients = [Client(sched, shared + t, max_tokens=4) for t in tails]
        results = [c.result() for c in clients]
        for t, r in zip(tails, results):
            assert r[0][0] == _alone(engine, shared + t, 4)
        assert sched.prompt_tokens == len(shared) + sum(len(t) for t in tails)
    finally:
        sched.close()


def test_the_server_answers_400_for_a_request_beyond_its_kv_budget(tmp_path):
    """`serve --kv-cache-memory`: the start-up log names the budget; a request whose prompt
    and max_tokens could never fit gets a 400 naming the flag; one that fits is served."""
    srv = ServerProcess(["--kv-cache-memory", "8MiB"], tmp_path / "server.log").wait_ready()
    try:
        assert re.search(r"KV cache: budget 0\.01 GiB \((\d+) tokens", srv.log())
        hello = [{"role": "user", "content": "Hi"}]
        ok = httpx.post(f"{srv.url}/v1/chat/completions", timeout=60,
                        json={"messages": hello, "max_tokens": 8})
        assert ok.status_code == 200, ok.text
        big = httpx.post(f"{srv.url}/v1/chat/completions", timeout=60,
                         json={"messages": hello, "max_tokens": 4000})
        assert big.status_code == 400
        assert "--kv-cache-memory" in big.json()["error"]["message"]
    finally:
        assert srv.stop() == 0
