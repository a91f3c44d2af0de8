"""`mistral7b generate [PROMPT]`: complete one prompt, streaming the text to stdout.

    mistral7b generate "The capital of France is" -n 32
    mistral7b generate -f prompt.txt --temperature 0.7 --seed 1
    echo "Write a haiku" | mistral7b generate --chat --json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mistral7b.cli import common, remote
from mistral7b.errors import InputError

if TYPE_CHECKING:
    from mistral7b.tokenizer.base import Tokenizer

DEFAULT_MAX_TOKENS = 256


def add_parser(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "generate", help="complete a prompt (streams to stdout)",
        description="Complete a prompt. The text streams to stdout; load progress and the "
                    "timing summary go to stderr. Sampling is greedy unless --temperature > 0.")
    p.add_argument("prompt", nargs="?",
                   help="the prompt; omitted or '-': read stdin (one trailing newline dropped)")
    p.add_argument("-f", "--file", metavar="FILE",
                   help="read the prompt from FILE ('-' = stdin; one trailing newline dropped)")
    p.add_argument("--chat", action="store_true",
                   help="send the prompt as one user message in the model's chat format")
    p.add_argument("--system", metavar="TEXT", help="system prompt (implies --chat)")
    p.add_argument("--safe", action="store_true",
                   help="put the Mistral guardrail system prompt first (safe_prompt; implies "
                        "--chat)")
    p.add_argument("--json", action="store_true",
                   help="print one JSON object (text, token_ids, finish_reason, prompt_tokens, "
                        "completion_tokens, timings) at the end instead of streaming")
    p.add_argument("-q", "--quiet", action="store_true",
                   help="no load message, progress bar or timing summary on stderr")
    p.add_argument("--verbose", action="store_true",
                   help="print the figures one per line on stderr instead of the summary "
                        "line (prompt tokens, time to first token, pre-fill and decode "
                        "tok/s, load time, peak memory), as `ollama run --verbose` does")
    common.add_structured_args(p)
    common.add_model_args(p)
    common.add_tp_arg(p)
    common.add_lora_arg(p)
    common.add_sampling_args(p, max_tokens=DEFAULT_MAX_TOKENS)
    remote.add_client_args(p)
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    # Everything that can be checked without the model is checked before loading it.
    if args.quiet and args.verbose:
        raise InputError("give -q/--quiet or --verbose, not both")
    text = read_prompt(args)
    sampling = common.sampling_kwargs(args)
    response_format = common.read_response_format(args)
    served = remote.pick_server(args)
    if served is not None:
        return run_served(args, served, text, {**sampling, "response_format": response_format})
    llm = common.load_model(args, quiet=args.quiet)
    common.use_response_format(llm, args, response_format, sampling)
    ids = encode_prompt(llm.require_tokenizer(), text,
                        chat=args.chat or args.system is not None or args.safe,
                        system=args.system, safe=args.safe)

    t0 = time.perf_counter()
    if args.json:
        completion = llm.generate(ids, max_context=args.ctx, **sampling)
        timings = common.timings(llm, time.perf_counter() - t0)
        print(json.dumps({
            "text": completion.text,
            "token_ids": completion.token_ids,
            "finish_reason": completion.finish_reason,
            "prompt_tokens": completion.prompt_tokens,
            "completion_tokens": completion.completion_tokens,
            "timings": timings,
        }, ensure_ascii=False))
    else:
        if not print_stream(llm.stream(ids, max_context=args.ctx, **sampling)):
            return common.EXIT_INTERRUPTED
        timings = common.timings(llm, time.perf_counter() - t0)
    if args.verbose:
        common.log(common.verbose_stats(timings))
    elif not args.quiet:
        common.log(common.summary_line(timings))
    return 0


def run_served(args: argparse.Namespace, served: remote.Served, text: str,
               sampling: dict[str, Any]) -> int:
    """The same answer as `run`, from a server that holds the model (cli/remote.py)."""
    body = remote.sampling_body(sampling)
    if args.chat or args.system is not None or args.safe:
        path = "/v1/chat/completions"
        body.update(messages=remote.messages_for(text, args.system), safe_prompt=args.safe)
    else:
        path, body["prompt"] = "/v1/completions", text
    answer = remote.Answer()
    # Ctrl-C leaves the stream, which closes the connection: the server drops the request.
    if not print_stream(remote.stream_text(served, path, body, answer,
                                           args.json_schema or args.grammar)):
        return common.EXIT_INTERRUPTED
    figures = remote.figures(served, answer)
    if args.verbose:
        common.log(common.verbose_stats(figures))
    elif not args.quiet:
        common.log(common.summary_line(figures))
    return 0


def print_stream(deltas: Iterable[str]) -> bool:
    """Write the text as it comes, then a newline; False when Ctrl-C stopped it."""
    out = sys.stdout
    try:
        for delta in deltas:
            out.write(delta)
            out.flush()
    except KeyboardInterrupt:
        out.write("\n")
        out.flush()
        common.log("interrupted")
        return False
    out.write("\n")
    out.flush()
    return True


def read_prompt(args: argparse.Namespace) -> str:
    """The prompt text from the argument, -f FILE, or stdin."""
    if args.file is not None and args.prompt is not None:
        raise InputError("give the prompt as an argument or with -f/--file, not both")
    if args.file is not None and args.file != "-":
        try:
            text = Path(args.file).read_text(encoding="utf-8")
        except UnicodeDecodeError:
            raise InputError(f"{args.file}: not UTF-8 text") from None
        return _drop_final_newline(text)
    if args.file == "-" or args.prompt == "-" or (args.prompt is None and not _stdin_is_tty()):
        if sys.stdin is None:
            raise InputError("stdin is closed: give the prompt as an argument or with -f FILE")
        return _drop_final_newline(sys.stdin.read())
    if args.prompt is None:
        raise InputError("no prompt: give it as an argument, with -f FILE, or on stdin")
    return args.prompt


def encode_prompt(tokenizer: Tokenizer, text: str, *, chat: bool, system: str | None,
                  safe: bool = False) -> list[int]:
    if chat:
        messages = [{"role": "system", "content": system}] if system else []
        messages.append({"role": "user", "content": text})
        return tokenizer.encode_chat(messages, add_generation_prompt=True, safe_prompt=safe)
    ids = tokenizer.encode(text, bos=True)
    if not ids:
        raise InputError("the prompt is empty (and this model has no BOS token to start from)")
    return ids


def _stdin_is_tty() -> bool:
    return sys.stdin is not None and sys.stdin.isatty()


def _drop_final_newline(text: str) -> str:
    # Editors and `echo` end a file with a newline nobody meant as part of the prompt
    # (llama.cpp's -f drops it too).
    return text.removesuffix("\r\n") if text.endswith("\r\n") else text.removesuffix("\n")
