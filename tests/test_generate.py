"""Generation through the engine: greedy against the HF reference, ragged batches, stops, seeds,
streaming. The default model (SmolLM2-135M GGUF) is the real model here."""

from __future__ import annotations

import json

import pytest
from reference_files import SMOLLM2_JSON

import mistral7b

REF = SMOLLM2_JSON


@pytest.fixture(scope="module")
def reference():
    return json.loads(REF.read_text())


@pytest.fixture(scope="module")
def llm():
    return mistral7b.load("default", device="cpu", dtype="float32")


def test_greedy_chat_continuation_matches_hf_reference(llm, reference):
    chat = reference["chat"]
    out = llm.generate(chat["prompt_ids"], max_tokens=32, temperature=0.0)
    assert out.token_ids == chat["hf_fp32_greedy_128_ids"][:32]
    assert out.finish_reason == "length"
    assert out.prompt_tokens == len(chat["prompt_ids"])


def test_chat_encoding_then_generation_follows_the_same_path(llm, reference):
    chat = reference["chat"]
    messages = [{"role": "user", "content": "Explain in a few sentences why the sky is blue."}]
    assert llm.tokenizer.encode_chat(messages) == chat["prompt_ids"]
    out = llm.chat(messages, max_tokens=20)
    assert out.token_ids == chat["hf_fp32_greedy_128_ids"][:20]
    assert out.text == llm.tokenizer.decode(out.token_ids)


def test_ragged_batch_generation_equals_each_alone(llm, reference):
    prompts = ["The capital of France is", reference["chat"]["prompt_text"][:60],
               "1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20,"]
    together = llm.generate(prompts, max_tokens=12)
    for prompt, got in zip(prompts, together):
        alone = llm.generate(prompt, max_tokens=12)
        assert got.token_ids == alone.token_ids
        assert got.text == alone.text


def test_each_sequence_stops_on_its_own(llm):
    prompts = ["The capital of France is Paris. The capital of Italy is",
               "Count: one, two, three,"]
    short, long = llm.generate(prompts, max_tokens=10, stop=[" Rome"]), None
    assert short[0].finish_reason == "stop" and " Rome" not in short[0].text
    assert short[1].finish_reason == "length" and len(short[1].token_ids) == 10
    long = llm.generate(prompts[1], max_tokens=10)
    assert long.token_ids == short[1].token_ids


def test_stop_string_cuts_text_exactly(llm):
    free = llm.generate("Count: one, two, three,", max_tokens=16)
    # pick a stop string from the middle of the free-running text, spanning a token boundary
    text = free.text
    stop = text[5:9]
    cut = llm.generate("Count: one, two, three,", max_tokens=16, stop=[stop])
    assert cut.finish_reason == "stop"
    assert cut.text == text[: text.index(stop)]


def test_eos_stops_generation(llm, reference):
    chat = reference["chat"]
    out = llm.generate(chat["prompt_ids"], max_tokens=200)
    # llama.cpp's plain greedy completion of this prompt ends at EOS after 81 tokens
    assert out.finish_reason == "stop"
    assert len(out.token_ids) < 200
    assert out.text.strip() == llm.tokenizer.decode(out.token_ids).strip()


def test_seeded_sampling_is_reproducible(llm):
    kw = {"max_tokens": 16, "temperature": 0.9, "top_p": 0.95, "top_k": 50}
    a = llm.generate("Once upon a time", seed=1234, **kw)
    b = llm.generate("Once upon a time", seed=1234, **kw)
    c = llm.generate("Once upon a time", seed=4321, **kw)
    assert a.token_ids == b.token_ids
    assert a.token_ids != c.token_ids
    batch = llm.generate(["Once upon a time", "Hello"], seed=1234, **kw)
    assert batch[0].token_ids == a.token_ids


def test_stream_deltas_concatenate_to_the_completion(llm):
    prompt = "Write the word café three times, then 東京 and an emoji:"
    deltas = list(llm.stream(prompt, max_tokens=24))
    full = llm.generate(prompt, max_tokens=24)
    assert "".join(deltas) == full.text
    assert any(len(d.encode()) > len(d) for d in deltas), "the test needs multi-byte output"
    # Only a stream cut by max_tokens in the middle of a character may end with U+FFFD.
    assert all("\ufffd" not in d for d in deltas[:-1])


def test_logprobs_are_reported(llm):
    out = llm.generate("The capital of France is", max_tokens=3, logprobs=True, top_logprobs=3)
    assert len(out.logprobs) == 3
    for lp in out.logprobs:
        assert lp.logprob <= 0.0 and len(lp.top) == 3
        # greedy picks the most likely token, so it heads its own top list
        assert lp.top[0][0] == lp.token_id


def test_bad_requests_raise_input_errors(llm):
    with pytest.raises(mistral7b.InputError):
        llm.generate("hi", max_tokens=0)
    with pytest.raises(mistral7b.InputError):
        llm.generate("hi", temperature=-1)
    with pytest.raises(mistral7b.InputError):
        llm.generate([10**9])
    with pytest.raises(mistral7b.InputError, match="context"):
        llm.generate("word " * 50, max_context=20)
    with pytest.raises(mistral7b.InputError):
        llm.generate("hi", bogus_option=1)


def test_generation_is_clamped_to_the_context(llm):
    out = llm.generate("The capital of France is", max_tokens=100, max_context=12)
    assert out.finish_reason == "length"
    assert out.prompt_tokens + len(out.token_ids) == 12
