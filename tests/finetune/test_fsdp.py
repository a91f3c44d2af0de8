"""FSDP2 fine-tuning on 2 CPU processes (gloo, spawned here under torchrun) against one process:

- a step on 2 ranks, each with its half of the global batch, gives the adapter of the
  single-process step on the whole batch (float32, within 1e-6), with gradient accumulation,
  a rank whose slice of a micro-batch is empty, and activation checkpointing under FSDP;
- the adapter files, written once by rank 0 from the gathered tensors, are the single
  process's, in both formats;
- a checkpoint of 2 ranks resumes on 1, and one of 1 on 2, and the continued run equals an
  uninterrupted one;
- QLoRA (int8 base: buffers, replicated) and a bf16 base (mixed with float32 LoRA in one
  FSDP unit) train on 2 ranks as on 1.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from tiny_models import hf_mistral, save_hf

import mistral7b
from mistral7b.finetune import Example, TrainConfig, Trainer
from mistral7b.lora import lora_state_dict

WORKER = Path(__file__).with_name("fsdp_worker.py")
# 10 rows (no packing) in micro-batches of 3: [3, 3, 3, 1]; with grad_accum 2, 4 steps are
# two epochs, and in the micro-batch of 1 row rank 1 has nothing of its own (weight 0).
# The bound: 2 ranks sum a gradient in another order than 1 (two half-batch products, then
# the reduce-scatter), and AdamW divides each gradient element by its own magnitude (plus
# eps = 1e-8), so the rounding of an element that nearly cancels moves its update by up to
# ~lr/10 (measured: 2.7e-7 at lr = 1e-3, 1.4e-6 at lr = 5e-3, growing with lr as that predicts).
CONFIG = {"steps": 4, "lr": 1e-3, "batch_size": 3, "grad_accum": 2, "pack": False,
          "seq_len": 32, "rank": 4, "alpha": 8, "eval_every": 2, "warmup": 1, "seed": 1}


def _examples(n, seed):
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        length = int(torch.randint(5, 20, (1,), generator=g))
        ids = torch.randint(3, 96, (length,), generator=g).tolist()
        out.append(Example(ids, [False] + [j % 3 != 0 for j in range(1, length)], i + 1))
    return out


EXAMPLES, EVALS = _examples(10, 0), _examples(3, 9)


def torchrun(args, *, nproc=2, timeout=300, ok=True):
    env = dict(os.environ, OMP_NUM_THREADS="1", MISTRAL7B_COLLECTIVE_TIMEOUT="60")
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                           f"--nproc-per-node={nproc}", *map(str, args)],
                          env=env, capture_output=True, text=True, timeout=timeout, check=False)
    if ok:
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    return proc


def _single(folder, out, *, resume=False, stop_after=None, dtype="float32", **extra):
    """A run in this process; returns (trainer, {step: LoRA weights after it})."""
    llm = mistral7b.load(folder, device="cpu", dtype=dtype)
    trainer = Trainer(llm, TrainConfig(**{**CONFIG, **extra}), out, progress=False)
    states = {}

    def on_step(info):
        states[info.step] = {k: v.clone() for k, v in lora_state_dict(trainer.model).items()}
        if info.step == stop_after:
            raise KeyboardInterrupt

    try:
        trainer.fit(EXAMPLES, EVALS, resume=resume, on_step=on_step)
    except KeyboardInterrupt:
        assert stop_after is not None
    return trainer, states


def _rows(examples):
    return [{"ids": e.ids, "targets": e.targets, "line": e.line} for e in examples]


def _progress(out):
    return json.loads((out / "checkpoint" / "trainer.json").read_text())


def assert_same(got, want, what):
    assert sorted(got) == sorted(want), what
    diff = {k: (got[k].float() - want[k].float()).abs().max().item() for k in want}
    worst = max(diff, key=diff.get)
    assert diff[worst] <= 1e-6, f"{what}: {worst} differs by {diff[worst]}"


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("fsdp")
    folder = save_hf(hf_mistral(seed=11), tmp / "model")
    full, full_states = _single(folder, tmp / "full")                 # 1 rank, 4 steps
    _single(folder, tmp / "one_then_two", stop_after=2)                # 1 rank, cut at 2
    qlora, qlora_states = _single(folder, tmp / "qlora", steps=2, qlora=8)
    bf16, _ = _single(folder, tmp / "bf16", steps=2, dtype="bfloat16")
    spec = {"model": str(folder), "examples": _rows(EXAMPLES), "eval": _rows(EVALS), "jobs": [
        # 2 ranks from scratch, cut after step 2 (activation checkpointing on: no change)
        {"out": str(tmp / "two_then_one"), "config": {**CONFIG, "grad_checkpoint": True},
         "resume": False, "stop_after": 2, "states": str(tmp / "two")},
        # 2 ranks continuing the 1-rank checkpoint of step 2 to the end
        {"out": str(tmp / "one_then_two"), "config": dict(CONFIG), "resume": True,
         "stop_after": None, "states": str(tmp / "resumed_on_two")},
        {"out": str(tmp / "qlora2"), "config": {**CONFIG, "steps": 2, "qlora": 8},
         "resume": False, "stop_after": None, "states": str(tmp / "qlora2")},
        {"out": str(tmp / "bf16_2"), "config": {**CONFIG, "steps": 2}, "dtype": "bfloat16",
         "resume": False, "stop_after": None, "states": None},
    ]}
    (tmp / "spec.json").write_text(json.dumps(spec))
    torchrun([WORKER, tmp / "spec.json"])
    two = {s: load_file(tmp / f"two-step{s}.safetensors") for s in (1, 2)}
    two_progress = _progress(tmp / "two_then_one")  # the checkpoint the next run resumes
    resumed_on_one, states_on_one = _single(folder, tmp / "two_then_one", resume=True)
    return {"tmp": tmp, "full": full, "full_states": full_states, "two": two,
            "two_progress": two_progress, "qlora": qlora, "qlora_states": qlora_states,
            "bf16": bf16,
            "on_one": resumed_on_one, "on_one_states": states_on_one}


def test_a_step_on_two_ranks_equals_the_single_process_step(runs):
    for step in (1, 2):
        assert_same(runs["two"][step], runs["full_states"][step], f"2 ranks, step {step}")
    two = runs["two_progress"]
    full = runs["full"]
    assert two["world_size"] == 2 and two["step"] == 2
    assert two["losses"] == pytest.approx(full.losses[:2], abs=1e-6)
    assert two["evals"][0][:2] == pytest.approx(list(full.evals[0][:2]), abs=1e-6)
    assert two["tokens"] == sum(len(e) for e in EXAMPLES)  # steps 1-2: one epoch of rows


def test_adapters_are_written_whole_by_rank_zero_in_both_formats(runs):
    tmp = runs["tmp"]
    one, two = tmp / "one_then_two", tmp / "two_then_one"   # both ended with 4 steps now
    for name in ("adapter_model.safetensors", "lora.safetensors"):
        assert_same(load_file(two / name), load_file(tmp / "full" / name), name)
        assert_same(load_file(one / name), load_file(tmp / "full" / name), name)
    assert not [p for p in os.listdir(two) if ".tmp" in p or p.startswith(".checkpoint")]


def test_a_two_rank_checkpoint_resumes_on_one_and_a_one_rank_checkpoint_on_two(runs):
    full = runs["full"]
    on_one = runs["on_one"]
    assert on_one.step == 4 and sorted(runs["on_one_states"]) == [3, 4]
    assert on_one.losses == pytest.approx(full.losses, abs=1e-6)
    assert_same(lora_state_dict(on_one.model), runs["full_states"][4], "2 -> 1 ranks")
    on_two = _progress(runs["tmp"] / "one_then_two")
    assert on_two["world_size"] == 2 and on_two["step"] == 4
    assert on_two["losses"] == pytest.approx(full.losses, abs=1e-6)
    assert [e[0] for e in on_two["evals"]] == [2, 4]
    resumed = load_file(runs["tmp"] / "resumed_on_two-step4.safetensors")
    assert_same(resumed, runs["full_states"][4], "1 -> 2 ranks")


def test_finetune_nproc_2_writes_adapters_that_load(tiny_chat_folder, tmp_path, capsys):
    """`mistral7b finetune --nproc 2` starts 2 ranks under torchrun; rank 0 alone talks and
    writes the adapters, which are the single-process run's and load with load(lora=...)."""
    from mistral7b.cli.finetune import main

    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps(x) + "\n" for x in [
        {"text": "the quick brown fox"}, {"text": "jumps over the lazy dog"},
        {"messages": [{"role": "user", "content": "hi"},
                      {"role": "assistant", "content": "hello"}]}]))
    model = str(tiny_chat_folder[1])
    argv = ["-m", model, "--data", str(data), "--steps", "2", "--rank", "4", "--lr", "1e-3",
            "--batch-size", "2", "--no-pack", "--json", "-q"]
    assert main([*argv, "-o", str(tmp_path / "one")]) == 0
    one = json.loads(capsys.readouterr().out)
    env = {"OMP_NUM_THREADS": "1", "MISTRAL7B_COLLECTIVE_TIMEOUT": "60"}
    proc = subprocess.run([sys.executable, "-m", "mistral7b.cli.main", "finetune", *argv,
                           "-o", str(tmp_path / "two"), "--nproc", "2"],
                          env={**os.environ, **env}, capture_output=True, text=True,
                          timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr[-4000:]
    lines = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    assert len(lines) == 1, proc.stdout          # one summary: rank 0's
    assert lines[0]["steps"] == 2
    assert lines[0]["final_loss"] == pytest.approx(one["final_loss"], abs=1e-6)
    for name in ("adapter_model.safetensors", "lora.safetensors"):
        assert_same(load_file(tmp_path / "two" / name), load_file(tmp_path / "one" / name),
                    name)
    ids = [1, 5, 9, 12, 7]
    trained = mistral7b.load(model, device="cpu", dtype="float32", lora=tmp_path / "one")
    for lora in (tmp_path / "two", tmp_path / "two" / "lora.safetensors"):
        llm = mistral7b.load(model, device="cpu", dtype="float32", lora=lora)
        assert (llm.logits(ids) - trained.logits(ids)).abs().max().item() < 1e-5


def test_qlora_and_a_bf16_base_train_on_two_ranks_as_on_one(runs):
    tmp = runs["tmp"]
    assert_same(load_file(tmp / "qlora2-step2.safetensors"), runs["qlora_states"][2], "QLoRA")
    assert _progress(tmp / "qlora2")["losses"] == pytest.approx(runs["qlora"].losses, abs=1e-6)
    # bf16 activations: the two orders of summation differ by bf16 rounding, not more
    assert _progress(tmp / "bf16_2")["losses"] == pytest.approx(runs["bf16"].losses, rel=2e-2)


def test_ranks_that_read_different_data_stop_with_a_clear_error(tmp_path):
    folder = save_hf(hf_mistral(seed=11), tmp_path / "model")
    spec = {"model": str(folder), "examples": _rows(EXAMPLES), "eval": [],
            "examples_other_ranks": _rows(EXAMPLES[:-1]),
            "jobs": [{"out": str(tmp_path / "out"), "config": dict(CONFIG), "resume": False,
                      "stop_after": None, "states": None}]}
    (tmp_path / "spec.json").write_text(json.dumps(spec))
    proc = torchrun([WORKER, tmp_path / "spec.json"], ok=False, timeout=120)
    assert proc.returncode != 0
    assert "do not agree on the training data: ranks [1] differ" in proc.stderr
    assert not (tmp_path / "out" / "checkpoint").exists()


def test_ctrl_c_on_two_ranks_saves_one_checkpoint_that_resumes(tiny_chat_folder, tmp_path):
    """Ctrl-C in a terminal reaches the whole process group (launcher, torchrun, ranks): the
    ranks finish their step, agree to stop, save together, and rank 0 says so once."""
    from interrupt import interrupt_after_checkpoint

    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps({"text": t}) + "\n" for t in ("the quick brown fox",
                                                                   "jumps over the lazy dog")))
    out = tmp_path / "out"
    argv = ["-m", str(tiny_chat_folder[1]), "--data", str(data), "-o", str(out), "--steps",
            "100000", "--save-every", "3", "--rank", "2", "--nproc", "2"]
    code, err = interrupt_after_checkpoint(argv, out, whole_group=True)
    assert code == 130, err[-3000:]
    assert err.count("interrupted at step") == 1, err[-3000:]
    step = int(err.split("interrupted at step ")[1].split(":")[0])
    assert _progress(out)["step"] == step >= 3
    assert not [p for p in os.listdir(out) if ".tmp" in p or p.startswith(".checkpoint")]
