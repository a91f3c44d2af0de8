"""`mistral7b bench`: pre-fill tok/s, decode tok/s, time to first token and peak memory, and
with `--vs-llama-cpp` the same measurement of llama.cpp on the same GGUF, in the same run.

    mistral7b bench -m model.Q4_0.gguf --vs-llama-cpp      # the file's own blocks (--quant auto)
    mistral7b bench --quant none                            # float weights
    mistral7b bench --quant int8 --prompt-tokens 256 --gen-tokens 64 --repeat 3

Each engine runs in a fresh subprocess (so its peak RSS is its own): it loads the model once,
then repeats `--repeat` times: a pre-fill of `--prompt-tokens` random token ids (the same ids
for every engine, from `--seed`) in one step, then `--gen-tokens` greedy tokens one step at a
time (the first comes out of the pre-fill). Medians are reported. Time to first token is the
pre-fill time plus one argmax. Peak RSS is the process's ru_maxrss (load included); page
faults are the minor faults (memory touched for the first time) during a pre-fill.
Just before each engine, another process measures the machine's read bandwidth with the same
threads (`torch.sum` over 1 GiB of float32, median of 7): the wall decode streams against.

llama.cpp is driven through llama-cpp-python's low-level `eval` (no sampling chain) with the
same thread count, so both sides do the same work: one batched forward, then single-token
forwards with a greedy pick. llama-cpp-python is a dev tool, not a dependency: build it as
the project README says.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence
from typing import Any

from mistral7b.cli import common
from mistral7b.errors import Mistral7BError

ENGINES = ("mistral7b", "llama.cpp")
MACHINE = "machine"     # the worker that measures read bandwidth (_read_bandwidth)


def add_parser(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "bench", help="measure pre-fill/decode speed and memory (optionally vs llama.cpp)",
        description="Measure pre-fill tok/s, decode tok/s, time to first token and peak RSS "
                    "on random prompt ids; --vs-llama-cpp runs llama.cpp on the same GGUF in "
                    "the same run and prints the ratios.")
    add_arguments(p)
    # --tp: the measuring process runs as tp ranks (_spawn), not this command itself
    p.set_defaults(run=run, spawns_ranks=True)


def add_arguments(p: argparse.ArgumentParser) -> None:
    common.add_model_args(p)
    common.add_tp_arg(p)
    g = p.add_argument_group("benchmark")
    g.add_argument("--prompt-tokens", type=int, default=256, metavar="N")
    g.add_argument("--gen-tokens", type=int, default=64, metavar="N")
    g.add_argument("--repeat", type=int, default=3, metavar="N",
                   help="timed runs per engine; medians are reported (default: %(default)s)")
    g.add_argument("--seed", type=int, default=0, help="seed of the random prompt ids")
    g.add_argument("--vs-llama-cpp", action="store_true",
                   help="also run llama.cpp (llama-cpp-python) on the same .gguf file")
    g.add_argument("--busy", type=int, nargs="?", const=1, default=0, metavar="N",
                   help="run N CPU-bound neighbour processes (one core each; N = 1 without a "
                        "number) beside each engine: speed on a machine that is doing "
                        "something else too")
    g.add_argument("--json", action="store_true", help="print the results as JSON on stdout")
    g.add_argument("--worker", choices=(*ENGINES, MACHINE), help=argparse.SUPPRESS)


def run(args: argparse.Namespace) -> int:
    if args.worker:
        result = _read_bandwidth(args.threads) if args.worker == MACHINE else _measure(args)
        print(json.dumps(result), flush=True)
        return 0
    threads = args.threads or 2
    engines = ["mistral7b"] + (["llama.cpp"] if args.vs_llama_cpp else [])
    from mistral7b.store import resolve

    args.model = str(resolve(args.model).path)     # a file both engines read
    if args.vs_llama_cpp and not str(args.model).endswith(".gguf"):
        from mistral7b.errors import InputError

        raise InputError("--vs-llama-cpp needs a .gguf model (-m FILE.gguf)")
    results: dict[str, dict[str, Any]] = {}
    for engine in engines:
        # the read bandwidth just before each engine: on a VM it drifts from minute to minute
        wall = _spawn(args, MACHINE, threads)
        results.setdefault(MACHINE, wall)
        neighbours = [_start_neighbour() for _ in range(args.busy)]
        try:
            results[engine] = {**_spawn(args, engine, threads), "machine_read_gbs": wall["read_gbs"]}
        finally:
            for neighbour in neighbours:
                neighbour.kill()
                neighbour.wait()
    _print_table(args, results)
    if args.json:
        print(json.dumps(results, indent=2))
    return 0


def _spawn(args: argparse.Namespace, engine: str, threads: int) -> dict[str, Any]:
    cmd = [sys.executable, "-m", "mistral7b.cli.bench", "--worker", engine, "-m",
           str(args.model), "--prompt-tokens", str(args.prompt_tokens), "--gen-tokens",
           str(args.gen_tokens), "--repeat", str(args.repeat), "--seed", str(args.seed),
           "-t", str(threads)]
    for flag in ("quant", "dtype", "device"):
        if getattr(args, flag, None):
            cmd += [f"--{flag}", str(getattr(args, flag))]
    print(f"[bench] {engine}: {' '.join(cmd[2:])}", file=sys.stderr, flush=True)
    env = dict(os.environ, OMP_NUM_THREADS=str(threads))
    tp = getattr(args, "tp", None) or 1
    if tp > 1 and engine == "mistral7b":     # the cores shared between the ranks
        cmd[cmd.index("-t") + 1] = env["OMP_NUM_THREADS"] = str(max(1, threads // tp))
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               f"--nproc-per-node={tp}", "--module", *cmd[2:], "--tp", str(tp)]
    out = subprocess.run(cmd, check=False, capture_output=True, text=True, env=env)
    if out.returncode != 0:
        sys.stderr.write(out.stderr[-4000:])
        raise Mistral7BError(
            f"the {engine} benchmark failed (exit {out.returncode}); its error is above")
    return json.loads(out.stdout.strip().splitlines()[-1])


def _read_bandwidth(threads: int | None) -> dict[str, Any]:
    """GB/s of `torch.sum` over 1 GiB of float32 (median of 7, after one warm-up)."""
    import torch

    if threads:
        torch.set_num_threads(threads)
    x = torch.ones(1 << 28)
    x.sum()
    runs = []
    for _ in range(7):
        t = time.perf_counter()
        x.sum()
        runs.append(time.perf_counter() - t)
    return {"read_gbs": x.numel() * 4 / statistics.median(runs) / 1e9}


def _start_neighbour() -> subprocess.Popen:
    """A CPU-bound process that keeps one core busy (pure Python: one thread, no OpenMP)."""
    proc = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    time.sleep(0.2)  # running before the engine starts
    return proc


def prompt_ids(n: int, vocab: int, seed: int) -> list[int]:
    import random

    rng = random.Random(seed)
    return [rng.randrange(3, vocab) for _ in range(n)]  # 0-2: unk/bos/eos in both vocabs


def _measure(args: argparse.Namespace) -> dict[str, Any]:
    t0 = time.perf_counter()
    step_fns = _llama_cpp(args) if args.worker == "llama.cpp" else _ours(args)
    vocab, reset, prefill, decode, weight_bytes, about = step_fns
    load_s = time.perf_counter() - t0
    ids = prompt_ids(args.prompt_tokens, vocab, args.seed)
    runs = []
    tokens: list[int] = []
    for _ in range(args.repeat):
        reset()
        faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        t = time.perf_counter()
        tok = prefill(ids)
        ttft = time.perf_counter() - t
        faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults
        tokens = [tok]
        t = time.perf_counter()
        for _ in range(args.gen_tokens - 1):
            tok = decode(tok)
            tokens.append(tok)
        dec = time.perf_counter() - t
        runs.append({"prefill_tps": len(ids) / ttft, "ttft_s": ttft,
                     "decode_tps": (args.gen_tokens - 1) / dec if dec else 0.0,
                     "prefill_page_faults": faults})
    med = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
    # weights read per generated token (every linear layer and norm; one embedding row)
    med["bandwidth_gbs"] = weight_bytes * med["decode_tps"] / 1e9
    return {"engine": args.worker, "model": str(args.model), "quant": args.quant,
            "threads": args.threads, "load_s": load_s, **med, "runs": runs, **about(),
            "peak_rss_gb": _peak_rss() / 1e9,
            "tokens": tokens[:16]}


def _peak_rss() -> int:
    """VmHWM where there is /proc: Linux copies ru_maxrss from the parent at fork."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _ours(args: argparse.Namespace):
    import torch

    import mistral7b
    from mistral7b.cache import BlockTable
    from mistral7b.engine import Engine

    if args.threads:
        torch.set_num_threads(args.threads)
    llm = mistral7b.load(args.model, device=args.device, dtype=args.dtype,
                         quant=None if args.quant == "none" else args.quant,
                         **({"tp": tp} if (tp := common.tensor_parallel(args)) else {}))
    model, config = llm.model, llm.config
    engine = Engine(model, config)
    engine.pool_type = llm.engine.pool_type     # tensor parallel: the pool on every rank
    # decode steps pick their thread count up to -t by measurement, as generate/serve do
    engine.adaptive_threads = True
    governor = engine.governor()
    state: dict[str, Any] = {"table": BlockTable()}

    def reset() -> None:
        engine.pool.release(state["table"])

    def prefill(ids: list[int]) -> int:
        return int(engine.step([state["table"]], [ids])[0].argmax())

    def decode(tok: int) -> int:
        if governor is None:
            return int(engine.step([state["table"]], [[tok]])[0].argmax())
        with governor.timed():
            return int(engine.step([state["table"]], [[tok]])[0].argmax())

    def about() -> dict[str, Any]:
        # which decode step ran: the fused C++ step (fused_step.py) or the eager modules
        return {"decode_step": "fused" if engine.fused_step() is not None else "eager"}

    return config.vocab_size, reset, prefill, decode, _weight_bytes(model), about


def _weight_bytes(model: Any) -> int:
    """Bytes a decode step reads: every parameter and buffer but the embedding table (one
    row of it)."""
    tables = [*model.tok_embeddings.parameters(), *model.tok_embeddings.buffers()]
    seen = {t.data_ptr() for t in tables}
    total = sum(t[0].nbytes for t in tables)
    for t in [*model.parameters(), *model.buffers()]:
        if t.data_ptr() not in seen:
            seen.add(t.data_ptr())
            total += t.nbytes
    return total


def _llama_cpp(args: argparse.Namespace):
    import llama_cpp
    import numpy as np
    from llama_cpp import Llama

    llm = Llama(model_path=str(args.model), n_ctx=args.prompt_tokens + args.gen_tokens + 8,
                n_batch=max(512, args.prompt_tokens), n_threads=args.threads,
                n_threads_batch=args.threads, verbose=False)

    n_vocab = llm.n_vocab()

    def reset() -> None:
        llm.reset()  # the next eval drops the cached positions from n_tokens on

    def last() -> int:
        # Llama.eval no longer copies logits out (sampling moved into llama.cpp): read the
        # last token's row straight from the context.
        row = llama_cpp.llama_get_logits_ith(llm.ctx, -1)
        return int(np.ctypeslib.as_array(row, shape=(n_vocab,)).argmax())

    def prefill(ids: list[int]) -> int:
        llm.eval(ids)
        return last()

    def decode(tok: int) -> int:
        llm.eval([tok])
        return last()

    return n_vocab, reset, prefill, decode, _gguf_weight_bytes(str(args.model)), dict


def _gguf_weight_bytes(path: str) -> int:
    """The same figure for llama.cpp from the file: every tensor but the embedding table."""
    from pathlib import Path

    from mistral7b.weights.gguf_parse import open_gguf

    _, header = open_gguf(Path(path))
    total = 0
    for name, info in header.tensors.items():
        total += info.n_bytes // info.dims[-1] if name == "token_embd.weight" else info.n_bytes
    return total


def _print_table(args: argparse.Namespace, results: dict[str, dict[str, Any]]) -> None:
    ours = results["mistral7b"]
    peer = results.get("llama.cpp")
    rows = [("prefill tok/s", "prefill_tps", "{:.1f}"), ("decode tok/s", "decode_tps", "{:.2f}"),
            ("time to first token s", "ttft_s", "{:.3f}"), ("peak RSS GB", "peak_rss_gb",
                                                            "{:.2f}"),
            ("decode bandwidth GB/s", "bandwidth_gbs", "{:.1f}"), ("load s", "load_s", "{:.2f}"),
            ("pre-fill page faults", "prefill_page_faults", "{:.0f}")]
    head = f"{'':24s}{'mistral7b':>12s}" + (f"{'llama.cpp':>12s}{'ratio':>8s}" if peer else "")
    print(f"{args.model} quant={args.quant} threads={args.threads or 2} prompt="
          f"{args.prompt_tokens} gen={args.gen_tokens} repeat={args.repeat} (medians)"
          + (f" busy: {args.busy} CPU-bound neighbour(s)" if args.busy else "")
          + f" decode step: {ours.get('decode_step', '?')}", file=sys.stderr)
    print(head, file=sys.stderr)
    for label, key, fmt in rows:
        line = f"{label:24s}{fmt.format(ours[key]):>12s}"
        if peer:
            line += f"{fmt.format(peer[key]):>12s}"
            if key != "prefill_page_faults":     # counts: a ratio of them says nothing
                ratio = ours[key] / peer[key] if peer[key] else float("nan")
                line += f"{ratio:>7.2f}x"
        print(line, file=sys.stderr)
    shares = [f"{name} {r['bandwidth_gbs'] / r['machine_read_gbs']:.0%} of "
              f"{r['machine_read_gbs']:.1f}" for name, r in (("mistral7b", ours),
                                                            ("llama.cpp", peer))
              if r and r.get("machine_read_gbs")]
    if shares:
        print("machine read bandwidth (torch.sum, 1 GiB float32, same threads, just before "
              f"each engine), GB/s: decode streams {'; '.join(shares)}", file=sys.stderr)
    if peer:
        same = ours["tokens"] == peer["tokens"]
        print(f"greedy tokens agree: {same} (first 16: ours {ours['tokens'][:8]}..., "
              f"llama.cpp {peer['tokens'][:8]}...)", file=sys.stderr)


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m mistral7b.cli.bench ...`: this command alone, with the CLI's error handling."""
    from mistral7b.cli.main import main as cli_main

    return cli_main(["bench", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())
