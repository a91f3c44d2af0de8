"""`mistral7b export -m MODEL [--lora ADAPTER ...] --to hf|consolidated|gguf [--type T] -o OUT`:
the model with its adapters merged, written for transformers, mistral-inference or llama.cpp
(mistral7b.exporter)."""

from __future__ import annotations

import argparse
import sys
import time
from typing import Any

from mistral7b.cli.common import add_lora_arg


def add_parser(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "export", help="write a model (LoRA merged) as HF, consolidated or GGUF",
        description="Write a model with its LoRA adapters merged: --to hf (a folder "
                    "transformers loads), consolidated (a folder mistral-inference loads) or "
                    "gguf (a file llama.cpp loads). Tensors are streamed one at a time.")
    p.add_argument("-m", "--model", default="default", metavar="PATH",
                   help="a checkpoint folder (consolidated or HF), a .gguf file, or 'default' "
                        "(default: %(default)s)")
    add_lora_arg(p)
    p.add_argument("--to", required=True, choices=("hf", "consolidated", "gguf"),
                   help="output format")
    p.add_argument("--type", choices=("f32", "f16", "bf16", "q8_0", "q4_0"),
                   help="weight type: f32/f16/bf16, or the GGUF block types q8_0/q4_0 "
                        "(default: the source's float type; f16 for a quantized GGUF)")
    p.add_argument("-o", "--output", required=True, metavar="OUT",
                   help="output folder (hf, consolidated) or file (gguf)")
    p.add_argument("--force", action="store_true", help="replace OUT if it exists")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from mistral7b.exporter import export
    from mistral7b.lora.multi import parse_lora_spec

    t0 = time.perf_counter()
    out = export(args.model, to=args.to, out=args.output, type=args.type,
                 lora=[parse_lora_spec(text) for text in args.lora_specs or []], force=args.force,
                 progress=not args.quiet)
    size = sum(f.stat().st_size for f in out.iterdir()) if out.is_dir() else out.stat().st_size
    print(f"{out}: {args.to}, {size / 1e9:.2f} GB in {time.perf_counter() - t0:.1f}s",
          file=sys.stderr)
    print(out)
    return 0
