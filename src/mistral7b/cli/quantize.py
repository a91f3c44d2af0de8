"""`mistral7b quantize SRC DST --to int8|int4`: write a quantized checkpoint that `load()`
recognizes without flags.

SRC is anything mistral7b loads (a consolidated or HF folder, a .gguf file); DST is a new
folder: params.json + consolidated.safetensors holding int8/int4 weights with their scales
(quant/checkpoint.py describes the layout) + the source's tokenizer files. Tensors are read,
quantized and written one at a time, so memory stays near one float tensor. GGUF Q4_0/Q4_1/
Q4_K tensors are copied into int4 without a float round trip.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from mistral7b.errors import InputError


def add_parser(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "quantize", help="write an int8/int4 copy of a checkpoint",
        description="Quantize a checkpoint (consolidated or HF folder, or .gguf) into a new "
                    "folder that mistral7b loads as quantized without flags.")
    add_arguments(p)
    p.set_defaults(run=run)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("src", metavar="SRC", help="checkpoint folder or .gguf file ('default' for "
                                               "the embedded model)")
    p.add_argument("dst", metavar="DST", help="output folder (created; must be empty)")
    p.add_argument("--to", required=True, choices=("int8", "int4"), dest="quant",
                   help="int8: per output channel; int4: groups of --group inputs")
    p.add_argument("--group", type=int, default=32, choices=(32, 64, 128, 256),
                   help="int4 group size for float sources (GGUF 4-bit types keep their "
                        "32; default: %(default)s)")
    p.add_argument("--name", metavar="NAME",
                   help="register the output under NAME in the model store, so that `-m "
                        "NAME` loads it (as `mistral7b create NAME -f DST` does)")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    from mistral7b import progress, store
    from mistral7b.quant import write_quantized
    from mistral7b.weights import open_checkpoint
    from mistral7b.weights.names import expected_shapes

    src = store.resolve(args.src).path
    dst = Path(args.dst).expanduser()
    if dst.exists() and (not dst.is_dir() or any(dst.iterdir())):
        raise InputError(f"{dst}: exists and is not an empty folder; choose a new one")
    if args.name is not None:
        store.check_name(args.name)        # before the work, not after it
    reader = open_checkpoint(src)
    t0 = time.perf_counter()
    with progress.enabled(not args.quiet), \
            progress.bar(total=len(expected_shapes(reader.config)),
                         desc=f"quantizing to {args.quant}", unit="tensor") as bar:
        out = write_quantized(reader, dst, args.quant, group=args.group,
                              progress=lambda name: bar.update())
    if args.name is not None:
        store.register(args.name, out)
        print(f"registered as {args.name}", file=sys.stderr)
    size = sum(f.stat().st_size for f in out.iterdir() if f.is_file())
    print(f"{out}: {args.quant}, {size / 1e9:.2f} GB in {time.perf_counter() - t0:.1f}s",
          file=sys.stderr)
    print(out)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m mistral7b.cli.quantize ...`: this command alone, with the CLI's error handling."""
    from mistral7b.cli.main import main as cli_main

    return cli_main(["quantize", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())
