"""The tool-call parser and request checks: calls are found however the text is split into
deltas, and malformed calls come back as text."""

from __future__ import annotations

import json

import pytest

from mistral7b.errors import InputError
from mistral7b.tools import (
    ToolCallParser,
    ToolFormat,
    check_tool_choice,
    check_tools,
    parse_calls,
)

MISTRAL = ToolFormat(marker_id=5)
HERMES = ToolFormat(open_text="<tool_call>", close_text="</tool_call>")
TOOLS = check_tools([{"type": "function", "function": {"name": "f", "parameters": {}}},
                     {"type": "function", "function": {"name": "g"}}])


def run(fmt: ToolFormat, pieces: list[tuple[int | None, str]]):
    parser = ToolCallParser(fmt)
    content = "".join(parser.push(t, text) for t, text in pieces)
    calls, rest = parser.finish()
    return content + rest, calls


def test_mistral_calls_after_the_control_id():
    payload = '[{"name": "f", "arguments": {"x": 1}}, {"name": "g", "arguments": {}}]'
    pieces = [(10, "Sure."), (5, "")] + [(100 + i, ch) for i, ch in enumerate(payload)]
    content, calls = run(MISTRAL, pieces)
    assert content == "Sure."
    assert [(c.name, json.loads(c.arguments)) for c in calls] == [("f", {"x": 1}), ("g", {})]
    assert all(len(c.id) == 9 and c.id.isalnum() for c in calls)
    assert len({c.id for c in calls}) == 2


def test_mistral_keeps_a_valid_id_the_model_wrote():
    calls = parse_calls('[{"name": "f", "arguments": {}, "id": "abcDEF123"}]', MISTRAL)
    assert calls[0].id == "abcDEF123"


@pytest.mark.parametrize("cut", range(1, 40))
def test_hermes_calls_found_wherever_the_text_is_cut(cut):
    text = 'Let me check.<tool_call>\n{"name": "f", "arguments": {"q": "a<b"}}\n</tool_call>'
    content, calls = run(HERMES, [(None, text[:cut]), (None, text[cut:])])
    assert content == "Let me check."
    assert [(c.name, json.loads(c.arguments)) for c in calls] == [("f", {"q": "a<b"})]


def test_hermes_text_that_only_looks_like_a_call_start_is_content():
    content, calls = run(HERMES, [(None, "a <tool"), (None, "box> b <")])
    assert calls is None and content == "a <toolbox> b <"


@pytest.mark.parametrize("payload", ['[{"name": "f", "arguments": {', "not json",
                                     '[{"arguments": {}}]', '[{"name": "f", "arguments": 3}]'])
def test_malformed_calls_come_back_as_text(payload):
    content, calls = run(MISTRAL, [(5, ""), (7, payload)])
    assert calls is None and content == payload


def test_arguments_written_as_a_json_string_are_accepted():
    calls = parse_calls('[{"name": "f", "arguments": "{\\"x\\": 2}"}]', MISTRAL)
    assert json.loads(calls[0].arguments) == {"x": 2}


@pytest.mark.parametrize("tools, match", [
    ([], "non-empty"), ([{"type": "retrieval"}], "type"),
    ([{"type": "function", "function": {"name": "has space"}}], "name"),
    ([{"type": "function", "function": {"name": "f"}}] * 2, "two tools"),
    ([{"type": "function", "function": {"name": "f", "parameters": []}}], "parameters"),
])
def test_bad_tools_name_the_problem(tools, match):
    with pytest.raises(InputError, match=match) as info:
        check_tools(tools)
    assert info.value.param == "tools"


def test_tool_choice():
    assert check_tool_choice(None, TOOLS).mode == "auto"
    assert check_tool_choice(None, None).mode == "none"
    named = check_tool_choice({"type": "function", "function": {"name": "g"}}, TOOLS)
    assert named.forced and named.name == "g"
    for bad in ("always", {"type": "function", "function": {"name": "h"}}):
        with pytest.raises(InputError) as info:
            check_tool_choice(bad, TOOLS)
        assert info.value.param == "tool_choice"
    with pytest.raises(InputError, match="needs tools"):
        check_tool_choice("required", None)
