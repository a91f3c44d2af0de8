"""Decode speed and KV-cache memory at long context: rolling window (W = 4096) vs no window.

    python bench/long_context.py -m /work/gguf/mistral-7b-random.Q4_0.gguf --quant int4 -t 2

For each context length P (default 4096, 8192, 16384) and each attention rule (the model's
config with sliding_window = W, and the same weights with no window), a cache is built as it
would be after a P-token pre-fill: the slots hold positions P - n_slots .. P - 1 (the rolling
buffer's invariant) with random k/v, since the cost of a decode step does not depend on the
values, only on how many keys there are. Pre-filling 16k tokens of a 7B model on 2 cores would
take many minutes per point and measure pre-fill, not what this is about. Then `--steps`
decode steps are timed through Engine.step; the median is reported with the cache's bytes.
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import time

import torch

import mistral7b
from mistral7b.cache import BlockTable
from mistral7b.engine import Engine


def filled_table(engine: Engine, length: int) -> BlockTable:
    """A table as after a `length`-token pre-fill (random k/v; the window trimmed)."""
    table = BlockTable()
    engine.pool.plan([table], [length])
    engine.pool.k.normal_()
    engine.pool.v.normal_()
    engine.pool.trim(table)
    return table


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("-m", "--model", required=True)
    p.add_argument("--quant", choices=["int8", "int4"])
    p.add_argument("-t", "--threads", type=int)
    p.add_argument("--window", type=int, default=4096)
    p.add_argument("--lengths", default="4096,8192,16384")
    p.add_argument("--steps", type=int, default=16)
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    llm = mistral7b.load(args.model, quant=args.quant)
    model = llm.model
    dtype = llm.engine.dtype
    print(f"{args.model} quant={args.quant} dtype={dtype} threads={torch.get_num_threads()}")
    print(f"{'attention':>12} {'context':>8} {'decode tok/s':>13} {'step ms':>9} {'cache GB':>9}")
    for window in (args.window, None):
        config = dataclasses.replace(llm.config, sliding_window=window)
        lengths = [int(x) for x in args.lengths.split(",")]
        slot_bytes = 2 * config.n_layers * config.n_kv_heads * config.head_dim * dtype.itemsize
        engine = Engine(model, config, kv_cache_memory=(max(lengths) + args.steps + 64)
                        * slot_bytes)
        for length in lengths:
            table = filled_table(engine, length)
            times = []
            for i in range(args.steps + 2):
                t0 = time.perf_counter()
                engine.step([table], [[100 + i]])
                times.append(time.perf_counter() - t0)
            step = statistics.median(times[2:])
            held = sum(1 for b in table.blocks if b > 0)
            name = f"W={window}" if window else "no window"
            print(f"{name:>12} {length:>8} {1 / step:>13.2f} {step * 1e3:>9.1f} "
                  f"{held * engine.pool.block_bytes / 1e9:>9.2f}", flush=True)
            engine.pool.release(table)


if __name__ == "__main__":
    main()
