"""Clear errors for missing or broken tokenizer files, and the chat-template sandbox."""

from __future__ import annotations

import json
import re

import pytest
from tokenizer_cases import smollm2_tokenizer

from mistral7b.errors import Mistral7BError, TokenizerError
from mistral7b.tokenizer import (
    GGUFTokenizer,
    HFTokenizer,
    MistralTokenizer,
    load_tokenizer,
)
from mistral7b.tokenizer.chat_template import render_chat_template

USER = [{"role": "user", "content": "hi"}]


def test_tokenizer_error_is_a_mistral7b_error():
    assert issubclass(TokenizerError, Mistral7BError)


def test_missing_path_is_named(tmp_path):
    missing = tmp_path / "nope"
    with pytest.raises(TokenizerError, match="nope: no such file or folder"):
        load_tokenizer(missing)


def test_empty_folder_names_files_looked_for(tmp_path):
    with pytest.raises(TokenizerError) as info:
        load_tokenizer(tmp_path)
    message = str(info.value)
    assert str(tmp_path) in message
    for name in ("tekken.json", "tokenizer.model", "tokenizer.json"):
        assert name in message


def test_unknown_file_kind(tmp_path):
    path = tmp_path / "weights.bin"
    path.write_bytes(b"\0" * 16)
    with pytest.raises(TokenizerError, match="weights.bin: not a tokenizer file"):
        load_tokenizer(path)


def test_missing_files_per_class(tmp_path):
    with pytest.raises(TokenizerError, match="m.gguf: GGUF file not found"):
        GGUFTokenizer.from_file(tmp_path / "m.gguf")
    with pytest.raises(TokenizerError, match="tokenizer.model: tokenizer file not found"):
        MistralTokenizer.from_file(tmp_path / "tokenizer.model")
    with pytest.raises(TokenizerError, match="no tokenizer.json"):
        HFTokenizer.from_folder(tmp_path)


def test_corrupt_gguf(tmp_path):
    path = tmp_path / "bad.gguf"
    path.write_bytes(b"GGUF" + b"\xff" * 60)
    with pytest.raises(TokenizerError, match="bad.gguf"):
        load_tokenizer(path)


def _write_gguf(path, **tokenizer):
    import gguf
    import numpy as np

    writer = gguf.GGUFWriter(str(path), "llama")
    if "model" in tokenizer:
        writer.add_tokenizer_model(tokenizer["model"])
        writer.add_token_list(["<unk>", "<s>", "</s>", "a"])
        writer.add_token_scores([0.0] * 4)
        writer.add_eos_token_id(tokenizer.get("eos", 2))
    writer.add_tensor("x", np.zeros(2, dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.mark.parametrize(
    "tokenizer, problem",
    [
        ({}, "no tokenizer in this GGUF file"),
        ({"model": "bert"}, "tokenizer model 'bert' is not supported"),
        ({"model": "llama", "eos": 9}, "tokenizer.ggml.eos_token_id = 9 is out of range"),
        ({"model": "gpt2"}, "gpt2 tokenizer without tokenizer.ggml.merges"),
    ],
)
def test_gguf_tokenizer_metadata_problems(tmp_path, tokenizer, problem):
    path = _write_gguf(tmp_path / "t.gguf", **tokenizer)
    with pytest.raises(TokenizerError, match=f"t.gguf: {problem}"):
        load_tokenizer(path)


def test_corrupt_sentencepiece_file(tmp_path):
    path = tmp_path / "tokenizer.model"
    path.write_bytes(b"not a model")
    with pytest.raises(TokenizerError, match="tokenizer.model"):
        load_tokenizer(tmp_path)


def test_corrupt_tokenizer_json(tmp_path):
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(TokenizerError, match="tokenizer.json: not a readable tokenizers file"):
        load_tokenizer(tmp_path)


def test_bad_tokenizer_config(tmp_path):
    smollm2_tokenizer().backend.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "tokenizer_config.json").write_text("[1, 2]")
    with pytest.raises(TokenizerError, match="tokenizer_config.json: expected a JSON object"):
        load_tokenizer(tmp_path)


def test_hf_folder_without_eos(tmp_path):
    smollm2_tokenizer().backend.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<|im_start|>"}))
    with pytest.raises(TokenizerError, match="no EOS token"):
        load_tokenizer(tmp_path)


# --- the sandbox ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "template",
    [
        "{{ ''.__class__.__mro__ }}",
        "{{ ''.__class__ }}",
        "{{ messages.__class__.__init__.__globals__ }}",
        "{% for c in ''.__class__.__mro__[1].__subclasses__() %}{{ c }}{% endfor %}",
        "{{ raise_exception.__globals__ }}",
        "{% set x = messages.append({'role': 'user'}) %}",
        "{{ messages[0].update({'content': 'x'}) }}",
    ],
)
def test_unsafe_template_is_stopped(template):
    with pytest.raises(TokenizerError, match="sandbox forbids"):
        render_chat_template(template, USER)


def test_unsafe_template_in_a_model_is_stopped(tmp_path):
    smollm2_tokenizer().backend.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "tokenizer_config.json").write_text(
        json.dumps({"eos_token": "<|im_end|>", "chat_template": "{{ ''.__class__.__mro__ }}"})
    )
    tok = load_tokenizer(tmp_path)
    with pytest.raises(TokenizerError, match="sandbox"):
        tok.encode_chat(USER)


def test_template_raise_exception_becomes_tokenizer_error():
    template = "{{ raise_exception('Conversation roles must alternate user/assistant') }}"
    with pytest.raises(TokenizerError, match="roles must alternate"):
        render_chat_template(template, USER)


def test_template_syntax_error():
    with pytest.raises(TokenizerError, match="does not parse"):
        render_chat_template("{% for m in messages %}", USER)


def test_template_helpers_as_transformers_provides():
    template = (
        "{% for m in messages %}{% if loop.index > 1 %}{% break %}{% endif %}"
        "{{ m | tojson }}{% endfor %}|{{ strftime_now('%Y') }}|{{ bos_token }}"
        "{% if tools is defined %}tools{% endif %}"
    )
    text = render_chat_template(
        template, [{"role": "user", "content": "héllo <b>"}, *USER], bos_token="<s>"
    )
    assert re.fullmatch(r'\{"role": "user", "content": "héllo <b>"\}\|\d{4}\|<s>', text), text


def test_trim_and_lstrip_blocks():
    template = "  {% for m in messages %}\n{{ m['content'] }}\n  {% endfor %}\n"
    assert render_chat_template(template, USER) == "hi\n"
