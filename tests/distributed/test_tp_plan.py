"""The shard math (distributed/tp.py) and the shard readers (tp_weights.py), in one process:
the ranks' slices tile every tensor, query heads find their kv heads locally, and each
format's reader hands out exactly its slice of what the whole reader gives."""

from __future__ import annotations

import itertools
import sys
from pathlib import Path

import gguf
import pytest
import torch
from tiny_models import hf_mistral, save_consolidated, save_gguf, save_hf
from tolerance import assert_close
from tp_helpers import finish, start_ranks, tp_logits

import mistral7b
from mistral7b.config import ModelConfig
from mistral7b.distributed.tp import TPPlan, check_group_boundary, valid_tp
from mistral7b.distributed.tp_weights import shard_reader
from mistral7b.errors import InputError, ModelFileError
from mistral7b.weights import open_checkpoint
from mistral7b.weights.names import expected_shapes

MISTRAL_7B = ModelConfig(dim=4096, n_layers=2, head_dim=128, hidden_dim=14336, n_heads=32,
                         n_kv_heads=8, norm_eps=1e-5, vocab_size=32000, rope_theta=1e4,
                         sliding_window=4096)


def test_valid_sizes_for_mistral_7b():
    assert valid_tp(MISTRAL_7B) == [2, 4, 8, 16, 32]


@pytest.mark.parametrize("tp", [2, 4, 8, 16, 32])
def test_the_ranks_slices_tile_every_tensor(tp):
    plans = [TPPlan(MISTRAL_7B, tp, r) for r in range(tp)]
    for name, shape in expected_shapes(MISTRAL_7B).items():
        parts = [p.part(name) for p in plans]
        if parts[0] is None:
            assert all(p is None for p in parts), name
            continue
        dim = parts[0][0]
        ranges = sorted({(lo, hi) for _, lo, hi in parts})   # replicated kv heads: once
        assert ranges[0][0] == 0 and ranges[-1][1] == shape[dim], name
        assert all(a[1] == b[0] for a, b in itertools.pairwise(ranges)), name
        local = expected_shapes(plans[0].local_config)[name]
        assert local == plans[0].local_shape(name, shape)


@pytest.mark.parametrize("tp", [2, 4, 8, 16, 32])
def test_query_heads_use_kv_heads_of_their_own_rank(tp):
    group = MISTRAL_7B.n_heads // MISTRAL_7B.n_kv_heads
    for rank in range(tp):
        plan = TPPlan(MISTRAL_7B, tp, rank)
        (q0, q1), (k0, k1) = plan.q_heads, plan.kv_heads
        assert all(k0 <= q // group < k1 for q in range(q0, q1))
        # and locally in the same order: local query head j uses local kv head j // G_local
        local = plan.local_config
        g_local = local.n_heads // local.n_kv_heads
        assert all((q // group) - k0 == (q - q0) // g_local for q in range(q0, q1))


def test_the_worked_example():
    plan = TPPlan(MISTRAL_7B, 2, 1)
    assert plan.q_heads == (16, 32) and plan.kv_heads == (4, 8) and plan.ffn == (7168, 14336)
    assert plan.part("layers.0.attention.wq.weight") == (0, 2048, 4096)
    assert plan.part("layers.0.attention.wk.weight") == (0, 512, 1024)
    assert plan.part("layers.0.attention.wo.weight") == (1, 2048, 4096)
    assert plan.part("layers.1.feed_forward.w2.weight") == (1, 7168, 14336)
    assert plan.part("tok_embeddings.weight") is None
    assert TPPlan(MISTRAL_7B, 16, 5).kv_heads == (2, 3)


@pytest.mark.parametrize("tp", [3, 5, 6, 64])
def test_a_tp_that_splits_no_heads_is_refused_naming_them(tp):
    with pytest.raises(InputError, match=r"n_heads=32, n_kv_heads=8.*\[2, 4, 8, 16, 32\]"):
        TPPlan(MISTRAL_7B, tp, 0)


def test_a_cut_inside_a_quantization_group_is_refused():
    config = MISTRAL_7B.with_(hidden_dim=96, n_heads=8, n_kv_heads=8)
    plan = TPPlan(config, 2, 0)
    with pytest.raises(InputError, match="not a multiple of the int4 group of 32"):
        check_group_boundary("layers.0.feed_forward.w2.weight", plan, 96, 32, "int4")
    check_group_boundary("layers.0.feed_forward.w2.weight", plan, 96, 16, "int4")


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    model = hf_mistral(n_heads=4, n_kv_heads=2, head_dim=16, hidden=128, window=6, seed=3)
    root = tmp_path_factory.mktemp("shards")
    w1 = model.model.layers[0].mlp.gate_proj.weight.detach().numpy()
    w2 = model.model.layers[1].mlp.down_proj.weight.detach().numpy()
    raw = {"blk.0.ffn_gate.weight": (gguf.quants.quantize(w1, gguf.GGMLQuantizationType.Q8_0),
                                     gguf.GGMLQuantizationType.Q8_0),
           "blk.1.ffn_down.weight": (gguf.quants.quantize(w2, gguf.GGMLQuantizationType.Q4_0),
                                     gguf.GGMLQuantizationType.Q4_0)}
    return {"hf": save_hf(model, root / "hf"),
            "consolidated": save_consolidated(model, root / "consolidated"),
            "gguf": save_gguf(model, root / "q.gguf", raw=raw)}


@pytest.mark.parametrize("fmt", ["hf", "consolidated", "gguf"])
def test_each_format_reads_exactly_the_slice(files, fmt):
    whole = open_checkpoint(files[fmt])
    for rank in range(2):
        plan = TPPlan(whole.config, 2, rank)
        shard = shard_reader(open_checkpoint(files[fmt]), plan)
        assert shard.config == plan.local_config
        for name in sorted(whole.names()):
            want = whole.tensor(name)
            part = plan.part(name)
            if part is not None:
                dim, lo, hi = part
                want = want.narrow(dim, lo, hi - lo)
            got = shard.tensor(name)
            assert shard.shape(name) == tuple(got.shape)
            assert torch.equal(got, want), (fmt, rank, name)


def test_gguf_columns_must_be_whole_blocks(files):
    reader = open_checkpoint(files["gguf"])
    with pytest.raises(ModelFileError, match="do not fall on its blocks of 32"):
        reader.raw_part("layers.1.feed_forward.w2.weight", 1, 0, 48)
    assert reader.raw_part("layers.1.feed_forward.w2.weight", 1, 64, 128).shape == (64, 64)


def test_load_with_tp_outside_torchrun_says_how_to_start_it(files):
    with pytest.raises(InputError, match="torchrun --nproc-per-node 2"):
        mistral7b.load(files["consolidated"], tp=2)


def test_ranks_that_open_different_files_refuse_to_start(files, tmp_path):
    models = [files["consolidated"], files["hf"]]
    here = Path(__file__).parent
    torch.save([1, 2, 3], str(tmp_path / "out") + ".ids")
    procs = start_ranks(lambda r: [sys.executable, str(here / "tp_rank.py"), "logits",
                                   str(models[r]), "none", str(tmp_path / "out"), "1"])
    for code, _, stderr in finish(procs):
        assert code != 0
        assert "opened a different model or options than rank 0" in stderr, stderr[-2000:]


def test_gguf_blocks_sharded_as_stored_give_the_single_process_logits(files, tmp_path):
    """int4 from a GGUF with Q8_0 and Q4_0 matrices: their blocks are sliced and copied as
    they are (row-parallel w2 in Q4_0 by whole blocks of each row), the F32 ones quantized
    in groups that the cut does not split."""
    ids = list(range(3, 20))
    one = mistral7b.load(files["gguf"], dtype="float32", quant="int4")
    got = tp_logits(files["gguf"], ids, [1, 7], tmp_path / "gguf.pt", quant="int4")
    for chunk in (1, 7):
        assert_close(got[chunk], one.logits(ids, chunk_size=chunk), rel=1e-5,
                     what=f"chunk {chunk}")
