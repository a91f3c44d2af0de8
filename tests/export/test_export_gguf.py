"""`--to gguf`: f16 files load back in mistral7b and in transformers' GGUF loader with the
logits of the model rounded to f16; q8_0 / q4_0 blocks are gguf's own quantization of the
merged weights, and every reader dequantizes them alike."""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest
import torch
from export_helpers import load32, random_adapter
from tolerance import assert_close

from mistral7b.exporter import export
from mistral7b.weights.names import format_name

PROMPT_IDS = [1, 1091, 1117, 1040, 6333, 1070, 5611, 1093, 29491, 1183, 4115, 1136]


def _f16_rounded(llm):
    """Our float32 model with every matrix rounded to f16 (norms stay float32, as GGUF
    keeps them): the model an F16 GGUF holds."""
    with torch.no_grad():
        for name, p in llm.model.named_parameters():
            if p.dim() == 2:
                p.copy_(p.half().float())
    return llm


def _gguf_tensors(path):
    """name -> (type name, dequantized float32 (rows, cols), raw data) by the gguf package's
    own reader and dequantizer (the outside reference)."""
    import gguf

    reader = gguf.GGUFReader(str(path))
    out = {}
    for t in reader.tensors:
        floats = gguf.quants.dequantize(t.data, t.tensor_type)
        out[t.name] = (t.tensor_type.name, np.asarray(floats, np.float32), t.data)
    return out


def test_f16_gguf_loads_in_mistral7b_and_transformers(v3_folder, tmp_path):
    from transformers import AutoModelForCausalLM

    adapter = random_adapter(v3_folder, tmp_path / "adapter", seed=4)
    want = _f16_rounded(load32(v3_folder, lora=adapter)).logits(PROMPT_IDS)
    out = export(v3_folder, to="gguf", type="f16", out=tmp_path / "m.gguf", lora=adapter,
                 progress=False)
    ours = load32(out)
    assert_close(ours.logits(PROMPT_IDS), want, what="mistral7b on the F16 GGUF")
    hf = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file=out.name,
                                              dtype=torch.float32).eval()
    with torch.no_grad():
        theirs = hf(torch.tensor([PROMPT_IDS])).logits[0]
    assert (theirs - want).abs().max().item() <= 1e-4
    source = load32(v3_folder).config          # GGUF stores epsilon as a float32
    assert ours.config.norm_eps == pytest.approx(source.norm_eps, rel=1e-6)
    assert ours.config.with_(norm_eps=source.norm_eps) == source


@pytest.mark.parametrize("kind", ["q8_0", "q4_0"])
def test_quantized_blocks_are_ggufs_own(v3_folder, tmp_path, kind, capsys):
    import gguf

    out = export(v3_folder, to="gguf", type=kind, out=tmp_path / "m.gguf", progress=False)
    src = load32(v3_folder)
    weights = {format_name(n, "gguf"): p.detach() for n, p in src.model.state_dict().items()
               if n in src.model.state_dict() and not n.startswith("rope")}
    tensors = _gguf_tensors(out)
    qtype = gguf.GGMLQuantizationType[kind.upper()]
    # hidden_dim 80 is not whole blocks of 32: ffn_down rows fall back to F16 and say so
    assert "kept in F16" in capsys.readouterr().err
    from mistral7b.weights import open_checkpoint

    reader = open_checkpoint(out)
    for name, (type_name, floats, data) in tensors.items():
        w = weights[name].float().numpy()
        if w.ndim == 1:
            assert type_name == "F32" and np.array_equal(floats.reshape(w.shape), w)
        elif w.shape[1] % 32:
            assert type_name == "F16"
        else:
            assert type_name == kind.upper()
            # the blocks are gguf's quantization of the weights, bit for bit
            assert np.array_equal(np.asarray(data).reshape(-1),
                                  gguf.quants.quantize(w, qtype).reshape(-1))
        ours_name = {format_name(n, "gguf"): n for n in reader.names()}[name]
        assert torch.equal(reader.tensor(ours_name).float().reshape(-1),
                           torch.from_numpy(floats.reshape(-1).copy())), name


@pytest.mark.parametrize("kind", ["q8_0", "q4_0"])
def test_quantized_gguf_runs_on_its_own_blocks(v3_blocks_folder, tmp_path, kind):
    """quant="auto" puts the file's blocks into our int8 / int4 layers without a float round
    trip: every layer's weight is gguf's dequantization of the blocks written, bit for bit.
    (Its logits differ from the float ones by the kernels' int8 activations, as llama.cpp's.)"""
    out = export(v3_blocks_folder, to="gguf", type=kind, out=tmp_path / "m.gguf",
                 progress=False)
    tensors = _gguf_tensors(out)
    auto = load32(out, quant="auto")
    expected = "Int8Linear" if kind == "q8_0" else "Int4Linear"
    for i in range(auto.config.n_layers):
        for path in ("attention.wq", "attention.wk", "attention.wv", "attention.wo",
                     "feed_forward.w1", "feed_forward.w2", "feed_forward.w3"):
            layer = auto.model.get_submodule(f"layers.{i}.{path}")
            assert type(layer).__name__ == expected
            _, floats, _ = tensors[format_name(f"layers.{i}.{path}.weight", "gguf")]
            assert torch.equal(layer.dequantize(torch.float32).reshape(-1),
                               torch.from_numpy(floats.reshape(-1).copy())), path
    greedy = auto.generate(PROMPT_IDS, max_tokens=4).token_ids
    assert len(greedy) == 4


@pytest.mark.skipif(importlib.util.find_spec("llama_cpp") is None,
                    reason="llama-cpp-python is not installed (an optional peer, not a "
                           "dependency)")
def test_q4_0_export_runs_in_llama_cpp(tmp_path):
    import llama_cpp

    out = export("default", to="gguf", type="q4_0", out=tmp_path / "smol.Q4_0.gguf",
                 progress=False)
    llm = llama_cpp.Llama(model_path=str(out), n_ctx=256, verbose=False, seed=0)
    text = llm("The capital of France is", max_tokens=8, temperature=0.0)["choices"][0]["text"]
    assert len(llm.tokenize(text.encode(), add_bos=False)) >= 4
    ids = llm.tokenize(b"The capital of France is", add_bos=False)
    import mistral7b

    assert ids == mistral7b.load(out).tokenizer.encode("The capital of France is", bos=False)
