"""Our decode attention over the paged pool (kernels/csrc/attention.cpp) and RMSNorm
(kernels/csrc/norm.cpp) against their written rules computed in float64, and the model's
cached decode (which now runs on them) against its uncached forward."""

from __future__ import annotations

import math

import pytest
import torch

from mistral7b.kernels import native

pytestmark = pytest.mark.skipif(native.ops() is None,
                                reason="our kernel library does not run on this CPU")


def reference_attention(q, k, v, slots, mask):
    """q (B, H, D); k, v (KV, S, D); slots, mask (B, K) -> (B, H * D) in float64."""
    B, H, D = q.shape
    G = H // k.shape[0]
    out = torch.zeros(B, H, D, dtype=torch.float64)
    for b in range(B):
        seen = slots[b][mask[b]]
        for h in range(H):
            keys, values = k[h // G, seen].double(), v[h // G, seen].double()
            p = torch.softmax(keys @ q[b, h].double() / math.sqrt(D), dim=0)
            out[b, h] = p @ values
    return out.reshape(B, H * D)


@pytest.mark.parametrize("D,H,KV", [(16, 4, 2), (64, 9, 3), (128, 32, 8), (24, 6, 6)])
def test_paged_attention_follows_its_rule(D, H, KV):
    torch.manual_seed(D + H)
    S, B, K = 200, 3, 37
    q = torch.randn(B, H, D) * 2
    k, v = torch.randn(KV, S, D), torch.randn(KV, S, D)
    slots = torch.randint(0, S, (B, K))
    mask = torch.rand(B, K) < 0.7
    mask[:, 0] = True                      # every row sees at least one key
    mask[2] = True                         # and one sees them all
    got = native.ops().paged_attention(q, k, v, slots, 0, 0, mask)
    want = reference_attention(q, k, v, slots, mask)
    torch.testing.assert_close(got.double(), want, atol=2e-6, rtol=2e-5)
    # no mask: every key; a slot range instead of a gather (one row)
    every = torch.ones(B, K, dtype=torch.bool)
    torch.testing.assert_close(native.ops().paged_attention(q, k, v, slots, 0, 0, None).double(),
                               reference_attention(q, k, v, slots, every), atol=2e-6, rtol=2e-5)
    span = torch.arange(50, 50 + K)[None]
    torch.testing.assert_close(
        native.ops().paged_attention(q[:1], k, v, None, 50, 50 + K, None).double(),
        reference_attention(q[:1], k, v, span, every[:1]), atol=2e-6, rtol=2e-5)


@pytest.mark.parametrize("D,H,KV", [(16, 4, 2), (128, 32, 8)])
def test_paged_attention_over_a_bfloat16_pool_follows_its_rule(D, H, KV):
    """A bfloat16 pool (a quantized 7B's KV cache): keys and values widened exactly, every
    sum in float32, so the rule holds on the bfloat16 values as stored."""
    torch.manual_seed(D)
    S, B, K = 120, 3, 29
    q = torch.randn(B, H, D) * 2
    k = torch.randn(KV, S, D).to(torch.bfloat16)
    v = torch.randn(KV, S, D).to(torch.bfloat16)
    slots = torch.randint(0, S, (B, K))
    mask = torch.rand(B, K) < 0.7
    mask[:, 0] = True
    got = native.ops().paged_attention(q, k, v, slots, 0, 0, mask)
    assert got.dtype == torch.float32
    want = reference_attention(q, k.float(), v.float(), slots, mask)
    torch.testing.assert_close(got.double(), want, atol=2e-6, rtol=2e-5)


def test_paged_attention_rejects_what_would_read_outside_the_pool():
    q, k, v = torch.randn(1, 4, 16), torch.randn(2, 10, 16), torch.randn(2, 10, 16)
    with pytest.raises(RuntimeError, match="slot out of range"):
        native.ops().paged_attention(q, k, v, torch.tensor([[3, 10]]), 0, 0, None)
    with pytest.raises(RuntimeError, match="slot range"):
        native.ops().paged_attention(q, k, v, None, 5, 11, None)


def test_exp_of_large_negative_scores_is_zero_not_nan():
    # scores far below the row's maximum: weights underflow to 0, the output is the top value
    q = torch.zeros(1, 1, 16)
    q[0, 0, 0] = 400.0
    k = torch.zeros(1, 4, 16)
    k[0, 1, 0] = 1.0                       # score 100 (after 1/sqrt(16)); the others 0
    v = torch.arange(64, dtype=torch.float32).view(1, 4, 16)
    out = native.ops().paged_attention(q, k, v, torch.tensor([[0, 1, 2, 3]]), 0, 0, None)
    torch.testing.assert_close(out[0], v[0, 1])


@pytest.mark.parametrize("D", [16, 64, 576, 4096, 100])
def test_rms_norm_follows_its_rule(D):
    torch.manual_seed(D)
    x, w = torch.randn(5, 3, D) * 3, torch.rand(D) + 0.5
    got = native.ops().rms_norm(x, w, 1e-5)
    xd = x.double()
    want = xd / torch.sqrt(xd.pow(2).mean(-1, keepdim=True) + 1e-5) * w.double()
    torch.testing.assert_close(got.double(), want, atol=1e-6, rtol=1e-6)


def test_cached_decode_equals_the_uncached_forward():
    """The model's decode steps (paged attention, our RMSNorm) against one uncached forward
    over the whole sequence (SDPA, the same norm), past a window of 8."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).parent))
    from test_fused_step import tiny

    from mistral7b.attention_plan import uncached_plan
    from mistral7b.cache import BlockTable
    from mistral7b.engine import Engine

    model = tiny(None, window=8)
    eng = Engine(model, model.config, kv_cache_memory=2**22, kv_block_size=4)
    eng.use_fused_step = False
    ids = [1, 4, 9, 16, 25, 36, 49, 64, 81, 3, 5, 7, 11, 13, 17, 19, 23, 29, 31, 37]
    table = BlockTable()
    cached = [eng.step([table], [ids[:3]])[0]] + [eng.step([table], [[t]])[0] for t in ids[3:]]
    with torch.inference_mode():
        plan, positions = uncached_plan([len(ids)], 8)
        full = model(torch.tensor([ids]), positions, None, plan)[0]
    torch.testing.assert_close(torch.stack(cached), full[2:], atol=1e-5, rtol=1e-5)
