"""Structured output: response formats compiled to llguidance grammars for our tokenizers.

`GrammarCompiler(tokenizer, vocab_size)` adapts a tokenizer to llguidance once (~0.5 s for
a 49k vocabulary, so `LLM` keeps one) and compiles what a request asks for:

| response_format | output |
|---|---|
| `{"type": "text"}` or None | anything (no grammar) |
| `{"type": "json_object"}` | one JSON object |
| `{"type": "json_schema", "json_schema": {"name", "schema", "strict"}}` | JSON valid under `schema` |
| `{"type": "regex", "regex": "..."}` (extension) | a full match of the regex |
| `{"type": "grammar", "grammar": "..."}` (extension) | a sentence of the Lark grammar (llguidance's Lark dialect: `start` rule, `%json {...}` embeds a schema) |

The last two are our extensions (vLLM's `guided_regex` / `guided_grammar` say the same, and
the server accepts those names too). An invalid schema, regex or grammar raises InputError
naming the problem, with param="response_format".

Tokenizer adapters: a `tokenizers`-library backend (HF folders, GGUF metadata) is handed to
llguidance as its tokenizer.json; a mistral-common SentencePiece or Tekken vocabulary is
handed over as the byte string of every id (`▁` -> space, `<0xNN>` -> that byte, control
tokens marked special) with an encoder that adds no dummy-prefix space.
"""

from __future__ import annotations

import dataclasses
import json
import re
from typing import Any

from mistral7b.constrain import Constraint
from mistral7b.errors import InputError
from mistral7b.tools import HERMES_CLOSE, HERMES_OPEN, ToolFormat, calls_schema

RESPONSE_FORMAT_TYPES = ("text", "json_object", "json_schema", "regex", "grammar")
_BYTE_PIECE = re.compile(r"<0x([0-9A-Fa-f]{2})>")


@dataclasses.dataclass(frozen=True)
class Grammar:
    """A compiled grammar; each sequence under it gets its own `constraint()`."""

    text: str                      # llguidance's grammar (JSON of its grammar list)
    tokenizer: Any                 # llguidance.LLTokenizer
    vocab_size: int

    def constraint(self) -> Constraint:
        import llguidance

        matcher = llguidance.LLMatcher(self.tokenizer, self.text, log_level=0)
        if matcher.is_error():
            raise InputError(f"invalid grammar: {matcher.get_error()}", param="response_format")
        return Constraint(matcher, self.vocab_size)


class GrammarCompiler:
    """Response formats and tool-call shapes -> Grammar, for one tokenizer."""

    def __init__(self, tokenizer: Any, vocab_size: int) -> None:
        self.vocab_size = vocab_size
        self.ll_tokenizer = guidance_tokenizer(tokenizer, vocab_size)

    def response_format(self, fmt: Any, param: str = "response_format") -> Grammar | None:
        """The grammar of an OpenAI-shaped response_format (module docstring); None for text."""
        import llguidance

        if fmt is None:
            return None
        if not isinstance(fmt, dict) or fmt.get("type") not in RESPONSE_FORMAT_TYPES:
            got = fmt.get("type") if isinstance(fmt, dict) else fmt
            raise InputError(f"response_format type must be one of "
                             f"{', '.join(RESPONSE_FORMAT_TYPES)}, got {got!r}", param=param)
        kind = fmt["type"]
        if kind == "text":
            return None
        if kind == "json_object":
            return self._check(llguidance.LLMatcher.grammar_from_json_schema(
                {"type": "object"}, defaults=_JSON_DEFAULTS), param, "json_object")
        if kind == "json_schema":
            spec = fmt.get("json_schema")
            if not isinstance(spec, dict):
                raise InputError("response_format json_schema needs "
                                 "{'json_schema': {'name': ..., 'schema': {...}}}", param=param)
            schema = spec.get("schema", {})
            if not isinstance(schema, (dict, bool)):
                raise InputError("response_format json_schema.schema must be a JSON schema "
                                 "object", param=param)
            return self.json_schema(schema, param)
        source = fmt.get(kind)
        if not isinstance(source, str) or not source:
            raise InputError(f"response_format {kind!r} needs a non-empty string field "
                             f"{kind!r}", param=param)
        if kind == "regex":
            return self._check(llguidance.LLMatcher.grammar_from_regex(source), param, "regex")
        return self._check(llguidance.LLMatcher.grammar_from_lark(source), param, "grammar")

    def json_schema(self, schema: dict[str, Any] | bool,
                    param: str = "response_format") -> Grammar:
        import llguidance

        if isinstance(schema, bool):        # JSON Schema's true (anything) / false (nothing)
            schema = {} if schema else {"not": {}}
        try:
            text = llguidance.LLMatcher.grammar_from_json_schema(schema, defaults=_JSON_DEFAULTS)
        except (ValueError, TypeError) as exc:
            raise InputError(f"invalid JSON schema: {exc}", param=param) from None
        return self._check(text, param, "JSON schema")

    def tool_calls(self, fmt: ToolFormat, tools: list[dict[str, Any]],
                   name: str | None = None, parallel: bool = True) -> Grammar:
        """Exactly the calls a forced tool_choice allows: Mistral's `[TOOL_CALLS]` then a JSON
        list of calls, or Hermes' `<tool_call>` blocks; arguments follow each schema. One
        call only for a named function or when `parallel` is False."""
        single = name is not None or not parallel
        import llguidance

        schema = {**calls_schema(tools, name), "x-guidance": _JSON_DEFAULTS}
        one = json.dumps(schema)
        if fmt.marker_id is not None:
            items: dict[str, Any] = {"type": "array", "minItems": 1,
                                     "items": calls_schema(tools, name),
                                     "x-guidance": _JSON_DEFAULTS}
            if single:
                items["maxItems"] = 1
            many = json.dumps(items)
            lark = f"start: <[{fmt.marker_id}]> %json {many}"
        else:
            lark = (f"start: call{'' if single else '+'}\ncall: {json.dumps(HERMES_OPEN + chr(10))} %json {one} "
                    f"{json.dumps(chr(10) + HERMES_CLOSE + chr(10))}")
        return self._check(llguidance.LLMatcher.grammar_from_lark(lark), "tools", "tool schema")

    def _check(self, text: str, param: str, what: str) -> Grammar:
        import llguidance

        error = llguidance.LLMatcher.validate_grammar(text, self.ll_tokenizer)
        if error and not error.startswith("WARNING"):
            first = error.strip().splitlines()[0]
            raise InputError(f"invalid {what}: {first}", param=param)
        return Grammar(text, self.ll_tokenizer, self.vocab_size)


# JSON as json.dumps writes it ("a": 1, "b": 2), the layout models saw most in training (and
# Mistral's tool calls exactly); no free whitespace, on which a model may loop until
# max_tokens.
_JSON_DEFAULTS: Any = {"whitespace_flexible": False, "item_separator": ", ",
                       "key_separator": ": "}


def guidance_tokenizer(tok: Any, vocab_size: int) -> Any:
    """An llguidance LLTokenizer of one of our tokenizers (module docstring)."""
    import llguidance

    eos = sorted(int(i) for i in tok.stop_ids)
    backend = getattr(tok, "backend", None)
    if backend is not None:                   # HF folder / GGUF: a tokenizers.Tokenizer
        return llguidance.LLTokenizer(backend.to_str(), n_vocab=vocab_size, eos_token=eos)
    raw = getattr(tok, "_raw", None)
    if raw is None:
        raise InputError(f"structured output does not support {type(tok).__name__} "
                         "tokenizers")
    return llguidance.LLTokenizer(llguidance.TokenizerWrapper(_MistralVocab(raw, eos)),
                                  n_vocab=vocab_size, eos_token=eos)


class _MistralVocab:
    """What llguidance's TokenizerWrapper reads of a mistral-common tokenizer."""

    def __init__(self, raw: Any, eos: list[int]) -> None:
        self.eos_token_id = eos[0]
        self.bos_token_id = raw.bos_id
        self.special_token_ids = sorted(int(i) for i in raw.special_ids)
        special = set(self.special_token_ids)
        tokens: list[bytes] = []
        byte_pieces = hasattr(raw, "id_to_byte_piece")   # Tekken
        for i in range(raw.n_words):
            piece = raw.id_to_piece(i)
            if i in special:
                tokens.append(b"\xff" + piece.encode())
            elif byte_pieces:
                tokens.append(raw.id_to_byte_piece(i))
            else:
                match = _BYTE_PIECE.fullmatch(piece)
                tokens.append(bytes([int(match.group(1), 16)]) if match
                              else piece.replace("\u2581", " ").encode())
        self.tokens = tokens
        self._raw = raw
        # SentencePiece puts a space before a text's first word; encode behind a character
        # that never merges with what follows and cut its ids off (mistral-common's trick).
        self._lead = [] if byte_pieces else raw.encode("\u263a", bos=False, eos=False)

    def __call__(self, text: str) -> list[int]:
        ids = self._raw.encode("\u263a" + text if self._lead else text, bos=False, eos=False)
        return list(ids[len(self._lead):])
