"""Time and peak memory of `mistral7b export` (run as a child process), with peers measured in
the same run: the sizes of the source, the output and the largest tensor, and a
llama-cpp-python load + short generation of a GGUF result.

    python bench/write_random_checkpoint.py /data/m7b --format consolidated
    flock -x /tmp/heavy.lock python bench/bench_export.py /data/m7b /data/m7b.Q4_0.gguf \\
        --to gguf --type q4_0

Peak RSS is the child's high-water mark (`wait4`'s ru_maxrss), plus its anonymous and
file-backed parts sampled from /proc every 0.1 s: streaming export holds about one tensor
(anonymous memory) while the source's pages are read through the memory map and handed back.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from mistral7b.weights import open_checkpoint


def _size(path: Path) -> int:
    if path.is_dir():
        return sum(f.stat().st_size for f in path.iterdir() if f.is_file())
    return path.stat().st_size


def _sample(pid: int, peaks: dict[str, int], stop: threading.Event) -> None:
    while not stop.is_set():
        try:
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                key = line.split(":")[0]
                if key in ("RssAnon", "RssFile"):
                    peaks[key] = max(peaks.get(key, 0), int(line.split()[1]) * 1024)
        except (OSError, ValueError):
            return
        stop.wait(0.1)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("src", type=Path)
    ap.add_argument("out", type=Path)
    ap.add_argument("--to", default="gguf", choices=("hf", "consolidated", "gguf"))
    ap.add_argument("--type", default="q4_0")
    ap.add_argument("--lora", action="append", default=[])
    ap.add_argument("--keep", action="store_true", help="keep the output (default: delete)")
    args = ap.parse_args()

    reader = open_checkpoint(args.src)
    c = reader.config
    largest = max(reader.shape(n)[0] * (reader.shape(n)[1] if len(reader.shape(n)) > 1 else 1)
                  for n in reader.names())
    reader.close()
    cmd = [sys.executable, "-m", "mistral7b.cli.main", "export", "-m", str(args.src),
           "--to", args.to, "--type", args.type, "-o", str(args.out), "-q", "--force"]
    for spec in args.lora:
        cmd += ["--lora", spec]
    t0 = time.perf_counter()
    child = subprocess.Popen(cmd)
    peaks: dict[str, int] = {}
    stop = threading.Event()
    sampler = threading.Thread(target=_sample, args=(child.pid, peaks, stop), daemon=True)
    sampler.start()
    _, status, usage = os.wait4(child.pid, 0)
    seconds = time.perf_counter() - t0
    stop.set()
    child.returncode = os.waitstatus_to_exitcode(status)
    if child.returncode:
        raise SystemExit(f"export failed ({child.returncode})")
    gb = 1e9
    print(f"model: {c.n_params / 1e9:.2f}B params, {c.n_layers} layers; source "
          f"{_size(args.src) / gb:.2f} GB")
    print(f"export --to {args.to} --type {args.type}: {seconds:.1f} s, "
          f"{c.n_params / seconds / 1e6:.0f} M params/s")
    print(f"peak RSS {usage.ru_maxrss * 1024 / gb:.2f} GB (anonymous {peaks.get('RssAnon', 0) / gb:.2f}"
          f" GB, file-backed {peaks.get('RssFile', 0) / gb:.2f} GB); peer: the largest tensor "
          f"in float32 {largest * 4 / gb:.2f} GB, the whole model in float32 "
          f"{c.n_params * 4 / gb:.1f} GB")
    print(f"output {args.out}: {_size(args.out) / gb:.2f} GB")
    if args.to == "gguf" and importlib.util.find_spec("llama_cpp") is not None:
        import llama_cpp

        t = time.perf_counter()
        llm = llama_cpp.Llama(model_path=str(args.out), n_ctx=64, n_threads=2, verbose=False)
        loaded = time.perf_counter() - t
        t = time.perf_counter()
        out = llm("The capital of France is", max_tokens=8, temperature=0.0)
        n = out["usage"]["completion_tokens"]
        print(f"peer: llama-cpp-python loads it in {loaded:.1f} s and generates {n} tokens "
              f"in {time.perf_counter() - t:.1f} s")
    elif args.to == "gguf":
        print("peer: llama-cpp-python is not installed; no llama.cpp load")
    if not args.keep:
        import shutil

        if args.out.is_dir():
            shutil.rmtree(args.out)
        else:
            args.out.unlink()


if __name__ == "__main__":
    main()
