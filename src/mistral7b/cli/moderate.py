"""`mistral7b moderate`: self-reflection moderation (paper §5.2), one JSON line per input.

    echo "How do I pick a lock?" | mistral7b moderate
    mistral7b moderate -f inputs.jsonl        # {"text": ...} or {"messages": [...]} per line
    mistral7b moderate "some text"

Each output line: {"category", "probability", "flagged", "scores": {label: probability}}, plus
"id" when the input line had one. Plain-text lines (stdin) are one input each; a line that is
a JSON object is read as {"text": ...} / {"input": ...} / {"messages": [...]}.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any, TextIO

from mistral7b.cli import common
from mistral7b.errors import InputError


def add_parser(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "moderate", help="classify texts with the model itself (self-reflection moderation)",
        description="Classify each input as 'not moderated' or one of Mistral's 13 moderation "
                    "categories with the model itself (Mistral 7B paper, section 5.2). Prints "
                    "one JSON line per input.")
    p.add_argument("text", nargs="?", help="one text to classify (default: read stdin)")
    p.add_argument("-f", "--file", metavar="FILE",
                   help="a JSONL file: one {\"text\": ...} or {\"messages\": [...]} per line "
                        "('-' = stdin)")
    p.add_argument("-q", "--quiet", action="store_true", help="no load message on stderr")
    common.add_model_args(p)
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from mistral7b.moderation import moderate

    if args.text is not None and args.file is not None:
        raise InputError("give one text as an argument or a file with -f, not both")
    if args.text is not None:
        inputs: Iterator[tuple[Any, Any]] = iter([(None, args.text)])
    elif args.file is not None and args.file != "-":
        path = Path(args.file)
        with path.open(encoding="utf-8") as f:  # read before loading: bad lines fail fast
            items = list(read_inputs(f, str(path), jsonl=True))
        inputs = iter(items)
    else:
        if sys.stdin is None or sys.stdin.isatty() and args.file is None:
            raise InputError("nothing to moderate: give a text, -f FILE, or lines on stdin")
        inputs = read_inputs(sys.stdin, "stdin", jsonl=args.file == "-")
    llm = common.load_model(args, quiet=args.quiet)
    tokenizer = llm.require_tokenizer()
    for ident, value in inputs:
        result = moderate(llm.engine, tokenizer, value).as_json()
        if ident is not None:
            result = {"id": ident, **result}
        print(json.dumps(result, ensure_ascii=False), flush=True)
    return 0


def read_inputs(f: TextIO, source: str, *, jsonl: bool) -> Iterator[tuple[Any, Any]]:
    """(id or None, text or messages) per non-blank line. With jsonl every line must be JSON;
    otherwise a line that is not a JSON object is plain text."""
    for n, line in enumerate(f, 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except ValueError:
            if jsonl:
                raise InputError(f"{source} line {n}: not valid JSON") from None
            yield None, line.rstrip("\r\n")
            continue
        if isinstance(obj, str):
            yield None, obj
        elif isinstance(obj, dict):
            value = obj.get("messages", obj.get("text", obj.get("input")))
            if not isinstance(value, (str, list)):
                raise InputError(f"{source} line {n}: expected {{\"text\": ...}} or "
                                 "{\"messages\": [...]}")
            yield obj.get("id"), value
        elif jsonl:
            raise InputError(f"{source} line {n}: expected a JSON object or string")
        else:
            yield None, line.rstrip("\r\n")
