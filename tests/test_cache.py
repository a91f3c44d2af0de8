"""Rolling buffer semantics: masks as a pure function of positions, ragged batches, memory."""

from __future__ import annotations

import itertools

import pytest
import torch
from tiny_models import hf_logits, hf_mistral, save_hf
from tolerance import assert_close

from mistral7b.attention_plan import visible
from mistral7b.cache import BlockTable, KVCacheFull, KVPool
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


def _pool(window, budget_tokens=1000, bs=4, config=None):
    cfg = config or _config(window)
    slot = 2 * cfg.n_layers * cfg.n_kv_heads * cfg.head_dim * 4
    return KVPool(cfg, budget_tokens * slot, dtype=torch.float32, device="cpu", block_size=bs)


def test_the_docstring_example_gives_back_blocks_that_left_the_window():
    pool = _pool(window=6)
    table = BlockTable()
    pool.plan([table], [10])          # positions 0..9
    pool.trim(table)
    # the next query (10) sees 5..10: block 0 (0-3) is given back, block 1 (4-7) stays
    assert table.blocks[0] == -1 and min(table.blocks[1:]) > 0 and table.length == 10


@pytest.mark.parametrize("length", [3, 4, 50, 1000])
def test_a_window_sequence_never_holds_more_than_w_positions_of_blocks(length):
    W, bs = 8, 4
    pool = _pool(window=W, bs=bs)
    table, free = BlockTable(), pool.available_blocks
    for _ in range(length):
        pool.plan([table], [1])
        pool.trim(table)
        held = sum(1 for b in table.blocks if b > 0)
        assert held <= -(-W // bs) + 1
    assert pool.available_blocks == free - held      # the rest went back to the pool
    pool.release(table)
    assert pool.available_blocks == free


@pytest.mark.parametrize("length", [3, 50, 1000])
def test_no_window_memory_follows_the_sequence(length):
    pool = _pool(window=None, budget_tokens=2000)
    table = BlockTable()
    pool.plan([table], [length])
    assert pool.used_bytes == -(-length // 4) * pool.block_bytes
    assert pool.block_bytes == 4 * 2 * 2 * 2 * 8 * 4     # bs * k,v * layers * kv * hd * f32
    pool.release(table)
    assert pool.used_bytes == 0


def test_a_full_pool_refuses_a_step_and_changes_nothing():
    pool = _pool(window=None, budget_tokens=16)      # 4 blocks of 4
    a, b = BlockTable(), BlockTable()
    pool.plan([a], [12])
    with pytest.raises(KVCacheFull):
        pool.plan([a, b], [1, 5])                    # needs 1 + 2 blocks, 1 left
    assert a.length == 12 and b.length == 0 and pool.available_blocks == 1
    pool.plan([b], [4])                              # what fits still runs


def test_the_budget_is_a_cap_not_an_allocation():
    """A 2 GiB budget on CPU: the pool's own count says 2 GiB, resident memory grows only
    with the blocks written."""
    import resource

    def rss() -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * resource.getpagesize()

    before = rss()
    pool = _pool(window=None, budget_tokens=2**31 // (2 * 2 * 2 * 8 * 4), bs=32)
    assert pool.nbytes <= 2**31
    assert rss() - before < 64 * 2**20
    table = BlockTable()
    pool.plan([table], [320])                        # 10 blocks
    pool.k[:, :, : 11 * 32] = 1.0
    pool.v[:, :, : 11 * 32] = 1.0
    assert rss() - before < 64 * 2**20


@pytest.fixture(scope="module")
def engine8(tmp_path_factory):
    model = hf_mistral(n_heads=4, n_kv_heads=2, head_dim=16, window=8, seed=11)
    path = save_hf(model, tmp_path_factory.mktemp("w8") / "hf")
    reader = open_checkpoint(path)
    net = build_model(reader, dtype=torch.float32, device=torch.device("cpu"))
    # small blocks, so that sequences here span many of them
    return model, Engine(net, reader.config, kv_cache_memory=2**24, kv_block_size=4)


def test_ragged_batch_rows_never_see_each_other(engine8):
    model, engine = engine8
    gen = torch.Generator().manual_seed(3)
    prompts = [torch.randint(0, 96, (n,), generator=gen).tolist() for n in (5, 40, 70)]
    alone = [hf_logits(model, p) for p in prompts]
    for chunk in (None, 3, 16):
        tables = [BlockTable() for _ in prompts]
        got = [[] for _ in prompts]
        step = chunk or 70
        fed = [0, 0, 0]
        while any(f < len(p) for f, p in zip(fed, prompts)):
            rows = [i for i in range(3) if fed[i] < len(prompts[i])]
            chunks = [prompts[i][fed[i]: fed[i] + step] for i in rows]
            out = engine.step([tables[i] for i in rows], chunks, all_logits=True)
            for b, i in enumerate(rows):
                got[i].append(out[b, : len(chunks[b])])
                fed[i] += len(chunks[b])
        for i, ref in enumerate(alone):
            assert_close(torch.cat(got[i]), ref,
                         what=f"row {i} (len {len(prompts[i])}) chunk {chunk}")
        for t in tables:
            engine.pool.release(t)


def test_decode_rows_in_any_order_match_alone(engine8):
    """Rows fed one token at a time, in changing order (a scheduler's view)."""
    model, engine = engine8
    prompts = [[5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15], [20, 21, 22], [30, 31, 32, 33, 34, 35]]
    tables = {r: BlockTable() for r in (0, 2, 3)}
    outs = {0: [], 2: [], 3: []}
    rows_of = {0: 0, 2: 1, 3: 2}
    for t in range(11):
        rows = [r for r in ((3, 0, 2) if t % 2 else (0, 2, 3)) if t < len(prompts[rows_of[r]])]
        logits = engine.step([tables[r] for r in rows],
                             [[prompts[rows_of[r]][t]] for r in rows])
        for b, r in enumerate(rows):
            outs[r].append(logits[b])
    for r, i in rows_of.items():
        ref = hf_logits(model, prompts[i])
        assert_close(torch.stack(outs[r]), ref, what=f"row {r}")
        engine.pool.release(tables[r])


def test_uncached_forward_matches_hf_on_a_padded_batch(engine8):
    """The training/scoring path: no cache, a padded batch, banded causal mask."""
    from mistral7b.attention_plan import uncached_plan

    model, engine = engine8
    prompts = [list(range(3, 30)), list(range(40, 50))]
    plan, positions = uncached_plan([len(p) for p in prompts], engine.config.sliding_window)
    tokens = torch.zeros(2, 27, dtype=torch.long)
    for b, p in enumerate(prompts):
        tokens[b, : len(p)] = torch.tensor(p)
    out = engine.model(tokens, positions, None, plan)
    for b, p in enumerate(prompts):
        assert_close(out[b, : len(p)], hf_logits(model, p), what=f"row {b}")


def _feed(engine, tables, seqs, chunk):
    """Feed every table the rest of its sequence, `chunk` tokens a step, all rows together;
    returns each row's logits of the positions fed, and registers the blocks filled."""
    got = [[] for _ in seqs]
    while any(t.length < len(s) for t, s in zip(tables, seqs)):
        rows = [i for i, (t, s) in enumerate(zip(tables, seqs)) if t.length < len(s)]
        chunks = [seqs[i][tables[i].length: tables[i].length + chunk] for i in rows]
        out = engine.step([tables[i] for i in rows], chunks, all_logits=True)
        for b, i in enumerate(rows):
            got[i].append(out[b, : len(chunks[b])])
            engine.pool.register(tables[i], seqs[i])
    return [torch.cat(g) for g in got]


@pytest.mark.parametrize("window", [8, None])
@pytest.mark.parametrize("chunk", [1, 7, 9])      # 1, W - 1, W + 1
def test_reused_prefix_gives_the_logits_of_a_cold_prefill(window, chunk, tmp_path):
    """A first sequence is computed and released; later sequences that start with some of
    its tokens take its cached blocks (and its partial last block) and feed only the rest,
    in a ragged batch beside an unrelated row. Their logits equal HF's full forward of the
    whole sequence: prefixes shorter and longer than W, splits inside a block and a chunk."""
    model = hf_mistral(n_heads=4, n_kv_heads=2, head_dim=16, window=window, seed=5)
    reader = open_checkpoint(save_hf(model, tmp_path / "hf"))
    engine = Engine(build_model(reader, dtype=torch.float32, device=torch.device("cpu")),
                    reader.config, kv_cache_memory=2**24, kv_block_size=4)
    gen = torch.Generator().manual_seed(chunk)
    first = torch.randint(3, 96, (30,), generator=gen).tolist()
    table = BlockTable()
    _feed(engine, [table], [first], chunk)
    engine.pool.release(table, first)                # blocks 0-6 and the tail (28, 29) cached
    cases = {
        "extends it (a chat turn)": first + [5, 6, 7],
        "splits inside a block, after W": first[:22] + [9, 9, 9, 9],
        "splits before W": first[:6] + [11, 12],
        "shares nothing": [40] + first[1:10],
    }
    # to the token: whole blocks, then the leading slots of the block after them
    want_reuse = {"extends it (a chat turn)": 30, "splits inside a block, after W": 22,
                  "splits before W": 6, "shares nothing": 0}
    unrelated = torch.randint(3, 96, (17,), generator=gen).tolist()
    tables = [BlockTable() for _ in cases] + [BlockTable()]
    reused = [engine.pool.reuse(t, s) for t, s in zip(tables, cases.values())]
    assert dict(zip(cases, reused)) == want_reuse
    outs = _feed(engine, tables, [*cases.values(), unrelated], chunk)
    for (name, seq), n, out in zip(cases.items(), reused, outs):
        assert_close(out, hf_logits(model, seq)[n:], what=f"{name}, chunk {chunk}")
    assert_close(outs[-1], hf_logits(model, unrelated), what="unrelated row")
    for t in tables:
        engine.pool.release(t)
