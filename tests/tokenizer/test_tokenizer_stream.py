"""Streaming detokenization: deltas concatenate to decode(ids) and never hold half a character."""

from __future__ import annotations

import random

import pytest
from tokenizer_cases import (
    STREAM_TEXTS,
    TEXTS,
    mistral_gguf_tokenizer,
    mistral_tokenizer,
    smollm2_tokenizer,
    stream,
)

from mistral7b.tokenizer import StreamDecoder

TOKENIZERS = {
    "mistral-v1": lambda: mistral_tokenizer(32000),
    "mistral-v3": lambda: mistral_tokenizer(32768),
    "gguf-sentencepiece-v1": lambda: mistral_gguf_tokenizer(32000),
    "gguf-smollm2": smollm2_tokenizer,
}


@pytest.fixture(params=list(TOKENIZERS), scope="module")
def tok(request):
    return TOKENIZERS[request.param]()


def test_deltas_are_whole_characters(tok):
    for text in STREAM_TEXTS:
        ids = tok.encode(text, bos=False)
        deltas = stream(tok, ids)
        assert "".join(deltas) == tok.decode(ids) == text
        assert not any("\ufffd" in d for d in deltas), deltas
    # Multi-byte characters really were split across tokens somewhere above.
    assert any(len(tok.encode(c, bos=False)) > 1 for c in "😀👨中文")


def test_deltas_with_bos_eos_and_control_ids(tok):
    for text in TEXTS + STREAM_TEXTS:
        body = tok.encode(text, bos=False)
        ids = [*([tok.bos_id] if tok.bos_id is not None else []), *body, tok.eos_id, *body]
        deltas = stream(tok, ids)
        assert "".join(deltas) == tok.decode(ids), repr(text)
        assert not any("\ufffd" in d for d in deltas)


def test_leading_space_of_each_piece_kept(tok):
    # SentencePiece drops the space of the first piece only: " b" after "a" must keep it.
    for text in ["a b", "a  b", " a", "  a", "a\n b", "x 😀 y"]:
        ids = tok.encode(text, bos=False)
        assert "".join(stream(tok, ids)) == tok.decode(ids)
        assert "".join(stream(tok, [tok.eos_id, *ids])) == tok.decode([tok.eos_id, *ids])


def test_random_ids_concatenate_to_decode(tok):
    # Arbitrary ids (stray continuation bytes, control ids anywhere): only the sum is checked.
    rng = random.Random(1234)
    for _ in range(30):
        ids = [rng.randrange(tok.vocab_size) for _ in range(rng.randint(1, 40))]
        assert "".join(stream(tok, ids)) == tok.decode(ids), ids


def test_flush_emits_an_unfinished_character(tok):
    # A character split over several tokens, cut before its last one.
    ids = next(
        ids[:-1]
        for ids in (tok.encode("ok " + c, bos=False) for c in "🦙😀🙂👨中é")
        if tok.decode(ids[:-1]).endswith("\ufffd")
    )
    decoder = tok.decoder()
    pushed = "".join(decoder.push(i) for i in ids)
    rest = decoder.flush()
    assert "\ufffd" not in pushed and rest.endswith("\ufffd")
    assert pushed + rest == tok.decode(ids)
    assert decoder.flush() == ""


def test_cost_per_token_does_not_grow():
    # Each push decodes the pending ids only: feed a long stream, record the longest input.
    tok = mistral_tokenizer(32000)
    longest = 0

    def counting_decode(ids):
        nonlocal longest
        longest = max(longest, len(ids))
        return tok.decode(ids)

    ids = tok.encode(" ".join(STREAM_TEXTS) * 40, bos=True)
    decoder = StreamDecoder(counting_decode, tok.encode("a", bos=False))
    text = "".join(decoder.push(i) for i in ids) + decoder.flush()
    assert len(ids) > 1000
    assert text == tok.decode(ids)
    assert longest <= 10


def test_real_replacement_characters_are_not_held_forever():
    # A stream of lone continuation bytes never completes a character: after `max_held`
    # pushes the U+FFFD it decodes to is emitted instead of waiting to the end.
    tok = mistral_tokenizer(32000)
    byte_80 = 3 + 0x80  # <0x80>
    decoder = tok.decoder()
    deltas = [decoder.push(byte_80) for _ in range(30)]
    assert sum(1 for d in deltas if d) >= 3
    assert "".join(deltas) + decoder.flush() == tok.decode([byte_80] * 30)
