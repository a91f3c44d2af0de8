"""Int8Linear / Int4Linear against float matmul, within error bounds derived from the
quantization step (no timings here: see bench/)."""

from __future__ import annotations

import pytest
import torch

from mistral7b.quant import Int4Linear, Int4Weight, Int8Linear, quantize_int4, quantize_int8
from mistral7b.quant.layers import int4_group_for, pack_nibbles


def _weights(out=96, n_in=256, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(out, n_in, generator=g) / n_in**0.5
    x = torch.randn(5, 3, n_in, generator=g)
    return w, x


def test_int8_weights_are_within_half_a_step():
    w, _ = _weights()
    q = quantize_int8(w)
    assert q.q.dtype == torch.int8 and q.q.abs().max() <= 127
    err = (q.dequantize() - w).abs()
    assert (err <= q.scale[:, None] / 2 + 1e-7).all()


@pytest.mark.parametrize("group", [32, 64, 128])
def test_int4_weights_are_within_half_a_step(group):
    w, _ = _weights()
    q = quantize_int4(w, group)
    assert q.q.dtype == torch.uint8 and q.q.shape == (96, 128)
    step = q.scale.repeat_interleave(group, dim=1)
    assert ((q.dequantize() - w).abs() <= step / 2 + 1e-6).all()
    # the group's min and max are on the grid (q = 0 and q = 15), up to the float16 rounding
    # of scale and min (2^-11 relative)
    g = w.view(96, -1, group)
    deq = q.dequantize().view(96, -1, group)
    torch.testing.assert_close(deq.amin(2), g.amin(2), rtol=2**-10, atol=1e-6)
    # the max lands within the scale's rounding up (15 steps of 2^-10 + 2^-11 relative)
    spread = g.amax(2) - g.amin(2)
    assert ((deq.amax(2) - g.amax(2)).abs() <= spread * 2**-9 + 1e-6).all()
    # scale and min are float16 values
    assert torch.equal(q.scale.half().float(), q.scale)
    assert torch.equal(q.min.half().float(), q.min)


def test_nibble_packing_order():
    q = torch.tensor([[1, 2, 15, 0]])
    assert pack_nibbles(q).tolist() == [[0x21, 0x0F]]
    w = Int4Weight(pack_nibbles(q), torch.ones(1, 1), torch.zeros(1, 1), 4)
    assert w.unpacked().tolist() == [[1, 2, 15, 0]]


def _rounding(layer, x, w):
    """How far the layer's own arithmetic may move y = x W^T, elementwise.

    Our kernel ("native") quantizes x to int8 per block of 32 (scale = max|x_block| / 127):
    each x moves by at most half that scale, so y by at most that times |W|, plus float32
    sums. PyTorch's kernels multiply in bf16 (8-bit mantissa): 2^-7 relative to |x| |W|.
    """
    x2 = x.float().reshape(-1, x.shape[-1])
    if layer.kernel == "native":
        amax = x2.abs().view(x2.shape[0], -1, 32).amax(dim=2, keepdim=True)
        half_step = (amax / 254).expand(-1, -1, 32).reshape(x2.shape)
        return half_step @ w.abs().t() + 1e-5 * (x2.abs() @ w.abs().t())
    return 2**-7 * (x2.abs() @ w.abs().t())


def _bound(x, w, step):
    """|x (W - Wq)^T| <= |x| (step / 2)^T elementwise: the quantization error's worst case."""
    return x.abs().reshape(-1, x.shape[-1]) @ (step / 2).t()


@pytest.mark.parametrize("batch", [5, 40])  # 15 rows: decode kernel; 120: widened to bf16
def test_int8_linear_vs_float_matmul(batch):
    w, _ = _weights()
    x = torch.randn(batch, 3, 256, generator=torch.Generator().manual_seed(1))
    q = quantize_int8(w)
    layer = Int8Linear(q, dtype=torch.float32)
    y = layer(x)
    assert y.shape == (batch, 3, 96) and y.dtype == torch.float32
    ref = x @ w.t()
    # the int8 step, plus the kernel's own rounding (_rounding)
    step = q.scale[:, None].expand_as(w)
    rounding = _rounding(layer, x, w)
    err = (y - ref).reshape(-1, 96).abs()
    assert (err <= _bound(x, w, step) + rounding).all()
    # and it is the matmul with its own dequantized weight, up to that rounding
    exact = x @ layer.dequantize(torch.float32).t()
    assert ((y - exact).reshape(-1, 96).abs() <= rounding).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("group", [32, 128])
def test_int4_linear_vs_float_matmul(dtype, group):
    w, x = _weights()
    q = quantize_int4(w, group)
    layer = Int4Linear(q, dtype=dtype)
    y = layer(x.to(dtype)).float()
    ref = x.to(dtype).float() @ w.t()
    step = q.scale.repeat_interleave(group, dim=1)
    # the int4 step, plus the kernel's own rounding (_rounding)
    rounding = _rounding(layer, x.to(dtype), w)
    err = (y - ref).reshape(-1, 96).abs()
    assert (err <= _bound(x, w, step) + rounding).all()
    exact = x.to(dtype).float() @ layer.dequantize(torch.float32).t()
    assert ((y - exact).reshape(-1, 96).abs() <= rounding).all()


def test_int4_linear_reads_back_its_weight():
    w, _ = _weights()
    q = quantize_int4(w, 32)
    layer = Int4Linear(q, dtype=torch.float32)
    want = q.dequantize()
    if layer.kernel == "native":  # float16 scale and min, held exactly
        assert torch.equal(layer.dequantize(), want)
    else:  # PyTorch's kernel holds bf16 scale/zero: the portable weight up to their rounding
        torch.testing.assert_close(layer.dequantize(), want, rtol=0,
                                   atol=float(want.abs().max()) * 2**-7)


def test_int4_group_falls_back_to_a_divisor():
    assert int4_group_for(4096, 128) == 128
    assert int4_group_for(576, 128) == 64     # SmolLM2's width
    assert int4_group_for(1536, 128) == 128
    with pytest.raises(ValueError):
        int4_group_for(100, 32)
