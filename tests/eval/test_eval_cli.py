"""`mistral7b eval ppl|mc|paper` on the tiny model with a character tokenizer (in-process:
the same `main` that `python -m mistral7b.cli.eval` runs)."""

from __future__ import annotations

import json

import pytest

import mistral7b
from mistral7b.cli.eval import main
from mistral7b.eval.paper import PAPER_TABLE, format_table, metric_of, select_rows
from mistral7b.eval.perplexity import perplexity

TEXT = ("It was the best of times, it was the worst of times, it was the age of wisdom, "
        "it was the age of foolishness.\n")


def test_ppl_prints_the_number_with_its_settings(tiny_folder, tmp_path, capsys):
    folder = tiny_folder[1]
    text = tmp_path / "text.txt"
    text.write_text(TEXT)
    assert main(["ppl", "-m", str(folder), "--file", str(text), "--window", "24",
                 "--stride", "10", "-q"]) == 0
    line = capsys.readouterr().out.strip()
    llm = mistral7b.load(folder, device="cpu", dtype="float32")
    ids = llm.tokenizer.encode(TEXT, bos=True)
    want = perplexity(llm.engine.model, ids, window=24, stride=10,
                      sliding_window=llm.config.sliding_window)
    assert line.startswith(f"perplexity {want.perplexity:.4f} (window 24, stride 10, "
                           f"{len(ids) - 1} tokens scored")
    assert main(["ppl", "-m", str(folder), "--file", str(text), "--window", "24", "-q",
                 "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["window"] == 24 and out["stride"] == 12 and out["tokens_scored"] == len(ids) - 1


def test_ppl_refuses_a_stride_that_skips_tokens(tiny_folder, tmp_path, capsys):
    text = tmp_path / "text.txt"
    text.write_text(TEXT)
    assert main(["ppl", "-m", str(tiny_folder[1]), "--file", str(text), "--window", "16",
                 "--stride", "16"]) == 2
    assert "error: --stride must be between 1 and window - 1" in capsys.readouterr().err


def test_mc_prints_accuracies(tiny_folder, tmp_path, capsys):
    data = tmp_path / "tasks.jsonl"
    rows = [{"question": f"q{i}?", "choices": ["yes", "no", "maybe"], "answer": i % 3}
            for i in range(5)]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert main(["mc", "-m", str(tiny_folder[1]), "--data", str(data), "--shots", "2",
                 "--style", "letters", "--json", "-q"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["n"] == 5 and out["shots"] == 2 and out["style"] == "letters"
    assert 0.0 <= out["acc"] <= 1.0 and len(out["predictions"]) == 5
    data.write_text('{"question": "q", "choices": ["a"], "answer": 0}\n')
    assert main(["mc", "-m", str(tiny_folder[1]), "--data", str(data)]) == 2
    assert "tasks.jsonl:1:" in capsys.readouterr().err


def test_paper_table_prints_ours_beside_the_paper():
    table = format_table({"MMLU": 59.84, "HellaSwag": 81.0})
    lines = table.splitlines()
    assert lines[2].split() == ["MMLU", "5", "acc", "59.8", "60.1", "-0.3"]
    assert lines[3].split() == ["HellaSwag", "0", "acc_norm", "81.0", "81.3", "-0.3"]
    assert lines[4].split() == ["WinoGrande", "0", "acc", "-", "75.3"]
    assert [r.paper for r in PAPER_TABLE] == [60.1, 81.3, 75.3, 83.0, 80.0, 55.5]
    assert [r.task for r in select_rows("mmlu,ARC-c")] == ["mmlu", "arc_challenge"]
    assert metric_of({"piqa": {"acc_norm,none": 0.8}}, "piqa", "acc_norm") == 0.8


def test_paper_refuses_unknown_tasks_before_loading(capsys):
    assert main(["paper", "-m", "/nonexistent", "--tasks", "gsm8k"]) == 2
    assert "unknown task 'gsm8k'" in capsys.readouterr().err


@pytest.mark.parametrize("argv", [["ppl", "--help"], ["mc", "--help"], ["paper", "--help"]])
def test_help(argv, capsys):
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 0
    assert "--lora" in capsys.readouterr().out
