"""Training data: the validator names the line and the problem; chat loss only on the
assistant's tokens (its end-of-turn marker included); plain text on every token."""

from __future__ import annotations

import json

import pytest

from mistral7b.errors import InputError
from mistral7b.finetune.data import DataError, Record, read_records, tokenize

CHAT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "Bye"},
        {"role": "assistant", "content": "Goodbye!"}]


def _write(tmp_path, lines):
    path = tmp_path / "train.jsonl"
    path.write_text("\n".join(x if isinstance(x, str) else json.dumps(x) for x in lines) + "\n")
    return path


@pytest.mark.parametrize("bad,problem", [
    ("{not json", "not valid JSON"),
    ([1, 2], "expected a JSON object"),
    ({"text": "a", "messages": []}, 'exactly one of "text"'),
    ({"prompt": "a"}, 'exactly one of "text"'),
    ({"text": "  "}, '"text" must be a non-empty string'),
    ({"messages": []}, '"messages" must be a non-empty list'),
    ({"messages": [{"role": "bot", "content": "x"}]}, "message 0 has role 'bot'"),
    ({"messages": [{"role": "user"}]}, 'message 0 (user) needs a string "content"'),
    ({"messages": [{"role": "user", "content": "x"}]}, "no assistant message"),
    ({"messages": CHAT[1:4]}, "the last message must be the assistant's"),
    ({"messages": [CHAT[1], CHAT[0], CHAT[2]]}, "a system message may only come first"),
    ({"messages": [CHAT[1], {"role": "assistant", "content": ""}]}, "content is empty"),
])
def test_validator_names_the_line_and_the_problem(tmp_path, bad, problem):
    path = _write(tmp_path, [{"text": "fine"}, "", bad])
    with pytest.raises(DataError) as exc:
        read_records(path)
    assert exc.value.line == 3
    assert str(exc.value).startswith(f"{path}:3: ")
    assert problem in str(exc.value)


def test_empty_and_non_utf8_files(tmp_path):
    path = tmp_path / "train.jsonl"
    path.write_text("\n\n")
    with pytest.raises(InputError, match="no examples"):
        read_records(path)
    path.write_bytes(b'{"text": "ok"}\n{"text": "\xff"}\n')
    with pytest.raises(DataError, match=":2: not UTF-8"):
        read_records(path)


def _targets_text(tok, example):
    return tok.decode([i for i, t in zip(example.ids, example.targets) if t])


def test_chat_loss_is_on_assistant_tokens_only(tiny_chat_folder):
    from mistral7b.tokenizer import load_tokenizer

    tok = load_tokenizer(tiny_chat_folder[1])  # ChatML: <|im_start|>role\n...<|im_end|>\n
    (ex,), cut = tokenize([Record(1, messages=CHAT)], tok, max_len=512)
    assert cut == 0 and ex.ids == tok.encode_chat(CHAT, add_generation_prompt=False)
    assert _targets_text(tok, ex) == "Hello!\nGoodbye!\n"
    im_end = 4  # the end-of-turn marker is trained on, so the model learns to stop
    trained = [i for i, t in zip(ex.ids, ex.targets) if t]
    assert trained.count(im_end) == 2
    assert not any(ex.targets[: len(tok.encode_chat(CHAT[:2], add_generation_prompt=True))])


def test_mistral_system_prompt_splits_turns_into_examples():
    """mistral-common puts the system prompt into the *last* user turn, so the conversation
    is not prefix-stable: each assistant turn becomes its own example, EOS included."""
    from mistral7b.tokenizer.mistral import MistralTokenizer

    tok = MistralTokenizer.for_vocab(32768)
    examples, _ = tokenize([Record(7, messages=CHAT)], tok, max_len=512)
    assert [_targets_text(tok, e) for e in examples] == ["Hello!", "Goodbye!"]
    for e in examples:
        assert e.ids[-1] == tok.eos_id and e.targets[-1] and e.line == 7
    assert examples[1].ids == tok.encode_chat(CHAT, add_generation_prompt=False)
    # Without a system prompt v1 is prefix-stable: one example, both replies trained.
    v1 = MistralTokenizer.for_vocab(32000)
    (one,), _ = tokenize([Record(1, messages=CHAT[1:])], v1, max_len=512)
    assert _targets_text(v1, one) == "Hello! Goodbye!"


def test_plain_text_trains_every_token_and_ends_with_eos(tiny_chat_folder):
    from mistral7b.tokenizer import load_tokenizer

    tok = load_tokenizer(tiny_chat_folder[1])
    (ex,), _ = tokenize([Record(1, text="abc")], tok, max_len=512)
    assert ex.ids == [tok.bos_id, *tok.encode("abc", bos=False), tok.eos_id]
    assert ex.targets == [False, True, True, True, True]
    (short,), cut = tokenize([Record(1, text="abcdefgh")], tok, max_len=4)
    assert cut == 1 and len(short) == 4
    with pytest.raises(DataError, match="no trainable token within the first 3 tokens"):
        tokenize([Record(5, messages=CHAT[1:3])], tok, max_len=3, path="x.jsonl")
