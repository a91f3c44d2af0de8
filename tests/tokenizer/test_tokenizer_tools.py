"""encode_chat(tools=...): Mistral v3 ids equal mistral-common's encode_chat_completion built
from its own classes (tools, tool calls, tool results); HF templates that read `tools` render
what transformers' apply_chat_template renders; formats without tools refuse them."""

from __future__ import annotations

import json

import pytest
from tokenizer_cases import (
    mistral_common_tokenizer,
    mistral_gguf_tokenizer,
    mistral_tokenizer,
    smollm2_tokenizer,
)

from mistral7b.errors import TokenizerError
from mistral7b.tokenizer import HFTokenizer
from mistral7b.tokenizer.mistral import mistral_call_id

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Current weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"},
                                                    "unit": {"enum": ["C", "F"]}},
                   "required": ["city"]}}}
TIME = {"type": "function", "function": {
    "name": "get_time", "description": "Local time",
    "parameters": {"type": "object", "properties": {"tz": {"type": "string"}}}}}
TOOLS = [WEATHER, TIME]


def call(cid: str, name: str, args: dict) -> dict:
    return {"id": cid, "type": "function",
            "function": {"name": name, "arguments": json.dumps(args)}}


CASES = {
    "tools-only": [{"role": "user", "content": "Weather in Paris?"}],
    "call-pending": [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": None,
         "tool_calls": [call("abcDEF123", "get_weather", {"city": "Paris"})]},
        {"role": "tool", "tool_call_id": "abcDEF123", "content": '{"temp": 21}'}],
    "two-calls-two-results-then-user": [
        {"role": "user", "content": "Weather and time in Rome?"},
        {"role": "assistant", "content": "",
         "tool_calls": [call("aaaaaaaa1", "get_weather", {"city": "Rome", "unit": "C"}),
                        call("bbbbbbbb2", "get_time", {"tz": "Europe/Rome"})]},
        {"role": "tool", "tool_call_id": "aaaaaaaa1", "content": "sunny, 25"},
        {"role": "tool", "tool_call_id": "bbbbbbbb2", "content": "14:02"},
        {"role": "assistant", "content": "Sunny, 25 C, and it is 14:02."},
        {"role": "user", "content": "And in Oslo?"}],
}


def oracle(messages: list[dict], tools: list[dict]) -> list[int]:
    """mistral-common's ids, built from its own message and tool classes."""
    from mistral_common.protocol.instruct.messages import (
        AssistantMessage,
        SystemMessage,
        ToolMessage,
        UserMessage,
    )
    from mistral_common.protocol.instruct.request import ChatCompletionRequest
    from mistral_common.protocol.instruct.tool_calls import Function, FunctionCall, Tool, ToolCall

    out = []
    for m in messages:
        if m["role"] == "system":
            out.append(SystemMessage(content=m["content"]))
        elif m["role"] == "user":
            out.append(UserMessage(content=m["content"]))
        elif m["role"] == "tool":
            out.append(ToolMessage(content=m["content"], tool_call_id=m["tool_call_id"]))
        else:
            calls = [ToolCall(id=c["id"], function=FunctionCall(
                name=c["function"]["name"], arguments=c["function"]["arguments"]))
                for c in m.get("tool_calls") or []] or None
            out.append(AssistantMessage(content=m["content"] or None, tool_calls=calls))
    request = ChatCompletionRequest(messages=out, tools=[
        Tool(function=Function(**t["function"])) for t in tools])
    return list(mistral_common_tokenizer(32768).encode_chat_completion(request).tokens)


@pytest.mark.parametrize("name", CASES)
def test_mistral_v3_tools_equal_mistral_common(name):
    tok = mistral_tokenizer(32768)
    assert tok.encode_chat(CASES[name], tools=TOOLS) == oracle(CASES[name], TOOLS)


@pytest.mark.parametrize("name", CASES)
def test_mistral_v3_gguf_vocabulary_encodes_tools_the_same(name):
    assert mistral_gguf_tokenizer(32768).encode_chat(CASES[name], tools=TOOLS) == \
        oracle(CASES[name], TOOLS)


def test_openai_call_ids_map_to_mistral_ids_consistently():
    """OpenAI ids ("call_...") break v3's 9-character rule: both the call and its result get
    the same mapped id, so the conversation encodes as if the client had sent that id."""
    openai_id = "call_Zx81kLmN0pQrStUvWxYz"
    mapped = mistral_call_id(openai_id)
    assert len(mapped) == 9 and mapped.isalnum() and mapped == mistral_call_id(openai_id)
    with_openai = [dict(m) for m in CASES["call-pending"]]
    with_openai[2] = {**with_openai[2], "tool_calls": [
        call(openai_id, "get_weather", {"city": "Paris"})]}
    with_openai[3] = {**with_openai[3], "tool_call_id": openai_id}
    expected = [dict(m) for m in CASES["call-pending"]]
    expected[2] = {**expected[2], "tool_calls": [call(mapped, "get_weather", {"city": "Paris"})]}
    expected[3] = {**expected[3], "tool_call_id": mapped}
    tok = mistral_tokenizer(32768)
    assert tok.encode_chat(with_openai, tools=TOOLS) == oracle(expected, TOOLS)


def test_mistral_v3_marks_tool_calls_with_its_control_id():
    tok = mistral_tokenizer(32768)
    raw = mistral_common_tokenizer(32768).instruct_tokenizer.tokenizer
    assert tok.supports_tools and tok.tool_calls_id == raw.get_special_token("[TOOL_CALLS]")


def test_mistral_v1_has_no_tools():
    tok = mistral_tokenizer(32000)
    assert not tok.supports_tools and tok.tool_calls_id is None
    with pytest.raises(TokenizerError, match="v3"):
        tok.encode_chat(CASES["tools-only"], tools=TOOLS)


def test_a_template_without_tools_refuses_them():
    tok = smollm2_tokenizer()      # the default model: ChatML without tools
    assert not tok.supports_tools
    with pytest.raises(TokenizerError, match="no tool support"):
        tok.encode_chat(CASES["tools-only"], tools=TOOLS)


HERMES_TEMPLATE = (
    "{%- if tools %}<|im_start|>system\nYou may call functions:\n<tools>"
    "{%- for tool in tools %}\n{{ tool | tojson }}{%- endfor %}\n</tools>\n"
    "Reply with <tool_call>\n{\"name\": ..., \"arguments\": ...}\n</tool_call><|im_end|>\n"
    "{% endif %}"
    "{%- for message in messages %}"
    "{%- if message.role == 'assistant' and message.tool_calls %}<|im_start|>assistant"
    "{%- for tc in message.tool_calls %}\n<tool_call>\n{\"name\": \"{{ tc.function.name }}\", "
    "\"arguments\": {{ tc.function.arguments }}}\n</tool_call>{%- endfor %}<|im_end|>\n"
    "{%- elif message.role == 'tool' %}<|im_start|>user\n<tool_response>\n{{ message.content }}"
    "\n</tool_response><|im_end|>\n"
    "{%- else %}<|im_start|>{{ message.role }}\n{{ message.content }}<|im_end|>\n{% endif %}"
    "{%- endfor %}{%- if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


@pytest.mark.parametrize("name", CASES)
def test_a_template_that_reads_tools_renders_them_as_transformers_does(name):
    transformers = pytest.importorskip("transformers")
    gguf_tok = smollm2_tokenizer()
    ours = HFTokenizer(gguf_tok.backend, eos_id=gguf_tok.eos_id, chat_template=HERMES_TEMPLATE)
    theirs = transformers.PreTrainedTokenizerFast(tokenizer_object=gguf_tok.backend,
                                                  eos_token="<|im_end|>")
    theirs.chat_template = HERMES_TEMPLATE
    assert ours.supports_tools
    expected = theirs.apply_chat_template(CASES[name], tools=TOOLS, tokenize=True,
                                          add_generation_prompt=True)
    if not isinstance(expected, list):   # newer transformers return a BatchEncoding
        expected = expected["input_ids"]
    assert ours.encode_chat(CASES[name], tools=TOOLS) == list(expected)
