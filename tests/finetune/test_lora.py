"""LoRA as a module swap: identity at B = 0, merged = unmerged, PEFT and Mistral file interop
against HF transformers + peft, the frozen int8/int4 base of QLoRA, and adapter file errors."""

from __future__ import annotations

import json

import pytest
import torch
from tiny_models import hf_mistral, save_hf
from tolerance import assert_close, rel_err

import mistral7b
from mistral7b.errors import ModelFileError
from mistral7b.lora import (
    FrozenQuantLinear,
    LoRALinear,
    adapter_from_model,
    apply_lora,
    apply_lora_file,
    lora_parameters,
    merge_lora,
    quantize_frozen,
    read_adapter,
    remove_lora,
    save_mistral,
    save_peft,
)

IDS = [1, 5, 17, 33, 2, 60, 61, 7, 9, 11, 40, 41, 42, 3, 90, 12, 13, 14, 15, 16]  # > window 8
HF_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny HF Mistral (GQA 4/2, window 8) saved as an HF folder, and its path."""
    hf = hf_mistral(seed=3)
    folder = save_hf(hf, tmp_path_factory.mktemp("tiny_hf"))
    return hf, folder


def _load(folder):
    return mistral7b.load(folder, device="cpu", dtype="float32")


def _randomize_lora(model, seed=0, std=0.2):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in lora_parameters(model):
            p.copy_(torch.randn(p.shape, generator=g) * std)


def test_lora_with_b_zero_gives_the_base_logits(tiny):
    _, folder = tiny
    llm = _load(folder)
    base = llm.logits(IDS)
    names = apply_lora(llm.model, rank=4, alpha=8)
    assert len(names) == 2 * 7
    assert all(isinstance(llm.model.get_submodule(n), LoRALinear) for n in names)
    assert torch.equal(llm.logits(IDS), base)
    # only the LoRA weights train; the base stays frozen
    trainable = [n for n, p in llm.model.named_parameters() if p.requires_grad]
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)
    remove_lora(llm.model)
    assert torch.equal(llm.logits(IDS), base)


def test_merged_equals_unmerged(tiny):
    _, folder = tiny
    llm = _load(folder)
    base = llm.logits(IDS)
    apply_lora(llm.model, rank=4, alpha=8)
    _randomize_lora(llm.model, std=0.05)  # an update ~10% of the weights, as training makes
    unmerged = llm.logits(IDS)
    assert rel_err(unmerged, base) > 1e-2  # the adapter does something
    merge_lora(llm.model)
    assert not any(isinstance(m, LoRALinear) for m in llm.model.modules())
    assert_close(llm.logits(IDS), unmerged, what="merged vs unmerged")


def test_merging_never_writes_the_memory_mapped_base(tiny):
    _, folder = tiny
    llm = _load(folder)
    wq = llm.model.layers[0].attention.wq.weight
    before = wq.clone()
    apply_lora(llm.model, rank=2, alpha=4, targets=["wq"])
    _randomize_lora(llm.model)
    merge_lora(llm.model)
    assert torch.equal(wq, before)
    assert not torch.equal(llm.model.layers[0].attention.wq.weight, before)


def _peft_model(hf, adapter_dir):
    from peft import PeftModel

    return PeftModel.from_pretrained(hf, str(adapter_dir)).eval()


def test_our_adapter_loads_into_transformers_and_peft(tiny, tmp_path):
    hf, folder = tiny
    llm = _load(folder)
    apply_lora(llm.model, rank=4, alpha=8)
    _randomize_lora(llm.model, seed=1)
    ours = llm.logits(IDS)
    save_peft(adapter_from_model(llm.model), tmp_path, llm.config, base_model=str(folder))
    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    assert cfg["r"] == 4 and cfg["lora_alpha"] == 8 and sorted(cfg["target_modules"]) == sorted(
        HF_TARGETS)
    import copy

    peft_model = _peft_model(copy.deepcopy(hf), tmp_path).double()  # float64 reference
    with torch.no_grad():
        theirs = peft_model(torch.tensor([IDS])).logits[0]
    assert_close(ours, theirs, what="ours in peft")


@pytest.mark.parametrize("merge", [False, True])
def test_a_peft_adapter_loads_into_mistral7b(tiny, tmp_path, merge):
    import copy

    from peft import LoraConfig, get_peft_model

    hf, folder = tiny
    peft_model = get_peft_model(copy.deepcopy(hf), LoraConfig(
        r=4, lora_alpha=16, target_modules=HF_TARGETS, lora_dropout=0.0, task_type="CAUSAL_LM"))
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    peft_model.eval()
    with torch.no_grad():  # the reference in float64, on a copy (the saved adapter stays float32)
        theirs = copy.deepcopy(peft_model).double()(torch.tensor([IDS])).logits[0]
    peft_model.save_pretrained(str(tmp_path))
    llm = _load(folder)
    adapter = apply_lora_file(llm, tmp_path, merge=merge)
    assert adapter.format == "peft" and adapter.rank == 4
    assert all(s == pytest.approx(4.0) for s in adapter.scales.values())
    assert_close(llm.logits(IDS), theirs, what=f"peft adapter, merge={merge}")


def test_mistral_lora_safetensors_round_trip(tiny, tmp_path):
    _, folder = tiny
    llm = _load(folder)
    apply_lora(llm.model, rank=4, alpha=12, targets=["wq", "wk", "w2"])
    _randomize_lora(llm.model, seed=2)
    ours = llm.logits(IDS)
    save_mistral(adapter_from_model(llm.model), tmp_path, llm.config)
    params = json.loads((tmp_path / "params.json").read_text())
    assert params["lora"]["scaling"] == pytest.approx(3.0)
    from safetensors import safe_open

    with safe_open(str(tmp_path / "lora.safetensors"), "pt") as f:
        assert "layers.0.attention.wq.lora_A.weight" in set(f.keys())
        assert "layers.1.feed_forward.w2.lora_B.weight" in set(f.keys())
    for path in (tmp_path, tmp_path / "lora.safetensors"):
        again = _load(folder)
        adapter = apply_lora_file(again, path, merge=False)
        assert adapter.format == "mistral" and adapter.targets == ("wq", "wk", "w2")
        assert_close(again.logits(IDS), ours, what=str(path))
    # Without params.json the scale is mistral-inference's default, 2.0.
    (tmp_path / "params.json").unlink()
    assert set(read_adapter(tmp_path, llm.config).scales.values()) == {2.0}


def test_adapter_file_errors_name_the_problem(tiny, tmp_path):
    _, folder = tiny
    llm = _load(folder)
    with pytest.raises(ModelFileError, match="no such LoRA adapter"):
        read_adapter(tmp_path / "nope", llm.config)
    with pytest.raises(ModelFileError, match="not a LoRA adapter folder"):
        read_adapter(tmp_path, llm.config)
    (tmp_path / "adapter_model.bin").write_bytes(b"pickle")
    with pytest.raises(ModelFileError, match="pickle"):
        read_adapter(tmp_path, llm.config)
    from safetensors.torch import save_file

    bad = tmp_path / "bad"
    bad.mkdir()
    save_file({"layers.0.attention.wq.lora_A.weight": torch.zeros(4, 63),
               "layers.0.attention.wq.lora_B.weight": torch.zeros(64, 4)},
              str(bad / "lora.safetensors"))
    with pytest.raises(ModelFileError, match="do not fit"):
        read_adapter(bad, llm.config)
    save_file({"layers.0.attention.wq.lora_A.weight": torch.zeros(4, 64)},
              str(bad / "lora.safetensors"))
    with pytest.raises(ModelFileError, match="lora_B missing"):
        read_adapter(bad, llm.config)
    (bad / "lora.safetensors").write_bytes(b"\x00garbage")
    with pytest.raises(ModelFileError, match="safetensors"):
        read_adapter(bad, llm.config)


@pytest.mark.parametrize("bits,tol", [(8, 0.01), (4, 0.15)])
def test_frozen_quant_base_dequantizes_within_its_step(bits, tol):
    torch.manual_seed(0)
    w = torch.randn(48, 128)
    q = FrozenQuantLinear(w, bits)
    assert q.qweight.nbytes == w.numel() * bits // 8
    rel = ((q.dequantize() - w).norm() / w.norm()).item()
    assert rel < tol
    x = torch.randn(3, 128, requires_grad=True)
    y = q(x)
    assert torch.allclose(y, x @ q.dequantize().T, atol=1e-5)
    y.sum().backward()  # backward dequantizes again: the grad is that of the same weight
    assert torch.allclose(x.grad, q.dequantize().sum(0).expand(3, -1), atol=1e-5)


def test_qlora_trains_only_lora_over_the_quantized_base(tiny):
    _, folder = tiny
    llm = _load(folder)
    base = llm.logits(IDS)
    quantize_frozen(llm.model, bits=8)
    quantized = llm.logits(IDS)
    assert (quantized - base).abs().max().item() < 0.1 * base.abs().max().item()
    apply_lora(llm.model, rank=2, alpha=4)
    assert torch.equal(llm.logits(IDS), quantized)
    from mistral7b.attention_plan import uncached_plan

    plan, positions = uncached_plan([len(IDS)], None)
    out = llm.model(torch.tensor([IDS]), positions, None, plan)
    out.logsumexp(-1).sum().backward()
    grads = [p.grad for p in lora_parameters(llm.model)]
    assert all(g is not None for g in grads) and any(g.abs().sum() > 0 for g in grads)
    assert all(p.grad is None for n, p in llm.model.named_parameters() if "lora_" not in n)


def test_merging_into_a_layer_without_float_weights_is_refused():
    class Opaque(torch.nn.Module):
        in_features, out_features = 8, 4

        def forward(self, x):
            return x[..., :4]

    lora = LoRALinear(Opaque(), rank=2, scale=1.0)
    with pytest.raises(TypeError, match="merge=False"):
        lora.merged()
