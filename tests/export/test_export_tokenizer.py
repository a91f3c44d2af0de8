"""The tokenizer in each export encodes like the source's: plain text and chat (template or
mistral-common), for an HF tokenizer.json source and a Mistral v3 source, in all three
formats; against outside references where there is one (mistral-common, transformers,
llama.cpp's ids for the embedded model)."""

from __future__ import annotations

import pytest
from tokenizer_cases import CONVERSATIONS, SKY_MESSAGES, TEXTS, oracle_chat_ids, reference

import mistral7b
from mistral7b.exporter import export
from mistral7b.tokenizer import GGUFTokenizer, load_tokenizer

TARGETS = [("hf", "out"), ("consolidated", "out"), ("gguf", "out.gguf")]


def _exported_tokenizer(src, tmp_path, to, name):
    out = export(src, to=to, out=tmp_path / name, progress=False)
    return GGUFTokenizer.from_file(out) if to == "gguf" else load_tokenizer(out)


def _assert_same(got, want):
    for text in TEXTS:
        assert got.encode(text, bos=True) == want.encode(text, bos=True), text
    for messages in CONVERSATIONS:
        assert got.encode_chat(messages) == want.encode_chat(messages), messages
    assert (got.eos_id, got.bos_id) == (want.eos_id, want.bos_id)


@pytest.mark.parametrize(("to", "name"), TARGETS)
def test_mistral_v3_source(v3_blocks_folder, tmp_path, to, name):
    got = _exported_tokenizer(v3_blocks_folder, tmp_path, to, name)
    _assert_same(got, load_tokenizer(v3_blocks_folder))
    for messages in CONVERSATIONS[:4]:               # mistral-common itself
        assert got.encode_chat(messages) == oracle_chat_ids(32768, messages)


@pytest.mark.parametrize(("to", "name"), TARGETS)
def test_hf_tokenizer_source(smollm2_hf_folder, tmp_path, to, name):
    got = _exported_tokenizer(smollm2_hf_folder, tmp_path, to, name)
    _assert_same(got, load_tokenizer(smollm2_hf_folder))
    capitals = reference()["capitals"]                # llama.cpp's ids for this vocabulary
    assert got.encode(capitals["text"], bos=False) == capitals["ids"]


def test_gguf_source_to_hf_in_transformers(tmp_path):
    """The embedded model's GGUF tokenizer written as tokenizer.json + tokenizer_config.json:
    transformers encodes text and renders the chat template as llama.cpp does."""
    from transformers import AutoTokenizer

    out = export("default", to="hf", out=tmp_path / "hf", type="f16", progress=False)
    tok = AutoTokenizer.from_pretrained(out)
    ref = reference()
    assert tok.encode(ref["capitals"]["text"], add_special_tokens=False) == \
        ref["capitals"]["ids"]
    chat = ref["chat"]
    text = tok.apply_chat_template(SKY_MESSAGES, tokenize=False, add_generation_prompt=True)
    assert text == chat["prompt_text"]
    assert tok.encode(text, add_special_tokens=False) == chat["prompt_ids"]
    assert mistral7b.load(out).tokenizer.encode_chat(SKY_MESSAGES) == chat["prompt_ids"]


def test_gguf_without_a_tokenizer_is_refused(tiny_consolidated, tmp_path):
    _, src = tiny_consolidated
    with pytest.raises(mistral7b.TokenizerError, match="no tokenizer.*GGUF file needs one"):
        export(src, to="gguf", out=tmp_path / "m.gguf", progress=False)
    assert list(tmp_path.iterdir()) == []
    out = export(src, to="hf", out=tmp_path / "hf", progress=False)  # HF takes none
    assert not (out / "tokenizer.json").exists()


@pytest.mark.parametrize("vocab", [32000, 32768])
def test_a_mistral_gguf_gets_a_template_that_renders_like_mistral_common(tmp_path, vocab):
    """A Mistral folder has no Jinja template (mistral-common needs none) but llama.cpp
    reads one from the GGUF: the one written, rendered and encoded as a template (not through
    mistral-common), gives mistral-common's ids for alternating conversations."""
    from tiny_models import hf_mistral, save_consolidated

    from mistral7b.tokenizer.hf import HFTokenizer

    model = hf_mistral(vocab=vocab, dim=16, n_layers=1, n_heads=2, n_kv_heads=1, head_dim=8,
                       hidden=32, window=None, seed=1)
    src = save_consolidated(model, tmp_path / "src")   # no tokenizer file: mistral-common's
    out = export(src, to="gguf", type="f32", out=tmp_path / "m.gguf", progress=False)
    gguf_tok = GGUFTokenizer.from_file(out)
    assert gguf_tok.uses_mistral_common and gguf_tok.has_own_chat_template
    as_template = HFTokenizer(gguf_tok.backend, eos_id=gguf_tok.eos_id,
                              bos_id=gguf_tok.bos_id, add_bos=True,
                              chat_template=gguf_tok.chat_template)
    alternating = [c for c in CONVERSATIONS
                   if all(m["role"] != r["role"] for m, r in zip(c[1:], c[:-1]))]
    assert len(alternating) >= 8
    for messages in alternating:
        assert as_template.encode_chat(messages) == oracle_chat_ids(vocab, messages), messages


def test_mistral_v3_source_to_hf_in_transformers(v3_blocks_folder, tmp_path):
    """An HF export of a Mistral folder also gets tokenizer.json + tokenizer_config.json, so
    transformers' AutoTokenizer encodes and chats as mistral-common (alternating turns)."""
    from tokenizer_cases import oracle_encode
    from transformers import AutoTokenizer

    out = export(v3_blocks_folder, to="hf", out=tmp_path / "hf", progress=False)
    assert (out / "tokenizer.model.v3").is_file()
    tok = AutoTokenizer.from_pretrained(out)
    for text in TEXTS:   # transformers turns control-token text into the ids, by design
        if not any(special in text for special in ("[INST]", "</s>", "<s>", "<unk>")):
            assert tok.encode(text) == oracle_encode(32768, text, bos=True), text
    for messages in CONVERSATIONS:
        if any(m["role"] == r["role"] for m, r in zip(messages[1:], messages[:-1])) or \
                "[INST]" in str(messages):
            continue
        got = tok.apply_chat_template(messages, tokenize=True, add_generation_prompt=True)
        got = got["input_ids"] if isinstance(got, dict) or hasattr(got, "keys") else got
        assert list(got) == oracle_chat_ids(32768, messages), messages
