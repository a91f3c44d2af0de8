"""The chat REPL's settings commands: `/set`, `/show`, `/save FILE`, `/load FILE`.

As in ollama: `/set parameter NAME VALUE` (or `/set NAME VALUE`) changes a sampling setting for
the next answers, `/set system TEXT` the system prompt, `/set verbose` / `/set quiet` the timing
line; `/show` prints the model, the settings, the system prompt and how much of the context the
conversation takes. Unlike ollama's (which saves a model), `/save` writes the conversation as
JSON and `/load` reads one back:

    {"system": "...", "settings": {"temperature": 0.7, ...},
     "messages": [{"role": "user", "content": "..."}, {"role": "assistant", ...}]}

`/load` also takes a bare list of OpenAI-style messages (a leading system message becomes the
system prompt). A bad value or file changes nothing and says why.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mistral7b.atomic import write_text_atomically
from mistral7b.cli import common
from mistral7b.cli.remote import ServedModel
from mistral7b.errors import InputError, Mistral7BError
from mistral7b.sampling_params import SamplingParams

if TYPE_CHECKING:
    from mistral7b.cli.chat import ChatSession

# /set names -> SamplingParams fields (ollama's names first, then ours and OpenAI's).
SETTING_NAMES = {
    "temperature": "temperature", "temp": "temperature",
    "top_p": "top_p", "top_k": "top_k", "min_p": "min_p",
    "num_predict": "max_tokens", "max_tokens": "max_tokens",
    "repeat_penalty": "repetition_penalty", "repetition_penalty": "repetition_penalty",
    "frequency_penalty": "frequency_penalty", "presence_penalty": "presence_penalty",
    "seed": "seed", "stop": "stop",
}
_FIELD_TYPES = {"max_tokens": int, "top_k": int, "seed": int}
_RESET = ("none", "off", "default")
MAX_LOAD_BYTES = 64 << 20

HELP = """  /set parameter NAME VALUE   change a setting: temperature, top_p, top_k, min_p,
                              num_predict (max tokens), repeat_penalty, seed, stop
                              (VALUE 'default' puts back the flag's value; 'parameter' may be left out)
  /set system TEXT            set the system prompt
  /set verbose | quiet        show or hide the timings after each answer
  /show [info|parameters|system|context]   the model, settings, system prompt, context use
  /save FILE                  write the conversation (and settings) as JSON
  /load FILE                  read a conversation written by /save (or a messages list)"""


def set_command(session: ChatSession, rest: str) -> None:
    words = rest.split(None, 1)
    if not words:
        common.log("usage: /set parameter NAME VALUE | /set system TEXT | /set verbose|quiet")
        return
    head, tail = words[0].lower(), (words[1] if len(words) > 1 else "")
    if head == "system":
        session.set_system(tail.strip() or None)
    elif head in ("verbose", "quiet"):
        session.verbose = head == "verbose"
        common.log(f"(timings {'on' if session.verbose else 'off'})")
    else:
        if head == "parameter":
            head, _, tail = tail.strip().partition(" ")
            head = head.lower()
        try:
            field, value = parse_setting(head, tail.strip())
            session.update_sampling({field: value})
        except InputError as exc:
            common.log(f"error: {exc}")
            return
        common.log(f"(set {head} to {'default' if value is None else value})")


def parse_setting(name: str, text: str) -> tuple[str, Any]:
    """The SamplingParams field and value that `/set NAME TEXT` asks for (None = default)."""
    field = SETTING_NAMES.get(name)
    if field is None:
        raise InputError(f"unknown setting {name!r}: use one of "
                         f"{', '.join(sorted(set(SETTING_NAMES)))}")
    if not text:
        raise InputError(f"/set {name} needs a value (or 'default')")
    if text.lower() in _RESET:
        return field, None
    if field == "stop":
        return field, [text]
    kind = _FIELD_TYPES.get(field, float)
    try:
        return field, kind(text)
    except ValueError:
        raise InputError(f"{name} must be {'an integer' if kind is int else 'a number'}, "
                         f"got {text!r}") from None


def merged_sampling(sampling: dict[str, Any], changes: dict[str, Any],
                    initial: dict[str, Any]) -> dict[str, Any]:
    """`sampling` with `changes` applied, checked as a whole; a change to None puts back the
    session's starting value (the command line's flag), or the library default."""
    merged = {**sampling, **changes}
    merged = {k: (initial.get(k) if v is None else v) for k, v in merged.items()}
    merged = {k: v for k, v in merged.items() if v is not None}
    check = {k: v for k, v in merged.items() if k != "response_format"}
    SamplingParams(**check)              # raises InputError naming the bad value
    return merged


def show_command(session: ChatSession, rest: str) -> None:
    parts = {"info": _info, "parameters": _parameters, "system": _system, "context": _context}
    which = rest.strip().lower()
    if which and which not in parts:
        common.log(f"unknown /show {which!r}: use {', '.join(parts)} (or /show alone)")
        return
    for name, part in parts.items():
        if not which or which == name:
            common.log(part(session))


def _info(session: ChatSession) -> str:
    if isinstance(session.llm, ServedModel):
        return session.llm.info()
    llm, cfg = session.llm, session.llm.config
    window = f"{cfg.sliding_window} tokens" if cfg.sliding_window else "none (full attention)"
    tok = type(llm.tokenizer).__name__ if llm.tokenizer is not None else "none"
    return (f"model        {llm.path}\n"
            f"parameters   {cfg.n_params / 1e9:.2f}B ({cfg.n_layers} layers, {cfg.n_heads} "
            f"query / {cfg.n_kv_heads} kv heads)\n"
            f"weights      {llm.quant or llm.engine.dtype} on {llm.engine.device}\n"
            f"context      {session.ctx} tokens (model: {cfg.max_seq_len})\n"
            f"window       {window}\n"
            f"rope theta   {cfg.rope_theta:g}\n"
            f"tokenizer    {tok}")


def _parameters(session: ChatSession) -> str:
    settings = {k: v for k, v in session.sampling.items() if k != "response_format"}
    lines = [f"{name:<20} {value}" for name, value in sorted(settings.items())]
    return "parameters\n" + ("\n".join("  " + line for line in lines) if lines else
                             "  (the defaults: greedy)")


def _system(session: ChatSession) -> str:
    return f"system prompt: {session.system}" if session.system else "no system prompt"


def _context(session: ChatSession) -> str:
    used = len(session.encode()) if session.turns or session.system else 0
    return (f"context: {len(session.turns)} message(s), {used} of {session.ctx} tokens "
            f"({100 * used / session.ctx:.0f}%)")


def save_command(session: ChatSession, rest: str) -> None:
    if not rest:
        common.log("usage: /save FILE")
        return
    path = Path(rest).expanduser()
    data = {"model": str(session.llm.path), "system": session.system,
            "settings": {k: v for k, v in session.sampling.items() if k != "response_format"},
            "messages": session.turns}
    try:
        write_text_atomically(path, json.dumps(data, indent=2, ensure_ascii=False) + "\n")
    except OSError as exc:
        common.log(f"error: could not save to {path}: {exc.strerror or exc}")
        return
    common.log(f"(saved {len(session.turns)} message(s) to {path})")


def load_command(session: ChatSession, rest: str) -> None:
    if not rest:
        common.log("usage: /load FILE")
        return
    path = Path(rest).expanduser()
    try:
        system, settings, turns = read_conversation(path)
        sampling = merged_sampling(session.sampling, settings, session.initial_sampling) \
            if settings else None
        session.replace_conversation(system, turns, sampling)
    except OSError as exc:
        common.log(f"error: could not read {path}: {exc.strerror or exc}")
        return
    except Mistral7BError as exc:
        common.log(f"error: {path}: {exc}")
        return
    common.log(f"(loaded {len(turns)} message(s) from {path})")


def read_conversation(path: Path) -> tuple[str | None, dict[str, Any], list[dict[str, str]]]:
    """(system prompt, settings, user/assistant messages) from a /save file or a list of
    messages; InputError says what is wrong with it."""
    if path.stat().st_size > MAX_LOAD_BYTES:
        raise InputError(f"the file is over {MAX_LOAD_BYTES >> 20} MiB: not a conversation")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InputError(f"not a JSON conversation ({exc})") from None
    system: str | None = None
    settings: dict[str, Any] = {}
    if isinstance(data, dict):
        messages, system, settings = data.get("messages"), data.get("system"), \
            data.get("settings") or {}
        if system is not None and not isinstance(system, str):
            raise InputError("'system' must be a string")
        if not isinstance(settings, dict):
            raise InputError("'settings' must be an object")
        unknown = [k for k in settings if k not in SETTING_NAMES.values()]
        if unknown:
            raise InputError(f"unknown setting(s) {', '.join(map(repr, unknown))}")
    else:
        messages = data
    if not isinstance(messages, list):
        raise InputError("expected a list of messages, or an object with 'messages'")
    turns: list[dict[str, str]] = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("content"), str) or \
                m.get("role") not in ("system", "user", "assistant"):
            raise InputError(f"message {i} must be {{\"role\": \"system\"|\"user\"|"
                             "\"assistant\", \"content\": \"text\"}")
        if m["role"] == "system":
            if turns:
                raise InputError(f"message {i}: a system message may only come first")
            system = m["content"]
        else:
            turns.append({"role": m["role"], "content": m["content"]})
    return system or None, settings, turns


COMMANDS = {"/set": set_command, "/show": show_command, "/save": save_command,
            "/load": load_command}
