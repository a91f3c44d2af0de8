"""`mistral7b finetune` on the tiny model with a character tokenizer: a run, --check, --resume,
refusals before loading the model, and Ctrl-C in a real process."""

from __future__ import annotations

import json
import os

import pytest
from interrupt import interrupt_after_checkpoint

from mistral7b.cli.finetune import main

LINES = [
    {"text": "the quick brown fox"},
    {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]},
    {"text": "jumps over the lazy dog"},
]


@pytest.fixture
def data(tmp_path):
    path = tmp_path / "train.jsonl"
    path.write_text("".join(json.dumps(x) + "\n" for x in LINES))
    return path


def test_finetune_writes_both_adapter_formats_and_resumes(tiny_chat_folder, data, tmp_path,
                                                          capsys):
    model = str(tiny_chat_folder[1])
    out = tmp_path / "out"
    argv = ["-m", model, "--data", str(data), "--eval-data", str(data), "-o", str(out),
            "--steps", "4", "--rank", "4", "--lr", "1e-2", "--batch-size", "2", "-q", "--json"]
    assert main(argv) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["steps"] == 4 and summary["eval"][-1]["step"] == 4
    assert summary["tokens_per_second"] > 0 and summary["peak_rss_mib"] > 0
    for name in ("checkpoint/trainer.json", "adapter_config.json", "adapter_model.safetensors",
                 "lora.safetensors", "params.json"):
        assert (out / name).is_file(), name
    # Running again into the same folder would overwrite the run: refused unless --resume.
    assert main(argv) == 2
    assert "already holds a checkpoint" in capsys.readouterr().err
    assert main([*argv, "--resume"]) == 0
    assert json.loads(capsys.readouterr().out)["steps"] == 4
    assert main([*argv, "--resume", "--lr", "0.5"]) == 2
    assert "settings differ" in capsys.readouterr().err


def test_check_validates_and_reports(tiny_chat_folder, data, tmp_path, capsys):
    assert main(["-m", str(tiny_chat_folder[1]), "--data", str(data), "-o", str(tmp_path / "o"),
                 "--check", "--seq-len", "24"]) == 0
    err = capsys.readouterr().err
    assert "3 examples" in err and "cut to 24 tokens" in err
    assert not (tmp_path / "o").exists()


def test_bad_data_is_refused_before_loading_the_model(tmp_path, capsys):
    path = tmp_path / "train.jsonl"
    path.write_text('{"text": "ok"}\n{"messages": [{"role": "user", "content": "x"}]}\n')
    assert main(["-m", "/nonexistent/model", "--data", str(path), "-o", str(tmp_path / "o")]) == 2
    assert f"error: {path}:2: no assistant message" in capsys.readouterr().err
    assert main(["--data", str(path), "-o", "o", "--rank", "0"]) == 2
    assert "rank must be >= 1" in capsys.readouterr().err


def test_ctrl_c_saves_a_checkpoint(tiny_chat_folder, data, tmp_path):
    out = tmp_path / "out"
    code, err = interrupt_after_checkpoint(
        ["-m", str(tiny_chat_folder[1]), "--data", str(data), "-o", str(out), "--steps",
         "100000", "--save-every", "2", "--rank", "2", "-q"], out)
    assert code == 130, err
    assert "interrupted at step" in err and "--resume" in err
    step = int(err.split("interrupted at step ")[1].split(":")[0])
    state = json.loads((out / "checkpoint" / "trainer.json").read_text())
    assert state["step"] == step >= 2
    assert not [p for p in os.listdir(out) if ".tmp" in p]
