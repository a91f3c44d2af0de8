"""Rolling buffer semantics: masks as a pure function of positions, ragged batches, memory."""

from __future__ import annotations

import itertools

import pytest
import torch
from tiny_models import hf_logits, hf_mistral, save_hf
from tolerance import assert_close

from mistral7b.cache import KVCache, visible
from mistral7b.config import ModelConfig
from mistral7b.engine import Engine
from mistral7b.weights import open_checkpoint
from mistral7b.weights.loader import build_model


def _config(window: int | None) -> ModelConfig:
    return ModelConfig(dim=32, n_layers=2, head_dim=8, hidden_dim=48, n_heads=4, n_kv_heads=2,
                       norm_eps=1e-5, vocab_size=64, rope_theta=10000.0, sliding_window=window)


def test_visible_is_the_banded_causal_rule():
    W = 4
    q = torch.arange(12)[:, None]
    k = torch.arange(-1, 12)[None, :]  # -1 = an empty slot
    got = visible(q, k, W)
    for i, j in itertools.product(range(12), range(-1, 12)):
        # DESIGN §2.1: a query at i sees keys i-W+1 .. i, itself included; empty slots never.
        want = j >= 0 and i - W + 1 <= j <= i
        assert bool(got[i, j + 1]) == want, (i, j)
    no_window = visible(q, k, None)
    assert bool(no_window[11, 1]) and not bool(no_window[3, 5]) and not bool(no_window[5, 0])


def test_rolling_slots_hold_the_last_w_positions():
    cache = KVCache(_config(4), n_rows=1, max_seq_len=100, dtype=torch.float32, device="cpu")
    cache.plan([0], [6])  # positions 0..5 in one chunk
    # the docstring's worked example: slot p mod 4 holds the newest p
    assert cache.slot_pos[0].tolist() == [4, 5, 2, 3]
    cache.plan([0], [1])  # position 6 -> slot 2
    assert cache.slot_pos[0].tolist() == [4, 5, 6, 3]
    assert cache.lengths == [7]


@pytest.mark.parametrize("length", [3, 4, 50, 1000])
def test_window_cache_holds_exactly_w_positions(length):
    W = 4
    cfg = _config(W)
    cache = KVCache(cfg, n_rows=2, max_seq_len=length, dtype=torch.float32, device="cpu")
    assert cache.k.shape == (cfg.n_layers, 2, cfg.n_kv_heads, min(W, length), cfg.head_dim)
    assert cache.v.shape == cache.k.shape


@pytest.mark.parametrize("length", [3, 50, 1000])
def test_no_window_cache_is_sized_to_the_request(length):
    cfg = _config(None)
    cache = KVCache(cfg, n_rows=1, max_seq_len=length, dtype=torch.bfloat16, device="cpu")
    assert cache.k.shape[3] == length
    assert cache.nbytes == 2 * cfg.n_layers * cfg.n_kv_heads * length * cfg.head_dim * 2


def test_cache_refuses_to_run_past_its_size():
    cache = KVCache(_config(None), n_rows=1, max_seq_len=5, dtype=torch.float32, device="cpu")
    cache.plan([0], [5])
    with pytest.raises(ValueError, match="sized for 5"):
        cache.plan([0], [1])


def test_mistral_7b_cache_is_512_mib_per_sequence_at_w_4096():
    from mistral7b.config import PRESETS

    cfg = PRESETS["mistral-7b-v0.1"]
    per_slot = 2 * cfg.n_layers * cfg.n_kv_heads * cfg.head_dim * 2  # k and v, bf16
    assert per_slot == 128 * 1024
    assert per_slot * cfg.sliding_window == 512 * 1024 * 1024


@pytest.fixture(scope="module")
def engine8(tmp_path_factory):
    model = hf_mistral(n_heads=4, n_kv_heads=2, head_dim=16, window=8, seed=11)
    path = save_hf(model, tmp_path_factory.mktemp("w8") / "hf")
    reader = open_checkpoint(path)
    net = build_model(reader, dtype=torch.float32, device=torch.device("cpu"))
    return model, Engine(net, reader.config)


def test_ragged_batch_rows_never_see_each_other(engine8):
    model, engine = engine8
    gen = torch.Generator().manual_seed(3)
    prompts = [torch.randint(0, 96, (n,), generator=gen).tolist() for n in (5, 40, 70)]
    alone = [hf_logits(model, p) for p in prompts]
    for chunk in (None, 3, 16):
        cache = engine.new_cache(3, 70)
        got = [[] for _ in prompts]
        step = chunk or 70
        fed = [0, 0, 0]
        while any(f < len(p) for f, p in zip(fed, prompts)):
            rows = [i for i in range(3) if fed[i] < len(prompts[i])]
            chunks = [prompts[i][fed[i]: fed[i] + step] for i in rows]
            out = engine.step(cache, rows, chunks, all_logits=True)
            for b, i in enumerate(rows):
                got[i].append(out[b, : len(chunks[b])])
                fed[i] += len(chunks[b])
        for i, ref in enumerate(alone):
            assert_close(torch.cat(got[i]), ref,
                         what=f"row {i} (len {len(prompts[i])}) chunk {chunk}")


def test_decode_rows_in_any_order_match_alone(engine8):
    """Rows fed one token at a time through non-contiguous row sets (a scheduler's view)."""
    model, engine = engine8
    prompts = [[5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15], [20, 21, 22], [30, 31, 32, 33, 34, 35]]
    cache = engine.new_cache(4, 16)
    outs = {0: [], 2: [], 3: []}
    rows_of = {0: 0, 2: 1, 3: 2}
    for t in range(11):
        rows = [r for r in (3, 0, 2) if t < len(prompts[rows_of[r]])]
        logits = engine.step(cache, rows, [[prompts[rows_of[r]][t]] for r in rows])
        for b, r in enumerate(rows):
            outs[r].append(logits[b])
    for r, i in rows_of.items():
        ref = hf_logits(model, prompts[i])
        assert_close(torch.stack(outs[r]), ref, what=f"row {r}")


def test_uncached_forward_matches_hf_on_a_padded_batch(engine8):
    """The training/scoring path: no cache, a padded batch, banded causal mask."""
    from mistral7b.cache import uncached_plan

    model, engine = engine8
    prompts = [list(range(3, 30)), list(range(40, 50))]
    plan, positions = uncached_plan([len(p) for p in prompts], engine.config.sliding_window)
    tokens = torch.zeros(2, 27, dtype=torch.long)
    for b, p in enumerate(prompts):
        tokens[b, : len(p)] = torch.tensor(p)
    out = engine.model(tokens, positions, None, plan)
    for b, p in enumerate(prompts):
        assert_close(out[b, : len(p)], hf_logits(model, p), what=f"row {b}")
