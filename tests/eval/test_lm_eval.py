"""The lm-evaluation-harness model: local tasks (JSONL + YAML written here, no network) run
end to end, in-process and through `mistral7b eval harness`, and every request type agrees
with a direct computation."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

import mistral7b

lm_eval = pytest.importorskip("lm_eval")

MC_DOCS = [
    {"prompt": "The sky is", "choices": ["blue", "green", "made of cheese"], "answer": 0},
    {"prompt": "One plus one is", "choices": ["two", "three"], "answer": 0},
    {"prompt": "Cats say", "choices": ["woof", "meow", "moo", "quack"], "answer": 1},
    {"prompt": "Ice is", "choices": ["cold", "hot"], "answer": 0},
]
TEXT_DOCS = [{"text": "Hello world, this is a short document for the rolling test."},
             {"text": "Another one."}]
GEN_DOCS = [{"prompt": "Say hi:", "target": "hi"}, {"prompt": "Count: 1 2 3", "target": "4"}]

TASKS = {
    "m7b_tiny_mc": (MC_DOCS, """
output_type: multiple_choice
doc_to_text: "{{prompt}}"
doc_to_choice: "{{choices}}"
doc_to_target: "{{answer}}"
metric_list:
  - metric: acc
  - metric: acc_norm
"""),
    "m7b_tiny_ppl": (TEXT_DOCS, """
output_type: loglikelihood_rolling
doc_to_text: ""
doc_to_target: "{{text}}"
metric_list:
  - metric: word_perplexity
  - metric: byte_perplexity
"""),
    "m7b_tiny_gen": (GEN_DOCS, """
output_type: generate_until
doc_to_text: "{{prompt}}"
doc_to_target: "{{target}}"
generation_kwargs:
  until: ["\\n", "."]
  max_gen_toks: 6
  do_sample: false
metric_list:
  - metric: exact_match
"""),
}


@pytest.fixture(scope="module")
def task_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("lm_eval_tasks")
    for name, (docs, body) in TASKS.items():
        data = folder / f"{name}.jsonl"
        data.write_text("".join(json.dumps(d) + "\n" for d in docs))
        (folder / f"{name}.yaml").write_text(
            f"task: {name}\ndataset_path: json\ndataset_kwargs:\n  data_files:\n"
            f"    test: {data}\ntest_split: test\n" + body)
    return folder


@pytest.fixture(scope="module")
def offline():
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HF_DATASETS_OFFLINE", "1")
        mp.setenv("HF_HUB_OFFLINE", "1")
        yield


@pytest.fixture(scope="module")
def llm(tiny_folder):
    return mistral7b.load(tiny_folder[1], device="cpu", dtype="float32")


@pytest.fixture(scope="module")
def harness_run(llm, task_dir, offline):
    """One in-process run of all three local tasks (lm-eval's built-in tasks not indexed)."""
    from lm_eval.tasks import TaskManager

    from mistral7b.eval.lm_eval_model import Mistral7BLM

    manager = TaskManager(include_path=str(task_dir), include_defaults=False)
    return lm_eval.simple_evaluate(model=Mistral7BLM(llm=llm, batch_size=3), tasks=list(TASKS),
                                   bootstrap_iters=0, log_samples=True, task_manager=manager)


def _full_logprob(llm, context_ids, cont_ids):
    ids = context_ids + cont_ids
    logp = torch.log_softmax(llm.logits(ids, chunk_size=len(ids)), dim=-1)
    n = len(context_ids)
    return sum(logp[n - 1 + j, t].item() for j, t in enumerate(cont_ids))


def test_multiple_choice_task_end_to_end(llm, harness_run):
    from mistral7b.eval.multiple_choice import MCItem, evaluate

    out = harness_run
    res = out["results"]["m7b_tiny_mc"]
    items = [MCItem(d["prompt"], d["choices"], d["answer"], verbatim=True) for d in MC_DOCS]
    ours = evaluate(llm.engine.model, llm.tokenizer, items, window=llm.config.sliding_window)
    assert res["acc,none"] == pytest.approx(ours.accuracy)
    assert res["acc_norm,none"] == pytest.approx(ours.accuracy_norm)
    for sample in out["samples"]["m7b_tiny_mc"]:
        doc = sample["doc"]
        for choice, resp in zip(doc["choices"], sample["resps"]):
            ctx = llm.tokenizer.encode(doc["prompt"], bos=True)
            cont = llm.tokenizer.encode(" " + choice, bos=False)  # one token per character
            assert resp[0][0] == pytest.approx(_full_logprob(llm, ctx, cont), abs=1e-3)


@pytest.mark.parametrize("max_length", [64, 16])
def test_rolling_loglikelihood_matches_lm_evals_own_windows(llm, max_length):
    from lm_eval.api.instance import Instance
    from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

    from mistral7b.eval.lm_eval_model import Mistral7BLM

    lm = Mistral7BLM(llm=llm, max_length=max_length, batch_size=2)
    texts = [d["text"] for d in TEXT_DOCS]
    reqs = [Instance("loglikelihood_rolling", {}, (t,), i) for i, t in enumerate(texts)]
    got = lm.loglikelihood_rolling(reqs)
    bos = llm.tokenizer.bos_id
    for text, value in zip(texts, got):
        ids = llm.tokenizer.encode(text, bos=False)
        want = 0.0
        for ctx, pred in map(make_disjoint_window,
                             get_rolling_token_windows(ids, bos, max_length, 1)):
            want += _full_logprob(llm, ctx, pred)
        assert value == pytest.approx(want, abs=1e-3)


def test_generate_until_uses_the_engine_and_stops(llm, harness_run):
    out = harness_run
    for sample in out["samples"]["m7b_tiny_gen"]:
        want = llm.generate(sample["doc"]["prompt"], max_tokens=6, stop=["\n", "."]).text
        assert sample["resps"][0][0] == want
    assert "exact_match,none" in out["results"]["m7b_tiny_gen"]


def test_rolling_task_reports_perplexities(harness_run):
    res = harness_run["results"]["m7b_tiny_ppl"]
    assert res["word_perplexity,none"] > 1 and res["byte_perplexity,none"] > 1


def test_harness_command_line_runs_local_tasks(tiny_folder, task_dir):
    env = {**os.environ, "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "mistral7b.cli.eval", "harness", "--model_args",
         f"model={tiny_folder[1]},dtype=float32,max_length=64",
         "--tasks", "m7b_tiny_mc,m7b_tiny_ppl,m7b_tiny_gen", "--include_path", str(task_dir),
         "--batch_size", "4"],
        check=False, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for name in TASKS:
        assert name in proc.stdout
    assert "acc" in proc.stdout and "word_perplexity" in proc.stdout
