"""Logits through the rolling cache, every chunk size, every weight format == HF's full forward."""

from __future__ import annotations

import pytest
import torch
from tiny_models import hf_logits, hf_mistral, save_consolidated, save_gguf, save_hf
from tolerance import assert_close, rel_err

import mistral7b

W = 6
SEQ = 3 * W + 5  # longer than 3W: the rolling buffer wraps several times
CHUNKS = [1, 2, W - 1, W, W + 1, None, 4 * SEQ]

CONFIGS = {
    # name: (n_heads, n_kv_heads, head_dim, window, theta, tie)
    "gqa1-hd16": (4, 4, 16, W, 10000.0, False),
    "gqa2-hd16": (4, 2, 16, W, 10000.0, False),
    "gqa4-hd32": (8, 2, 32, W, 10000.0, False),
    "gqa4-hd16-nowindow": (8, 2, 16, None, 1e6, False),
    "gqa2-hd32-tied": (4, 2, 32, W, 10000.0, True),
}


@pytest.fixture(scope="module", params=list(CONFIGS))
def case(request, tmp_path_factory):
    n_heads, n_kv, head_dim, window, theta, tie = CONFIGS[request.param]
    model = hf_mistral(n_heads=n_heads, n_kv_heads=n_kv, head_dim=head_dim, window=window,
                       theta=theta, tie=tie, seed=hash(request.param) % 1000)
    ids = torch.randint(0, model.config.vocab_size, (SEQ,),
                        generator=torch.Generator().manual_seed(7)).tolist()
    root = tmp_path_factory.mktemp(request.param)
    paths = {
        "hf": save_hf(model, root / "hf"),
        "consolidated": save_consolidated(model, root / "consolidated"),
        "gguf": save_gguf(model, root / "model.gguf"),
    }
    return model, ids, hf_logits(model, ids), paths


@pytest.mark.parametrize("fmt", ["hf", "consolidated", "gguf"])
def test_logits_match_hf_for_every_chunk_size(case, fmt):
    model, ids, ref, paths = case
    llm = mistral7b.load(paths[fmt], device="cpu", dtype="float32")
    assert llm.config.sliding_window == model.config.sliding_window
    assert llm.config.n_kv_heads == model.config.num_key_value_heads
    for chunk in CHUNKS:
        out = llm.logits(ids, chunk_size=chunk)
        assert out.dtype == torch.float32
        assert_close(out, ref, what=f"{fmt} chunk_size={chunk}")


def test_window_matters_in_these_cases(case):
    """Guard: the test sequences are long enough that a wrong window would be caught."""
    model, ids, ref, _ = case
    if model.config.sliding_window is None:
        pytest.skip("no window")
    wider = hf_mistral(n_heads=model.config.num_attention_heads,
                       n_kv_heads=model.config.num_key_value_heads,
                       head_dim=model.config.head_dim, window=W + 1)
    wider.load_state_dict(model.state_dict())
    assert rel_err(hf_logits(wider, ids), ref) > 1e-2


def test_a_wrong_layout_or_rope_base_would_be_caught(case):
    """Guard: the bound is far below what a real mistake gives. q/k rows left in HF's
    half-split order (no un-permute) and a rope base off by 10x each miss by > 1e-2."""
    model, ids, ref, paths = case
    llm = mistral7b.load(paths["hf"], device="cpu", dtype="float32")
    hd = llm.config.head_dim
    to_hf = list(range(0, hd, 2)) + list(range(1, hd, 2))  # HF row r = our row to_hf[r]
    with torch.no_grad():
        for block in llm.model.layers:
            for lin in (block.attention.wq, block.attention.wk):
                w = lin.weight.view(-1, hd, lin.weight.shape[1])
                lin.weight.copy_(w[:, to_hf].reshape_as(lin.weight))
    assert rel_err(llm.logits(ids), ref) > 1e-2
    theta = model.config.rope_parameters["rope_theta"] if hasattr(
        model.config, "rope_parameters") else model.config.rope_theta
    other = hf_mistral(n_heads=model.config.num_attention_heads,
                       n_kv_heads=model.config.num_key_value_heads,
                       head_dim=model.config.head_dim, window=model.config.sliding_window,
                       theta=theta * 10, tie=model.config.tie_word_embeddings)
    other.load_state_dict(model.state_dict())
    assert rel_err(hf_logits(other, ids), ref) > 1e-2


def test_sharded_hf_and_pth_load_the_same(tmp_path):
    model = hf_mistral(n_heads=4, n_kv_heads=2, head_dim=16, window=W, seed=3)
    ids = list(range(1, SEQ + 1))
    ref = hf_logits(model, ids)
    sharded = save_hf(model, tmp_path / "sharded", max_shard_size="20KB")
    assert len(list(sharded.glob("model-*-of-*.safetensors"))) > 1
    pth = save_consolidated(model, tmp_path / "pth", fmt="pth")
    for path in (sharded, pth):
        out = mistral7b.load(path, dtype="float32").logits(ids, chunk_size=4)
        assert_close(out, ref, what=str(path))


def test_bfloat16_stays_close_to_float32(case):
    _, ids, ref, paths = case
    out = mistral7b.load(paths["hf"], dtype="bfloat16").logits(ids)
    assert out.dtype == torch.float32
    # bf16 weights+activations: a loose bound, but far below the logits' spread (std ~1.5)
    assert (out - ref).abs().mean().item() < 0.1
