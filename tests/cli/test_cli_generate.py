"""`mistral7b generate`: real subprocess runs on the embedded default model."""

from __future__ import annotations

import json
import re

import pytest
from cli_helpers import assert_user_error, run_cli

from mistral7b.cli.main import main

SUMMARY = re.compile(r"load \d+\.\d\d s \| prompt (\d+) tok(?: \((\d+) cached\))?, [\d.]+ tok/s \| "
                     r"first token \d+\.\d\d s \| generated (\d+) tok, [\d.]+ tok/s \| "
                     r"peak RSS \d+ MiB")


def test_greedy_streams_llamacpp_answer(reference, tokenizer):
    capitals = reference["capitals"]
    # llama.cpp's argmax after the last prompt token, decoded by the model's own tokenizer.
    expected = tokenizer.decode([capitals["llamacpp_argmax"][-1]])
    assert expected.strip()
    result = run_cli("generate", capitals["text"], "-n", "6")
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(expected), result.stdout
    assert result.stdout.endswith("\n")
    # The summary goes to stderr only, with the prompt's token count.
    match = SUMMARY.search(result.stderr)
    assert match, result.stderr
    assert int(match[1]) == len(capitals["ids"])
    assert "tok/s" not in result.stdout and "load" not in result.stdout


def test_json_from_stdin(reference, tokenizer):
    capitals = reference["capitals"]
    # The trailing newline `echo` adds is dropped, so the prompt is the reference's 19 tokens.
    result = run_cli("generate", "--json", "-n", "5", "-q", input=capitals["text"] + "\n")
    assert result.returncode == 0, result.stderr
    out = json.loads(result.stdout)           # the whole of stdout is one JSON object
    assert set(out) >= {"text", "token_ids", "finish_reason", "prompt_tokens",
                        "completion_tokens", "timings"}
    assert out["finish_reason"] == "length"
    assert out["completion_tokens"] == 5 == len(out["token_ids"])
    assert out["prompt_tokens"] == len(capitals["ids"])
    assert out["token_ids"][0] == capitals["llamacpp_argmax"][-1]
    assert out["text"] == tokenizer.decode(out["token_ids"])
    assert out["timings"]["prompt_tokens"] == len(capitals["ids"])
    assert "tok/s" not in result.stderr       # -q


def test_file_with_chat_format_matches_api(tmp_path, llm):
    prompt = tmp_path / "prompt.txt"
    prompt.write_text("What is the capital of Italy?\n", encoding="utf-8")
    result = run_cli("generate", "-f", str(prompt), "--system", "Answer in one word.",
                     "-n", "8", "--stop", "\n")
    assert result.returncode == 0, result.stderr
    expected = llm.chat([{"role": "system", "content": "Answer in one word."},
                         {"role": "user", "content": "What is the capital of Italy?"}],
                        max_tokens=8, stop=["\n"])
    assert result.stdout == expected.text + "\n"
    assert SUMMARY.search(result.stderr)


def test_missing_model_is_one_line_error(tmp_path):
    result = run_cli("generate", "-m", str(tmp_path / "no-such-model"), "hello")
    assert_user_error(result, "no-such-model")


def test_bad_flag_value_in_subprocess():
    result = run_cli("generate", "--temperature", "-1", "hello")
    assert_user_error(result, "--temperature", ">= 0")


@pytest.mark.parametrize("argv, words", [
    (["-n", "0"], ["--max-tokens", ">= 1"]),
    (["-n", "-5"], ["--max-tokens"]),
    (["-n", "many"], ["-n/--max-tokens", "invalid int"]),
    (["--top-p", "2"], ["--top-p", "(0, 1]"]),
    (["--top-k", "-1"], ["--top-k"]),
    (["--min-p", "1.5"], ["--min-p"]),
    (["--repeat-penalty", "0"], ["--repeat-penalty"]),
    (["--presence-penalty", "3"], ["--presence-penalty"]),
    (["--stop", ""], ["--stop"]),
    (["-c", "0"], ["--ctx"]),
    (["-f", "/no/such/prompt.txt"], ["/no/such/prompt.txt", "no such file"]),
    (["--frobnicate"], ["unrecognized arguments"]),
])
def test_bad_values_fail_before_loading(argv, words, capsys):
    """Checked before the model loads: in-process, fast. (`hello` is given, so no stdin.)"""
    args = ["generate", *argv] if argv[0] == "-f" else ["generate", "hello", *argv]
    try:
        code = main(args)
    except SystemExit as exc:     # argparse's own errors
        code = exc.code
    err = capsys.readouterr().err
    assert code == 2
    assert err.count("\n") == 1 and err.startswith("error: "), err
    for word in words:
        assert word in err


def test_prompt_and_file_together_is_an_error(tmp_path, capsys):
    (tmp_path / "p.txt").write_text("x")
    assert main(["generate", "hello", "-f", str(tmp_path / "p.txt")]) == 2
    assert capsys.readouterr().err.startswith("error: give the prompt as an argument or")


def _prompt_args(prompt=None, file=None):
    import argparse

    return argparse.Namespace(prompt=prompt, file=file)


def test_read_prompt_sources(tmp_path, monkeypatch):
    import io

    from mistral7b.cli.generate import read_prompt

    monkeypatch.setattr("sys.stdin", io.StringIO("from stdin\n"))
    assert read_prompt(_prompt_args("-")) == "from stdin"
    monkeypatch.setattr("sys.stdin", io.StringIO("piped\r\n"))
    assert read_prompt(_prompt_args(file="-")) == "piped"
    monkeypatch.setattr("sys.stdin", io.StringIO("implicit"))   # not a TTY, no prompt given
    assert read_prompt(_prompt_args()) == "implicit"
    path = tmp_path / "p.txt"
    path.write_text("line 1\nline 2\n\n", encoding="utf-8")      # only one newline is dropped
    assert read_prompt(_prompt_args(file=str(path))) == "line 1\nline 2\n"
    assert read_prompt(_prompt_args("as given\n")) == "as given\n"


SPEC_PROMPT = ("Copy this list exactly: red, green, blue, yellow, red, green, blue, yellow, red, "
               "green, blue, yellow, red,")


@pytest.mark.parametrize("flags", [["--speculate", "4"], ["--draft-model", "default"]],
                         ids=["lookup", "draft-model"])
def test_speculate_gives_the_same_answer_and_reports_acceptance(flags):
    """--speculate (prompt lookup) or --draft-model (here the default model's int4 blocks
    drafting for its float weights): the greedy answer of plain decoding (float weights: the
    invariant is exact there), and the drafts it accepted in --json and on stderr."""
    common = ["generate", SPEC_PROMPT, "-n", "24", "--json", "--quant", "none"]
    plain = run_cli(*common, "-q")
    spec = run_cli(*common, *flags)
    assert plain.returncode == 0 and spec.returncode == 0, spec.stderr
    want, got = json.loads(plain.stdout), json.loads(spec.stdout)
    assert got["token_ids"] == want["token_ids"] and got["text"] == want["text"]
    assert want["timings"]["draft_tokens"] == 0
    assert 0 < got["timings"]["accepted_tokens"] <= got["timings"]["draft_tokens"]
    assert got["timings"].get("draft_model") == ("default" if "--draft-model" in flags else None)
    assert "drafts accepted" in spec.stderr


def test_speculate_out_of_range_is_one_line_error():
    result = run_cli("generate", "hi", "-n", "2", "--speculate", "99")
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1].startswith("error: speculate must be")


def test_summary_line_names_the_draft_model():
    text = run_cli("generate", SPEC_PROMPT, "-n", "8", "--draft-model", "default",
                   "--speculate", "2")
    assert text.returncode == 0, text.stderr
    assert re.search(r"drafts accepted \(\d+%, draft model default\)", text.stderr), text.stderr


def test_draft_model_with_another_vocabulary_is_one_line_error(tmp_path):
    from tiny_models import mistral_v3_folder

    folder = mistral_v3_folder(tmp_path / "v3")
    result = run_cli("generate", "hi", "-n", "2", "--draft-model", str(folder))
    assert_user_error(result, "does not share the vocabulary", "vocabulary sizes differ")
