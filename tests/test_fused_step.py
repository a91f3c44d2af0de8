"""The fused decode step (fused_step.py, kernels/csrc/step.cpp) against the eager step.

Invariant: fused = eager. Both compute every number with the same kernels on the same shapes,
so the logits are equal to the bit (the issue asks float32 within 1e-5 and, for quantized
weights, identical greedy ids over 64 tokens: equality implies both). Checked on ragged
batches under a window shorter than the sequences (the paged keys wrap past it), in float32,
int8, int4 and the K-quants; after a module or a parameter is swapped; and where the step
must not apply.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from tiny_models import random_k_blocks
from torch import nn

from mistral7b.attention_plan import PAGED_MAX_T
from mistral7b.batch import run_batch
from mistral7b.cache import BlockTable
from mistral7b.config import ModelConfig
from mistral7b.engine import Engine
from mistral7b.fused_step import _LINEARS, FusedDecode
from mistral7b.kernels import native
from mistral7b.model import Transformer
from mistral7b.modules import set_parameter, swap_module
from mistral7b.quant.klinear import KQuantLinear
from mistral7b.quant.load import quantize_model
from mistral7b.sampling import SamplingParams
from mistral7b.sequence import GenerationStats

pytestmark = pytest.mark.skipif(native.ops() is None,
                                reason="our kernel library does not run on this CPU")

WINDOW = 16
# ragged: 5, 11 and 23 tokens; prompt + 64 new tokens runs far past the window of 16
PROMPTS = [[1, 5, 9, 13, 17], [1] + list(range(30, 40)), [1] + [7, 8, 9, 10, 11, 12] * 3 + [3] * 4]


def tiny(quant: str | None, window: int | None = WINDOW, seed: int = 0) -> Transformer:
    """`quant` None, "int8", "int4" or "kquant" (GGUF Q4_K / Q5_K / Q6_K blocks on their own
    bits, kernels/csrc/kquant.cpp); "int8/bf16", "int4/bf16" or "kquant/bf16": those weights over a
    bfloat16 embedding table and KV cache, computing in float32 (what load() makes of a big
    quantized model on the CPU: Transformer.compute_in_float32)."""
    quant, _, table = (quant or "").partition("/")
    model = _tiny(quant or None, window, seed)
    if table == "bf16":
        model.tok_embeddings.to(torch.bfloat16)
        for layer in model.layers:            # as loaded in bfloat16, then widened
            for norm in (layer.attention_norm, layer.ffn_norm):
                norm.weight.data = norm.weight.data.to(torch.bfloat16)
        model.compute_in_float32()
    return model


def _tiny(quant: str | None, window: int | None, seed: int) -> Transformer:
    # shapes our int4/int8 kernel takes: outputs a multiple of 16, inputs of 32 (K-quants: 256)
    wide = quant == "kquant"
    config = ModelConfig(dim=256 if wide else 64, n_layers=2, head_dim=64 if wide else 16,
                         hidden_dim=256 if wide else 96, n_heads=4, n_kv_heads=2, norm_eps=1e-5,
                         vocab_size=96, rope_theta=10000.0, sliding_window=window,
                         max_seq_len=256)
    torch.manual_seed(seed)
    model = Transformer(config).float().eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.3)
        for layer in model.layers:   # norms away from 1, so a wrong norm weight shows
            layer.attention_norm.weight.uniform_(0.5, 1.5)
            layer.ffn_norm.weight.uniform_(0.5, 1.5)
    if wide:
        _k_quantize(model, seed)
    elif quant is not None:
        quantize_model(model, quant, group=32)
    return model


def _k_quantize(model: Transformer, seed: int) -> None:
    """Every linear of every layer a random K-quant weight, the three kinds in turn."""
    rng = np.random.default_rng(seed)
    kinds = ["Q4_K", "Q5_K", "Q6_K"]
    for i, layer in enumerate(model.layers):
        for j, (part, name) in enumerate(_LINEARS):
            lin = getattr(getattr(layer, part), name)
            kind = kinds[(i + j) % 3]
            blocks = random_k_blocks(kind, lin.out_features, lin.in_features, rng, (2e-4, 8e-4))
            panels = native.gguf_kpanels(kind, torch.from_numpy(blocks), lin.out_features,
                                         lin.in_features)
            assert panels is not None
            setattr(getattr(layer, part), name, KQuantLinear.from_kpanels(panels,
                                                                          dtype=torch.float32))


class NoText:
    """The scheduler's per-sequence detokenizer, for a model without a tokenizer."""

    def push(self, token: int) -> str:
        return ""

    def flush(self) -> str:
        return ""


def engine(model: Transformer, fused: bool) -> Engine:
    eng = Engine(model, model.config, kv_cache_memory=2**22, kv_block_size=4)
    eng.use_fused_step = fused
    return eng


def greedy_steps(eng: Engine, n: int, feed: list[list[int]] | None = None):
    """Pre-fill PROMPTS, then n one-token steps of the whole batch; yields each step's logits.
    With `feed`, step i feeds feed[i] (so two engines get the same tokens)."""
    tables = [BlockTable() for _ in PROMPTS]
    logits = torch.stack([eng.step([t], [p])[0] for t, p in zip(tables, PROMPTS)])
    for i in range(n):
        tokens = feed[i] if feed is not None else logits.argmax(-1).tolist()
        logits = eng.step(tables, [[t] for t in tokens])
        yield tokens, logits


@pytest.mark.parametrize("quant", [None, "int8", "int4", "int8/bf16", "int4/bf16", "kquant",
                                   "kquant/bf16"])
def test_fused_logits_equal_eager_on_a_ragged_batch_past_the_window(quant, monkeypatch):
    model = tiny(quant)
    fused_eng, eager_eng = engine(model, True), engine(model, False)
    calls = []
    real_call = FusedDecode.__call__
    monkeypatch.setattr(FusedDecode, "__call__",
                        lambda self, *a, **k: calls.append(1) or real_call(self, *a, **k))
    fed, fused_logits = zip(*greedy_steps(fused_eng, 64))
    eager_logits = [lg for _, lg in greedy_steps(eager_eng, 64, feed=list(fed))]
    # every decode step went through it, and the pre-fills short enough (<= 16 tokens)
    assert len(calls) == 64 + sum(len(p) <= PAGED_MAX_T for p in PROMPTS)
    for a, b in zip(fused_logits, eager_logits):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0)   # the bound ...
        assert torch.equal(a, b)                               # ... and what we claim


@pytest.mark.parametrize("quant", ["int4", "int8", "int4/bf16", "kquant/bf16"])
def test_quantized_greedy_ids_are_identical_over_64_tokens(quant):
    model = tiny(quant)
    params = [SamplingParams(max_tokens=64, temperature=0.0)] * len(PROMPTS)

    def ids(fused: bool) -> dict[int, list[int]]:
        out: dict[int, list[int]] = {i: [] for i in range(len(PROMPTS))}
        for i, o in run_batch(engine(model, fused), PROMPTS, params, stop_ids=frozenset(),
                              new_decoder=NoText):
            if o.token_id is not None:
                out[i].append(o.token_id)
        return out

    fused, eager = ids(True), ids(False)
    assert all(len(v) == 64 for v in fused.values())
    assert fused == eager


def test_without_a_window_and_a_single_row_whose_keys_are_one_slot_range():
    model = tiny("int4", window=None)
    a, b = engine(model, True), engine(model, False)
    for eng in (a, b):
        eng.pool  # noqa: B018 (made now: both pools hand out the same blocks)
    ta, tb = BlockTable(), BlockTable()
    la, lb = a.step([ta], [PROMPTS[2]]), b.step([tb], [PROMPTS[2]])
    for _ in range(40):
        tok = int(la[0].argmax())
        la, lb = a.step([ta], [[tok]]), b.step([tb], [[tok]])
        assert torch.equal(la, lb)
    plan, _ = a.pool.plan([ta], [1])          # in order: the keys are a view of the pool
    assert plan.view is not None


def test_a_swapped_module_or_parameter_is_used_at_the_next_step():
    model, other = tiny("int4"), tiny("int4", seed=1)
    fused_eng, eager_eng = engine(model, True), engine(model, False)
    first = fused_eng.fused_step()
    assert first is not None
    swap_module(model, "layers.1.feed_forward.w2", other.layers[1].feed_forward.w2)
    set_parameter(model, "layers.0.attention_norm.weight",
                  other.layers[0].attention_norm.weight.detach().clone())
    rebuilt = fused_eng.fused_step()
    assert rebuilt is not None and rebuilt is not first
    fed, fused_logits = zip(*greedy_steps(fused_eng, 8))
    eager_logits = [lg for _, lg in greedy_steps(eager_eng, 8, feed=list(fed))]
    assert all(torch.equal(a, b) for a, b in zip(fused_logits, eager_logits))


def test_it_stands_aside_where_it_does_not_apply():
    model = tiny("int4")
    eng = engine(model, True)
    assert eng.fused_step() is not None
    engine_off = engine(model, False)
    assert engine_off.fused_step() is None

    class Wrapped(nn.Module):                  # e.g. a LoRA layer around the base
        def __init__(self, base):
            super().__init__()
            self.base = base

        def forward(self, x):
            return self.base(x)

    swap_module(model, "layers.0.attention.wq", Wrapped(model.layers[0].attention.wq))
    assert eng.fused_step() is None            # eager from now on, and still right
    table = BlockTable()
    eng.step([table], [PROMPTS[0]])
    eng.step([table], [[3]])

    bf16 = tiny(None).to(torch.bfloat16)
    assert engine(bf16, True).fused_step() is None


def test_a_hook_anywhere_means_the_eager_path():
    """Tensor parallel sums row-parallel products in forward hooks: a step that skipped them
    would be wrong, so any hook (added before or after the stack was built) turns it off."""
    model = tiny("int4")
    eng = engine(model, True)
    assert eng.fused_step() is not None
    seen = []
    handle = model.layers[1].attention.wo.register_forward_hook(lambda *a: seen.append(1))
    assert eng.fused_step() is None
    table = BlockTable()
    eng.step([table], [PROMPTS[0]])
    eng.step([table], [[3]])
    assert len(seen) == 2                       # the hook ran for the pre-fill and the decode
    handle.remove()
    eng.forget_stale_prefixes()                 # what every generate call starts with
    assert eng.fused_step() is not None


@pytest.mark.parametrize("fused", [True, False])
def test_int4_speculative_greedy_equals_plain_greedy(fused):
    """End to end on the scheduler: drafting changes no greedy id with int4 weights (the
    bit-level reason: test_a_verification_step_computes_what_decode_steps_do_to_the_bit)."""
    model = tiny("int4")
    params = [SamplingParams(max_tokens=48, temperature=0.0)] * len(PROMPTS)
    stats = GenerationStats()

    def ids(speculate: int) -> dict[int, list[int]]:
        out: dict[int, list[int]] = {i: [] for i in range(len(PROMPTS))}
        for i, o in run_batch(engine(model, fused), PROMPTS, params, stop_ids=frozenset(),
                              new_decoder=NoText, speculate=speculate,
                              stats=stats if speculate else None):
            if o.token_id is not None:
                out[i].append(o.token_id)
        return out

    assert ids(4) == ids(0)
    assert stats.draft_tokens > 0 and stats.accepted_tokens > 0   # it did speculate


@pytest.mark.parametrize("quant", [None, "int8", "int4"])
@pytest.mark.parametrize("fused", [True, False])
def test_a_verification_step_computes_what_decode_steps_do_to_the_bit(quant, fused):
    """Feeding [x, d1, d2, d3, d4] in one step gives, position by position, the logits of
    feeding them one step at a time, for every row of a ragged batch past the window: to the
    bit with our int4/int8 kernel (each row's products are its own). Float products go
    through PyTorch's matmul, whose rounding depends on the number of rows: within 1e-5."""
    model = tiny(quant)
    eng = engine(model, fused)
    chunk_tables = [BlockTable() for _ in PROMPTS]
    step_tables = [BlockTable() for _ in PROMPTS]
    for tables in (chunk_tables, step_tables):
        for t, p in zip(tables, PROMPTS):
            eng.step([t], [p])
    drafts = [[3, 9, 27, 81, 50], [4, 4, 4], [60, 61, 62, 63]]          # ragged: 5, 3, 4
    together = eng.step(chunk_tables, drafts, all_logits=True)
    for i in range(max(map(len, drafts))):
        rows = [b for b, d in enumerate(drafts) if i < len(d)]
        one = eng.step([step_tables[b] for b in rows], [[drafts[b][i]] for b in rows])
        for j, b in enumerate(rows):
            if quant is None:
                torch.testing.assert_close(together[b, i], one[j], atol=1e-5, rtol=1e-5)
            else:
                assert torch.equal(together[b, i], one[j]), (b, i)


def test_weights_changed_in_place_or_through_data_are_seen():
    for quant in (None, "int4"):
        model, other = tiny(quant), tiny(quant, seed=1)
        fused_eng, eager_eng = engine(model, True), engine(model, False)
        assert fused_eng.fused_step() is not None
        with torch.no_grad():
            model.layers[0].ffn_norm.weight.mul_(1.5)                            # in place
            model.layers[1].attention_norm.weight.data = torch.rand(64) + 0.5    # new storage
            if quant is None:
                model.layers[0].attention.wq.weight.data = other.layers[0].attention.wq.weight
        fed, fused_logits = zip(*greedy_steps(fused_eng, 4))
        eager_logits = [lg for _, lg in greedy_steps(eager_eng, 4, feed=list(fed))]
        assert all(torch.equal(a, b) for a, b in zip(fused_logits, eager_logits))
