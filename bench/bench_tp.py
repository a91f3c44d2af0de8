"""Tensor parallel: peak RSS of each rank and pre-fill / decode tok/s, TP=1 beside TP=N.

    python bench/bench_tp.py /data/m7b.Q4_0.gguf --quant auto --tp 1 2
    python bench/bench_tp.py /data/m7b-consolidated --quant none --dtype bf16 --tp 1 2

Each TP size runs in fresh processes (TP=1: one; TP=N: N ranks under torchrun), loads the
model with `mistral7b.load(..., tp=N)`, feeds a random prompt of --prompt-tokens ids in one
pre-fill step and then --gen-tokens greedy decode steps through the engine (rank 0 drives;
the other ranks follow). Every rank writes its ru_maxrss when it exits; this script gathers
and prints them. On a CPU with fewer cores than ranks x threads, TP=N shows that it runs and
what each rank holds, not a speed-up: the ranks share the cores.
"""

from __future__ import annotations

import argparse
import atexit
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))


def rank_job(args: argparse.Namespace) -> None:
    """One rank: load, measure (rank 0), and record this process's peak RSS at exit."""
    import torch

    import mistral7b
    from mistral7b.cache import BlockTable

    rank = int(os.environ.get("RANK", "0"))
    out = Path(args.job)

    def record() -> None:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        (out / f"rank{rank}.json").write_text(json.dumps({"peak_rss": peak}))

    atexit.register(record)
    t0 = time.perf_counter()
    llm = mistral7b.load(args.model, quant=None if args.quant == "none" else args.quant,
                         dtype=args.dtype, tp=args.tp if args.tp > 1 else None,
                         kv_cache_memory=1 << 30)
    load_s = time.perf_counter() - t0                    # only rank 0 gets here
    ids = torch.randint(3, llm.config.vocab_size, (args.prompt_tokens,),
                        generator=torch.Generator().manual_seed(0)).tolist()
    engine, table = llm.engine, BlockTable()
    with torch.inference_mode():
        t0 = time.perf_counter()
        token = int(engine.step([table], [ids])[0].argmax())
        prefill_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        for _ in range(args.gen_tokens):
            token = int(engine.step([table], [[token]])[0].argmax())
        decode_s = time.perf_counter() - t0
    (out / "speed.json").write_text(json.dumps({
        "load_s": load_s, "prefill_tps": args.prompt_tokens / prefill_s,
        "decode_tps": args.gen_tokens / decode_s}))


def run(args: argparse.Namespace, tp: int) -> dict:
    job = Path(tempfile.mkdtemp(prefix=f"bench_tp{tp}_"))
    me = [str(Path(__file__).resolve()), args.model, "--job", str(job), "--tp", str(tp),
          "--quant", args.quant, "--dtype", args.dtype, "--prompt-tokens",
          str(args.prompt_tokens), "--gen-tokens", str(args.gen_tokens)]
    env = dict(os.environ, OMP_NUM_THREADS=str(max(1, args.threads // tp)))
    if tp == 1:
        cmd = [sys.executable, *me]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               f"--nproc-per-node={tp}", *me]
    code = subprocess.call(cmd, env=env)
    if code:
        raise SystemExit(f"TP={tp} failed with exit code {code}")
    result = json.loads((job / "speed.json").read_text())
    result["peak_rss"] = [json.loads((job / f"rank{r}.json").read_text())["peak_rss"]
                          for r in range(tp)]
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model")
    ap.add_argument("--tp", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--quant", default="auto", choices=["auto", "none", "int8", "int4"])
    ap.add_argument("--dtype", default="bf16")
    ap.add_argument("--prompt-tokens", type=int, default=64)
    ap.add_argument("--gen-tokens", type=int, default=16)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1,
                    help="CPU threads in all, shared between the ranks")
    ap.add_argument("--job", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.job:
        if len(args.tp) != 1:
            raise SystemExit("--job takes one --tp")
        args.tp = args.tp[0]
        rank_job(args)
        return
    size = Path(args.model).stat().st_size if Path(args.model).is_file() else sum(
        f.stat().st_size for f in Path(args.model).iterdir() if f.is_file())
    print(f"model {args.model} ({size / 2**30:.2f} GiB on disk), quant {args.quant}, "
          f"dtype {args.dtype}, {args.threads} threads in all, {os.cpu_count()} cores")
    for tp in args.tp:
        r = run(args, tp)
        rss = ", ".join(f"rank {i} {b / 2**30:.2f} GiB" for i, b in enumerate(r["peak_rss"]))
        print(f"TP={tp}: peak RSS {rss} | load {r['load_s']:.1f} s | pre-fill "
              f"{r['prefill_tps']:.1f} tok/s | decode {r['decode_tps']:.2f} tok/s", flush=True)


if __name__ == "__main__":
    main()
