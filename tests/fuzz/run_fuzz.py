"""The long fuzz run of model files and inputs: counts per outcome class, the slowest clean
rejection, and every defect (with its mutant saved to reproduce it).

    OMP_NUM_THREADS=1 python tests/fuzz/run_fuzz.py --gguf 20000 --each 5000 --out /tmp/fuzz

`--each` is the count for every other target (tokenizer, safetensors, config.json,
params.json, chat, jsonl). The run is deterministic for a given --seed. Exit status 1 when
any defect was found. The short run of the normal suite is tests/fuzz/test_fuzz_short.py.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gguf", type=int, default=20000, help="GGUF mutants")
    parser.add_argument("--each", type=int, default=5000, help="mutants of each other target")
    parser.add_argument("--targets", default="gguf,tokenizer,safetensors,config.json,"
                                             "params.json,chat,jsonl")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--timeout", type=float, default=10.0, help="seconds per mutant")
    parser.add_argument("--memory-mb", type=int, default=1024,
                        help="address space a mutant may add (RLIMIT_AS)")
    parser.add_argument("--jobs", type=int, default=1, help="mutants run at a time")
    parser.add_argument("--out", type=Path, help="folder for the saved defect mutants")
    args = parser.parse_args(argv)

    import torch

    torch.set_num_threads(1)
    import fuzz_harness

    with tempfile.TemporaryDirectory(prefix="mistral7b-fuzz-") as tmp:
        targets = fuzz_harness.Targets(Path(tmp), seed=args.seed)
        counts = {t: (args.gguf if t == "gguf" else args.each)
                  for t in args.targets.split(",")}
        t0 = time.perf_counter()
        done = 0

        def progress(result: fuzz_harness.Result) -> None:
            nonlocal done
            done += 1
            if result.outcome == fuzz_harness.DEFECT:
                print(f"DEFECT {result.target}#{result.index}: {result.detail}", flush=True)
            if done % 1000 == 0:
                print(f"... {done} mutants, {time.perf_counter() - t0:.0f} s", flush=True)

        summary = fuzz_harness.run(targets, counts, timeout_s=args.timeout,
                                   memory_mb=args.memory_mb, jobs=args.jobs,
                                   save_defects=args.out,
                                   progress=progress)
        elapsed = time.perf_counter() - t0
    print(summary.table())
    for target, r in summary.slowest_rejection.items():
        print(f"slowest rejection, {target}: {r.seconds:.3f} s: {r.detail[:160]}")
    total = sum(sum(c.values()) for c in summary.counts.values())
    print(f"{total} mutants in {elapsed:.0f} s ({args.jobs} at a time); "
          f"{len(summary.defects)} defects (timeout {args.timeout} s, +{args.memory_mb} MB "
          "address space per mutant)")
    return 1 if summary.defects else 0


if __name__ == "__main__":
    sys.path[:0] = [str(Path(__file__).parent), str(Path(__file__).parent.parent)]
    sys.exit(main())
