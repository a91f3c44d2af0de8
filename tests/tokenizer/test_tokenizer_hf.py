"""HFTokenizer on folders built here, against the llama.cpp reference ids and transformers."""

from __future__ import annotations

import json
import shutil

import pytest
from tokenizer_cases import (
    CONVERSATIONS,
    SKY_MESSAGES,
    TEXTS,
    mistral_gguf_tokenizer,
    oracle_encode,
    reference,
    shipped_file,
    smollm2_tokenizer,
)
from tokenizers import Tokenizer as Backend
from tokenizers import processors

from mistral7b.tokenizer import HFTokenizer, MistralTokenizer, load_tokenizer
from mistral7b.tokenizer.chat_template import CHATML_TEMPLATE


def _write_folder(folder, backend, **config):
    folder.mkdir(parents=True, exist_ok=True)
    backend.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    return folder


@pytest.fixture(scope="module")
def smollm2_folder(tmp_path_factory):
    gguf_tok = smollm2_tokenizer()
    return _write_folder(
        tmp_path_factory.mktemp("smollm2"),
        gguf_tok.backend,
        chat_template=gguf_tok.chat_template,
        bos_token="<|im_start|>",
        eos_token={"content": "<|im_end|>", "special": True},
        add_bos_token=False,
    )


@pytest.fixture(scope="module")
def smollm2_hf(smollm2_folder):
    return HFTokenizer.from_folder(smollm2_folder)


@pytest.fixture(scope="module")
def transformers_smollm2(smollm2_folder):
    transformers = pytest.importorskip("transformers")
    tok = transformers.PreTrainedTokenizerFast(
        tokenizer_file=str(smollm2_folder / "tokenizer.json"),
        bos_token="<|im_start|>",
        eos_token="<|im_end|>",
    )
    tok.chat_template = smollm2_tokenizer().chat_template
    return tok


def test_hf_folder_gives_reference_ids(smollm2_hf):
    ref = reference()
    assert smollm2_hf.encode(ref["capitals"]["text"]) == ref["capitals"]["ids"]
    assert smollm2_hf.encode_chat(SKY_MESSAGES) == ref["chat"]["prompt_ids"]
    assert smollm2_hf.bos_id is None
    assert smollm2_hf.stop_ids == frozenset({2})


def test_load_tokenizer_picks_hf(smollm2_folder):
    tok = load_tokenizer(smollm2_folder)
    assert type(tok) is HFTokenizer


def test_encode_equals_transformers(smollm2_hf, transformers_smollm2):
    for text in TEXTS:
        if "<|" in text:  # transformers turns special-token strings into ids; we do not
            continue
        expected = transformers_smollm2.encode(text, add_special_tokens=False)
        assert smollm2_hf.encode(text) == expected, text
        assert smollm2_hf.decode(expected) == transformers_smollm2.decode(
            expected, skip_special_tokens=True
        )


@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_chat_equals_transformers_apply_chat_template(
    smollm2_hf, transformers_smollm2, add_generation_prompt
):
    for messages in [*CONVERSATIONS, SKY_MESSAGES]:
        expected = transformers_smollm2.apply_chat_template(
            messages, add_generation_prompt=add_generation_prompt, tokenize=True
        )
        if not isinstance(expected, list):  # transformers 5 returns a BatchEncoding
            expected = expected["input_ids"]
        ours = smollm2_hf.encode_chat(messages, add_generation_prompt=add_generation_prompt)
        assert ours == expected, messages


def test_generation_config_eos_ids_stop(tmp_path, smollm2_folder):
    folder = tmp_path / "gen"
    shutil.copytree(smollm2_folder, folder)
    (folder / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 0]}))
    assert HFTokenizer.from_folder(folder).stop_ids == frozenset({0, 2})


def test_chat_template_jinja_file_wins(tmp_path, smollm2_folder):
    folder = tmp_path / "jinja"
    shutil.copytree(smollm2_folder, folder)
    (folder / "chat_template.jinja").write_text(CHATML_TEMPLATE)
    tok = HFTokenizer.from_folder(folder)
    assert tok.render_chat(SKY_MESSAGES) == (
        "<|im_start|>user\nExplain in a few sentences why the sky is blue.<|im_end|>\n"
        "<|im_start|>assistant\n"
    )


def test_no_template_falls_back_to_chatml(tmp_path):
    folder = _write_folder(tmp_path / "plain", smollm2_tokenizer().backend, eos_token="<|im_end|>")
    tok = HFTokenizer.from_folder(folder)
    assert not tok.has_own_chat_template
    ids = tok.encode_chat(CONVERSATIONS[0])
    assert ids[0] == 1 and ids.count(2) == 1  # <|im_start|>, <|im_end|> as their ids
    assert tok.stop_ids == frozenset({2})


def test_safe_prompt_joins_existing_system(smollm2_hf):
    text = smollm2_hf.render_chat(CONVERSATIONS[1], safe_prompt=True)
    assert text.startswith("<|im_start|>system\nAlways assist with care, respect, and truth.")
    assert "positivity.\n\nYou are terse.<|im_end|>" in text


@pytest.fixture(scope="module")
def sentencepiece_folder(tmp_path_factory):
    # A Llama-style HF folder (SentencePiece BPE, BOS added by tokenizer_config).
    return _write_folder(
        tmp_path_factory.mktemp("spm"),
        mistral_gguf_tokenizer(32000).backend,
        bos_token="<s>",
        eos_token="</s>",
        add_bos_token=True,
        chat_template=CHATML_TEMPLATE,
    )


def test_sentencepiece_hf_folder_adds_bos(sentencepiece_folder):
    tok = HFTokenizer.from_folder(sentencepiece_folder)
    assert tok.bos_id == 1
    for text in TEXTS:
        assert tok.encode(text) == oracle_encode(32000, text, bos=True), text
        assert tok.encode(text, bos=False) == oracle_encode(32000, text, bos=False), text


def test_add_bos_inferred_from_post_processor(tmp_path):
    copy = Backend.from_str(mistral_gguf_tokenizer(32000).backend.to_str())
    copy.post_processor = processors.TemplateProcessing(
        single="<s> $A", special_tokens=[("<s>", 1)]
    )
    folder = _write_folder(tmp_path / "pp", copy, bos_token="<s>", eos_token="</s>")
    tok = HFTokenizer.from_folder(folder)
    assert tok.bos_id == 1
    assert tok.encode("Hello") == oracle_encode(32000, "Hello", bos=True)


@pytest.mark.parametrize(
    "config, template, expected",
    [
        ({"model_type": "llama"}, None, HFTokenizer),
        ({"model_type": "mistral"}, None, MistralTokenizer),
        ({"model_type": "mistral"}, "{{ '[INST] ' + messages[0]['content'] }}", MistralTokenizer),
        ({"model_type": "mistral"}, "{{ '<|user|>' + messages[0]['content'] }}", HFTokenizer),
    ],
)
def test_folder_with_both_files(tmp_path, sentencepiece_folder, config, template, expected):
    folder = tmp_path / "both"
    shutil.copytree(sentencepiece_folder, folder)
    shutil.copy(shipped_file(32000), folder / "tokenizer.model")
    (folder / "config.json").write_text(json.dumps(config))
    tok_config = json.loads((folder / "tokenizer_config.json").read_text())
    tok_config.pop("chat_template")
    if template is not None:
        tok_config["chat_template"] = template
    (folder / "tokenizer_config.json").write_text(json.dumps(tok_config))
    assert type(load_tokenizer(folder)) is expected


def test_consolidated_folder_uses_mistral_common(tmp_path, sentencepiece_folder):
    folder = tmp_path / "consolidated"
    shutil.copytree(sentencepiece_folder, folder)
    shutil.copy(shipped_file(32000), folder / "tokenizer.model")
    (folder / "params.json").write_text("{}")
    assert type(load_tokenizer(folder)) is MistralTokenizer
