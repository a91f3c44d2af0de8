"""`mistral7b bench`: pre-fill tok/s, decode tok/s, time to first token and peak memory, and
with `--vs-llama-cpp` the same measurement of llama.cpp on the same GGUF, in the same run.

    mistral7b bench -m model.Q4_0.gguf --vs-llama-cpp      # the file's own blocks (--quant auto)
    mistral7b bench --quant none                            # float weights
    mistral7b bench --quant int8 --prompt-tokens 256 --gen-tokens 64 --repeat 3

Each engine runs in a process of its own (so its peak RSS is its own, `bench_worker.py`): it
loads the model once, then does `--warmup` untimed and `--repeat` timed runs: a pre-fill of
`--prompt-tokens` random token ids (the same ids for every engine, from `--seed`) in one step,
then `--gen-tokens` greedy tokens one step at a time (the first comes out of the pre-fill).
Both engines load first, one after the other; then their runs take turns (ours, llama.cpp;
llama.cpp, ours; ...), each just after a reading of the machine's read bandwidth with the same
threads (`torch.sum` over 1 GiB of float32, median of 7, in a third process): on a VM speed
and bandwidth drift from one minute to the next, and taking turns puts both engines in the
same minutes. Medians are reported, and beside them the ratio of each round's pair of runs.
Time to first token is the pre-fill time plus one argmax. Peak RSS is the process's
high-water mark (load included); page faults are the minor faults (memory touched for the
first time) during a pre-fill. With `--busy N`, N CPU-bound neighbours run during the runs.

llama.cpp is driven through llama-cpp-python's low-level `eval` (no sampling chain) with the
same thread count, so both sides do the same work: one batched forward, then single-token
forwards with a greedy pick. llama-cpp-python is a dev tool, not a dependency: build it as
the project README says.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from typing import Any

from mistral7b.cli import common
from mistral7b.cli.bench_worker import MACHINE
from mistral7b.errors import InputError, Mistral7BError

ENGINES = ("mistral7b", "llama.cpp")


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
                   help="timed runs per engine, the engines taking turns; medians are "
                        "reported (default: %(default)s)")
    g.add_argument("--warmup", type=int, default=1, metavar="N",
                   help="untimed runs per engine before the timed ones, as llama-bench does: "
                        "first runs pay for buffers and caches (default: %(default)s)")
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
        from mistral7b.cli import bench_worker

        bench_worker.serve(args)
        return 0
    if args.repeat < 1 or args.warmup < 0:
        raise InputError(f"--repeat must be >= 1 and --warmup >= 0 (got {args.repeat}, "
                         f"{args.warmup})")
    threads = args.threads or 2
    engines = ["mistral7b"] + (["llama.cpp"] if args.vs_llama_cpp else [])
    from mistral7b.store import resolve

    args.model = str(resolve(args.model).path)     # a file both engines read
    if args.vs_llama_cpp and not str(args.model).endswith(".gguf"):
        raise InputError("--vs-llama-cpp needs a .gguf model (-m FILE.gguf)")
    with contextlib.ExitStack() as stack:
        machine = stack.enter_context(_Worker(args, MACHINE, threads))
        workers = {}
        for engine in engines:      # one load at a time
            workers[engine] = stack.enter_context(_Worker(args, engine, threads))
        runs: dict[str, list[dict[str, Any]]] = {engine: [] for engine in engines}
        with _neighbours(args.busy):
            for _ in range(args.warmup):
                for engine in engines:
                    workers[engine].ask("run")
            for r in range(args.repeat):
                # the engines take turns, the first one changing every round, each after a
                # fresh reading of the read bandwidth: on a VM both drift minute by minute
                for engine in engines[::-1] if r % 2 else engines:
                    wall = machine.ask("run")["read_gbs"]
                    runs[engine].append({**workers[engine].ask("run"), "machine_read_gbs": wall})
        results = {MACHINE: {"read_gbs": runs[engines[0]][0]["machine_read_gbs"],
                             "omp_wait_policy": wait_policy()}}
        for engine in engines:
            results[engine] = _summary(workers[engine], runs[engine])
    if len(engines) > 1:
        results["ratios"] = {key: [a[key] / b[key] for a, b in zip(*runs.values()) if b[key]]
                             for key in ("prefill_tps", "decode_tps")}
    _print_table(args, results)
    if args.json:
        print(json.dumps(results, indent=2))
    return 0


def _summary(worker: _Worker, runs: list[dict[str, Any]]) -> dict[str, Any]:
    """An engine's medians over its runs, its process's figures, and the bandwidth its
    decode streamed (the weights read per token: every linear layer and norm, one row of
    the embedding table)."""
    end = worker.ask("end")
    med = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
    return {**end, "load_s": worker.load_s, **med,
            "bandwidth_gbs": end["weight_bytes"] * med["decode_tps"] / 1e9, "runs": runs}


class _Worker:
    """One bench_worker process: started (and loaded) on entry, asked for runs; on exit its
    stdin is closed, which asks it to finish, and it is killed if it has not within 30 s.
    Its stderr goes to a temporary file, shown when it fails."""

    def __init__(self, args: argparse.Namespace, engine: str, threads: int) -> None:
        cmd = [sys.executable, "-m", "mistral7b.cli.bench", "--worker", engine, "-m",
               str(args.model), "--prompt-tokens", str(args.prompt_tokens), "--gen-tokens",
               str(args.gen_tokens), "--seed", str(args.seed), "-t", str(threads)]
        for flag in ("quant", "dtype", "device"):
            if getattr(args, flag, None):
                cmd += [f"--{flag}", str(getattr(args, flag))]
        if engine != MACHINE:
            print(f"[bench] {engine}: {' '.join(cmd[2:])}", file=sys.stderr, flush=True)
        env = dict(os.environ, OMP_NUM_THREADS=str(threads))
        tp = getattr(args, "tp", None) or 1
        if tp > 1 and engine == "mistral7b":     # the cores shared between the ranks
            cmd[cmd.index("-t") + 1] = env["OMP_NUM_THREADS"] = str(max(1, threads // tp))
            cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
                   f"--nproc-per-node={tp}", "--module", *cmd[2:], "--tp", str(tp)]
        self.engine, self.cmd, self.env = engine, cmd, env

    def __enter__(self) -> _Worker:  # noqa: PYI034 (Python 3.10 has no typing.Self)
        self.log = tempfile.TemporaryFile()
        self.proc = subprocess.Popen(self.cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=self.log, text=True, env=self.env)
        try:
            self.load_s = self._reply("ready")["load_s"]
        except BaseException:
            self.__exit__()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        # its stdin's end asks it to finish (torchrun then stops its ranks); killed if not
        with contextlib.suppress(OSError):
            if self.proc.stdin is not None:
                self.proc.stdin.close()
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.log.close()

    def ask(self, command: str) -> dict[str, Any]:
        assert self.proc.stdin is not None
        try:
            self.proc.stdin.write(command + "\n")
            self.proc.stdin.flush()
        except BrokenPipeError:
            pass                    # it died: _reply reports it
        return self._reply(command)

    def _reply(self, key: str) -> dict[str, Any]:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:   # a library may print lines of its own
            if line.startswith("{"):
                message = json.loads(line)
                if key in message:
                    return message[key]
        code = self.proc.wait()
        self.log.seek(0)
        sys.stderr.write(self.log.read()[-4000:].decode(errors="replace"))
        raise Mistral7BError(f"the {self.engine} benchmark failed (exit {code}); its error "
                             "is above")


@contextlib.contextmanager
def _neighbours(n: int) -> Iterator[None]:
    """n CPU-bound processes that keep a core busy each (pure Python: one thread, no OpenMP)."""
    procs = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(n)]
    try:
        if procs:
            time.sleep(0.2)     # running before the engines start
        yield
    finally:
        for proc in procs:
            proc.kill()
            proc.wait()


def wait_policy() -> str:
    """The OpenMP wait policy both engines run under (the workers inherit this environment).
    It moves decode: with PASSIVE, idle threads sleep after every parallel region and each of
    a decode step's regions wakes them again (our 7B decode ran 15-30% slower that way on a
    2-core VM than with libgomp's default, a short spin)."""
    return os.environ.get("OMP_WAIT_POLICY") or "unset (the OpenMP runtime's default)"


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
          + f" decode step: {ours.get('decode_step', '?')}"
          + f" kernels: {ours.get('kernels', '?')}"
          + f" OMP_WAIT_POLICY: {results[MACHINE]['omp_wait_policy']}", file=sys.stderr)
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
        print("machine read bandwidth (torch.sum, 1 GiB float32, same threads, read just "
              f"before each run; medians), GB/s: decode streams {'; '.join(shares)}",
              file=sys.stderr)
    if results.get("ratios"):
        rounds = "; ".join(f"{key.split('_')[0]} " + ", ".join(f"{r:.2f}x" for r in values)
                           for key, values in results["ratios"].items())
        print(f"each round's ratio (the engines taking turns): {rounds}", file=sys.stderr)
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
