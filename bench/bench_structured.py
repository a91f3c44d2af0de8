"""Structured output overhead: decode tok/s with and without a JSON schema, and mask time.

    flock -x /tmp/heavy.lock python bench/bench_structured.py -t 2     # the default model

Each round generates --tokens tokens for --batch rows, once free and once under a JSON
schema whose story must be long (minLength), so both runs decode the same number of steps
(ignore_eos keeps the free run going). Free and constrained runs alternate, the
median of --rounds is printed, with the mask time per masked token (the scheduler's
`stats.mask_seconds / stats.masked_tokens`) and the one-off cost of compiling the schema
and starting a matcher. Figures only, no assertions.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")   # before torch: see the README

import torch

import mistral7b

SCHEMA = {"type": "object", "required": ["title", "story"], "additionalProperties": False,
          "properties": {"title": {"type": "string", "maxLength": 40},
                         "story": {"type": "string", "minLength": 2000}}}
FORMAT = {"type": "json_schema", "json_schema": {"name": "story", "schema": SCHEMA}}
PROMPT = "Write a long story about a lighthouse keeper, as JSON with a title and the story:"


def one(llm: mistral7b.LLM, batch: int, tokens: int, fmt: dict | None) -> dict:
    extra = {"response_format": fmt} if fmt else {"ignore_eos": True}
    outs = llm.generate([PROMPT] * batch, max_tokens=tokens, temperature=0.0, **extra)
    s = llm.stats
    return {"tps": s.generated_tokens / s.decode_seconds if s.decode_seconds else 0.0,
            "generated": s.generated_tokens,
            "mask_ms": 1e3 * s.mask_seconds / s.masked_tokens if s.masked_tokens else 0.0,
            "mask_share": s.mask_seconds / s.decode_seconds if s.decode_seconds else 0.0,
            "finish": sorted({o.finish_reason for o in outs})}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("-m", "--model", default="default")
    p.add_argument("-t", "--threads", type=int, default=2)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--tokens", type=int, default=64)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--json", action="store_true")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    llm = mistral7b.load(args.model)
    t0 = time.perf_counter()
    compiler = llm.grammar_compiler
    adapt_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    compiler.response_format(FORMAT).constraint()
    compile_ms = 1e3 * (time.perf_counter() - t0)
    one(llm, args.batch, 4, None)                                   # warm-up
    one(llm, args.batch, 4, FORMAT)
    free, guided = [], []
    for _ in range(args.rounds):
        free.append(one(llm, args.batch, args.tokens, None))
        guided.append(one(llm, args.batch, args.tokens, FORMAT))
    f = statistics.median(r["tps"] for r in free)
    g = statistics.median(r["tps"] for r in guided)
    mask = statistics.median(r["mask_ms"] for r in guided)
    share = statistics.median(r["mask_share"] for r in guided)
    result = {"model": args.model, "threads": args.threads, "batch": args.batch,
              "tokens": args.tokens, "free_tps": round(f, 1), "schema_tps": round(g, 1),
              "ratio": round(g / f, 3), "mask_ms_per_token": round(mask, 3),
              "mask_share_of_decode": round(share, 3),
              "vocab_adapt_s": round(adapt_s, 2), "compile_and_start_ms": round(compile_ms, 1),
              "generated_free": [r["generated"] for r in free],
              "generated_schema": [r["generated"] for r in guided],
              "finish_schema": sorted({x for r in guided for x in r["finish"]})}
    if args.json:
        print(json.dumps(result))
        return
    print(f"{args.model} threads={args.threads} batch={args.batch} tokens={args.tokens} "
          f"rounds={args.rounds}")
    print(f"decode tok/s free {f:.1f} | JSON schema {g:.1f} | ratio {g / f:.3f}")
    print(f"mask {mask:.3f} ms per token ({100 * share:.1f}% of decode time); vocabulary "
          f"adapted once in {adapt_s:.2f} s; schema compiled + matcher started in "
          f"{compile_ms:.1f} ms")
    print(f"tokens generated free {result['generated_free']}, schema "
          f"{result['generated_schema']} (finish {result['finish_schema']})")


if __name__ == "__main__":
    main()
