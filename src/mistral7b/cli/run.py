"""`mistral7b run MODEL [PROMPT] [FLAGS...]`: ollama's `run`: pull when missing, then talk.

    mistral7b run mistral-7b-instruct-v0.3                 # chat (a terminal)
    mistral7b run mistral "Why is the sky blue?" -n 64     # one answer, streamed
    echo "Summarize: ..." | mistral7b run mistral          # stdin not a terminal: generate

MODEL is anything -m takes. When it is an alias or a Hub repository id that is not in the
store, it is pulled first (pull.py's download, the alias's pinned commit). Then the work is
handed to `chat` (no PROMPT and stdin a terminal) or `generate` (a PROMPT, or stdin piped;
with `--chat`, the model's chat format): their own parsers read FLAGS, so every flag of
those commands works here (`--verbose`, `-n`, `--temperature`, `--system`, ...).
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

from mistral7b import store
from mistral7b.cli import common
from mistral7b.errors import InputError


def add_parser(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "run", help="pull a model if needed, then chat with it or complete a prompt",
        description="Run MODEL (an alias, a Hub repository id, a name from `mistral7b list` "
                    "or a path): pull it when it is not in the store, then open `chat` (no "
                    "PROMPT, stdin a terminal) or answer PROMPT with `generate --chat` (a "
                    "PROMPT, or stdin piped). FLAGS after PROMPT go to that command (see "
                    "'mistral7b chat --help' and 'mistral7b generate --help').")
    p.add_argument("model", metavar="MODEL")
    p.add_argument("rest", nargs=argparse.REMAINDER, metavar="[PROMPT] [FLAGS...]")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from mistral7b.cli.main import build_parser

    ensure_local(args.model)
    prompt = args.rest[0] if args.rest and not args.rest[0].startswith("-") else None
    flags = args.rest[1:] if prompt is not None else args.rest
    stdin_tty = sys.stdin is not None and sys.stdin.isatty()
    if prompt is None and stdin_tty:
        argv = ["chat", "-m", args.model, *flags]
    else:
        argv = ["generate", "--chat", "-m", args.model, *([prompt] if prompt else []), *flags]
    target = build_parser(only=argv[0]).parse_args(argv)
    return int(target.run(target))


def ensure_local(model: str) -> None:
    """Pull `model` when it names a repository the store does not have yet (offline, the
    resolver's one line says how to get it)."""
    try:
        store.resolve(model)
    except store.ModelNotFound as missing:
        from huggingface_hub import constants

        from mistral7b.cli.pull import download

        try:
            store.repo_and_revision(model)
        except InputError:
            raise missing from None     # not a repository name: nothing to pull
        if constants.HF_HUB_OFFLINE:
            raise missing from None
        common.log(f"{model} is not in the store: pulling it")
        download(model)
