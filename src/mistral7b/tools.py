"""Tool (function) calling: OpenAI's request fields checked, and generated calls parsed.

How a model writes a call depends on its chat format (`ToolFormat`):

| format | a call looks like | used by |
|---|---|---|
| Mistral (v3+) | `[TOOL_CALLS]` control id, then `[{"name": "f", "arguments": {...}}]` | Mistral 7B v0.3 (mistral-common's encoding) |
| Hermes | `<tool_call>\\n{"name": "f", "arguments": {...}}\\n</tool_call>` | HF chat templates that read `tools` (Qwen, Hermes, SmolLM3) |

`ToolCallParser` follows one generated choice: text before the call marker is content
(streamed as it comes), text after it is held and parsed when the choice ends. Text that
does not parse as calls is handed back as content, with finish reason "stop", as vLLM's
Mistral parser does. Call ids are 9 letters and digits, mistral-common's rule for v3, which
OpenAI clients accept as any other string.
"""

from __future__ import annotations

import dataclasses
import json
import re
import secrets
import string
from typing import Any

from mistral7b.errors import InputError

_NAME = re.compile(r"[a-zA-Z0-9_-]{1,64}")
_ID_CHARS = string.ascii_letters + string.digits
HERMES_OPEN, HERMES_CLOSE = "<tool_call>", "</tool_call>"


@dataclasses.dataclass(frozen=True)
class ToolCall:
    id: str
    name: str
    arguments: str          # JSON text, as OpenAI sends it

    def to_openai(self) -> dict[str, Any]:
        return {"id": self.id, "type": "function",
                "function": {"name": self.name, "arguments": self.arguments}}


@dataclasses.dataclass(frozen=True)
class ToolChoice:
    """OpenAI's tool_choice: mode "none" | "auto" | "required"; `name` for a named function
    (mode "required" then too)."""

    mode: str = "auto"
    name: str | None = None

    @property
    def forced(self) -> bool:
        return self.mode == "required"


@dataclasses.dataclass(frozen=True)
class ToolFormat:
    """Where a model's tool calls start: a control id (Mistral) or an opening text (Hermes)."""

    marker_id: int | None = None
    open_text: str | None = None
    close_text: str | None = None

    @property
    def mistral(self) -> bool:
        return self.marker_id is not None


def new_call_id() -> str:
    return "".join(secrets.choice(_ID_CHARS) for _ in range(9))


def tool_format(tok: Any) -> ToolFormat | None:
    """The call format of a tokenizer's chat format, None when it has no tool calling."""
    if not tok.supports_tools:
        return None
    if tok.tool_calls_id is not None:
        return ToolFormat(marker_id=tok.tool_calls_id)
    return ToolFormat(open_text=HERMES_OPEN, close_text=HERMES_CLOSE)


def check_tools(tools: Any) -> list[dict[str, Any]]:
    """OpenAI `tools`: a list of {"type": "function", "function": {"name", "description"?,
    "parameters"?}}. Returns them unchanged (a chat template renders them as given);
    InputError(param="tools") names a fault."""
    if not isinstance(tools, list) or not tools:
        raise InputError("tools must be a non-empty list of {'type': 'function', "
                         "'function': {...}}", param="tools")
    names = set()
    out = []
    for i, tool in enumerate(tools):
        where = f"tools[{i}]"
        if not isinstance(tool, dict) or tool.get("type") != "function":
            raise InputError(f"{where} must be {{'type': 'function', 'function': {{...}}}}",
                             param="tools")
        fn = tool.get("function")
        if not isinstance(fn, dict):
            raise InputError(f"{where}.function must be an object", param="tools")
        name = fn.get("name")
        if not isinstance(name, str) or not _NAME.fullmatch(name):
            raise InputError(f"{where}.function.name must be 1-64 letters, digits, '_' or "
                             f"'-', got {name!r}", param="tools")
        if name in names:
            raise InputError(f"{where}: two tools are named {name!r}", param="tools")
        names.add(name)
        params = fn.get("parameters", {"type": "object", "properties": {}})
        if not isinstance(params, dict):
            raise InputError(f"{where}.function.parameters must be a JSON schema object",
                             param="tools")
        desc = fn.get("description")
        if desc is not None and not isinstance(desc, str):
            raise InputError(f"{where}.function.description must be a string", param="tools")
        out.append(tool)
    return out


def check_tool_choice(choice: Any, tools: list[dict[str, Any]] | None) -> ToolChoice:
    """OpenAI's tool_choice: "none" | "auto" | "required" |
    {"type": "function", "function": {"name": ...}}. None means "auto" (with tools)."""
    if choice is None:
        return ToolChoice("auto" if tools else "none")
    if choice in ("none", "auto", "required"):
        if choice != "none" and not tools:
            raise InputError(f"tool_choice {choice!r} needs tools", param="tool_choice")
        return ToolChoice(choice)
    if isinstance(choice, dict) and choice.get("type") == "function":
        fn = choice.get("function")
        name = fn.get("name") if isinstance(fn, dict) else None
        known = [t["function"]["name"] for t in tools or []]
        if name not in known:
            raise InputError(f"tool_choice names function {name!r}, which is not in tools "
                             f"({', '.join(known) or 'none given'})", param="tool_choice")
        return ToolChoice("required", name)
    raise InputError("tool_choice must be 'none', 'auto', 'required' or "
                     "{'type': 'function', 'function': {'name': ...}}", param="tool_choice")


def calls_schema(tools: list[dict[str, Any]], name: str | None = None) -> dict[str, Any]:
    """JSON schema of one call {"name", "arguments"} to any of `tools` (or to `name`)."""
    options = []
    for tool in tools:
        fn = tool["function"]
        if name is not None and fn["name"] != name:
            continue
        options.append({"type": "object", "additionalProperties": False,
                        "required": ["name", "arguments"],
                        "properties": {"name": {"const": fn["name"]},
                                       "arguments": fn.get("parameters") or {"type": "object"}}})
    return options[0] if len(options) == 1 else {"anyOf": options}


class ToolCallParser:
    """Splits one generated choice into content and tool calls (module docstring)."""

    def __init__(self, fmt: ToolFormat) -> None:
        self.fmt = fmt
        self.in_call = False
        self._held = ""            # content that may be the start of an opening text
        self._call_text: list[str] = []

    def push(self, token_id: int | None, text: str) -> str:
        """Feed one output (its token id and text delta); return the content to emit now."""
        if self.in_call:
            self._call_text.append(text)
            return ""
        if self.fmt.marker_id is not None:
            if token_id == self.fmt.marker_id:
                self.in_call = True
                self._call_text.append(text)
                return ""
            return text
        opening = self.fmt.open_text or ""
        full = self._held + text
        at = full.find(opening)
        if at >= 0:
            self.in_call = True
            self._call_text.append(full[at:])
            self._held = ""
            return full[:at]
        keep = _partial_suffix(full, opening)
        self._held = full[len(full) - keep:] if keep else ""
        return full[:len(full) - keep]

    def finish(self) -> tuple[list[ToolCall] | None, str]:
        """(the parsed calls or None, content not emitted yet: held text, or the call text
        when it does not parse)."""
        if not self.in_call:
            held, self._held = self._held, ""
            return None, held
        text = "".join(self._call_text)
        calls = parse_calls(text, self.fmt)
        return (calls, "") if calls else (None, text)


def _partial_suffix(text: str, opening: str) -> int:
    """Length of the longest suffix of `text` that is a proper prefix of `opening`."""
    for n in range(min(len(opening) - 1, len(text)), 0, -1):
        if opening.startswith(text[-n:]):
            return n
    return 0


def parse_calls(text: str, fmt: ToolFormat) -> list[ToolCall] | None:
    """The calls in `text` (what follows the marker), or None when it is not valid calls."""
    if fmt.marker_id is not None:
        payloads = [text]
    else:
        opening, closing = fmt.open_text or "", fmt.close_text or ""
        payloads = [part.split(closing)[0] for part in text.split(opening)[1:]]
    calls = []
    for payload in payloads:
        try:
            value = json.loads(payload)
        except json.JSONDecodeError:
            return None
        for item in value if isinstance(value, list) else [value]:
            call = _call(item)
            if call is None:
                return None
            calls.append(call)
    return calls or None


def _call(item: Any) -> ToolCall | None:
    if not isinstance(item, dict) or not isinstance(item.get("name"), str):
        return None
    args = item.get("arguments", item.get("parameters", {}))
    if isinstance(args, str):       # some models write the arguments as a JSON string
        try:
            args = json.loads(args)
        except json.JSONDecodeError:
            return None
    if not isinstance(args, dict):
        return None
    call_id = item.get("id")
    if not isinstance(call_id, str) or not re.fullmatch(r"[a-zA-Z0-9]{9}", call_id):
        call_id = new_call_id()
    return ToolCall(call_id, item["name"], json.dumps(args, ensure_ascii=False))
