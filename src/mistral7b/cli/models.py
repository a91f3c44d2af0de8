"""The model store's commands (store.py): `list`, `show NAME`, `rm NAME...`, `create NAME -f PATH`.

    mistral7b list [--json]
    mistral7b show mistral-7b-instruct-v0.3 [--json]
    mistral7b create my-finetune -f out/quantized      # a name for a file or folder of yours
    mistral7b rm my-finetune mistral-7b-v0.1 [-y]

`rm` deletes a pulled repository from the Hugging Face cache (huggingface_hub's own delete
strategy) or forgets a name given with `create` (the files stay); it never deletes anything
outside the store, and asks first unless `-y`.
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
from typing import Any

from mistral7b import store
from mistral7b.cli import common
from mistral7b.errors import InputError


def add_list_parser(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "list", help="list the models in the local store",
        description="The models -m can name: the embedded default, names given with "
                    "`create`, and Hub repositories in the Hugging Face cache (HF_HOME).")
    p.add_argument("--json", action="store_true", help="one JSON array instead of a table")
    p.set_defaults(run=run_list)


def add_show_parser(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "show", help="show a model's config, tokenizer, chat format and adapters",
        description="What a model is, read from its headers (no weights are loaded).")
    p.add_argument("model", metavar="MODEL", help="a name from `mistral7b list`, an alias, a "
                                                  "Hub repository id or a path")
    p.add_argument("--json", action="store_true", help="one JSON object")
    p.set_defaults(run=run_show)


def add_rm_parser(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "rm", help="remove models from the local store",
        description="Delete pulled repositories from the Hugging Face cache, or forget names "
                    "given with `create` (their files stay). Nothing outside the store is "
                    "ever deleted.")
    p.add_argument("models", nargs="+", metavar="MODEL")
    p.add_argument("-y", "--yes", action="store_true", help="do not ask")
    p.set_defaults(run=run_rm)


def add_create_parser(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "create", help="give a model file or folder a name for -m",
        description="Register a model of yours (a .gguf file, a `quantize` output, a "
                    "consolidated or HF folder) under NAME, so `-m NAME` loads it. The files "
                    f"stay where they are; the name is kept in ${store.HOME_ENV}/"
                    f"{store.REGISTRY_FILE} (default ~/.cache/mistral7b).")
    p.add_argument("name", metavar="NAME")
    p.add_argument("-f", "--file", required=True, metavar="PATH",
                   help="the model file or folder")
    p.set_defaults(run=run_create)


def run_list(args: argparse.Namespace) -> int:
    from mistral7b.model_info import summary

    rows: list[dict[str, Any]] = []
    for entry in store.entries():
        info = summary(entry.path) if entry.path.exists() else None
        rows.append({
            "name": entry.name,
            "format": info.format if info else "missing",
            "quantization": info.quantization if info else "?",
            "size_bytes": entry.size_bytes,
            "parameters": info.n_params if info else None,
            "path": str(entry.path),
            "modified": _iso(entry.modified),
            "source": entry.source,
            "repo_id": entry.repo_id,
            "revision": entry.revision,
            **({"error": info.error} if info and info.error else {}),
        })
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    header = ("NAME", "FORMAT", "QUANT", "SIZE", "PARAMS", "MODIFIED", "PATH")
    table = [header] + [(r["name"], r["format"], r["quantization"], _size(r["size_bytes"]),
                         _params(r["parameters"]), r["modified"][:16].replace("T", " "),
                         r["path"]) for r in rows]
    widths = [max(len(row[i]) for row in table) for i in range(len(header) - 1)]
    for row in table:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths)) + "  " + row[-1])
    return 0


def run_show(args: argparse.Namespace) -> int:
    from mistral7b.model_info import details

    hit = store.resolve(args.model)
    info = details(hit.path)
    page = {
        "model": args.model, "path": str(hit.path), "source": hit.source,
        "repo_id": hit.repo_id, "revision": hit.revision,
        "format": info.summary.format, "quantization": info.summary.quantization,
        "parameters": info.summary.n_params, "config": info.config,
        "tokenizer": info.tokenizer, "chat_format": info.chat_format,
        "adapters": info.adapters,
    }
    if args.json:
        print(json.dumps(page, indent=2))
        return 0
    c = info.config
    where = f"{hit.repo_id}@{hit.revision}" if hit.repo_id else hit.source
    lines = [
        ("model", f"{args.model} ({where})"),
        ("path", str(hit.path)),
        ("format", f"{info.summary.format}, {info.summary.quantization}"),
        ("parameters", _params(info.summary.n_params)),
        ("layers", f"{c['n_layers']} x dim {c['dim']}, hidden {c['hidden_dim']}"),
        ("attention", f"{c['n_heads']} heads, {c['n_kv_heads']} kv heads, "
                      + f"head_dim {c['head_dim']}"),
        ("sliding window", str(c["sliding_window"]) if c["sliding_window"] else
                           "none (full causal)"),
        ("context", str(c["max_seq_len"])),
        ("rope theta", f"{c['rope_theta']:g}"),
        ("norm eps", f"{c['norm_eps']:g}"),
        ("vocabulary", str(c["vocab_size"])),
        ("tokenizer", info.tokenizer),
        ("chat format", info.chat_format),
        ("adapters", ", ".join(info.adapters) or "none beside it"),
    ]
    width = max(len(k) for k, _ in lines) + 2
    for key, value in lines:
        print(f"{key + ':':{width}}{value}")
    return 0


def run_rm(args: argparse.Namespace) -> int:
    plans = [store.plan_removal(name) for name in args.models]   # all checked before any goes
    if not args.yes:
        if sys.stdin is None or not sys.stdin.isatty():
            raise InputError("rm asks before removing and stdin is not a terminal: pass -y "
                             "to confirm")
        for plan in plans:
            print(f"{plan.name}: {plan.what}" + (f", {_size(plan.freed_bytes)}"
                                                 if plan.freed_bytes else ""), file=sys.stderr)
        try:
            answer = input(f"remove {len(plans)} model(s)? [y/N] ").strip().lower()
        except EOFError:
            answer = ""
        if answer not in ("y", "yes"):
            common.log("nothing removed")
            return 1
    for plan in plans:
        plan.run()
        common.log(f"removed {plan.name}: {plan.what}")
    return 0


def run_create(args: argparse.Namespace) -> int:
    path = store.register(args.name, args.file)
    common.log(f"{args.name} -> {path} (`mistral7b run {args.name}` or `-m {args.name}`)")
    return 0


def _iso(posix: float) -> str:
    if not posix:
        return ""
    return datetime.datetime.fromtimestamp(posix, datetime.timezone.utc).isoformat(
        timespec="seconds")


def _size(n: int) -> str:
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n} B"


def _params(n: int | None) -> str:
    if n is None:
        return "?"
    return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.1f}M"

