"""`--to hf` and `--to consolidated`: LoRA merged, loaded back by transformers and mistral7b
with the logits of our merged model."""

from __future__ import annotations

import json

import pytest
import torch
from export_helpers import IDS, load32, random_adapter, run_cli
from tolerance import assert_close

import mistral7b
from mistral7b.exporter import export

# The ISSUE's bound for transformers' logits against ours (merged), in absolute terms.
HF_ABS = 1e-4


def test_hf_export_with_lora_loads_in_transformers(tiny_consolidated, tmp_path):
    from transformers import AutoModelForCausalLM

    _, src = tiny_consolidated
    adapter = random_adapter(src, tmp_path / "adapter", seed=1)
    ours = load32(src, lora=adapter).logits(IDS)
    out = export(src, to="hf", out=tmp_path / "hf", lora=[adapter], progress=False,
                 shard_bytes=40_000)   # a few shards, so the index is exercised
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == ["MistralForCausalLM"]
    assert config["sliding_window"] == 8 and config["head_dim"] == 16
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    hf = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32,
                                              attn_implementation="eager").eval()
    with torch.no_grad():
        theirs = hf(torch.tensor([IDS])).logits[0]
    assert (theirs - ours).abs().max().item() <= HF_ABS
    assert_close(load32(out).logits(IDS), ours, what="hf export in mistral7b")


def test_the_export_is_what_the_adapter_changes(tiny_consolidated, tmp_path):
    """Guard: without the adapter the exported logits are the base model's, far from the
    merged ones (so the test above sees the merge, not an identity)."""
    _, src = tiny_consolidated
    adapter = random_adapter(src, tmp_path / "adapter", seed=2)
    out = export(src, to="hf", out=tmp_path / "hf", progress=False)
    base = load32(out).logits(IDS)
    assert_close(base, load32(src).logits(IDS), what="no adapter")
    assert (base - load32(src, lora=adapter).logits(IDS)).abs().max().item() > 100 * HF_ABS


@pytest.mark.parametrize("fmt", ["peft", "mistral"])
def test_consolidated_export_loads_back_with_equal_logits(tiny_consolidated, tmp_path, fmt):
    from tiny_models import save_hf

    hf, _ = tiny_consolidated
    src = save_hf(hf, tmp_path / "hf_src")            # an HF source: q/k rows un-permuted
    adapter = random_adapter(src, tmp_path / "adapter", seed=3, fmt=fmt)
    ours = load32(src, lora=[(adapter, 0.5)]).logits(IDS)
    out = export(src, to="consolidated", out=tmp_path / "cons", lora=[(adapter, 0.5)],
                 progress=False)
    params = json.loads((out / "params.json").read_text())
    assert params["sliding_window"] == 8 and params["rope_theta"] == 10000.0
    assert sorted(p.name for p in out.iterdir()) == ["consolidated.safetensors", "params.json"]
    assert_close(load32(out).logits(IDS), ours, what="consolidated export")


def test_bf16_export_stores_bf16(tiny_consolidated, tmp_path):
    from safetensors import safe_open

    _, src = tiny_consolidated
    out = export(src, to="consolidated", out=tmp_path / "c", type="bf16", progress=False)
    with safe_open(str(out / "consolidated.safetensors"), "pt") as f:
        t = f.get_tensor("layers.0.attention.wq.weight")
    assert t.dtype == torch.bfloat16
    want = load32(src).model.layers[0].attention.wq.weight.to(torch.bfloat16)
    assert torch.equal(t, want)


def test_bad_arguments_are_clear_errors(tiny_consolidated, tmp_path):
    _, src = tiny_consolidated
    with pytest.raises(mistral7b.InputError, match="unknown export format 'onnx'"):
        export(src, to="onnx", out=tmp_path / "x")
    with pytest.raises(mistral7b.InputError, match="unknown export type 'q5_k'"):
        export(src, to="gguf", out=tmp_path / "x.gguf", type="q5_k")
    with pytest.raises(mistral7b.InputError, match="GGUF block type"):
        export(src, to="hf", out=tmp_path / "x", type="q4_0")
    with pytest.raises(mistral7b.InputError, match="no such folder"):
        export(src, to="hf", out=tmp_path / "missing" / "x")
    assert list(tmp_path.iterdir()) == []


def test_an_existing_output_is_refused_unless_forced(tiny_consolidated, tmp_path):
    _, src = tiny_consolidated
    out = export(src, to="consolidated", out=tmp_path / "c", progress=False)
    with pytest.raises(mistral7b.InputError, match="exists.*--force"):
        export(src, to="consolidated", out=out, progress=False)
    export(src, to="hf", out=out, force=True, progress=False)
    assert (out / "config.json").is_file() and not (out / "params.json").exists()
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "a.txt").write_text("mine")
    with pytest.raises(mistral7b.InputError, match="does not hold a model"):
        export(src, to="hf", out=tmp_path / "notes", force=True, progress=False)
    assert (tmp_path / "notes" / "a.txt").read_text() == "mine"


def test_a_full_disk_is_refused_before_writing(tiny_consolidated, tmp_path, monkeypatch):
    import shutil
    from collections import namedtuple

    _, src = tiny_consolidated
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda _: usage(10**6, 10**6 - 1000, 1000))
    with pytest.raises(mistral7b.errors.ResourceError, match="needs about .* GB"):
        export(src, to="hf", out=tmp_path / "hf", progress=False)
    assert list(tmp_path.iterdir()) == []


def test_a_disk_that_fills_midway_leaves_nothing(tiny_consolidated, tmp_path, monkeypatch):
    import errno

    from mistral7b.weights.safetensors_write import StreamWriter

    _, src = tiny_consolidated
    calls = []

    def fail_third(self, name, t):
        calls.append(name)
        if len(calls) == 3:
            raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(StreamWriter, "write", fail_third)
    with pytest.raises(mistral7b.errors.ResourceError, match="disk filled up.*removed"):
        export(src, to="consolidated", out=tmp_path / "c", progress=False)
    assert list(tmp_path.iterdir()) == []


def test_cli_export(tiny_consolidated, tmp_path):
    _, src = tiny_consolidated
    out = tmp_path / "out"
    result = run_cli("export", "-m", str(src), "--to", "consolidated", "-o", str(out), "-q")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == str(out)
    assert "export: consolidated.safetensors + params.json" in result.stderr
    assert_close(load32(out).logits(IDS), load32(src).logits(IDS), what="CLI export")
    again = run_cli("export", "-m", str(src), "--to", "consolidated", "-o", str(out))
    assert again.returncode == 2 and "Traceback" not in again.stderr
    assert again.stderr.strip().splitlines()[-1].startswith(f"error: {out} exists")
