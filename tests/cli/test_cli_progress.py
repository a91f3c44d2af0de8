"""Progress bars (on a terminal only, never with -q or through a pipe) and the figures of
`generate --verbose` / `--json`."""

from __future__ import annotations

import json
import re

import pytest
from cli_helpers import TerminalSession, assert_user_error, cli_env, run_cli
from tiny_models import mistral_v3_folder

from mistral7b.progress import MIN_BYTES_ENV

# tqdm's bar: "loading: 100%|#####| 23/23 [00:00<00:00, 1234.5tensor/s]" (redrawn with \r).
BAR = re.compile(rb"(\w[\w ()]*): +\d+%\|.*?\| *\d+/\d+ \[")


@pytest.fixture(scope="module")
def tiny_v3(tmp_path_factory):
    """A tiny float consolidated model (v3 tokenizer): the float loader's path."""
    return mistral_v3_folder(tmp_path_factory.mktemp("tiny") / "model", seed=2)


def terminal_output(*args: str, **env: str) -> bytes:
    term = TerminalSession(*args, env=cli_env(TERM="dumb", **env))
    try:
        assert term.wait(timeout=240) == 0, term.output[-2000:]
        return term.output
    finally:
        term.close()


def bars(output: bytes) -> set[str]:
    return {m.decode() for m in BAR.findall(output)}


def test_load_bar_on_a_terminal_for_large_checkpoints_only():
    # The 100 MB default model is not large: no bar...
    quiet = terminal_output("generate", "Hello", "-n", "2")
    assert not bars(quiet), quiet[-1500:]
    # ...until the threshold says it is.
    shown = terminal_output("generate", "Hello", "-n", "2", **{MIN_BYTES_ENV: "1"})
    assert "loading (int4)" in bars(shown), shown[-1500:]
    # -q: no bar, no summary.
    silent = terminal_output("generate", "Hello", "-n", "2", "-q", **{MIN_BYTES_ENV: "1"})
    assert not bars(silent) and b"tok/s" not in silent


def test_no_bar_through_a_pipe():
    env = cli_env(**{MIN_BYTES_ENV: "1"})
    piped = run_cli("generate", "Hello", "-n", "2", env=env)
    assert piped.returncode == 0, piped.stderr
    assert "\r" not in piped.stderr and "tensor/s" not in piped.stderr, piped.stderr
    assert "load " in piped.stderr            # the summary line still comes


def test_server_start_up_bar(tiny_v3):
    term = TerminalSession("serve", "-m", str(tiny_v3), "--port", "0",
                           env=cli_env(TERM="dumb", **{MIN_BYTES_ENV: "1"}))
    try:
        out = term.expect_text(b"loaded in", since=0)
        assert "loading" in bars(out), out[-1500:]     # the float loader's bar
        term.interrupt()
        term.wait()
    finally:
        term.close()


def test_quantize_and_eval_bars(tmp_path):
    out = terminal_output("quantize", "default", str(tmp_path / "q"), "--to", "int8")
    assert "quantizing to int8" in bars(out), out[-1500:]
    text = tmp_path / "text.txt"
    text.write_text("The quick brown fox jumps over the lazy dog. " * 40)
    out = terminal_output("eval", "ppl", "-f", str(text), "--window", "64", "--stride", "32")
    assert "scoring" in bars(out), out[-1500:]
    piped = run_cli("eval", "ppl", "-f", str(text), "--window", "64", "--stride", "32")
    assert piped.returncode == 0 and "scoring" not in piped.stderr, piped.stderr


VERBOSE_FIELDS = ("total duration", "load duration", "prompt eval count",
                  "prompt eval duration", "prompt eval rate", "time to first token",
                  "eval count", "eval duration", "eval rate", "peak memory")


def _seconds(text: str, label: str) -> float:
    m = re.search(rf"^{label}: +([\d.]+) s$", text, re.MULTILINE)
    assert m, (label, text)
    return float(m[1])


def test_verbose_prints_the_figures(tokenizer):
    prompt = "The capital of France is"
    result = run_cli("generate", prompt, "-n", "6", "--verbose", "--ignore-eos")
    assert result.returncode == 0, result.stderr
    for field in VERBOSE_FIELDS:
        assert re.search(rf"^{field}: ", result.stderr, re.MULTILINE), (field, result.stderr)
    count = re.search(r"^prompt eval count: +(\d+) token", result.stderr, re.MULTILINE)
    assert count and int(count[1]) == len(tokenizer.encode(prompt, bos=True))
    assert re.search(r"^eval count: +6 token", result.stderr, re.MULTILINE), result.stderr
    ttft = _seconds(result.stderr, "time to first token")
    assert 0 < ttft <= _seconds(result.stderr, "total duration")
    assert "| first token" not in result.stderr      # the table replaces the summary line
    assert_user_error(run_cli("generate", prompt, "--verbose", "-q"), "--verbose")


def test_first_token_time_within_total():
    result = run_cli("generate", "Hello", "-n", "4", "--json", "-q", "--ignore-eos")
    assert result.returncode == 0, result.stderr
    t = json.loads(result.stdout)["timings"]
    assert 0 < t["first_token_s"] <= t["total_s"]
    assert t["prompt_s"] <= t["first_token_s"] + 1e-3      # the pre-fill comes first
    summary = run_cli("generate", "Hello", "-n", "4", "--ignore-eos")
    assert re.search(r"\| first token \d+\.\d\d s \|", summary.stderr), summary.stderr
