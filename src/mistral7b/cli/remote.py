"""`generate`, `chat` and `run` through a running `mistral7b serve` (Ollama's workflow).

A cold process pays for `import torch` (~1.2 s) and the model's load before its first
token; a server that already holds the model answers in the time of one HTTP request and its
pre-fill. So these commands look for a registered server (servers.py) that runs

1. the same model: the same resolved file or folder, the quant and dtype this command would
   load (the same flags, or flags naming what the server loaded), the same speculative
   setting and LoRA adapters, and the same context length; and
2. every option given can be carried by the API with the same meaning (the sampling flags,
   stop strings, seed, chat format, system prompt, --safe, --json-schema / --grammar).

Anything else runs in this process, silently: --device, --tp, -t, --kv-cache-memory, --json
(token ids are not in the API), a temperature or penalty outside the API's ranges, a flag
this module does not know. `--local` always runs here; `--host URL` (or MISTRAL7B_HOST)
always asks that server, and says so when nothing answers. The API key comes from --api-key
or MISTRAL7B_API_KEY.

This module, servers.py and api_client.py import neither torch nor the tokenizers: the
client path of `mistral7b generate` is Python's start-up, this file and one request.
"""

from __future__ import annotations

import argparse
import os
import re
import time
from collections.abc import Generator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mistral7b import servers, store
from mistral7b.api_client import APIClient, ServerError, ServerUnreachable
from mistral7b.cli import common
from mistral7b.errors import InputError
from mistral7b.sampling_params import SamplingParams

HOST_ENV = "MISTRAL7B_HOST"
API_KEY_ENV = "MISTRAL7B_API_KEY"
HOST_TIMEOUT_S = 2.0           # --host: how long the named server gets to answer /health

# Flags whose values the requests carry, or that only shape this process's own output.
CARRIED = frozenset({
    "command", "run", "prompt", "file", "chat", "system", "safe", "quiet", "verbose",
    "json_schema", "grammar", "model", "quant", "dtype", "speculate", "lora_specs", "ctx",
    "local", "host", "api_key", *common.SAMPLING_FLAGS,
})
# The API's own ranges (server/protocol.py), where they are narrower than the library's.
API_LIMITS = {"temperature": 2.0, "repetition_penalty": 10.0}
MAX_STOP_STRINGS = 16


def add_client_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("server (answers come from a running `mistral7b serve` of the "
                             "same model when there is one)")
    g.add_argument("--local", action="store_true",
                   help="load the model in this process even when a server runs it")
    g.add_argument("--host", metavar="URL",
                   help=f"ask the server at URL, e.g. http://127.0.0.1:8000 (default: "
                        f"${HOST_ENV}, else a registered server of the same model; see "
                        "`mistral7b ps`)")
    g.add_argument("--api-key", metavar="KEY",
                   help=f"the server's API key (default: ${API_KEY_ENV})")


@dataclass
class Served:
    """The server a command talks to."""

    client: APIClient
    entry: servers.ServerEntry | None      # None: --host named a server not registered here

    @property
    def where(self) -> str:
        """'http://127.0.0.1:8000 (pid 1234)'"""
        pid = f" (pid {self.entry.pid})" if self.entry else ""
        return f"{self.client.url}{pid}"

    @property
    def context(self) -> int | None:
        return self.entry.max_model_len if self.entry else None


def pick_server(args: argparse.Namespace) -> Served | None:
    """The server that answers this command, or None to run it here."""
    host = getattr(args, "host", None) or os.environ.get(HOST_ENV) or None
    if getattr(args, "local", False):
        if getattr(args, "host", None):
            raise InputError("give --local or --host, not both")
        return None
    key = getattr(args, "api_key", None) or os.environ.get(API_KEY_ENV) or None
    if host:
        return _forced(args, host, key)
    if uncarried(args):
        return None
    try:
        path = str(store.resolve(args.model).path.resolve())
    except InputError:
        return None             # the local path gives the one-line error
    for entry in reversed(servers.running()):             # the newest first
        if not same_model(entry, args, path) or (entry.api_key_required and not key):
            continue
        client = APIClient(entry.url, key)
        if client.healthy():
            return Served(client, entry)
    return None


def _forced(args: argparse.Namespace, host: str, key: str | None) -> Served:
    client = APIClient(host, key)
    if not client.healthy(HOST_TIMEOUT_S):
        raise ServerUnreachable(
            f"no mistral7b server answers at {client.url}: start one with `mistral7b serve "
            f"-m {args.model}` (it listens on http://127.0.0.1:8000), or drop --host "
            f"(and ${HOST_ENV}) to run the model in this process")
    lacking = uncarried(args)
    if lacking:
        raise InputError(f"{lacking[0]} cannot be sent to a server: drop it, or drop --host "
                         "to run the model in this process")
    entry = next((e for e in servers.running() if e.url == client.url), None)
    return Served(client, entry)


def uncarried(args: argparse.Namespace) -> list[str]:
    """The flags given that a request cannot carry with the same meaning."""
    from mistral7b.cli.main import build_parser

    defaults = vars(build_parser(only=args.command).parse_args([args.command]))
    out = [f"--{name.replace('_', '-')}" for name, value in vars(args).items()
           if name not in CARRIED and value != defaults.get(name)]
    for name, limit in API_LIMITS.items():
        value = getattr(args, name, None)
        if value is not None and value > limit:
            out.append(common.SAMPLING_FLAGS[name])
    if len(getattr(args, "stop", None) or ()) > MAX_STOP_STRINGS:
        out.append("--stop")
    return out


def same_model(entry: servers.ServerEntry, args: argparse.Namespace, path: str) -> bool:
    """Whether `entry` runs the model these flags would load here, with the same settings."""
    lora = sorted(lora_key(spec) for spec in getattr(args, "lora_specs", None) or ())
    ctx = getattr(args, "ctx", None)
    return (entry.path == path
            and args.quant in (entry.quant_flag, entry.quant)
            and (args.dtype == entry.dtype_flag or args.dtype == entry.dtype)
            and getattr(args, "speculate", 0) == entry.speculate
            and lora == sorted(entry.lora)
            and (ctx == entry.max_model_len if ctx is not None
                 else entry.max_model_len == entry.trained_len))


def lora_key(spec: str) -> str:
    """'PATH[:SCALE]' with PATH absolute and SCALE a float: how servers.py records it."""
    path, sep, scale = spec.rpartition(":")
    try:
        value = float(scale) if sep else 1.0
    except ValueError:
        path, value = spec, 1.0
    return f"{Path(path or spec).expanduser().resolve()}:{value:g}"


# ------------------------------------------------------------------------------ requests


def sampling_body(sampling: dict[str, Any]) -> dict[str, Any]:
    """The request fields for the command's sampling flags: every field given explicitly,
    with the command line's defaults (the API's own defaults differ: temperature 1)."""
    p = SamplingParams(**{k: v for k, v in sampling.items() if k != "response_format"})
    body: dict[str, Any] = {
        "max_tokens": p.max_tokens, "temperature": p.temperature, "top_p": p.top_p,
        "top_k": p.top_k, "min_p": p.min_p, "repetition_penalty": p.repetition_penalty,
        "frequency_penalty": p.frequency_penalty, "presence_penalty": p.presence_penalty,
        "ignore_eos": p.ignore_eos, "stream_options": {"include_usage": True},
    }
    if p.seed is not None:
        body["seed"] = p.seed
    if p.stop:
        body["stop"] = list(p.stop)
    if sampling.get("response_format") is not None:
        body["response_format"] = sampling["response_format"]
    return body


@dataclass
class Answer:
    """What one streamed answer reported, for the summary line."""

    started: float = field(default_factory=time.perf_counter)
    first_token_s: float | None = None
    total_s: float = 0.0
    finish_reason: str | None = None
    usage: dict[str, Any] = field(default_factory=dict)
    timings: dict[str, Any] = field(default_factory=dict)


def stream_text(served: Served, path: str, body: dict[str, Any], answer: Answer,
                response_format_file: str | None = None) -> Generator[str, None, None]:
    """The text deltas of a streamed completion or chat answer; `answer` collects figures."""
    chat = path.endswith("/chat/completions")
    try:
        for event in served.client.stream(path, body):
            if event.get("usage"):
                answer.usage = event["usage"]
                answer.timings = event.get("timings") or {}
            for choice in event.get("choices") or ():
                text = (choice.get("delta") or {}).get("content") if chat else choice.get("text")
                if choice.get("finish_reason"):
                    answer.finish_reason = choice["finish_reason"]
                if text:
                    if answer.first_token_s is None:
                        answer.first_token_s = time.perf_counter() - answer.started
                    yield text
    except ServerError as exc:
        raise local_words(exc, response_format_file) from None
    finally:
        answer.total_s = time.perf_counter() - answer.started


def local_words(exc: ServerError, response_format_file: str | None) -> InputError:
    """The server's refusal in the words the local path uses for the same mistake."""
    if response_format_file and exc.param and exc.param.startswith("response_format"):
        return InputError(f"{response_format_file}: {exc}")
    found = re.search(r"context length is (\d+) tokens, but the prompt has (\d+)", str(exc))
    if exc.code == "context_length_exceeded" and found:      # batch.run_batch's words
        return InputError(f"prompt 0 has {found.group(2)} tokens but the context is "
                          f"{found.group(1)}: shorten the prompt or raise the context size")
    return exc


def figures(served: Served, answer: Answer) -> dict[str, Any]:
    """The summary's figures (common.summary_line / verbose_stats) from the server's usage
    and timings and this client's clock."""
    u, t = answer.usage, answer.timings
    out: dict[str, Any] = {
        "served_by": served.where,
        "prompt_tokens": int(u.get("prompt_tokens", 0)),
        "cached_tokens": int((u.get("prompt_tokens_details") or {}).get("cached_tokens", 0)),
        "generated_tokens": int(u.get("completion_tokens", 0)),
        "total_s": round(answer.total_s, 3),
        "first_token_s": round(answer.first_token_s or answer.total_s, 3),
    }
    if t:
        out.update(prompt_s=round(t.get("prompt_ms", 0.0) / 1000, 3),
                   prompt_tps=round(t.get("prompt_per_second", 0.0), 1),
                   generation_s=round(t.get("predicted_ms", 0.0) / 1000, 3),
                   generation_tps=round(t.get("predicted_per_second", 0.0), 1))
    return out


def messages_for(text: str, system: str | None) -> list[dict[str, str]]:
    return ([{"role": "system", "content": system}] if system else []) + \
        [{"role": "user", "content": text}]


# ------------------------------------------------------------------------------ chat


@dataclass(frozen=True)
class ServedConfig:
    max_seq_len: int


class ServedTokenizer:
    """Counts a conversation's tokens with the server's own chat format (POST /tokenize)."""

    def __init__(self, served: Served) -> None:
        self.served = served

    def encode_chat(self, messages: list[dict[str, str]], add_generation_prompt: bool = True,
                    safe_prompt: bool = False) -> list[int]:
        body = {"messages": messages, "add_generation_prompt": add_generation_prompt}
        tokens = self.served.client.post("/tokenize", body).get("tokens")
        return list(tokens) if isinstance(tokens, list) else []


class ServedModel:
    """What the chat REPL asks of its model, answered by a server: the history stays here
    and each turn sends the whole conversation to /v1/chat/completions (streamed)."""

    def __init__(self, served: Served, response_format_file: str | None = None) -> None:
        self.served = served
        self.response_format_file = response_format_file
        context = served.context or int(served.client.post(
            "/tokenize", {"prompt": ""}).get("max_model_len") or 0)
        self.config = ServedConfig(max_seq_len=context)
        self.path = served.entry.path if served.entry else served.client.url
        self.tokenizer = ServedTokenizer(served)
        self.last = Answer()

    def require_tokenizer(self) -> ServedTokenizer:
        return self.tokenizer

    def clear_cache(self) -> None:
        """Nothing to do here: the server's prefix cache keeps what later requests reuse."""

    def stream_chat(self, messages: list[dict[str, str]], *, safe_prompt: bool = False,
                    max_context: int | None = None, **sampling: Any
                    ) -> Generator[str, None, None]:
        body = {**sampling_body(sampling), "messages": messages, "safe_prompt": safe_prompt}
        self.last = Answer()
        return stream_text(self.served, "/v1/chat/completions", body, self.last,
                           self.response_format_file)

    def summary_line(self) -> str:
        return common.summary_line(figures(self.served, self.last))

    def info(self) -> str:
        e = self.served.entry
        if e is None:
            return f"model        served by {self.served.client.url}\ncontext      " \
                   f"{self.config.max_seq_len} tokens"
        return (f"model        {e.path}\n"
                f"served by    {self.served.client.url} (pid {e.pid}, up "
                f"{servers.uptime(e)})\n"
                f"weights      {e.quant if e.quant != 'none' else e.dtype} on {e.device}\n"
                f"context      {e.max_model_len} tokens")
