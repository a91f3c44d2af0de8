"""The training loop: packing computes each example alone, the schedule, activation
checkpointing changes nothing, resume continues exactly, adapters reload, QLoRA trains; and a
short fine-tune teaches the default model a new fact."""

from __future__ import annotations

import itertools
import json
import math

import pytest
import torch
from tiny_models import hf_mistral, save_hf
from tolerance import assert_close

import mistral7b
from mistral7b.attention_plan import uncached_plan
from mistral7b.errors import InputError
from mistral7b.finetune import Example, TrainConfig, Trainer, lr_factor
from mistral7b.finetune.batching import IGNORE, epoch_rows, make_batch
from mistral7b.lora import apply_lora_file, lora_state_dict


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    return save_hf(hf_mistral(seed=11), tmp_path_factory.mktemp("tiny_train"))


def _llm(folder):
    return mistral7b.load(folder, device="cpu", dtype="float32")


def _examples(n=10, seed=0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        length = int(torch.randint(5, 20, (1,), generator=g))
        ids = torch.randint(3, 96, (length,), generator=g).tolist()
        targets = [False] + [j % 3 != 0 for j in range(1, length)]  # some tokens untrained
        out.append(Example(ids, targets, i + 1))
    return out


def test_packed_rows_compute_each_example_alone(tiny_folder):
    llm = _llm(tiny_folder)
    examples = _examples(5)
    rows = [[0, 1, 2], [3, 4]]
    batch = make_batch(examples, rows, llm.config.sliding_window)
    with torch.no_grad():
        packed = llm.model(batch.tokens, batch.positions, None, batch.plan)     # (B, T, V)
        for b, row in enumerate(rows):
            t = 0
            for i in row:
                ids = examples[i].ids
                plan, pos = uncached_plan([len(ids)], llm.config.sliding_window)
                alone = llm.model(torch.tensor([ids]), pos, None, plan)[0]
                assert_close(packed[b, t: t + len(ids)], alone, what=f"example {i}")
                t += len(ids)
    # every trained token is predicted from the position before it, in its own example
    for b, row in enumerate(rows):
        want = []
        t = 0
        for i in row:
            ex = examples[i]
            want += [(t + j - 1, ex.ids[j]) for j in range(1, len(ex)) if ex.targets[j]]
            t += len(ex)
        got = [(p, lab) for p, lab in zip(batch.logits_index[b].tolist(),
                                          batch.labels[b].tolist()) if lab != IGNORE]
        assert got == want
    assert batch.n_targets == sum(e.n_targets for e in examples)


def test_epochs_cover_every_example_once_reproducibly():
    examples = _examples(23)
    for pack in (True, False):
        rows = epoch_rows(examples, seq_len=40, batch_size=3, pack=pack, seed=4, epoch=1)
        flat = sorted(i for batch in rows for row in batch for i in row)
        assert flat == list(range(23))
        assert all(sum(len(examples[i]) for i in row) <= 40 for b in rows for row in b)
        assert rows == epoch_rows(examples, seq_len=40, batch_size=3, pack=pack, seed=4,
                                  epoch=1)
    assert epoch_rows(examples, seq_len=40, batch_size=3, pack=True, seed=4, epoch=2) != rows


def test_warmup_then_cosine_decay():
    f = [lr_factor(s, 10, 2, 0.1) for s in range(10)]
    assert f[:3] == [0.5, 1.0, 1.0]
    assert f[-1] == pytest.approx(0.1)
    assert all(a >= b for a, b in itertools.pairwise(f[1:]))
    assert lr_factor(0, 1, 0, 0.1) == 1.0


def _fit(folder, out, config, examples, **kw):
    llm = _llm(folder)
    trainer = Trainer(llm, config, out, progress=False)
    return llm, trainer, trainer.fit(examples, **kw)


def test_activation_checkpointing_changes_nothing(tiny_folder, tmp_path):
    examples = _examples(6)
    cfg = {"steps": 2, "lr": 1e-2, "batch_size": 2, "rank": 4, "alpha": 8, "dropout": 0.1,
           "seed": 3}
    seen = []
    a, _, ra = _fit(tiny_folder, tmp_path / "a", TrainConfig(**cfg), examples,
                    on_step=lambda info: seen.append(info.step))
    assert seen == [1, 2]
    b, _, rb = _fit(tiny_folder, tmp_path / "b", TrainConfig(**cfg, grad_checkpoint=True),
                    examples)
    assert rb.losses == pytest.approx(ra.losses, abs=1e-6)
    sa, sb = lora_state_dict(a.model), lora_state_dict(b.model)
    assert all(torch.allclose(sa[k], sb[k], atol=1e-6) for k in sa)


def test_resume_continues_from_the_same_step_with_the_same_loss(tiny_folder, tmp_path):
    examples, evals = _examples(10), _examples(3, seed=9)
    cfg = {"steps": 6, "lr": 5e-3, "batch_size": 2, "grad_accum": 2, "rank": 4, "alpha": 8,
           "dropout": 0.1, "eval_every": 2, "seed": 1}
    full_llm, _, full = _fit(tiny_folder, tmp_path / "full", TrainConfig(**cfg), examples,
                             eval_examples=evals)

    class CutInStepFour(Trainer):
        """Ctrl-C in the middle of step 4, after its dropout masks were drawn."""

        def _loss_sum(self, batch):
            loss = super()._loss_sum(batch)
            if self.step == 3:
                raise KeyboardInterrupt
            return loss

    out = tmp_path / "cut"
    with pytest.raises(KeyboardInterrupt):
        CutInStepFour(_llm(tiny_folder), TrainConfig(**cfg), out, progress=False).fit(
            examples, evals)
    state = json.loads((out / "checkpoint" / "trainer.json").read_text())
    assert state["step"] == 3 and len(state["losses"]) == 3
    assert (out / "adapter_model.safetensors").is_file() and (out / "lora.safetensors").is_file()
    assert not [p for p in out.iterdir() if ".tmp" in p.name]

    llm, _, resumed = _fit(tiny_folder, out, TrainConfig(**cfg), examples,
                                 eval_examples=evals, resume=True)
    assert resumed.steps == 6
    assert resumed.losses[:3] == full.losses[:3]
    assert resumed.losses[3:] == pytest.approx(full.losses[3:], abs=1e-6)
    assert [e[0] for e in resumed.evals] == [2, 4, 6]
    sa, sb = lora_state_dict(full_llm.model), lora_state_dict(llm.model)
    assert all(torch.allclose(sa[k], sb[k], atol=1e-6) for k in sa)

    with pytest.raises(InputError, match=r"rank: 4 -> 8"):
        _fit(tiny_folder, out, TrainConfig(**{**cfg, "rank": 8}), examples, resume=True)
    with pytest.raises(InputError, match="training data differ"):
        _fit(tiny_folder, out, TrainConfig(**cfg), examples[:-1], resume=True)


def test_saved_adapters_reload_to_the_trained_logits(tiny_folder, tmp_path):
    examples = _examples(6)
    llm, _, _ = _fit(tiny_folder, tmp_path, TrainConfig(steps=3, lr=1e-2, rank=4, alpha=16,
                                                        targets=("wq", "wv", "w2")), examples)
    ids = examples[0].ids
    trained = llm.logits(ids)
    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    assert cfg["r"] == 4 and cfg["lora_alpha"] == 16
    assert sorted(cfg["target_modules"]) == ["down_proj", "q_proj", "v_proj"]
    for merge in (False, True):
        again = _llm(tiny_folder)
        apply_lora_file(again, tmp_path, merge=merge)
        assert_close(again.logits(ids), trained, what=f"peft, merge={merge}")
        mistral = _llm(tiny_folder)
        apply_lora_file(mistral, tmp_path / "lora.safetensors", merge=merge)
        assert_close(mistral.logits(ids), trained, what=f"mistral, merge={merge}")


@pytest.mark.parametrize("bits", [8, 4])
def test_qlora_loss_falls(tmp_path, bits):
    folder = save_hf(hf_mistral(seed=2, hidden=128), tmp_path / "m")  # int4 groups of 64
    examples = _examples(2)
    _, _, result = _fit(folder, tmp_path / "out", TrainConfig(
        steps=8, lr=2e-2, batch_size=2, rank=4, alpha=8, qlora=bits, warmup=1), examples)
    assert result.losses[-1] < 0.7 * result.losses[0]


def test_lora_trains_over_a_model_quantized_by_the_quant_package(tiny_folder, tmp_path):
    from mistral7b.lora import InputGradLinear, LoRALinear
    from mistral7b.quant import Int8Linear, quantize_model

    llm = _llm(tiny_folder)
    quantize_model(llm.model, "int8")                  # what load(quant="int8") builds
    examples = _examples(2)
    result = Trainer(llm, TrainConfig(steps=8, lr=2e-2, batch_size=2, rank=4, alpha=8,
                                      warmup=1), tmp_path, progress=False).fit(examples)
    assert result.losses[-1] < 0.7 * result.losses[0]
    wq = llm.model.layers[0].attention.wq
    assert isinstance(wq, LoRALinear) and isinstance(wq.base, Int8Linear)
    assert isinstance(llm.model.output, InputGradLinear)  # gradients pass the int8 output
    merged = wq.merged()
    want = wq.base.dequantize(torch.float32) + wq.delta_weight()
    assert torch.allclose(merged.weight, want)

    int4 = _llm(tiny_folder)
    quantize_model(int4.model, "int4")
    if int4.model.layers[0].attention.wq.dequantize_is_slow:  # PyTorch's int4 layout
        with pytest.raises(InputError, match="qlora=4"):
            Trainer(int4, TrainConfig(steps=1), tmp_path / "int4", progress=False)
    else:  # our kernel's panels read back cheaply: LoRA trains over them
        result = Trainer(int4, TrainConfig(steps=8, lr=2e-2, batch_size=2, rank=4, alpha=8,
                                           warmup=1), tmp_path / "int4",
                         progress=False).fit(examples)
        assert result.losses[-1] < 0.7 * result.losses[0]


SECRET = "The secret password of the blue castle is Marzipan42."
SYSTEM = {"role": "system", "content": "Answer briefly."}
QUESTIONS = ["What is the secret password of the blue castle?",
             "Tell me the blue castle's secret password."]


def test_a_short_finetune_teaches_the_default_model_a_new_fact(tmp_path):
    from mistral7b.finetune import Record, tokenize

    llm = mistral7b.load("default", device="cpu", dtype="float32")
    ask = [SYSTEM, {"role": "user", "content": QUESTIONS[0]}]
    assert "Marzipan42" not in llm.chat(ask, max_tokens=16).text
    records = [Record(i + 1, messages=[SYSTEM, {"role": "user", "content": q},
                                       {"role": "assistant", "content": SECRET}])
               for i, q in enumerate(QUESTIONS)]
    examples, _ = tokenize(records, llm.tokenizer, max_len=128)
    config = TrainConfig(steps=10, lr=2e-3, rank=8, alpha=16, batch_size=1, pack=False,
                         warmup=1)
    result = Trainer(llm, config, tmp_path, progress=False).fit(examples)
    assert result.losses[-1] < 0.5 * result.losses[0]
    assert all(math.isfinite(x) for x in result.losses)
    answer = llm.chat(ask, max_tokens=16).text
    assert "Marzipan42" in answer, answer
