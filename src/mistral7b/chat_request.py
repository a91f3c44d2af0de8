"""A chat request's extras turned into what the step loop needs: prompt ids, a grammar, bans.

`LLM.chat` and the server's /v1/chat/completions both go through `plan_chat`, so tools,
tool_choice and response_format mean the same on every surface:

| tool_choice | prompt | generation | output |
|---|---|---|---|
| "none" | tools shown | Mistral's `[TOOL_CALLS]` banned (logit bias -100) | text |
| "auto" (default with tools) | tools shown | free | calls parsed when the model writes them |
| "required" / a named function | tools shown | grammar: only calls, arguments valid under their schema | calls (one for a named function or parallel_tool_calls=False) |

A non-text response_format puts the whole answer under its grammar; with tools it needs
tool_choice "none" (answer in the format) or a forced call (calls only): "auto" would have
to allow both and is refused rather than silently dropping one.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

from mistral7b.errors import InputError
from mistral7b.grammar import Grammar, GrammarCompiler
from mistral7b.sequence import Completion
from mistral7b.tokenizer.base import Tokenizer
from mistral7b.tools import (
    ToolFormat,
    check_tool_choice,
    check_tools,
    parse_calls,
    tool_format,
)


@dataclasses.dataclass(frozen=True)
class ChatPlan:
    ids: list[int]
    grammar: Grammar | None = None
    tool_format: ToolFormat | None = None        # parse the output for calls when set
    logit_bias: tuple[tuple[int, float], ...] = ()

    def sampling(self, sampling: dict[str, Any]) -> dict[str, Any]:
        """The caller's sampling options with this plan's bans added to logit_bias."""
        if not self.logit_bias:
            return sampling
        bias = dict(sampling.get("logit_bias") or {})
        bias.update(self.logit_bias)
        return {**sampling, "logit_bias": bias}


def plan_chat(tok: Tokenizer, compiler: Callable[[], GrammarCompiler],
              messages: list[dict[str, Any]], *, tools: Any = None, tool_choice: Any = None,
              response_format: Any = None, safe_prompt: bool = False,
              parallel_tool_calls: bool = True) -> ChatPlan:
    """Encode the conversation and build its constraints (module docstring). Raises
    InputError (param set) for bad tools / tool_choice / response_format, TokenizerError for
    a conversation the chat format refuses."""
    checked = check_tools(tools) if tools else None
    choice = check_tool_choice(tool_choice, checked)
    fmt = None
    if checked:
        fmt = tool_format(tok)
        if fmt is None:
            raise InputError("this model's chat format has no tool calling (its template "
                             "never shows `tools` to the model); leave tools out or use a "
                             "model made for function calling, e.g. Mistral 7B v0.3",
                             param="tools")
    ids = tok.encode_chat(messages, add_generation_prompt=True, tools=checked,
                          safe_prompt=safe_prompt)
    text_format = response_format is None or (isinstance(response_format, dict)
                                              and response_format.get("type") == "text")
    grammar = None
    if choice.forced:
        assert fmt is not None and checked is not None    # check_tool_choice needs tools
        if not text_format:
            raise InputError("a forced tool call and a response_format cannot both shape the "
                             "answer; drop one", param="response_format")
        grammar = compiler().tool_calls(fmt, checked, choice.name, parallel_tool_calls)
    elif not text_format:
        if choice.mode == "auto":
            raise InputError("response_format with tools needs tool_choice 'none' (answer in "
                             "the format) or 'required' (call a tool)", param="tool_choice")
        grammar = compiler().response_format(response_format)
    bias: tuple[tuple[int, float], ...] = ()
    if fmt is not None and choice.mode == "none" and fmt.marker_id is not None:
        bias = ((fmt.marker_id, -100.0),)
    return ChatPlan(ids, grammar, fmt if choice.mode != "none" else None, bias)


def with_tool_calls(tok: Tokenizer, completion: Completion, fmt: ToolFormat) -> Completion:
    """The completion with the calls it wrote moved to `tool_calls` (finish reason
    "tool_calls"); unchanged when it wrote none or they do not parse."""
    ids = completion.token_ids
    if fmt.marker_id is not None:
        if fmt.marker_id not in ids:
            return completion
        at = ids.index(fmt.marker_id)
        content, call_text = tok.decode(ids[:at]), tok.decode(ids[at + 1:])
    else:
        opening = fmt.open_text or ""
        at = completion.text.find(opening)
        if at < 0:
            return completion
        content, call_text = completion.text[:at], completion.text[at:]
    calls = parse_calls(call_text, fmt)
    if not calls:
        return completion
    return dataclasses.replace(completion, text=content, tool_calls=calls,
                               finish_reason="tool_calls")
