"""A chat turn continues on the previous answer's own token ids (chat_history.py).

A tiny random model samples tokens a tokenizer would never produce for their text, so the
previous answer encoded again differs from what the model generated: the worst case for the
prefix cache. The turn must still take everything it fed from the cache, compute only the new
messages, and answer as a cold run over the model's own conversation does.
"""

from __future__ import annotations

import pytest
from tiny_models import mistral_v3_folder

import mistral7b

N_ANSWER = 12


def user(text):
    return {"role": "user", "content": text}


def assistant(text):
    return {"role": "assistant", "content": text}


@pytest.fixture(scope="module")
def llm(tmp_path_factory):
    return mistral7b.load(mistral_v3_folder(tmp_path_factory.mktemp("v3"), seed=4))


def first_turn(llm):
    llm.clear_cache()
    m1 = [user("Hello there, who are you?")]
    r1 = llm.chat(m1, max_tokens=N_ANSWER, ignore_eos=True)
    assert r1.finish_reason == "length"
    return m1, llm.tokenizer.encode_chat(m1), r1


def test_second_turn_computes_only_the_new_messages(llm):
    tok = llm.tokenizer
    m1, p1, r1 = first_turn(llm)
    m2 = m1 + [assistant(r1.text), user("And what next?")]
    plain = tok.encode_chat(m2)
    answer_again = tok.encode(r1.text, bos=False)   # mistral-common encodes each message alone
    assert answer_again != list(r1.token_ids)       # the case this is about
    assert plain[len(p1):len(p1) + len(answer_again)] == answer_again
    tail = plain[len(p1) + len(answer_again):]      # "</s>[INST] And what next?[/INST]"

    r2 = llm.chat(m2, max_tokens=6)
    fed = len(p1) + len(r1.token_ids) - 1           # the last sampled token was never fed
    assert r2.cached_tokens == fed
    assert r2.prompt_tokens == len(p1) + len(r1.token_ids) + len(tail)
    # The same answer as a cold run over the model's own conversation.
    llm.clear_cache()
    cold = llm.generate(p1 + list(r1.token_ids) + tail, max_tokens=6)
    assert cold.cached_tokens == 0 and cold.token_ids == r2.token_ids
    # The text the model is shown is the conversation's, spelt with its own tokens (up to
    # the spaces SentencePiece puts between messages).
    def letters(ids):
        return "".join(tok.decode(ids).split())
    assert letters(p1 + list(r1.token_ids) + tail) == letters(plain)


def test_stream_chat_continues_the_same_way(llm):
    m1, p1, r1 = first_turn(llm)
    m2 = m1 + [assistant(r1.text), user("And what next?")]
    stream = llm.stream_chat(m2, max_tokens=4)
    text = "".join(stream)
    assert stream.completion is not None and stream.completion.text == text
    assert stream.completion.cached_tokens == len(p1) + len(r1.token_ids) - 1
    # A third turn continues the streamed one.
    m3 = m2 + [assistant(text), user("Thanks.")]
    r3 = llm.chat(m3, max_tokens=2)
    assert r3.cached_tokens == stream.completion.prompt_tokens + \
        len(stream.completion.token_ids) - 1


def test_anything_else_is_encoded_plainly(llm):
    tok = llm.tokenizer
    # An edited answer: the conversation does not continue the last turn.
    m1, _, r1 = first_turn(llm)
    edited = m1 + [assistant(r1.text + " (edited)"), user("And what next?")]
    assert llm.chat(edited, max_tokens=2).prompt_tokens == len(tok.encode_chat(edited))
    # After clear_cache the last turn is forgotten too.
    m1, _, r1 = first_turn(llm)
    m2 = m1 + [assistant(r1.text), user("And what next?")]
    llm.clear_cache()
    r2 = llm.chat(m2, max_tokens=2)
    assert r2.prompt_tokens == len(tok.encode_chat(m2)) and r2.cached_tokens == 0
    # An answer cut by a stop string: its ids hold more than its text.
    llm.clear_cache()
    long = llm.chat(m1, max_tokens=N_ANSWER, ignore_eos=True)
    stop = long.text[len(long.text) // 2:][:3]
    assert stop.strip()
    cut = llm.chat(m1, max_tokens=N_ANSWER, ignore_eos=True, stop=[stop])
    assert cut.finish_reason == "stop"
    m2 = m1 + [assistant(cut.text), user("And what next?")]
    assert llm.chat(m2, max_tokens=2).prompt_tokens == len(tok.encode_chat(m2))
