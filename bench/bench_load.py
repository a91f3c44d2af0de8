"""Load time, peak RSS and first-token latency of a checkpoint (run each in a fresh process).

    python bench/bench_load.py PATH [--prompt-tokens 256] [--runs 3]

Peak RSS is the child's ru_maxrss: it includes memory-mapped weight pages that were touched,
so it is the figure that tells whether loading ever held a second copy of the weights.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys

CHILD = r"""
import json, resource, sys, time
import torch
t0 = time.perf_counter()
import mistral7b
llm = mistral7b.load(sys.argv[1], device="cpu")
load = time.perf_counter() - t0
rss_after_load = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9
ids = torch.randint(3, llm.config.vocab_size, (int(sys.argv[2]),),
                    generator=torch.Generator().manual_seed(0)).tolist()
t1 = time.perf_counter()
out = llm.generate(ids, max_tokens=1) if llm.tokenizer is not None else None
if out is None:
    from mistral7b.cache import BlockTable

    llm.engine.step([BlockTable()], [ids])
ttft = time.perf_counter() - t1
print(json.dumps({"load_s": load, "rss_after_load_gb": rss_after_load, "ttft_s": ttft,
                  "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9,
                  "dtype": str(llm.engine.dtype)}))
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("path")
    ap.add_argument("--prompt-tokens", type=int, default=256)
    ap.add_argument("--runs", type=int, default=3)
    args = ap.parse_args()
    results = []
    for i in range(args.runs):
        out = subprocess.run([sys.executable, "-c", CHILD, args.path, str(args.prompt_tokens)],
                             capture_output=True, text=True, check=True)
        results.append(json.loads(out.stdout.strip().splitlines()[-1]))
        print(f"run {i + 1}: {results[-1]}", file=sys.stderr)
    med = {k: statistics.median(r[k] for r in results)
           for k in ("load_s", "rss_after_load_gb", "peak_rss_gb", "ttft_s")}
    print(f"{args.path}: load {med['load_s']:.2f} s | peak RSS after load "
          f"{med['rss_after_load_gb']:.2f} GB | first token after {args.prompt_tokens}-token "
          f"prompt {med['ttft_s']:.2f} s | peak RSS {med['peak_rss_gb']:.2f} GB "
          f"({results[0]['dtype']}, median of {args.runs})")


if __name__ == "__main__":
    main()
