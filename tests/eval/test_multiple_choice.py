"""Multiple-choice scoring equals a brute force over the choices (one full forward per
choice through the cached path), and prompts have the documented shape."""

from __future__ import annotations

import json

import pytest
import torch

import mistral7b
from mistral7b.errors import InputError
from mistral7b.eval.multiple_choice import (
    MCItem,
    build_prompt,
    evaluate,
    pick_shots,
    prompt_and_continuations,
    read_items,
)

ITEMS = [
    MCItem("What color is the sky?", ["blue", "green", "a very long answer indeed"], 0),
    MCItem("2 + 2 =", ["4", "5"], 1, subject="math"),
    MCItem("Pick a letter.", ["x", "yy", "zzz", "w"], 3, subject="math"),
    MCItem("A cat sat on the", ["mat", "hat"], 0, verbatim=True),
    MCItem("Best fruit?", ["apple", "banana", "cherry"], 2),
    MCItem("Largest planet?", ["Jupiter", "Mars"], 0, subject="astronomy"),
]


@pytest.fixture(scope="module")
def llm(tiny_folder):
    _, folder = tiny_folder
    return mistral7b.load(folder, device="cpu", dtype="float32")


def brute_force(llm, items, shots, style):
    """Every choice scored alone: log-softmax of a full forward, summed over its characters
    (the tokenizer has one token per character, so the split is plain arithmetic)."""
    tok = llm.tokenizer
    preds, preds_norm, all_lps = [], [], []
    for item in items:
        context = build_prompt(item, pick_shots(item, shots, items), style)
        _, conts = prompt_and_continuations(item, style)
        lps = []
        for cont in conts:
            ids = tok.encode(context + cont, bos=True)
            logp = torch.log_softmax(llm.logits(ids, chunk_size=len(ids)), dim=-1)
            k = len(cont)
            lps.append(sum(logp[len(ids) - k - 1 + j, ids[len(ids) - k + j]].item()
                           for j in range(k)))
        all_lps.append(lps)
        preds.append(max(range(len(lps)), key=lps.__getitem__))
        norm = [lp / len(c.strip()) for lp, c in zip(lps, conts)]
        preds_norm.append(max(range(len(norm)), key=norm.__getitem__))
    return preds, preds_norm, all_lps


@pytest.mark.parametrize("shots,style", [(0, "cloze"), (2, "cloze"), (1, "letters")])
def test_scores_equal_a_brute_force_over_the_choices(llm, shots, style):
    result = evaluate(llm.engine.model, llm.tokenizer, ITEMS, shots=shots, style=style,
                      batch_size=3, window=llm.config.sliding_window)
    preds, preds_norm, lps = brute_force(llm, ITEMS, shots, style)
    for got, want in zip(result.logprobs, lps):
        assert got == pytest.approx(want, abs=1e-3)
    assert result.predictions == preds
    assert result.predictions_norm == preds_norm
    assert result.accuracy == sum(p == it.answer for p, it in zip(preds, ITEMS)) / len(ITEMS)
    assert result.accuracy_norm == sum(
        p == it.answer for p, it in zip(preds_norm, ITEMS)) / len(ITEMS)


def test_prompt_shapes():
    q = MCItem("2 + 2 =", ["4", "5"], 0, subject="elementary_math")
    shot = MCItem("1 + 1 =", ["2", "3"], 0, subject="elementary_math")
    assert build_prompt(q, [shot], "letters") == (
        "The following are multiple choice questions (with answers) about elementary math."
        "\n\n1 + 1 =\nA. 2\nB. 3\nAnswer: A\n\n2 + 2 =\nA. 4\nB. 5\nAnswer:")
    assert build_prompt(q, [], "cloze") == "Question: 2 + 2 =\nAnswer:"
    assert prompt_and_continuations(q, "cloze")[1] == [" 4", " 5"]
    assert prompt_and_continuations(q, "letters")[1] == [" A", " B"]


def test_shots_prefer_the_same_subject_and_never_the_question():
    chosen = pick_shots(ITEMS[1], 2, ITEMS)
    assert chosen[0] is ITEMS[2] and ITEMS[1] not in chosen
    with pytest.raises(InputError, match="needs 9 other"):
        pick_shots(ITEMS[0], 9, ITEMS)


def test_task_file_errors_name_the_line(tmp_path):
    path = tmp_path / "tasks.jsonl"
    good = {"question": "q", "choices": ["a", "b"], "answer": "B"}
    path.write_text(json.dumps(good) + "\n\n" + json.dumps({**good, "answer": 5}) + "\n")
    with pytest.raises(InputError, match=r"tasks.jsonl:3: \"answer\" must be"):
        read_items(path)
    path.write_text(json.dumps(good) + "\n{oops\n")
    with pytest.raises(InputError, match=r"tasks.jsonl:2: not valid JSON"):
        read_items(path)
    path.write_text(json.dumps({"question": "q", "choices": ["a"], "answer": 0}) + "\n")
    with pytest.raises(InputError, match="at least 2"):
        read_items(path)
    path.write_text(json.dumps(good) + "\n")
    assert read_items(path)[0].answer == 1
