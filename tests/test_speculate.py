"""Speculative decoding by prompt lookup (speculate.py): the proposer against a brute-force
search; greedy output identical to plain greedy (ragged batch, a window shorter than the
sequence, EOS and stop strings inside accepted drafts); sampling keeps the distribution
(chi-square against the exact marginal computed from the model); the surfaces take it."""

from __future__ import annotations

import random

import pytest
import torch

from mistral7b.batch import run_batch
from mistral7b.engine import Engine
from mistral7b.errors import InputError
from mistral7b.sampling import SamplingParams
from mistral7b.sequence import GenerationStats
from mistral7b.speculate import check_speculate, propose

VOCAB = 96
TEMP = 1.0


class Decoder:
    def push(self, token: int) -> str:
        return f"<{token}>"

    def flush(self) -> str:
        return ""


def _naive(tokens: list[int], k: int, max_ngram: int = 4) -> list[int]:
    """The longest suffix (up to max_ngram) that occurs earlier; its latest occurrence."""
    n = len(tokens)
    for size in range(min(max_ngram, n - 1), 0, -1):
        suffix = tokens[n - size:]
        for end in range(n - 2, size - 2, -1):
            if tokens[end - size + 1: end + 1] == suffix:
                draft = tokens[end + 1: end + 1 + k]
                if draft:
                    return draft
    return []


def test_propose_worked_example_and_against_brute_force():
    assert propose([5, 6, 7, 9, 5, 6], 3) == [7, 9, 5]
    assert propose([1, 2, 3], 4) == []
    assert propose([4], 2) == [] and propose([4, 4], 0) == []
    rng = random.Random(0)
    for _ in range(500):
        tokens = [rng.randrange(6) for _ in range(rng.randrange(1, 40))]
        k = rng.randrange(1, 6)
        assert propose(tokens, k) == _naive(tokens, k), tokens


def test_check_speculate():
    assert check_speculate(0) == 0 and check_speculate(8) == 8
    for bad in (-1, 17, 2.5, True, "4"):
        with pytest.raises(InputError, match="speculate"):
            check_speculate(bad)


@pytest.fixture(scope="module")
def model():
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).parent / "server"))
    from test_scheduler import tiny_model

    return tiny_model(window=16)


def _engine(model) -> Engine:
    net, config = model
    return Engine(net, config, kv_cache_memory=2**24, kv_block_size=4)


def _run(model, prompts, params, speculate, stop_ids=frozenset()):
    stats = GenerationStats()
    outs: dict[int, list] = {i: [] for i in range(len(prompts))}
    for i, out in run_batch(_engine(model), prompts, [params] * len(prompts),
                            stop_ids=stop_ids, new_decoder=Decoder, stats=stats,
                            speculate=speculate):
        outs[i].append(out)
    result = [([o.token_id for o in outs[i] if o.token_id is not None],
               "".join(o.text for o in outs[i]), outs[i][-1].finish_reason)
              for i in range(len(prompts))]
    return result, stats


# Prompts that repeat themselves, so that lookup finds drafts; lengths differ (ragged) and
# prompt + output exceeds the window of 16.
PROMPTS = [[1] + [7, 8, 9, 10, 11] * 4, [1, 3, 4] * 6 + [5], [1] + list(range(20, 32)) * 2]


@pytest.mark.parametrize("k", [1, 3, 8])
def test_greedy_output_is_identical(model, k):
    params = SamplingParams(max_tokens=40)
    plain, _ = _run(model, PROMPTS, params, 0)
    spec, stats = _run(model, PROMPTS, params, k)
    assert spec == plain
    assert stats.draft_tokens > 0 and stats.accepted_tokens > 0   # it did speculate


def test_eos_and_stop_strings_inside_accepted_drafts(model):
    params = SamplingParams(max_tokens=40)
    plain, _ = _run(model, PROMPTS, params, 0)
    # a token the model writes late in each answer, when drafts are being accepted
    eos = frozenset({plain[0][0][25]})
    stopped, _ = _run(model, PROMPTS, params, 0, stop_ids=eos)
    spec, stats = _run(model, PROMPTS, params, 4, stop_ids=eos)
    assert spec == stopped and stats.accepted_tokens > 0
    assert stopped[0][2] == "stop" and len(stopped[0][0]) < 40
    stop = f"<{plain[1][0][20]}><{plain[1][0][21]}>"
    with_stop = SamplingParams(max_tokens=40, stop=[stop])
    plain_s, _ = _run(model, PROMPTS, with_stop, 0)
    spec_s, _ = _run(model, PROMPTS, with_stop, 4)
    assert spec_s == plain_s and plain_s[1][2] == "stop" and stop not in plain_s[1][1]


def _exact_joint(model, prompt: list[int]) -> torch.Tensor:
    """p(t1, t2, t3 | prompt) = p(t1) p(t2 | t1) p(t3 | t1, t2) at TEMP, flattened,
    from full forwards of every continuation (no cache, no speculation)."""
    from mistral7b.attention_plan import uncached_plan

    net, config = model

    def probs(seqs: torch.Tensor) -> torch.Tensor:
        B, T = seqs.shape
        plan, pos = uncached_plan([T] * B, config.sliding_window)
        with torch.no_grad():
            return torch.softmax(net(seqs, pos, None, plan)[:, -1].double() / TEMP, -1)

    base = torch.tensor(prompt)[None]
    p1 = probs(base)[0]                                                     # (V,)
    t1 = torch.arange(VOCAB)[:, None]
    p2 = probs(torch.cat([base.expand(VOCAB, -1), t1], 1))                 # (V1, V2)
    pairs = torch.cartesian_prod(torch.arange(VOCAB), torch.arange(VOCAB))  # (V1*V2, 2)
    p3 = probs(torch.cat([base.expand(len(pairs), -1), pairs], 1))         # (V1*V2, V3)
    return ((p1[:, None] * p2).reshape(-1, 1) * p3).reshape(-1)


def _copying_model():
    """The tiny model made to continue cycles of six tokens (6 7 8 9 10 11 6 ...) with
    probability ~0.6 and anything else otherwise: its embedding dominates the residual
    stream and output row succ(t) points along token t's embedding. Random enough for a
    distribution test, repetitive enough that lookup drafts are often accepted."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).parent / "server"))
    from test_scheduler import tiny_model

    net, config = tiny_model(window=16)
    with torch.no_grad():
        emb = net.tok_embeddings.weight.mul_(30)
        succ = torch.arange(VOCAB).view(-1, 6).roll(-1, 1).reshape(-1)
        out = torch.empty_like(net.output.weight)
        out[succ] = emb / emb.norm(dim=1, keepdim=True) * 0.85
        net.output.weight.copy_(out)
    return net, config


def sample_first_three(model, prompt: list[int], n: int, stats: GenerationStats,
                       **speculation) -> torch.Tensor:
    """Counts (VOCAB ** 3,) of the first three tokens of n seeded samples at TEMP, run in
    batches of 250 with `speculation` (run_batch's speculate=, draft=)."""
    counts = torch.zeros(VOCAB ** 3)
    engine = _engine(model)
    for start in range(0, n, 250):
        params = [SamplingParams(max_tokens=3, temperature=TEMP, seed=s)
                  for s in range(start, start + 250)]
        got: dict[int, list[int]] = {}
        for i, out in run_batch(engine, [prompt] * 250, params, stop_ids=frozenset(),
                                new_decoder=Decoder, stats=stats, **speculation):
            if out.token_id is not None:
                got.setdefault(i, []).append(out.token_id)
        for ids in got.values():
            counts[(ids[0] * VOCAB + ids[1]) * VOCAB + ids[2]] += 1
    return counts


def assert_matches_exact_joint(model, prompt: list[int], counts: torch.Tensor) -> None:
    """Chi-square of the counts against the exact joint distribution, over bins with >= 5
    expected counts, the rest pooled into one."""
    expected = _exact_joint(model, prompt) * counts.sum()
    big = expected >= 5
    observed, want = counts[big].double(), expected[big]
    if expected[~big].sum() > 0:            # the small bins pooled into one
        observed = torch.cat([observed, counts[~big].sum()[None].double()])
        want = torch.cat([want, expected[~big].sum()[None]])
    chi2 = ((observed - want) ** 2 / want).sum()
    df = torch.tensor(float(len(want) - 1))
    p_value = float(torch.special.gammaincc(df / 2, chi2 / 2))
    assert len(want) >= 4 and p_value > 1e-3, (p_value, chi2, len(want))


def test_sampling_keeps_the_distribution():
    """The first three tokens: token 1 comes from the pre-fill, token 2 from a step fed a
    draft, token 3 from that step when token 2 matched the draft, else from the next one.
    3000 seeded samples of (t1, t2, t3) against their exact joint distribution; chi-square
    over bins with >= 5 expected counts, the rest pooled."""
    model = _copying_model()
    prompt = [1, 7, 8, 9, 10, 11, 6, 7, 8, 9]
    stats = GenerationStats()
    counts = sample_first_three(model, prompt, 3000, stats, speculate=2)
    assert stats.accepted_tokens > 100          # the speculative path was taken often
    assert_matches_exact_joint(model, prompt, counts)
