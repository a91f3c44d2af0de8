"""On a CUDA GPU (skipped elsewhere; `pytest -m cuda`): the logits of float, int8 and int4
models against the CPU, greedy generation, and a LoRA training step.

References are computed on the CPU in float32. For int8 / int4 the reference model has each
linear weight replaced by its dequantized int8 / int4 weight (the same quantizer load uses),
so the bound holds only the kernel's own arithmetic:
- float32 and int8 (PyTorch's CUDA int8 kernel accumulates in float32 over float32 scales;
  pre-fill dequantizes to float32 blocks): the suite's float32 bound (tolerance.py);
- int4 (tinygemm: bf16 activations, bf16 scale and zero, float32 accumulation): 2e-2 of the
  logits' scale, a few bf16 roundings (2^-8 each) through two layers;
- bf16 float weights: the same 2e-2.
"""

from __future__ import annotations

import pytest
import torch
from tiny_models import hf_mistral, save_hf
from tolerance import FLOAT32, assert_close

import mistral7b
from mistral7b.quant.convert import linear_names, quantize_tensor

pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU")]

BF16 = 2e-2
IDS = [1, *range(3, 60, 2), 7, 9, 11]        # 33 tokens: pre-fill > 16 rows, windows of 8


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    # dims tinygemm takes: in_features % 32, out_features % 8 (vocab 96, kv 32, hidden 96)
    return save_hf(hf_mistral(seed=5), tmp_path_factory.mktemp("cuda_model"))


def _cpu_reference(folder, quant=None):
    llm = mistral7b.load(folder, device="cpu", dtype="float32")
    if quant is not None:
        with torch.no_grad():
            for name in linear_names(llm.config):
                module = llm.model.get_submodule(name.removesuffix(".weight"))
                module.weight.copy_(quantize_tensor(module.weight, quant).dequantize())
    return llm


@pytest.mark.parametrize("chunk", [None, 1])      # pre-fill in one chunk; token by token
def test_float32_logits_equal_the_cpu(folder, chunk):
    want = _cpu_reference(folder).logits(IDS, chunk)
    got = mistral7b.load(folder, device="cuda", dtype="float32").logits(IDS, chunk)
    assert got.device.type == "cuda"
    assert_close(got.cpu(), want, FLOAT32, what=f"float32, chunk {chunk}")


def test_bf16_logits_are_within_bf16_of_the_cpu(folder):
    llm = mistral7b.load(folder, device="cuda")              # CUDA default: bf16
    assert llm.engine.dtype == torch.bfloat16
    assert_close(llm.logits(IDS).cpu(), _cpu_reference(folder).logits(IDS), BF16, what="bf16")


@pytest.mark.parametrize("chunk", [None, 1])
def test_int8_logits_equal_the_dequantized_reference(folder, chunk):
    llm = mistral7b.load(folder, device="cuda", dtype="float32", quant="int8")
    assert llm.model.layers[0].attention.wq.kernel == "cuda"
    want = _cpu_reference(folder, "int8").logits(IDS, chunk)
    assert_close(llm.logits(IDS, chunk).cpu(), want, FLOAT32, what=f"int8, chunk {chunk}")


@pytest.mark.parametrize("chunk", [None, 1])
def test_int4_logits_are_within_bf16_of_the_dequantized_reference(folder, chunk):
    llm = mistral7b.load(folder, device="cuda", dtype="bfloat16", quant="int4")
    wq = llm.model.layers[0].attention.wq
    if torch.cuda.get_device_capability()[0] >= 8:
        assert wq.kernel == "tinygemm"
    want = _cpu_reference(folder, "int4").logits(IDS, chunk)
    assert_close(llm.logits(IDS, chunk).cpu(), want, BF16, what=f"int4, chunk {chunk}")
    # and the layer reads its weight back on the device (what LoRA's backward uses)
    w = wq.dequantize(torch.float32)
    assert w.device.type == "cuda" and w.shape == (wq.out_features, wq.in_features)


def test_a_cpu_layer_moved_to_cuda_runs_there(folder):
    llm = mistral7b.load(folder, device="cpu", dtype="float32", quant="int4")
    layer = llm.model.layers[0].feed_forward.w1
    x = torch.randn(5, layer.in_features)
    want = layer(x)
    layer.to("cuda")
    assert layer.qweight.is_cuda and layer.kernel in ("tinygemm", "generic")
    got = layer(x.cuda()).cpu()
    assert_close(got, want, BF16, what="moved int4 layer")


def test_greedy_generation_equals_the_cpu(folder):
    prompt = [1, 17, 23, 5, 9]
    cpu = _cpu_reference(folder).generate(prompt, max_tokens=24)
    gpu = mistral7b.load(folder, device="cuda", dtype="float32").generate(prompt,
                                                                           max_tokens=24)
    assert gpu.token_ids == cpu.token_ids


def test_a_lora_step_equals_the_cpu(folder, tmp_path):
    from mistral7b.finetune import Example, TrainConfig, Trainer
    from mistral7b.lora import lora_state_dict

    g = torch.Generator().manual_seed(0)
    examples = [Example(torch.randint(3, 96, (n,), generator=g).tolist(), [False] + [True] *
                        (n - 1), i + 1) for i, n in enumerate((9, 14, 6, 11))]
    config = {"steps": 2, "lr": 1e-3, "batch_size": 2, "rank": 4, "alpha": 8, "warmup": 1}
    results = {}
    for device in ("cpu", "cuda"):
        llm = mistral7b.load(folder, device=device, dtype="float32")
        trainer = Trainer(llm, TrainConfig(**config), tmp_path / device, progress=False)
        result = trainer.fit(examples)
        results[device] = (result.losses, {k: v.cpu() for k, v in
                                           lora_state_dict(trainer.model).items()})
    assert results["cuda"][0] == pytest.approx(results["cpu"][0], abs=1e-5)
    for k, v in results["cpu"][1].items():
        assert (results["cuda"][1][k] - v).abs().max().item() <= 1e-5, k
    # QLoRA (int8 base: the tiny model's 96-wide layers take no int4 groups of 64) on the
    # default CUDA dtype, bf16, trains too
    llm = mistral7b.load(folder, device="cuda")
    result = Trainer(llm, TrainConfig(**{**config, "steps": 6, "lr": 2e-2, "qlora": 8}),
                     tmp_path / "q", progress=False).fit(examples)
    assert all(torch.isfinite(torch.tensor(result.losses)))
    assert result.losses[-1] < result.losses[0]
