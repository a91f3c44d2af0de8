"""Tool calling through the real `openai` client against a server on a tiny random model with
Mistral's v3 tokenizer: prompts equal mistral-common's encoding (tools, calls, results), a
forced call always parses (streamed and not), and a call -> result -> answer round trip."""

from __future__ import annotations

import functools
import json

import jsonschema
import openai
import pytest
from conftest import ServerProcess
from tiny_models import mistral_v3_folder

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Current weather in a city",
    "parameters": {"type": "object", "additionalProperties": False, "required": ["city"],
                   "properties": {"city": {"enum": ["Paris", "Rome", "Oslo"]},
                                  "unit": {"enum": ["C", "F"]}}}}}
TIME = {"type": "function", "function": {
    "name": "get_time", "description": "Local time",
    "parameters": {"type": "object", "additionalProperties": False, "required": ["tz"],
                   "properties": {"tz": {"type": "string", "maxLength": 12}}}}}
TOOLS = [WEATHER, TIME]
SCHEMAS = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]


@pytest.fixture(scope="module")
def v3_server(tmp_path_factory):
    folder = mistral_v3_folder(tmp_path_factory.mktemp("v3model"))
    log = tmp_path_factory.mktemp("v3server") / "server.log"
    srv = ServerProcess(["-m", str(folder), "--served-model-name", "x", "--max-model-len", "1024",
                         "--max-n", "8"], log)
    try:
        yield srv.wait_ready()
    finally:
        assert srv.stop() == 0, srv.log()


@pytest.fixture(scope="module")
def v3(v3_server):
    return openai.OpenAI(base_url=f"{v3_server.url}/v1", api_key="x", max_retries=0,
                         timeout=60)


@functools.cache
def mistral_common_v3():
    from mistral_common.tokens.tokenizers.mistral import MistralTokenizer

    return MistralTokenizer.v3()


def oracle_ids(messages: list[dict], tools: list[dict]) -> list[int]:
    """mistral-common's encoding of the same request, through its own OpenAI converter."""
    from mistral_common.protocol.instruct.request import ChatCompletionRequest

    request = ChatCompletionRequest.from_openai(messages, tools=tools)
    return list(mistral_common_v3().encode_chat_completion(request).tokens)


def check_calls(message, finish_reason, name=None):
    assert finish_reason == "tool_calls"
    assert message.tool_calls, message
    for call in message.tool_calls:
        assert call.type == "function" and len(call.id) == 9 and call.id.isalnum()
        assert name is None or call.function.name == name
        jsonschema.validate(json.loads(call.function.arguments), SCHEMAS[call.function.name])


def test_prompt_equals_mistral_common_for_tools_calls_and_results(v3, v3_server):
    import httpx

    conversation = ASK + [
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "A1b2C3d4E", "type": "function",
             "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
        {"role": "tool", "tool_call_id": "A1b2C3d4E", "content": '{"temp": 21, "sky": "clear"}'},
        {"role": "assistant", "content": "It is 21 C and clear."},
        {"role": "user", "content": "And the time there?"}]
    expected = oracle_ids(conversation, TOOLS)
    ids = httpx.post(f"{v3_server.url}/tokenize",
                     json={"messages": conversation, "tools": TOOLS}).json()["tokens"]
    assert ids == expected
    out = v3.chat.completions.create(model="x", messages=conversation, tools=TOOLS,
                                     max_tokens=1)
    assert out.usage.prompt_tokens == len(expected)


@pytest.mark.parametrize("parallel", [False, True])
def test_a_required_call_always_parses(v3, parallel):
    """The random model may write several calls in parallel mode (its "," is as likely as
    its "]"), hence the room in max_tokens; with parallel_tool_calls=False exactly one."""
    out = v3.chat.completions.create(model="x", messages=ASK, tools=TOOLS,
                                     tool_choice="required", temperature=1.0, n=8,
                                     max_tokens=400, seed=1, parallel_tool_calls=parallel)
    for choice in out.choices:
        check_calls(choice.message, choice.finish_reason)
        assert choice.message.content is None
        assert parallel or len(choice.message.tool_calls) == 1


def test_a_named_call_streamed_as_openai_sends_it(v3):
    stream = v3.chat.completions.create(
        model="x", messages=ASK, tools=TOOLS, max_tokens=80, temperature=1.0, seed=2,
        tool_choice={"type": "function", "function": {"name": "get_time"}}, stream=True)
    calls: dict[int, dict] = {}
    finish = None
    for chunk in stream:       # accumulate deltas the way OpenAI's docs show
        choice = chunk.choices[0]
        for delta in choice.delta.tool_calls or []:
            entry = calls.setdefault(delta.index, {"id": None, "name": "", "arguments": ""})
            entry["id"] = delta.id or entry["id"]
            entry["name"] += delta.function.name or ""
            entry["arguments"] += delta.function.arguments or ""
        finish = choice.finish_reason or finish
    assert finish == "tool_calls" and calls
    for entry in calls.values():
        assert entry["name"] == "get_time" and len(entry["id"]) == 9
        jsonschema.validate(json.loads(entry["arguments"]), SCHEMAS["get_time"])


def test_call_result_answer_round_trip(v3):
    first = v3.chat.completions.create(model="x", messages=ASK, tools=TOOLS,
                                       tool_choice={"type": "function",
                                                    "function": {"name": "get_weather"}},
                                       max_tokens=80, temperature=0.0)
    check_calls(first.choices[0].message, first.choices[0].finish_reason, "get_weather")
    call = first.choices[0].message.tool_calls[0]
    conversation = ASK + [
        first.choices[0].message.model_dump(exclude_none=True),
        {"role": "tool", "tool_call_id": call.id, "content": '{"temp": 18}'}]
    answer = v3.chat.completions.create(model="x", messages=conversation, tools=TOOLS,
                                        tool_choice="none", max_tokens=8, temperature=0.0)
    choice = answer.choices[0]
    assert choice.message.tool_calls is None and choice.finish_reason in ("stop", "length")
    assert answer.usage.prompt_tokens == len(oracle_ids(conversation, TOOLS))


def test_tool_choice_none_never_calls(v3):
    out = v3.chat.completions.create(model="x", messages=ASK, tools=TOOLS, tool_choice="none",
                                     logit_bias={"5": 100}, max_tokens=5, temperature=0.0)
    assert out.choices[0].message.tool_calls is None
    assert out.choices[0].finish_reason != "tool_calls"


@pytest.mark.parametrize("fields, param", [
    ({"tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice"),
    ({"tool_choice": "auto", "response_format": {"type": "json_object"}}, "tool_choice"),
    ({"tool_choice": "required", "response_format": {"type": "json_object"}},
     "response_format"),
    ({"tools": [{"type": "function", "function": {"name": "bad name"}}]}, "tools"),
])
def test_bad_tool_requests_are_400(v3, fields, param):
    with pytest.raises(openai.BadRequestError) as info:
        v3.chat.completions.create(model="x", messages=ASK, max_tokens=2,
                                   **{"tools": TOOLS, **fields})
    assert info.value.body["param"] == param
