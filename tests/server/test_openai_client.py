"""The server driven by the official `openai` client (and httpx where the client has no call):
models, completions, chat, streaming with include_usage, logprobs, echo scoring, stop, seeds,
limits, auth, CORS, metrics, tokenize/detokenize."""

from __future__ import annotations

import json

import httpx
import openai
import pytest
from conftest import ALLOWED_ORIGIN, API_KEY, metric
from reference_files import SMOLLM2_JSON

REF = SMOLLM2_JSON
SKY = [{"role": "user", "content": "Explain in a few sentences why the sky is blue."}]
GREEDY = {"temperature": 0.0}


@pytest.fixture(scope="module")
def reference():
    return json.loads(REF.read_text())["chat"]


def test_models(client):
    assert [m.id for m in client.models.list().data] == ["default"]
    assert client.models.retrieve("default").id == "default"
    with pytest.raises(openai.NotFoundError) as info:
        client.models.retrieve("gpt-4")
    assert info.value.body["code"] == "model_not_found"


def test_chat_greedy_follows_the_reference_continuation(client, http, reference):
    # the chat template through /tokenize, then the greedy reply against HF's greedy ids
    ids = http.post("/tokenize", json={"messages": SKY}).json()["tokens"]
    assert ids == reference["prompt_ids"]
    out = client.chat.completions.create(model="default", messages=SKY, max_tokens=16,
                                         **GREEDY)
    expected = http.post("/detokenize",
                         json={"tokens": reference["hf_fp32_greedy_128_ids"][:16]}).json()
    assert out.choices[0].message.content == expected["prompt"]
    assert out.choices[0].message.role == "assistant"
    assert out.choices[0].finish_reason == "length"
    assert out.usage.prompt_tokens == len(ids)
    assert out.usage.completion_tokens == 16
    assert out.usage.total_tokens == len(ids) + 16


def test_chat_stream_with_usage_equals_the_plain_answer(client):
    plain = client.chat.completions.create(model="default", messages=SKY, max_tokens=12,
                                           **GREEDY)
    chunks = list(client.chat.completions.create(
        model="default", messages=SKY, max_tokens=12, stream=True,
        stream_options={"include_usage": True}, **GREEDY))
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == plain.choices[0].message.content
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert finishes[-1] == "length" and set(finishes[:-1]) == {None}
    assert chunks[-1].choices == [] and chunks[-1].usage == plain.usage
    assert all(c.usage is None for c in chunks[:-1])


def test_completion_stream_equals_the_plain_answer(client):
    prompt = "The three primary colours are"
    plain = client.completions.create(model="default", prompt=prompt, max_tokens=10, **GREEDY)
    chunks = list(client.completions.create(model="default", prompt=prompt, max_tokens=10,
                                            stream=True, **GREEDY))
    assert "".join(c.choices[0].text for c in chunks) == plain.choices[0].text
    assert chunks[-1].choices[0].finish_reason == plain.choices[0].finish_reason
    assert plain.usage.prompt_tokens > 0 and plain.usage.completion_tokens == 10


def test_chat_logprobs(client):
    out = client.chat.completions.create(model="default", messages=SKY, max_tokens=6,
                                         logprobs=True, top_logprobs=3, **GREEDY)
    content = out.choices[0].logprobs.content
    assert len(content) == out.usage.completion_tokens == 6
    assert "".join(t.token for t in content) == out.choices[0].message.content
    for t in content:
        assert len(t.top_logprobs) == 3
        lps = [x.logprob for x in t.top_logprobs]
        assert lps == sorted(lps, reverse=True) and all(lp <= 0 for lp in lps)
        assert t.logprob == pytest.approx(lps[0])          # greedy takes the top token
        assert t.bytes == list(t.token.encode())


def test_echo_scoring_agrees_with_generation_logprobs(client, http):
    """lm-evaluation-harness's local-completions request: token-id prompts, echo, logprobs,
    temperature 0. The pre-fill's prompt logprobs equal the decode step's logprobs."""
    prompt = http.post("/tokenize", json={"prompt": "The capital of France is"}).json()["tokens"]
    gen = client.completions.create(model="default", prompt=prompt, max_tokens=1, logprobs=1,
                                    **GREEDY)
    token_lp = gen.choices[0].logprobs.token_logprobs[0]
    new_token = http.post("/tokenize", json={"prompt": gen.choices[0].text,
                                             "add_special_tokens": False}).json()["tokens"]
    full = prompt + new_token
    other = http.post("/tokenize", json={"prompt": "Bonjour"}).json()["tokens"]
    scored = client.completions.create(model="default", prompt=[full, other], max_tokens=1,
                                       echo=True, logprobs=1, **GREEDY)
    assert [c.index for c in scored.choices] == [0, 1]
    lp = scored.choices[0].logprobs
    assert len(lp.token_logprobs) == len(full) + 1             # prompt + one generated token
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    assert lp.token_logprobs[len(full) - 1] == pytest.approx(token_lp, abs=1e-4)
    # is_greedy as the harness computes it: the continuation token is the top token
    assert lp.token_logprobs[len(full) - 1] == pytest.approx(
        max(lp.top_logprobs[len(full) - 1].values()), abs=1e-6)
    assert scored.choices[0].text.startswith("The capital of France is" + gen.choices[0].text)
    only = client.completions.create(model="default", prompt=[full], max_tokens=0, echo=True,
                                     logprobs=0, **GREEDY)
    assert only.choices[0].logprobs.token_logprobs == pytest.approx(lp.token_logprobs[:-1])
    assert only.usage.completion_tokens == 0


def test_stop_strings(client):
    prompt = "List: apples, pears, plums, cherries, grapes,"
    free = client.completions.create(model="default", prompt=prompt, max_tokens=12, **GREEDY)
    assert "fruit." in free.choices[0].text
    stopped = client.completions.create(model="default", prompt=prompt, max_tokens=12,
                                        stop=["t.", "zzz"], **GREEDY)
    assert stopped.choices[0].text == free.choices[0].text.split("t.")[0]
    assert stopped.choices[0].finish_reason == "stop"


def test_seed_reproducibility_and_n(client):
    def sample(seed, n=1):
        out = client.completions.create(model="default", prompt="Once upon a time",
                                        max_tokens=8, temperature=1.0, seed=seed, n=n)
        return [c.text for c in sorted(out.choices, key=lambda c: c.index)]

    first = sample(7)
    assert sample(7) == first
    assert sample(7, n=2) == first + sample(8)           # choice i uses seed + i
    assert len({*sample(7), *sample(9), *sample(11)}) > 1


def test_max_tokens_is_clamped_to_the_context_left(client, http):
    prompt = " ".join(["word"] * 380)
    n_prompt = http.post("/tokenize", json={"prompt": prompt}).json()["count"]
    assert n_prompt < 384
    out = client.completions.create(model="default", prompt=prompt, max_tokens=10**9,
                                    extra_body={"ignore_eos": True}, **GREEDY)
    assert out.choices[0].finish_reason == "length"
    assert out.usage.completion_tokens == 384 - n_prompt


def test_over_long_prompt_names_both_lengths(client):
    with pytest.raises(openai.BadRequestError) as info:
        client.completions.create(model="default", prompt=[1] * 400, max_tokens=4)
    err = info.value.body
    assert err["code"] == "context_length_exceeded" and err["param"] == "prompt"
    assert "384" in err["message"] and "400" in err["message"]


def test_api_key(server, http):
    bad = openai.OpenAI(base_url=f"{server.url}/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError) as info:
        bad.models.list()
    assert info.value.status_code == 401
    assert info.value.body["code"] == "invalid_api_key"
    assert set(info.value.response.json()["error"]) == {"message", "type", "param", "code"}
    for path in ("/v1/models", "/metrics", "/tokenize"):
        assert httpx.get(f"{server.url}{path}").status_code == 401
    assert httpx.get(f"{server.url}/health").status_code == 200       # open without a key
    assert "wrong" not in server.log() and API_KEY not in server.log()


def test_cors_only_for_listed_origins(server):
    def preflight(origin):
        return httpx.options(f"{server.url}/v1/chat/completions", headers={
            "Origin": origin, "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "authorization,content-type"})

    ok = preflight(ALLOWED_ORIGIN)
    assert ok.status_code == 200
    assert ok.headers["access-control-allow-origin"] == ALLOWED_ORIGIN
    assert "access-control-allow-origin" not in preflight("http://evil.example").headers


def test_tokenize_detokenize_roundtrip(http):
    text = "Hello, world! 123"
    got = http.post("/tokenize", json={"prompt": text}).json()
    assert got["count"] == len(got["tokens"]) and got["max_model_len"] == 384
    assert http.post("/detokenize", json={"tokens": got["tokens"]}).json()["prompt"] == text


def test_metrics(client, http):
    client.completions.create(model="default", prompt="Hi", max_tokens=2, **GREEDY)
    text = http.get("/metrics").text
    assert 'mistral7b_requests_total{endpoint="/v1/completions",status="200"}' in text
    assert metric(http, "mistral7b_time_to_first_token_seconds_count") >= 1
    assert metric(http, "mistral7b_generation_tokens_total") >= 2
    assert metric(http, "mistral7b_prompt_tokens_total") >= 1
    assert metric(http, "mistral7b_queue_depth") == 0
    assert metric(http, "mistral7b_generation_tokens_per_second") >= 0


def test_a_repeated_prompt_reports_its_cached_tokens(client, http):
    """The second identical request takes the first one's prompt from the prefix cache (all
    but its last token, whose logits are needed); usage and /metrics say so."""
    msgs = [{"role": "user", "content": "Describe a quiet harbour at dawn in two sentences."}]
    hits = metric(http, "mistral7b_prefix_cache_hit_tokens_total")
    first = client.chat.completions.create(model="default", messages=msgs, max_tokens=4,
                                           **GREEDY)
    # (the template's default system prompt may already be cached by earlier tests)
    assert first.usage.prompt_tokens_details.cached_tokens < first.usage.prompt_tokens - 1
    second = client.chat.completions.create(model="default", messages=msgs, max_tokens=4,
                                            **GREEDY)
    cached = second.usage.prompt_tokens_details.cached_tokens
    assert cached == second.usage.prompt_tokens - 1
    assert second.choices[0].message.content == first.choices[0].message.content
    stream = client.chat.completions.create(model="default", messages=msgs, max_tokens=4,
                                            stream=True, stream_options={"include_usage": True},
                                            **GREEDY)
    usage = [c.usage for c in stream if c.usage is not None][-1]
    assert usage.prompt_tokens_details.cached_tokens == cached
    assert metric(http, "mistral7b_prefix_cache_hit_tokens_total") - hits == (
        first.usage.prompt_tokens_details.cached_tokens + 2 * cached)


def test_n_choices_prefill_the_prompt_once(client, http):
    msgs = [{"role": "user", "content": "Invent a name for a small red boat, then explain it."}]
    before = metric(http, "mistral7b_prompt_tokens_total")
    out = client.chat.completions.create(model="default", messages=msgs, max_tokens=3, n=4,
                                         temperature=1.0, seed=5)
    assert len(out.choices) == 4
    computed = out.usage.prompt_tokens - out.usage.prompt_tokens_details.cached_tokens
    assert metric(http, "mistral7b_prompt_tokens_total") - before == computed
