"""GGUF K-quants (Q4_K, Q5_K, Q6_K) on their own bits (kernels/csrc/kquant.cpp,
quant/klinear.py): the repack holds gguf's dequantized weights bit for bit, the kernel equals
its written rule in float64, a quantized load of a K-quant file runs them (fused step
included) at the file's size, and a layer moved elsewhere keeps its weights."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from tiny_models import k_quant_gguf, random_k_blocks

import mistral7b
from mistral7b.fused_step import FusedDecode
from mistral7b.kernels import native
from mistral7b.quant import Int4Linear, Int8Linear
from mistral7b.quant.klinear import KQuantLinear
from mistral7b.quant.qembedding import QuantEmbedding
from mistral7b.weights import open_checkpoint

gguf = pytest.importorskip("gguf")
pytestmark = pytest.mark.skipif(native.ops() is None,
                                reason="needs an x86 CPU with AVX2 and a C++ compiler")
KINDS = ["Q4_K", "Q5_K", "Q6_K"]
BITS = {"Q4_K": 4.5, "Q5_K": 5.5, "Q6_K": 6.5625}     # the file's bits per weight


def _panels(kind: str, rows: int, cols: int, seed: int = 0):
    blocks = random_k_blocks(kind, rows, cols, np.random.default_rng(seed))
    want = gguf.quants.dequantize(blocks, gguf.GGMLQuantizationType[kind]).reshape(rows, cols)
    p = native.gguf_kpanels(kind, torch.from_numpy(blocks), rows, cols)
    assert p is not None
    return p, torch.from_numpy(want)


@pytest.mark.parametrize("kind", KINDS)
def test_the_repack_holds_ggufs_weights_bit_for_bit(kind):
    p, want = _panels(kind, 48, 768)
    blocks = random_k_blocks(kind, 48, 768, np.random.default_rng(0))   # _panels' blocks
    assert torch.equal(native.gguf_dequantize(kind, torch.from_numpy(blocks).reshape(-1), 48,
                                              768), want)
    assert p.kind == kind and p.bits == int(kind[1])
    assert torch.equal(p.dequantize(torch.float32), want)     # gguf-py's own arithmetic
    assert int(p.values().max()) < 2 ** p.bits
    assert p.nbytes * 8 == 48 * 768 * BITS[kind]                 # the file's bits, no more


def _activations_as_the_kernel_sees_them(x: torch.Tensor) -> torch.Tensor:
    # int8 with one scale per super-block of 256 inputs (ggml's Q8_K, what llama.cpp
    # multiplies K-quants by), max|x| / 127, rounded to nearest even
    blocks = x.view(x.shape[0], -1, 256)
    amax = blocks.abs().amax(-1, keepdim=True)
    inv = torch.where(amax > 0, torch.full_like(amax, 127.0) / amax, torch.zeros_like(amax))
    return (torch.round(blocks * inv).double() * (amax.double() / 127.0)).view_as(x)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize(("m", "n", "k"), [(1, 32, 512), (2, 32, 512), (3, 32, 512),
                                           (4, 32, 512), (5, 32, 512), (8, 32, 512),
                                           (9, 32, 512), (15, 32, 512),
                                           # tiles of rows over groups of panels (kspan)
                                           (6, 144, 4096)])
def test_the_kernel_follows_its_rule(kind, m, n, k):
    p, w = _panels(kind, n, k, seed=m)
    g = torch.Generator().manual_seed(m)
    x = torch.randn(m, k, generator=g)
    x[0, :256] = 0.0         # an all-zero super-block (scale 0)
    x[-1, 300] = 40.0        # an outlier
    want = _activations_as_the_kernel_sees_them(x) @ w.double().t()
    slack = 1e-5 * (x.abs().double() @ w.abs().double().t()) + 1e-6
    got = p.matmul(x)
    assert ((got.double() - want).abs() <= slack).all(), float((got.double() - want).abs().max())


@pytest.mark.parametrize("kind", KINDS)
def test_a_row_gets_the_same_bits_in_any_batch(kind):
    # pre-fill (block factors, and Q5_K / Q6_K values, unpacked once for tiles of 8 rows)
    # against decode (one row, all unpacked in registers): batched = alone, bit for bit
    p, _ = _panels(kind, 144, 4096, seed=3)
    x = torch.randn(19, 4096, generator=torch.Generator().manual_seed(3))
    whole = p.matmul(x)
    for i in (0, 7, 8, 18):
        assert torch.equal(whole[i: i + 1], p.matmul(x[i: i + 1])), i
    assert torch.equal(whole[16:], p.matmul(x[16:]))


def test_bad_k_quant_input_is_refused():
    p, _ = _panels("Q6_K", 16, 256)
    ops = native.ops()
    with pytest.raises(RuntimeError, match="float32"):
        p.matmul(torch.randn(2, 256, dtype=torch.float64))
    with pytest.raises(RuntimeError, match="multiple of 16, K of 256"):
        ops.kqmm(torch.randn(1, 128), p.w, p.scale, p.d, None, 6, 16, 16)
    with pytest.raises(RuntimeError, match="super-blocks"):
        ops.gguf_kpanels(torch.zeros(100, dtype=torch.uint8), 14, 16, 256)
    # a block whose d is not finite: no panels (the loader's checked path reports the file)
    blocks = random_k_blocks("Q4_K", 16, 256, np.random.default_rng(0))
    blocks[3, 0:2] = np.array([np.inf], dtype=np.float16).view(np.uint8)
    assert native.gguf_kpanels("Q4_K", torch.from_numpy(blocks), 16, 256) is None


def test_a_quantized_load_runs_k_quants_on_their_bits(tmp_path):
    path, raw = k_quant_gguf(tmp_path / "k.gguf")
    llm = mistral7b.load(path, quant="auto", dtype="float32")
    reader = open_checkpoint(path)
    held = 0
    for i, layer in enumerate(llm.model.layers):
        for parent, attr, ours in [(layer.attention, "wq", "attention.wq"),
                                   (layer.attention, "wv", "attention.wv"),
                                   (layer.feed_forward, "w3", "feed_forward.w3"),
                                   (layer.feed_forward, "w2", "feed_forward.w2")]:
            lin = getattr(parent, attr)
            assert isinstance(lin, KQuantLinear), type(lin)
            want = reader.tensor(f"layers.{i}.{ours}.weight")
            assert torch.equal(lin.dequantize(torch.float32), want)
            x = torch.randn(3, 256)
            rule = _activations_as_the_kernel_sees_them(x) @ want.double().t()
            slack = 1e-5 * (x.abs().double() @ want.abs().double().t()) + 1e-6
            assert ((lin(x).double() - rule).abs() <= slack).all()
        held += sum(t.nbytes for t in layer.buffers())
    file_bytes = sum(blocks.nbytes for name, (blocks, _) in raw.items() if name != "token_embd.weight")
    assert held == file_bytes   # the file's size, not widened
    # decode goes through the fused step, and equals the eager one to the bit
    assert FusedDecode.build(llm.model) is not None
    ids = list(range(3, 30))
    fused = llm.logits(ids)
    llm.engine.use_fused_step = False
    assert torch.equal(llm.logits(ids), fused)


def test_int8_mode_and_a_move_keep_the_weights(tmp_path):
    path, _ = k_quant_gguf(tmp_path / "k.gguf")
    reader = open_checkpoint(path)
    want = reader.tensor("layers.0.attention.wq.weight")          # Q4_K
    llm = mistral7b.load(path, quant="auto", dtype="float32")
    lin = llm.model.layers[0].attention.wq
    # Q4_K's portable form is int4 with float32 scales: the same weights exactly
    assert torch.equal(lin.portable().dequantize(torch.float32), want)
    six = llm.model.layers[0].attention.wv                         # Q6_K: int8 elsewhere
    w6 = six.dequantize(torch.float32)
    step = six.portable().scale[:, None]
    assert ((six.portable().dequantize(torch.float32) - w6).abs() <= step / 2 + 1e-7).all()
    # a move to another device rebuilds the int4 / int8 layer there: here the meta device
    lin.to("meta")
    assert isinstance(lin, Int4Linear) and lin.qweight.device.type == "meta"
    # int8 asked for: K-quants are dequantized and requantized, as before
    llm8 = mistral7b.load(path, quant="int8", dtype="float32")
    assert isinstance(llm8.model.layers[0].attention.wq, Int8Linear)


def test_the_table_stays_in_its_blocks_and_gives_the_same_rows(tmp_path):
    path, raw = k_quant_gguf(tmp_path / "k.gguf")
    llm = mistral7b.load(path, quant="auto", dtype="bfloat16")   # computing in float32
    emb = llm.model.tok_embeddings
    assert isinstance(emb, QuantEmbedding) and emb.blocks.nbytes == raw["token_embd.weight"][0].nbytes
    want = open_checkpoint(path).tensor_as("tok_embeddings.weight", torch.bfloat16)
    ids = torch.tensor([[0, 5, 127], [64, 64, 1]])
    assert torch.equal(emb(ids), want[ids])
    assert torch.equal(emb.weight, want)
    assert llm.engine.dtype == torch.bfloat16          # the KV cache follows the table's dtype
    with pytest.raises(IndexError):
        emb(torch.tensor([128]))
    # the same model over the dequantized table computes the same logits, to the bit
    tokens = list(range(3, 30))
    kept = llm.logits(tokens)
    llm.model.tok_embeddings = torch.nn.Embedding(128, 256, _weight=want)
    assert torch.equal(llm.logits(tokens), kept)
