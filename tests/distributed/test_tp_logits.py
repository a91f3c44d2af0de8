"""Tensor parallel over 2 processes (gloo, CPU) gives the single process's logits: float32
within 1e-5 of the logits' scale, from every weight format, for decode (chunk 1) and for a
pre-fill chunk longer than the window; int8/int4 within their kernels' rounding."""

from __future__ import annotations

import pytest
import torch
from tiny_models import hf_mistral, save_consolidated, save_gguf, save_hf
from tolerance import assert_close
from tp_helpers import tp_logits, tp_weights

import mistral7b
from mistral7b.distributed.tp import ROW_PARALLEL

W = 6
SEQ = 3 * W + 5
TP_FLOAT32 = 1e-5
CONFIGS = {  # name: (n_heads, n_kv_heads): GQA ratios 2 and 4
    "gqa2": (4, 2),
    "gqa4": (8, 2),
}


def _ids(vocab: int) -> list[int]:
    return torch.randint(0, vocab, (SEQ,), generator=torch.Generator().manual_seed(7)).tolist()


@pytest.fixture(scope="module", params=list(CONFIGS))
def case(request, tmp_path_factory):
    n_heads, n_kv = CONFIGS[request.param]
    model = hf_mistral(n_heads=n_heads, n_kv_heads=n_kv, head_dim=16, window=W, hidden=128,
                       seed=len(request.param) * 7 + n_heads)
    root = tmp_path_factory.mktemp(request.param)
    return root, {"hf": save_hf(model, root / "hf"),
                  "consolidated": save_consolidated(model, root / "consolidated"),
                  "gguf": save_gguf(model, root / "model.gguf")}


@pytest.mark.parametrize("fmt", ["hf", "consolidated", "gguf"])
def test_tp2_logits_equal_one_process(case, fmt):
    root, paths = case
    ids = _ids(96)
    one = mistral7b.load(paths[fmt], dtype="float32")
    got = tp_logits(paths[fmt], ids, [1, W + 1], root / f"{fmt}.pt")
    for chunk in (1, W + 1):
        want = one.logits(ids, chunk_size=chunk)
        assert_close(got[chunk], want, rel=TP_FLOAT32, what=f"{fmt} chunk {chunk}")


@pytest.mark.parametrize("quant", ["int8", "int4"])
def test_tp2_quantized_shards_are_the_single_process_weights(case, quant):
    if case[0].name.startswith("gqa2"):
        pytest.skip("the quantized cases run on the GQA-4 model (one set keeps this fast)")
    """Each rank's int8/int4 weights are exactly its part of the single process's: int4
    groups do not cross the cut (tp.py check_group_boundary), and the int8 shards of wo/w2
    take their whole rows' scales (tp_weights.py)."""
    root, paths = case
    one = mistral7b.load(paths["consolidated"], dtype="float32", quant=quant)
    shards = tp_weights(paths["consolidated"], quant, root / f"{quant}.weights")
    for name, module in one.model.named_modules():
        if not hasattr(module, "dequantize") or name == "output":
            continue
        whole = module.dequantize(torch.float32)
        dim = 1 if name.endswith(ROW_PARALLEL) else 0
        assert torch.equal(torch.cat([s[name] for s in shards], dim=dim), whole), name


@pytest.mark.parametrize("quant", ["int8", "int4"])
def test_tp2_quantized_logits_equal_one_process(case, quant):
    if case[0].name.startswith("gqa2"):
        pytest.skip("the quantized cases run on the GQA-4 model (one set keeps this fast)")
    """With the same weights, only the rounding of partial sums differs: each rank's wo/w2
    product is summed by the all-reduce, one process sums it in one pass (~1e-7 apart).
    PyTorch's int8 kernel, used where our kernels do not run, returns bf16
    (tests/quant/test_quant_layers.py: 2^-7 of |x||W| per product), each rank's partial sum
    rounded on its own. Our kernels round the activations to int8 per block of 32 (as
    llama.cpp's Q8_0 does), so a 1e-7 difference can move one activation across a rounding
    boundary: one step of max|x|/127 of its block, a jump of up to ~1% of the logits' scale.
    2^-5 of the logits' scale covers either through the two blocks; a wrong shard (a head or
    a group on the wrong rank) is off by the logits' whole scale."""
    root, paths = case
    ids = _ids(96)
    one = mistral7b.load(paths["consolidated"], dtype="float32", quant=quant)
    got = tp_logits(paths["consolidated"], ids, [1, W + 1], root / f"{quant}.pt", quant=quant)
    kernel = one.model.layers[0].attention.wo.kernel
    bound = 2**-5
    for chunk in (1, W + 1):
        want = one.logits(ids, chunk_size=chunk)
        assert_close(got[chunk], want, rel=bound, what=f"{quant} ({kernel}) chunk {chunk}")
