"""Structured output and the newer OpenAI details on the shared server (the default model):
response_format through the openai client (streamed, n > 1, beside free requests in one
batch), vLLM's guided_* fields on completions, logit_bias, content parts, the developer
role, /version and SSE keep-alive comments."""

from __future__ import annotations

import asyncio
import json
import re

import httpx
import jsonschema
import openai
import pytest
from conftest import API_KEY

CITY = {"type": "object", "additionalProperties": False, "required": ["city", "country"],
        "properties": {"city": {"type": "string", "maxLength": 20},
                       "country": {"type": "string", "maxLength": 20},
                       "capital": {"type": "boolean"}}}
FORMAT = {"type": "json_schema", "json_schema": {"name": "city", "schema": CITY, "strict": True}}
ASK = [{"role": "user", "content": "Name a large city in Europe, as JSON."}]


def test_json_schema_with_n_choices(client):
    out = client.chat.completions.create(model="default", messages=ASK, response_format=FORMAT,
                                         n=4, temperature=1.0, seed=3, max_tokens=60)
    for choice in out.choices:
        jsonschema.validate(json.loads(choice.message.content), CITY)
        assert choice.finish_reason == "stop"


def test_json_schema_streamed(client):
    chunks = client.chat.completions.create(model="default", messages=ASK,
                                            response_format=FORMAT, stream=True,
                                            temperature=0.0, max_tokens=60)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    jsonschema.validate(json.loads(text), CITY)


def test_json_object(client):
    out = client.chat.completions.create(model="default", messages=ASK,
                                         response_format={"type": "json_object"},
                                         temperature=0.0, max_tokens=80)
    assert isinstance(json.loads(out.choices[0].message.content), dict)


def test_constrained_and_free_requests_in_one_batch(server, headers):
    """Four requests at once: the free ones equal their answers alone (no mask leaks between
    rows), the constrained ones validate."""
    free = {"messages": [{"role": "user", "content": "Tell me about Rome."}],
            "max_tokens": 24, "temperature": 0.0}
    guided = {"messages": ASK, "max_tokens": 60, "temperature": 0.0,
              "response_format": FORMAT}
    url = f"{server.url}/v1/chat/completions"
    alone = httpx.post(url, json=free, headers=headers, timeout=60).json()

    async def together():
        async with httpx.AsyncClient(headers=headers, timeout=120) as http:
            return await asyncio.gather(*[http.post(url, json=b)
                                          for b in (free, guided, free, guided)])

    answers = [r.json()["choices"][0]["message"]["content"] for r in asyncio.run(together())]
    assert answers[0] == answers[2] == alone["choices"][0]["message"]["content"]
    for text in answers[1::2]:
        jsonschema.validate(json.loads(text), CITY)


def test_completions_take_vllm_guided_fields(client):
    out = client.completions.create(model="default", prompt="The answer (yes or no):",
                                    max_tokens=5, temperature=1.0, n=3, seed=1,
                                    extra_body={"guided_regex": "(yes|no)"})
    assert all(c.text in ("yes", "no") for c in out.choices)
    out = client.completions.create(model="default", prompt="Colors:", max_tokens=20,
                                    temperature=0.0, extra_body={"guided_grammar": (
                                        'start: c ("," c)~0..2\nc: "red" | "blue"')})
    assert re.fullmatch(r"(red|blue)(,(red|blue)){0,2}", out.choices[0].text)


def test_bad_schema_is_a_400(client):
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model="default", messages=ASK, max_tokens=4,
                                       response_format={"type": "json_schema", "json_schema": {
                                           "name": "x", "schema": {"type": "nonsense"}}})
    assert info.value.body["param"] == "response_format"
    assert "schema" in info.value.body["message"]


def test_logit_bias(client):
    free = client.completions.create(model="default", prompt="The capital of France is",
                                     max_tokens=4, temperature=0.0, logprobs=1)
    first = free.choices[0].logprobs.tokens[0]
    ids = httpx.post(f"{client.base_url}".removesuffix("/v1/") + "/tokenize",
                     json={"prompt": "The capital of France is" + first,
                           "add_special_tokens": False},
                     headers={"Authorization": f"Bearer {API_KEY}"}).json()["tokens"]
    banned = client.completions.create(model="default", prompt="The capital of France is",
                                       max_tokens=4, temperature=0.0, logprobs=1,
                                       logit_bias={str(ids[-1]): -100})
    assert banned.choices[0].logprobs.tokens[0] != first


def test_content_parts_and_developer_role_encode_as_text_and_system(http):
    parts = [{"role": "developer", "content": [{"type": "text", "text": "Be "},
                                               {"type": "text", "text": "brief."}]},
             {"role": "user", "content": [{"type": "text", "text": "Hi"}]}]
    plain = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    a = http.post("/tokenize", json={"messages": parts}).json()["tokens"]
    b = http.post("/tokenize", json={"messages": plain}).json()["tokens"]
    assert a == b


def test_version_is_open_and_names_the_package(server):
    import mistral7b

    r = httpx.get(f"{server.url}/version")          # no API key needed, like /health
    assert r.status_code == 200 and r.json() == {"version": mistral7b.__version__}


def test_keepalive_comments_during_a_long_prefill(http):
    """A 300-token prompt pre-fills in 32-token steps (well over the server's 0.1 s
    keep-alive): comment lines arrive before the first token, and the stream still parses."""
    body = {"messages": [{"role": "user", "content": "word " * 300}], "max_tokens": 2,
            "stream": True, "temperature": 0.0, "ignore_eos": True}
    comments, events = 0, []
    with http.stream("POST", "/v1/chat/completions", json=body) as r:
        for line in r.iter_lines():
            if line.startswith(":"):
                comments += 1
            elif line.startswith("data: "):
                events.append(line[len("data: "):])
    assert comments >= 1
    assert events[-1] == "[DONE]"
    assert json.loads(events[-2])["choices"][0]["finish_reason"] == "length"
