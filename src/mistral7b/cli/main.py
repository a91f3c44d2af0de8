"""`mistral7b`: one entry point, one subcommand per module.

Each module in COMMANDS has `add_parser(subparsers)` (which sets `run` as the parser's default)
and `run(args) -> int`. To add a command (quantize, bench, ...), write
`mistral7b/cli/<name>.py` with those two functions and add its name to COMMANDS. Commands
that share a concern may share a module, named in SHARED: `models.py` holds the model store's
`list`, `show`, `rm` and `create`, each registered by its `add_<command>_parser`; `run` is
a module of its own.

This is the one place that turns a user's mistake into one line on stderr, `error: ...`, and
exit code 2: a bad flag or flag value, a missing file, or any `Mistral7BError` (bad model
file, over-long prompt, gated repository, ...). Anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from collections.abc import Sequence
from typing import NoReturn

from mistral7b.cli.common import EXIT_INTERRUPTED, EXIT_USAGE
from mistral7b.errors import Mistral7BError

COMMANDS = ("run", "generate", "chat", "serve", "ps", "pull", "list", "show", "rm", "create",
            "quantize", "export", "bench", "eval", "finetune", "moderate")
SHARED = {"list": "models", "show": "models", "rm": "models", "create": "models"}

# A file the user named is missing or unreadable: as much a user's mistake as a bad flag.
USER_ERRORS = (Mistral7BError, FileNotFoundError, IsADirectoryError, NotADirectoryError,
               PermissionError)


class ArgumentParser(argparse.ArgumentParser):
    """argparse with one-line errors: `error: <what> (see 'mistral7b generate --help')`."""

    def error(self, message: str) -> NoReturn:
        print(f"error: {message} (see '{self.prog} --help')", file=sys.stderr)
        sys.exit(EXIT_USAGE)


def build_parser(only: str | None = None) -> ArgumentParser:
    """The parser of every command, or of `only` that one (the others' modules are then not
    imported: some import torch to read their defaults, and `generate` answered by a server
    never needs torch)."""
    from mistral7b import __version__

    parser = ArgumentParser(
        prog="mistral7b",
        description="Run Mistral 7B (and Llama-architecture models) locally: completions "
                    "stream to stdout; logs, progress and timings go to stderr.")
    parser.add_argument("--version", action="version", version=f"mistral7b {__version__}")
    subparsers = parser.add_subparsers(title="commands", dest="command", metavar="COMMAND")
    for name in COMMANDS if only not in COMMANDS else (only,):
        module = importlib.import_module(f"mistral7b.cli.{SHARED.get(name, name)}")
        getattr(module, f"add_{name}_parser" if name in SHARED else "add_parser")(subparsers)
    return parser


def one_line(exc: BaseException) -> str:
    if isinstance(exc, OSError) and exc.filename is not None and exc.strerror:
        return f"{exc.filename}: {exc.strerror.lower()}"
    text = " ".join(part.strip() for part in str(exc).splitlines() if part.strip())
    return text or type(exc).__name__


def main(argv: Sequence[str] | None = None) -> int:
    words = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser(only=words[0] if words else None)
    args = parser.parse_args(words)
    if args.command is None:
        parser.print_help(sys.stderr)
        return EXIT_USAGE
    if hasattr(sys.stdout, "reconfigure"):
        # A model may write any character; never die on a terminal that cannot show one.
        sys.stdout.reconfigure(errors="replace")
    if (getattr(args, "tp", None) or 1) > 1 and not getattr(args, "spawns_ranks", False):
        from mistral7b.distributed.runtime import launch_local, under_torchrun

        if not under_torchrun():    # start the ranks; each runs this command without --tp
            return launch_local(args.tp, without_tp(sys.argv[1:] if argv is None else argv))
    try:
        return args.run(args)
    except BrokenPipeError:
        # The reader went away (`mistral7b generate ... | head`): stop quietly. Point stdout at
        # devnull so the interpreter's final flush does not raise again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    except USER_ERRORS as exc:
        sys.stdout.flush()
        print(f"error: {one_line(exc)}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return EXIT_INTERRUPTED


def without_tp(argv: Sequence[str]) -> list[str]:
    """ARGV less `--tp N` / `--tp=N` (the ranks then take tp from torchrun's world size)."""
    out, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg == "--tp":
            skip = True
        elif not arg.startswith("--tp="):
            out.append(arg)
    return out


if __name__ == "__main__":
    sys.exit(main())
