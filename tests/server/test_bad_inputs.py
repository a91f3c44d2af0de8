"""Bad requests: each gets a 4xx in OpenAI's error shape (never FastAPI's 422 body), and the
server answers a normal request right after each one."""

from __future__ import annotations

import json

import pytest

C, H = "/v1/completions", "/v1/chat/completions"
USER = [{"role": "user", "content": "hi"}]


def body(**fields) -> bytes:
    return json.dumps(fields).encode()


def chat(**fields) -> bytes:
    return json.dumps({"messages": USER, "max_tokens": 2, **fields}).encode()


def comp(**fields) -> bytes:
    return json.dumps({"prompt": "hi", "max_tokens": 2, **fields}).encode()


# (id, method, path, raw body, expected status, expected param or None, expected code or None)
CASES = [
    ("malformed-json", "POST", C, b'{"prompt": "a",', 400, None, None),
    ("invalid-utf8", "POST", C, b'{"prompt": "\xff\xfe"}', 400, None, None),
    ("empty-body", "POST", C, b"", 400, None, None),
    ("body-not-object", "POST", C, b"[1, 2, 3]", 400, None, None),
    ("missing-prompt", "POST", C, body(max_tokens=2), 400, "prompt", None),
    ("prompt-number", "POST", C, body(prompt=5), 400, "prompt", None),
    ("prompt-empty-list", "POST", C, body(prompt=[]), 400, "prompt", None),
    ("prompt-mixed-list", "POST", C, body(prompt=[1, "a"]), 400, "prompt", None),
    ("prompt-empty-ids", "POST", C, body(prompt=[[]]), 400, "prompt", None),
    ("prompt-empty-string", "POST", C, body(prompt=""), 400, "prompt", None),
    ("token-out-of-vocab", "POST", C, body(prompt=[1, 999_999]), 400, "prompt",
     "invalid_token_id"),
    ("token-negative", "POST", C, body(prompt=[-1]), 400, "prompt", "invalid_token_id"),
    ("max-tokens-negative", "POST", C, comp(max_tokens=-1), 400, "max_tokens", None),
    ("max-tokens-string", "POST", C, comp(max_tokens="5"), 400, "max_tokens", None),
    ("max-tokens-float", "POST", C, comp(max_tokens=1.5), 400, "max_tokens", None),
    ("max-tokens-zero-no-echo", "POST", C, comp(max_tokens=0), 400, "max_tokens", None),
    ("temperature-negative", "POST", C, comp(temperature=-0.5), 400, "temperature", None),
    ("temperature-huge", "POST", C, comp(temperature=1e9), 400, "temperature", None),
    ("temperature-nan", "POST", C, b'{"prompt": "hi", "temperature": NaN}', 400,
     "temperature", None),
    ("temperature-infinity", "POST", C, b'{"prompt": "hi", "temperature": 1e999}', 400,
     "temperature", None),
    ("temperature-bool", "POST", C, comp(temperature=True), 400, "temperature", None),
    ("top-p-zero", "POST", C, comp(top_p=0), 400, "top_p", None),
    ("top-p-above-one", "POST", C, comp(top_p=1.5), 400, "top_p", None),
    ("top-k-negative", "POST", C, comp(top_k=-5), 400, "top_k", None),
    ("min-p-above-one", "POST", C, comp(min_p=2), 400, "min_p", None),
    ("frequency-penalty", "POST", C, comp(frequency_penalty=3), 400, "frequency_penalty", None),
    ("presence-penalty", "POST", C, comp(presence_penalty=-2.5), 400, "presence_penalty", None),
    ("n-zero", "POST", C, comp(n=0), 400, "n", None),
    ("n-over-cap", "POST", C, comp(n=1000), 400, "n", None),
    ("logprobs-too-many", "POST", C, comp(logprobs=100), 400, "logprobs", None),
    ("seed-huge", "POST", C, comp(seed=2**70), 400, "seed", None),
    ("seed-string", "POST", C, comp(seed="abc"), 400, "seed", None),
    ("stop-empty-string", "POST", C, comp(stop=[""]), 400, "stop", None),
    ("stop-number", "POST", C, comp(stop=5), 400, "stop", None),
    ("stop-too-many", "POST", C, comp(stop=[f"s{i}" for i in range(40)]), 400, "stop", None),
    ("echo-string", "POST", C, comp(echo="yes"), 400, "echo", None),
    ("stream-string", "POST", C, comp(stream="true"), 400, "stream", None),
    ("suffix", "POST", C, comp(suffix="end"), 400, "suffix", None),
    ("logit-bias-out-of-vocab", "POST", C, comp(logit_bias={"999999": 10}), 400, "logit_bias",
     "invalid_token_id"),
    ("logit-bias-not-an-id", "POST", C, comp(logit_bias={"abc": 10}), 400, "logit_bias", None),
    ("logit-bias-too-big", "POST", C, comp(logit_bias={"5": 200}), 400, "logit_bias.5", None),
    ("best-of", "POST", C, comp(best_of=3), 400, "best_of", None),
    ("prompt-too-long", "POST", C, body(prompt=[1] * 500, max_tokens=1), 400, "prompt",
     "context_length_exceeded"),
    ("unknown-model", "POST", C, comp(model="gpt-4"), 404, "model", "model_not_found"),
    ("chat-messages-empty", "POST", H, body(messages=[]), 400, "messages", None),
    ("chat-messages-missing", "POST", H, body(max_tokens=2), 400, "messages", None),
    ("chat-messages-not-list", "POST", H, body(messages="hi"), 400, "messages", None),
    ("chat-message-not-object", "POST", H, body(messages=["hi"]), 400, "messages.0", None),
    ("chat-unknown-role", "POST", H, body(messages=[{"role": "wizard", "content": "hi"}]), 400,
     "messages.0.role", None),
    ("chat-missing-role", "POST", H, body(messages=[{"content": "hi"}]), 400, "messages.0.role",
     None),
    ("chat-content-number", "POST", H, body(messages=[{"role": "user", "content": 123}]), 400,
     "messages.0.content", None),
    ("chat-content-image", "POST", H, body(messages=[{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "http://x/y.png"}}]}]), 400,
     "messages.0.content", None),
    ("chat-max-tokens-zero", "POST", H, chat(max_tokens=0), 400, "max_tokens", None),
    ("chat-top-logprobs-without-logprobs", "POST", H, chat(top_logprobs=2), 400,
     "top_logprobs", None),
    ("chat-top-logprobs-too-many", "POST", H, chat(logprobs=True, top_logprobs=50), 400,
     "top_logprobs", None),
    ("chat-tools-without-template-support", "POST", H,
     chat(tools=[{"type": "function", "function": {"name": "f"}}]), 400, "tools", None),
    ("chat-tools-not-function", "POST", H, chat(tools=[{"type": "retrieval"}]), 400,
     "tools.0.type", None),
    ("chat-tool-choice-without-tools", "POST", H, chat(tool_choice="required"), 400,
     "tool_choice", None),
    ("chat-json-schema-invalid", "POST", H, chat(response_format={
        "type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "objectx"}}}),
     400, "response_format", None),
    ("chat-json-schema-missing", "POST", H, chat(response_format={"type": "json_schema"}), 400,
     "response_format", None),
    ("chat-regex-invalid", "POST", H, chat(response_format={"type": "regex", "regex": "[a-"}),
     400, "response_format", None),
    ("chat-grammar-invalid", "POST", H, chat(response_format={"type": "grammar",
                                                              "grammar": "start: nothing"}),
     400, "response_format", None),
    ("chat-format-unknown", "POST", H, chat(response_format={"type": "xml"}), 400,
     "response_format.type", None),
    ("completions-guided-regex-invalid", "POST", C, comp(guided_regex="(unclosed"), 400,
     "response_format", None),
    ("completions-two-formats", "POST", C, comp(guided_regex="a", guided_grammar="start: "
                                                "\"a\""), 400, "guided_grammar", None),
    ("chat-unknown-model", "POST", H, chat(model="nope"), 404, "model", "model_not_found"),
    ("chat-prompt-too-long", "POST", H, body(messages=[{"role": "user",
                                                        "content": "word " * 500}]),
     400, "messages", "context_length_exceeded"),
    ("oversized-body", "POST", C, body(prompt="x" * 100_000), 413, None, "request_too_large"),
    ("detokenize-out-of-vocab", "POST", "/detokenize", body(tokens=[10**7]), 400, "tokens",
     "invalid_token_id"),
    ("tokenize-nothing", "POST", "/tokenize", body(), 400, "prompt", None),
    ("unknown-route", "GET", "/v1/engines", None, 404, None, None),
    ("wrong-method", "GET", C, None, 405, None, None),
]


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_bad_request_gets_an_openai_error_and_the_server_carries_on(http, case):
    _, method, path, raw, status, param, code = case
    r = http.request(method, path, content=raw, headers={"Content-Type": "application/json"})
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert isinstance(err["message"], str) and err["message"]
    assert err["type"] == ("invalid_request_error" if status < 500 else "server_error")
    if param is not None:
        assert err["param"] == param
    if code is not None:
        assert err["code"] == code
    if code == "context_length_exceeded":
        assert "384" in err["message"]
    ok = http.post(C, json={"prompt": "Hello", "max_tokens": 1, "temperature": 0})
    assert ok.status_code == 200 and ok.json()["choices"][0]["finish_reason"] == "length"


def test_the_matrix_is_big_enough():
    assert len(CASES) >= 30


def test_wrong_content_type(http):
    r = http.post(C, content=b"prompt=hi", headers={"Content-Type": "text/plain"})
    assert r.status_code == 400 and "error" in r.json()
