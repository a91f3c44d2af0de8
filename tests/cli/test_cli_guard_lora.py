"""`generate --safe`, `--lora PATH[:SCALE]` on generate/chat, and `mistral7b moderate`: real
subprocess runs on the embedded default model, against the Python API in this process."""

from __future__ import annotations

import json

import pytest
from cli_helpers import assert_user_error, run_cli
from lora_helpers import write_default_model_adapter

from mistral7b.moderation import LABELS
from mistral7b.tokenizer import SAFE_PROMPT

QUESTION = "What is the best French cheese?"


def test_generate_safe_puts_the_guardrail_prompt_first(llm):
    result = run_cli("generate", "--safe", "--json", "-q", "-n", "4", QUESTION)
    assert result.returncode == 0, result.stderr
    out = json.loads(result.stdout)
    messages = [{"role": "user", "content": QUESTION}]
    expected = llm.tokenizer.encode_chat([{"role": "system", "content": SAFE_PROMPT}, *messages])
    assert out["prompt_tokens"] == len(expected)
    assert out["token_ids"] == llm.chat(messages, safe_prompt=True, max_tokens=4).token_ids
    assert out["token_ids"] == llm.generate(expected, max_tokens=4).token_ids


@pytest.fixture(scope="module")
def adapter_paths(tmp_path_factory):
    """Two small random adapters for the default model (PEFT and Mistral files)."""
    return [write_default_model_adapter(tmp_path_factory.mktemp("a"), seed=0,
                                        targets=("wq", "wv")),
            write_default_model_adapter(tmp_path_factory.mktemp("b"), seed=1, targets=("w2",),
                                        fmt="mistral")]


def test_generate_with_two_adapters_equals_the_api(adapter_paths):
    import mistral7b

    a, b = adapter_paths
    result = run_cli("generate", "--json", "-q", "-n", "6", "--lora", str(a),
                     "--lora", f"{b}:0.5", "The capital of France is")
    assert result.returncode == 0, result.stderr
    got = json.loads(result.stdout)["token_ids"]
    api = mistral7b.load("default", quant="auto", lora=[a, (b, 0.5)])  # as the CLI loads it
    assert got == api.generate("The capital of France is", max_tokens=6).token_ids
    base = mistral7b.load("default", quant="auto").generate("The capital of France is",
                                                            max_tokens=6)
    assert got != base.token_ids          # the adapters change the answer


def test_lora_flag_errors_are_one_line(tmp_path):
    assert_user_error(run_cli("generate", "--lora", str(tmp_path / "nope"), "hi"),
                      "no such LoRA adapter")
    assert_user_error(run_cli("chat", "--lora", str(tmp_path), input=""),
                      "not a LoRA adapter folder")


def test_moderate_prints_one_json_line_per_input(llm, tmp_path):
    from mistral7b.moderation import moderate

    texts = ["How do I bake bread?", "Write malware that steals passwords."]
    stdin = f"{texts[0]}\n\n" + json.dumps({"id": "x1", "text": texts[1]}) + "\n"
    result = run_cli("moderate", "-q", input=stdin)
    assert result.returncode == 0, result.stderr
    lines = [json.loads(line) for line in result.stdout.splitlines()]
    assert len(lines) == 2 and "id" not in lines[0] and lines[1]["id"] == "x1"
    for line, text in zip(lines, texts):
        assert line["category"] in LABELS and set(line["scores"]) == set(LABELS)
        assert line["flagged"] == (line["category"] != "not moderated")
        expected = moderate(llm.engine, llm.tokenizer, text)
        assert line["category"] == expected.category
        assert line["probability"] == pytest.approx(expected.probability, abs=1e-5)

    jsonl = tmp_path / "in.jsonl"
    jsonl.write_text(json.dumps({"messages": [{"role": "user", "content": texts[1]}]}) + "\n")
    result = run_cli("moderate", "-q", "-f", str(jsonl))
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["category"] == lines[1]["category"]

    jsonl.write_text("plain text is not JSONL\n")
    assert_user_error(run_cli("moderate", "-f", str(jsonl)), "line 1", "not valid JSON")
