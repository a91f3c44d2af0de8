"""`mistral7b ps`: the running `mistral7b serve` processes (as `ollama ps` lists its models).

    $ mistral7b ps
    URL                     PID    MODEL    WEIGHTS          CONTEXT  UPTIME
    http://127.0.0.1:8000   1234   default  int4 on cpu      8192     5 min

`generate`, `chat` and `run` answer through one of these when it runs the same model
(cli/remote.py). Entries of servers that died without removing theirs are dropped here.
"""

from __future__ import annotations

import argparse
import json
from typing import Any

from mistral7b import servers


def add_parser(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "ps", help="list the running `mistral7b serve` processes",
        description="List the servers started with `mistral7b serve` on this machine (under "
                    "this MISTRAL7B_HOME): address, process id, model, weights, context and "
                    "uptime. `generate`, `chat` and `run` answer through a server that runs "
                    "the same model.")
    p.add_argument("--json", action="store_true", help="one JSON object per server, a line each")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    found = servers.running()
    if args.json:
        for entry in found:
            print(json.dumps(servers.describe(entry)))
        return 0
    rows = [("URL", "PID", "MODEL", "WEIGHTS", "CONTEXT", "UPTIME")]
    for e in found:
        weights = e.quant if e.quant != "none" else e.dtype
        rows.append((e.url, str(e.pid), e.model, f"{weights} on {e.device}",
                     str(e.max_model_len), servers.uptime(e)))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        print("   ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip())
    return 0
