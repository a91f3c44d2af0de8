"""Our int4/int8 CPU kernel (csrc/qmm.cpp) against its written rule, computed in float64.

The rule (native.py / qmm.cpp): activations are quantized per block of 32 to int8 with scale
max|x| / 127 and round-half-to-even; weights are w = d * q + m per group. So the kernel must
equal (dequantized activations) @ (dequantized weights)^T up to float32 summation.
"""

from __future__ import annotations

import pytest
import torch

from mistral7b.kernels import native
from mistral7b.quant.layers import quantize_int4, quantize_int8

pytestmark = pytest.mark.skipif(native.ops() is None,
                                reason="needs an x86 CPU with AVX2 and a C++ compiler")


def _activations_as_the_kernel_sees_them(x: torch.Tensor) -> torch.Tensor:
    blocks = x.view(x.shape[0], -1, 32)
    amax = blocks.abs().amax(-1, keepdim=True)
    # float32 division, as in C++ (torch's `127.0 / amax` multiplies by a reciprocal:
    # one ulp off for some amax, e.g. 2.59375)
    inv = torch.where(amax > 0, torch.full_like(amax, 127.0) / amax, torch.zeros_like(amax))
    q = torch.round(blocks * inv)                                        # half to even
    return (q.double() * (amax.double() / 127.0)).view_as(x)


def _close(y: torch.Tensor, want: torch.Tensor, x: torch.Tensor, w: torch.Tensor) -> None:
    slack = 1e-5 * (x.abs().double() @ w.abs().double().t()) + 1e-6
    assert ((y.double() - want).abs() <= slack).all(), float((y.double() - want).abs().max())


def _data(m, n, k, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(m, k, generator=g)
    x[0, :32] = 0.0           # an all-zero block (scale 0)
    x[-1, 5] = 40.0           # an outlier
    return x, torch.randn(n, k, generator=g) / k**0.5


@pytest.mark.parametrize(("m", "n", "k", "group"),
                         [(1, 16, 32, 32), (3, 48, 96, 32), (4, 32, 256, 64), (5, 32, 256, 128),
                          (9, 64, 256, 256), (17, 16, 128, 32),
                          # several tiles of rows over groups of panels (qmm.cpp panels_span);
                          # from 32 rows AVX2 takes Q4_0's form in assembly (qmm_avx2.h), the
                          # group's first tile unpacking for the rest, the last tile not full
                          (6, 336, 4096, 32), (37, 48, 512, 32), (34, 336, 4096, 32)])
@pytest.mark.parametrize("form", ["affine", "symmetric", "float32 scales"])
def test_int4_kernel_follows_its_rule(m, n, k, group, form):
    x, w = _data(m, n, k, seed=m * 7 + n)
    q = quantize_int4(w, group)
    scale, mins = q.scale, q.min
    if form == "symmetric":          # Q4_0's form: min = -8 scale, not stored
        mins = scale * -8.0
    if form == "float32 scales":     # Q4_K's d * sc products are not float16 values
        scale = scale * (1 + 2**-15)
    p = native.pack_int4(q.q, scale, mins, group, exact=True)
    assert (p.mins is None) == (form == "symmetric")
    assert p.scale.dtype == (torch.float32 if form == "float32 scales" else torch.float16)
    # w = d q + m in float32, as gguf's dequantizer computes it
    weights = (q.unpacked(torch.int32).float().view(n, -1, group) * scale[..., None]
               + mins[..., None]).view(n, k)
    assert torch.equal(p.dequantize(torch.float32), weights)
    _close(p.matmul(x), _activations_as_the_kernel_sees_them(x) @ weights.double().t(), x, w)


@pytest.mark.parametrize(("m", "n", "k"), [(1, 16, 32), (4, 48, 96), (7, 32, 512),
                                           (9, 208, 4096)])
def test_int8_kernel_follows_its_rule(m, n, k):
    x, w = _data(m, n, k, seed=m + n)
    q = quantize_int8(w)
    p = native.pack_int8(q.q, q.scale)
    weights = q.q.double() * q.scale.double()[:, None]
    assert torch.equal(p.dequantize(torch.float64), weights)
    _close(p.matmul(x), _activations_as_the_kernel_sees_them(x) @ weights.t(), x, w)


@pytest.mark.parametrize(("m", "n", "k"), [(1, 16, 64), (5, 48, 96), (9, 208, 4096)])
def test_int8_per_block_kernel_follows_its_rule(m, n, k):
    """Q8_0's form: a scale per block of 32 (the kernel takes the offset off in int32)."""
    x, w = _data(m, n, k, seed=m + n + 1)
    blocks = w.view(n, -1, 32)
    scale = (blocks.abs().amax(-1) / 127.0).half().float()          # Q8_0 keeps float16
    q = torch.round(blocks / scale[..., None]).clamp(-127, 127).to(torch.int8).view(n, k)
    p = native.pack_int8(q, scale)
    assert p.group == 32 and p.scale.dtype == torch.float16
    weights = (q.double().view(n, -1, 32) * scale.double()[..., None]).view(n, k)
    assert torch.equal(p.dequantize(torch.float64), weights)
    _close(p.matmul(x), _activations_as_the_kernel_sees_them(x) @ weights.t(), x, w)


def test_panels_hold_the_stored_values():
    g = torch.Generator().manual_seed(3)
    values = torch.randint(0, 16, (32, 64), generator=g, dtype=torch.uint8)
    packed = values[:, 0::2] | (values[:, 1::2] << 4)       # portable: low nibble first
    ones = torch.ones(32, 2)
    assert torch.equal(native.pack_int4(packed, ones, ones * 0, 32).values(), values)
    q8 = torch.randint(-127, 128, (16, 64), generator=g, dtype=torch.int8)
    stored = native.pack_int8(q8, torch.ones(16)).values()
    assert torch.equal(stored.to(torch.int16) - 128, q8.to(torch.int16))


def test_bad_shapes_are_refused():
    ops = native.ops()
    p = native.pack_int4(torch.zeros(16, 16, dtype=torch.uint8), torch.ones(16, 1),
                         torch.zeros(16, 1), 32)
    with pytest.raises(RuntimeError, match="float32"):
        ops.qmm(torch.zeros(1, 32, dtype=torch.float64), p.w, p.scale, p.mins, 4, 32, 8.0, 16)
    with pytest.raises(RuntimeError, match="contiguous bytes"):
        ops.qmm(torch.zeros(1, 32), p.w[:-1], p.scale, p.mins, 4, 32, 8.0, 16)
    with pytest.raises(RuntimeError, match="multiple of 16"):
        ops.pack4(torch.zeros(8, 16, dtype=torch.uint8))


@pytest.mark.parametrize("m", [5, 37])
@pytest.mark.parametrize("symmetric", [False, True])
def test_bfloat16_in_bfloat16_out(m, symmetric):
    x, w = _data(m, 48, 256, seed=11)
    xb = x.bfloat16()
    q = quantize_int4(w, 32)
    mins = q.scale * -8.0 if symmetric else q.min
    p = native.pack_int4(q.q, q.scale, mins, 32, exact=True)
    y = p.matmul(xb)
    assert y.dtype == torch.bfloat16
    weights = (q.unpacked(torch.int32).float().view(48, -1, 32) * q.scale[..., None]
               + mins[..., None]).view(48, 256)
    want = _activations_as_the_kernel_sees_them(xb.float()) @ weights.double().t()
    # float32 sums, then one rounding to bfloat16 (8 significant bits)
    slack = 1e-5 * (x.abs().double() @ w.abs().double().t()) + 2**-8 * want.abs() + 1e-6
    assert ((y.double() - want).abs() <= slack).all()
    # the same sums as from float32 x, rounded once
    assert torch.equal(y, p.matmul(xb.float()).bfloat16())


needs_bf16 = pytest.mark.skipif(native.ops() is None or not native.ops().has_bf16(),
                                reason="needs AVX-512 BF16")


@needs_bf16
@pytest.mark.parametrize(("m", "n", "k"), [(1, 16, 32), (2, 13, 96), (3, 9, 64), (4, 100, 512)])
def test_bf16_gemv_against_float64(m, n, k):
    g = torch.Generator().manual_seed(m * n)
    x = torch.randn(m, k, generator=g).bfloat16()
    w = torch.randn(n, k, generator=g).bfloat16()
    want = x.double() @ w.double().t()
    y = native.ops().bf16_gemv(x, w)
    assert y.dtype == torch.bfloat16 and y.shape == (m, n)
    slack = 2**-8 * want.abs() + 1e-5 * (x.double().abs() @ w.double().abs().t())
    assert ((y.double() - want).abs() <= slack).all()


@needs_bf16
def test_bf16_model_decodes_on_the_kernel_like_f_linear(tmp_path):
    from tiny_models import hf_mistral, save_hf

    import mistral7b
    from mistral7b.quant.layers import BF16Linear

    llm = mistral7b.load(save_hf(hf_mistral(seed=3, hidden=128), tmp_path / "m"),
                         dtype="bfloat16")
    wq = llm.model.layers[0].attention.wq
    assert isinstance(wq, BF16Linear) and isinstance(wq, torch.nn.Linear)
    assert llm.model.output.weight is llm.model.tok_embeddings.weight or \
        isinstance(llm.model.output, BF16Linear)
    ids = [1, 5, 9, 20, 7, 3, 11, 2]

    def one_token_steps():  # decode-sized steps: the kernel's case
        from mistral7b.cache import BlockTable

        table = BlockTable()
        out = torch.stack([llm.engine.step([table], [[t]])[0] for t in ids])
        llm.engine.pool.release(table)
        return out

    kernel_logits = one_token_steps()
    for module in llm.model.modules():
        if isinstance(module, BF16Linear):
            module.__class__ = torch.nn.Linear
    plain_logits = one_token_steps()
    # one bf16 rounding per product, differently ordered sums: close, not equal
    assert (kernel_logits - plain_logits).abs().max() <= 0.05 * plain_logits.abs().max()


def test_no_compiler_means_pytorch_kernels_and_a_warning(monkeypatch, caplog):
    from mistral7b.quant import Int4Linear

    monkeypatch.setattr(native, "_compiler", lambda: None)
    native.ops.cache_clear()
    try:
        with caplog.at_level("WARNING", logger="mistral7b.kernels.native"):
            assert native.ops() is None
        assert "no C++ compiler" in caplog.text
        layer = Int4Linear(quantize_int4(torch.randn(32, 64), 32), dtype=torch.float32)
        assert layer.kernel == "torch"
    finally:
        monkeypatch.undo()
        native.ops.cache_clear()
    assert native.ops() is not None


def test_ops_have_shape_only_versions_for_tracing():
    ops = native.ops()
    x = torch.empty(3, 64, device="meta")
    y = ops.qmm(x, torch.empty(32 * 32, dtype=torch.uint8, device="meta"),
                torch.empty(2, 2, 16, dtype=torch.float16, device="meta"), None, 4, 32, 8.0, 32)
    assert y.shape == (3, 32) and y.device.type == "meta"


@pytest.mark.parametrize("nbytes", [1000, (4 << 20) + 12345, 24 << 20])
def test_weight_memory_holds_what_was_copied(nbytes):
    """Panels are laid out in weight memory (pack.cpp weight_empty): PyTorch's allocator, or
    with MISTRAL7B_HUGE_PAGES=1 a mapping of their own whose whole 2 MiB pages are advised for
    huge pages. Either way the copy holds the bytes; a huge-page copy big enough to hold a
    2 MiB page starts on a 2 MiB boundary, and gives its pages back when dropped."""
    import os
    import subprocess
    import sys

    src = torch.randint(0, 256, (nbytes,), dtype=torch.uint8)
    assert torch.equal(native.ops().weight_copy(src), src)
    strided = torch.randn(300, 70).half().t()
    half = native.ops().weight_copy(strided)
    assert half.is_contiguous() and torch.equal(half, strided)
    code = (f"import torch; from mistral7b.kernels import native\n"
            f"src = torch.randint(0, 256, ({nbytes},), dtype=torch.uint8)\n"
            f"for _ in range(3):\n"
            f"    copy = native.ops().weight_copy(src)\n"
            f"    assert torch.equal(copy, src)\n"
            f"    assert {nbytes} < 4 << 20 or copy.data_ptr() % (2 << 20) == 0\n"
            f"    del copy\n"
            f"print('ok')")
    out = subprocess.run([sys.executable, "-c", code], check=False, capture_output=True,
                         text=True, env={**os.environ, "MISTRAL7B_HUGE_PAGES": "1"})
    assert out.stdout.strip() == "ok", out.stderr
