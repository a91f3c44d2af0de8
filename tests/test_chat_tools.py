"""LLM.chat with tools: Mistral v3 ([TOOL_CALLS] + a JSON list) on a tiny random model, and a
Hermes-style chat template (<tool_call> blocks) on the default model's weights. Forced calls
always parse and follow their schema (checked with jsonschema)."""

from __future__ import annotations

import json

import jsonschema
import pytest
from tiny_models import mistral_v3_folder

import mistral7b
from mistral7b.errors import InputError
from mistral7b.tokenizer import HFTokenizer

CITY = {"type": "object", "additionalProperties": False, "required": ["city"],
        "properties": {"city": {"enum": ["Paris", "Rome", "Oslo"]}}}
TOOLS = [{"type": "function", "function": {"name": "get_weather", "parameters": CITY}},
         {"type": "function", "function": {"name": "get_news", "parameters": {
             "type": "object", "additionalProperties": False, "required": ["topic"],
             "properties": {"topic": {"enum": ["sport", "art"]}}}}}]
SCHEMAS = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]

HERMES = (
    "{%- if tools %}<|im_start|>system\n<tools>{% for t in tools %}\n{{ t | tojson }}"
    "{% endfor %}\n</tools>\nCall a tool with <tool_call>\n{\"name\": ..., \"arguments\": ...}"
    "\n</tool_call><|im_end|>\n{% endif %}"
    "{%- for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
    "{%- if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


@pytest.fixture(scope="module")
def v3(tmp_path_factory):
    return mistral7b.load(mistral_v3_folder(tmp_path_factory.mktemp("v3")))


@pytest.fixture(scope="module")
def hermes():
    llm = mistral7b.load("default")
    gguf = llm.tokenizer
    llm.tokenizer = HFTokenizer(gguf.backend, eos_id=gguf.eos_id, chat_template=HERMES)
    return llm


def check(reply, single: bool):
    assert reply.finish_reason == "tool_calls" and reply.tool_calls
    assert not single or len(reply.tool_calls) == 1
    for call in reply.tool_calls:
        assert len(call.id) == 9 and call.id.isalnum()
        jsonschema.validate(json.loads(call.arguments), SCHEMAS[call.name])


@pytest.mark.parametrize("model", ["v3", "hermes"])
@pytest.mark.parametrize("seed", range(6))
def test_forced_calls_parse(request, model, seed):
    llm = request.getfixturevalue(model)
    reply = llm.chat(ASK, tools=TOOLS, tool_choice="required", temperature=1.0, seed=seed,
                     max_tokens=200, parallel_tool_calls=False)
    check(reply, single=True)


@pytest.mark.parametrize("model", ["v3", "hermes"])
def test_a_named_function_is_the_one_called(request, model):
    llm = request.getfixturevalue(model)
    reply = llm.chat(ASK, tools=TOOLS, temperature=1.0, seed=0, max_tokens=200,
                     tool_choice={"type": "function", "function": {"name": "get_news"}})
    check(reply, single=True)
    assert reply.tool_calls[0].name == "get_news"


def test_none_bans_the_call_token(v3):
    reply = v3.chat(ASK, tools=TOOLS, tool_choice="none", logit_bias={5: 100}, max_tokens=4)
    assert reply.tool_calls is None and 5 not in reply.token_ids


def test_auto_returns_plain_text_when_the_model_writes_no_call(v3):
    reply = v3.chat(ASK, tools=TOOLS, max_tokens=6, logit_bias={5: -100})
    assert reply.tool_calls is None and reply.finish_reason in ("stop", "length")


def test_the_default_template_refuses_tools():
    llm = mistral7b.load("default")
    with pytest.raises(InputError, match="no tool calling") as info:
        llm.chat(ASK, tools=TOOLS)
    assert info.value.param == "tools"
