"""Serving memory on a Mistral-7B-v0.3-shaped model (no window, 32k context) with random int4
weights: resident memory when the server's scheduler starts with the default KV budget, then
8 concurrent requests of --prompt tokens served within that budget.

    python bench/bench_kv_memory.py -t 2 [--prompt 2048 --max-tokens 8 --clients 8]

The scheduler is the one `mistral7b serve` runs (in-process here: the model is built in
memory, see random_int4.py). Before the paged cache, the same start-up committed
max_concurrency x 32768 tokens x 128 KiB = 32 GiB of bf16 KV. Figures only.
"""

from __future__ import annotations

import argparse
import json
import os
import queue
import re
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")   # before torch: see the README

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from random_int4 import random_int4_llm

from mistral7b.request import GenerationRequest
from mistral7b.sampling import SamplingParams
from mistral7b.scheduler import Scheduler


def rss_gib() -> float:
    with open("/proc/self/status") as f:
        return int(re.search(r"VmRSS:\s+(\d+)", f.read()).group(1)) / 2**20


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("-t", "--threads", type=int, default=2)
    p.add_argument("--prompt", type=int, default=2048)
    p.add_argument("--max-tokens", type=int, default=8)
    p.add_argument("--clients", type=int, default=8)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    llm = random_int4_llm("mistral-7b-v0.3")
    weights = sum(t.numel() * t.element_size() for t in
                  [*llm.model.parameters(), *llm.model.buffers()]) / 2**30
    before = rss_gib()
    sched = Scheduler(llm.engine, stop_ids=llm.tokenizer.stop_ids,
                      new_decoder=llm.tokenizer.decoder, max_model_len=32768)
    sched.start()
    started = rss_gib()
    pool = sched.pool
    out: queue.Queue = queue.Queue()
    g = torch.Generator().manual_seed(0)
    t0 = time.perf_counter()
    for i in range(args.clients):
        ids = torch.randint(1000, 30000, (args.prompt,), generator=g).tolist()
        params = SamplingParams(max_tokens=args.max_tokens, ignore_eos=True)
        sched.submit(GenerationRequest(ids, [params], lambda o, i=i: out.put((i, o)),
                                       args.max_tokens))
    finished, peak_used = 0, 0
    while finished < args.clients:
        i, o = out.get(timeout=3600)
        if o.error is not None:
            raise o.error
        finished += o.finish_reason is not None
        peak_used = max(peak_used, pool.used_bytes)
    wall = time.perf_counter() - t0
    result = {
        "weights_gib": round(weights, 2), "rss_after_build_gib": round(before, 2),
        "rss_scheduler_started_gib": round(started, 2),
        "kv_budget_gib": round(pool.nbytes / 2**30, 2),
        "kv_peak_used_gib": round(peak_used / 2**30, 2),
        "rss_after_requests_gib": round(rss_gib(), 2),
        "clients": args.clients, "prompt_tokens": args.prompt, "wall_s": round(wall, 1),
        "preemptions": sched.preemptions,
    }
    sched.close()
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
