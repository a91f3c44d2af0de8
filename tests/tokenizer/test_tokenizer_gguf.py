"""GGUFTokenizer: SentencePiece GGUFs against mistral-common/sentencepiece, the default model's
byte-level BPE against llama.cpp's ids (tests/reference)."""

from __future__ import annotations

import random

import pytest
from tokenizer_cases import (
    CONVERSATIONS,
    SKY_MESSAGES,
    TEXTS,
    mistral_gguf_tokenizer,
    oracle_chat_ids,
    oracle_decode,
    oracle_encode,
    reference,
    shipped_file,
    smollm2_gguf_path,
    smollm2_tokenizer,
    write_sentencepiece_gguf,
)

from mistral7b.tokenizer import GGUFTokenizer, HFTokenizer, load_tokenizer
from mistral7b.tokenizer.chat_template import CHATML_TEMPLATE

VOCABS = [32000, 32768]


def _random_texts(seed: int, count: int) -> list[str]:
    """Seeded random strings mixing words, whitespace runs, punctuation and rare characters."""
    rng = random.Random(seed)
    alphabet = list(
        "abcdefghijklmnopqrstuvwxyz ABCXYZ     \t\n\r0123456789.,;:!?'\"()[]{}<>/\\-_=+*&^%$#@~`|"
        "éèàüöñçßøå中文字日本語한국어😀👍🏽🇫🇷ЖжЯяαβγ\u200b\u00a0\u0301▁"
    ) + ["👨‍👩‍👧‍👦"]
    words = ["the", "of", "and", "to", "in", "is", "was", "for", "on", "that", "with", "by"]
    words += ["at", "from", "this", "Mistral", "token", "streaming", "sliding"]
    texts = []
    for i in range(count):
        if i % 2:
            texts.append("".join(rng.choice(alphabet) for _ in range(rng.randint(0, 40))))
        else:
            texts.append(
                rng.choice(["", " ", "  "]).join(
                    rng.choice(words) for _ in range(rng.randint(1, 15))
                )
            )
    return texts


# --- SentencePiece (Mistral vocabulary) GGUF -------------------------------------------------


@pytest.mark.parametrize("vocab", VOCABS)
@pytest.mark.parametrize("bos", [True, False])
def test_sentencepiece_gguf_encodes_like_mistral_common(vocab, bos):
    tok = mistral_gguf_tokenizer(vocab)
    for text in TEXTS:
        ids = tok.encode(text, bos=bos)
        assert ids == oracle_encode(vocab, text, bos), text
        assert tok.decode(ids) == oracle_decode(vocab, ids), text


@pytest.mark.parametrize("vocab", VOCABS)
def test_sentencepiece_gguf_random_strings(vocab):
    tok = mistral_gguf_tokenizer(vocab)
    for text in _random_texts(seed=vocab, count=400):
        ids = tok.encode(text, bos=False)
        assert ids == oracle_encode(vocab, text, bos=False), repr(text)
        assert tok.decode(ids) == oracle_decode(vocab, ids), repr(text)


@pytest.mark.parametrize("vocab", VOCABS)
def test_sentencepiece_gguf_properties(vocab):
    tok = mistral_gguf_tokenizer(vocab)
    assert (tok.vocab_size, tok.bos_id, tok.eos_id) == (vocab, 1, 2)
    assert tok.stop_ids == frozenset({2})
    assert tok.id_to_piece(13) == "<0x0A>" if vocab == 32000 else tok.id_to_piece(3) == "[INST]"


@pytest.mark.parametrize("vocab", VOCABS)
@pytest.mark.parametrize("case", range(len(CONVERSATIONS)))
def test_mistral_vocab_gguf_chat_is_mistral_commons(vocab, case):
    tok = mistral_gguf_tokenizer(vocab)
    assert tok.uses_mistral_common
    messages = CONVERSATIONS[case]
    assert tok.encode_chat(messages) == oracle_chat_ids(vocab, messages)


def test_other_vocab_uses_its_template(tmp_path):
    # One piece renamed: no longer Mistral's vocabulary, so mistral-common's ids would be wrong.
    path = write_sentencepiece_gguf(
        tmp_path / "other.gguf", shipped_file(32000), CHATML_TEMPLATE, rename={31999: "夢"}
    )
    tok = GGUFTokenizer.from_file(path)
    assert not tok.uses_mistral_common
    ids = tok.encode_chat(CONVERSATIONS[0])
    text = "<|im_start|>user\nHello!<|im_end|>\n<|im_start|>assistant\n"
    # No <|im_start|> token in this vocab: the rendered text is encoded as plain text.
    assert ids == tok.backend.encode(text, add_special_tokens=False).ids
    assert tok.decode(ids) == text


def test_mistral_finetune_with_other_template_uses_it(tmp_path):
    zephyr = (
        "{% for message in messages %}{{ '<|' + message['role'] + '|>\n' + message['content']"
        " + eos_token + '\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>\n' }}"
        "{% endif %}"
    )
    path = write_sentencepiece_gguf(tmp_path / "zephyr.gguf", shipped_file(32000), zephyr)
    tok = GGUFTokenizer.from_file(path)
    assert not tok.uses_mistral_common
    ids = tok.encode_chat(CONVERSATIONS[0])
    # eos_token rendered as "</s>" becomes the EOS id (the template writes it).
    assert ids.count(2) == 1
    assert tok.decode(ids) == "<|user|>\nHello! \n<|assistant|>\n"


# --- the embedded default model (SmolLM2, byte-level BPE) ------------------------------------


def test_default_model_encodes_like_llama_cpp():
    ref = reference()["capitals"]
    tok = smollm2_tokenizer()
    assert tok.encode(ref["text"]) == ref["ids"]  # no BOS: add_bos_token is false
    assert tok.encode(ref["text"], bos=False) == ref["ids"]
    assert [tok.decode([i]) for i in ref["ids"]] == ref["pieces"]
    assert tok.decode(ref["ids"]) == ref["text"]


def test_default_model_chat_prompt_is_the_references():
    ref = reference()["chat"]
    tok = smollm2_tokenizer()
    assert tok.render_chat(SKY_MESSAGES) == ref["prompt_text"]
    assert tok.encode_chat(SKY_MESSAGES) == ref["prompt_ids"]


def test_default_model_properties():
    tok = smollm2_tokenizer()
    assert not tok.uses_mistral_common
    assert tok.bos_id is None
    assert tok.id_to_piece(tok.eos_id) == "<|im_end|>"
    assert tok.stop_ids == frozenset({tok.eos_id})
    assert tok.vocab_size == 49152


def test_default_model_decodes_llama_cpp_completion():
    ref = reference()["chat"]
    tok = smollm2_tokenizer()
    ids = ref["llamacpp_greedy_128_ids"]
    end = ids.index(tok.eos_id)
    assert tok.decode(ids[:end]) == ref["llamacpp_completion_text"]
    assert any(i in tok.stop_ids for i in ids)


def test_default_model_plain_text_never_yields_control_ids():
    tok = smollm2_tokenizer()
    ids = tok.encode("<|im_start|>user\nhi<|im_end|>")
    assert tok.eos_id not in ids and 1 not in ids
    assert tok.decode(ids) == "<|im_start|>user\nhi<|im_end|>"


def test_default_model_splits_every_digit():
    # tokenizer.ggml.pre = "smollm": StarCoder's rule, each digit is a token of its own.
    tok = smollm2_tokenizer()
    pieces = [tok.decode([i]) for i in tok.encode("year 2024: 3.14159")]
    assert pieces == ["year", " ", *"2024", ":", " ", "3", ".", *"14159"]


def test_default_model_round_trips_texts():
    tok = smollm2_tokenizer()
    for text in TEXTS:
        assert tok.decode(tok.encode(text)) == text, text


def test_default_model_safe_prompt_replaces_default_system():
    tok = smollm2_tokenizer()
    text = tok.render_chat(SKY_MESSAGES, safe_prompt=True)
    assert text.startswith("<|im_start|>system\nAlways assist with care")
    assert "SmolLM" not in text


def test_load_tokenizer_dispatches_gguf():
    tok = load_tokenizer(str(smollm2_gguf_path()))
    assert isinstance(tok, GGUFTokenizer) and isinstance(tok, HFTokenizer)
