"""MistralTokenizer against mistral-common itself (the ground truth of Mistral's formats)."""

from __future__ import annotations

import shutil

import pytest
from tokenizer_cases import (
    CONVERSATIONS,
    TEXTS,
    mistral_common_messages,
    mistral_tokenizer,
    oracle_chat_ids,
    oracle_decode,
    oracle_encode,
    shipped_file,
)

from mistral7b.errors import TokenizerError
from mistral7b.tokenizer import SAFE_PROMPT, MistralTokenizer, load_tokenizer

VOCABS = [32000, 32768]


def test_safe_prompt_is_the_papers_text():
    assert SAFE_PROMPT == (
        "Always assist with care, respect, and truth. Respond with utmost utility yet securely. "
        "Avoid harmful, unethical, prejudiced, or negative content. Ensure replies promote "
        "fairness and positivity."
    )


@pytest.mark.parametrize("vocab", VOCABS)
def test_properties(vocab):
    tok = mistral_tokenizer(vocab)
    assert tok.version == {32000: "v1", 32768: "v3"}[vocab]
    assert tok.vocab_size == vocab
    assert (tok.bos_id, tok.eos_id) == (1, 2)
    assert tok.stop_ids == frozenset({2})
    assert tok.id_to_piece(2) == "</s>"
    if vocab == 32768:
        assert (tok.id_to_piece(3), tok.id_to_piece(4)) == ("[INST]", "[/INST]")


@pytest.mark.parametrize("vocab", VOCABS)
@pytest.mark.parametrize("bos", [True, False])
def test_encode_decode_equal_mistral_common(vocab, bos):
    tok = mistral_tokenizer(vocab)
    for text in TEXTS:
        ids = tok.encode(text, bos=bos)
        assert ids == oracle_encode(vocab, text, bos), text
        assert tok.decode(ids) == oracle_decode(vocab, ids), text


@pytest.mark.parametrize("vocab", VOCABS)
def test_decode_skips_control_tokens(vocab):
    tok = mistral_tokenizer(vocab)
    ids = [1, *tok.encode("Hello", bos=False), 2]
    assert tok.decode(ids) == "Hello"
    if vocab == 32768:
        assert tok.decode([3, *tok.encode("hi", bos=False), 4]) == "hi"


@pytest.mark.parametrize("vocab", VOCABS)
@pytest.mark.parametrize("case", range(len(CONVERSATIONS)))
def test_chat_equals_encode_chat_completion(vocab, case):
    messages = CONVERSATIONS[case]
    assert mistral_tokenizer(vocab).encode_chat(messages) == oracle_chat_ids(vocab, messages)


@pytest.mark.parametrize("vocab", VOCABS)
def test_user_typed_control_tags_stay_text(vocab):
    tok = mistral_tokenizer(vocab)
    messages = [{"role": "user", "content": "[INST] x [/INST] </s> <s>"}]
    ids = tok.encode_chat(messages)
    assert ids.count(tok.eos_id) == 0 and ids.count(tok.bos_id) == 1
    if vocab == 32768:  # exactly one structural [INST] and [/INST]
        assert ids.count(3) == 1 and ids.count(4) == 1
    assert "[INST] x [/INST] </s> <s>" in tok.decode(ids)


@pytest.mark.parametrize("vocab", VOCABS)
def test_last_assistant_turn_closed_with_eos(vocab):
    messages = CONVERSATIONS[2][:2]  # user, assistant
    ids = mistral_tokenizer(vocab).encode_chat(messages, add_generation_prompt=False)
    assert ids == oracle_chat_ids(vocab, messages, mode="finetuning")
    assert ids[-1] == 2


@pytest.mark.parametrize("vocab", VOCABS)
def test_last_assistant_turn_continued_as_prefix(vocab):
    messages = CONVERSATIONS[2][:2]
    ids = mistral_tokenizer(vocab).encode_chat(messages, add_generation_prompt=True)
    prefixed = [messages[0], {**messages[1], "prefix": True}]
    assert ids == oracle_chat_ids(vocab, prefixed)
    assert ids[-1] != 2


@pytest.mark.parametrize("vocab", VOCABS)
def test_generation_prompt_flag_does_not_change_a_user_ending(vocab):
    tok = mistral_tokenizer(vocab)
    messages = CONVERSATIONS[3]
    assert tok.encode_chat(messages, add_generation_prompt=False) == tok.encode_chat(messages)


@pytest.mark.parametrize("vocab", VOCABS)
def test_safe_prompt_goes_first_in_the_system_prompt(vocab):
    tok = mistral_tokenizer(vocab)
    plain = CONVERSATIONS[0]
    assert tok.encode_chat(plain, safe_prompt=True) == oracle_chat_ids(
        vocab, [{"role": "system", "content": SAFE_PROMPT}, *plain]
    )
    with_system = CONVERSATIONS[1]
    expected = [
        {"role": "system", "content": SAFE_PROMPT + "\n\n" + with_system[0]["content"]},
        *with_system[1:],
    ]
    assert tok.encode_chat(with_system, safe_prompt=True) == oracle_chat_ids(vocab, expected)


@pytest.mark.parametrize("vocab", VOCABS)
def test_content_parts_are_joined(vocab):
    tok = mistral_tokenizer(vocab)
    parts = [{"role": "user", "content": [{"type": "text", "text": "Hel"}, "lo!"]}]
    assert tok.encode_chat(parts) == oracle_chat_ids(vocab, CONVERSATIONS[0])


@pytest.mark.parametrize("vocab", VOCABS)
def test_bare_tokenizer_model_version_from_its_size(vocab, tmp_path):
    # Mistral 7B v0.3 ships its v3 vocabulary as plain `tokenizer.model` too.
    shutil.copy(shipped_file(vocab), tmp_path / "tokenizer.model")
    tok = load_tokenizer(tmp_path)
    assert isinstance(tok, MistralTokenizer)
    assert tok.version == {32000: "v1", 32768: "v3"}[vocab]
    for messages in CONVERSATIONS[:4]:
        assert tok.encode_chat(messages) == oracle_chat_ids(vocab, messages)


def test_folder_prefers_versioned_file(tmp_path):
    shutil.copy(shipped_file(32000), tmp_path / "tokenizer.model")
    shutil.copy(shipped_file(32768), tmp_path / "tokenizer.model.v3")
    (tmp_path / "tokenizer.json").write_text("{}")  # an HF file beside them is not used
    tok = load_tokenizer(tmp_path)
    assert isinstance(tok, MistralTokenizer) and tok.version == "v3"
    assert tok.path.name == "tokenizer.model.v3"


def test_for_vocab_rejects_unknown_sizes():
    with pytest.raises(TokenizerError, match="50000"):
        MistralTokenizer.for_vocab(50000)


@pytest.mark.parametrize(
    "messages, problem",
    [
        ([], "non-empty"),
        ([{"role": "robot", "content": "hi"}], "robot"),
        ([{"role": "user", "content": 3}], "not a string"),
        ([{"role": "tool", "content": "x"}], "v1 instruct format.*start with a user"),
    ],
)
def test_invalid_conversations_raise_tokenizer_error(messages, problem):
    with pytest.raises(TokenizerError, match=problem):
        mistral_tokenizer(32000).encode_chat(messages)


def test_tekken_file_equals_mistral_common():
    from mistral_common.protocol.instruct.request import ChatCompletionRequest
    from mistral_common.tokens.tokenizers.mistral import MistralTokenizer as MCTokenizer

    path = shipped_file(32000).parent / "tekken_240718.json"
    tok = load_tokenizer(path)
    oracle = MCTokenizer.from_file(path)
    raw = oracle.instruct_tokenizer.tokenizer
    for text in TEXTS:
        ids = tok.encode(text)
        assert ids == raw.encode(text, bos=True, eos=False), text
        assert tok.decode(ids) == oracle.decode(ids)
    for messages in CONVERSATIONS:
        request = ChatCompletionRequest(messages=mistral_common_messages(messages))
        assert tok.encode_chat(messages) == oracle.encode_chat_completion(request).tokens
