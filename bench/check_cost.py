"""What the untrusted-file checks cost at load: the GGUF header walk and the tensor data checks
(finite values, block scales), beside the same loads with the data checks switched off.

    python bench/check_cost.py                  # the default model + an F16 GGUF it writes
    python bench/check_cost.py PATH [PATH ...]

Without paths it measures `mistral7b.load("default")` (SmolLM2-135M, Q4_1 blocks: scales
checked, then dequantized) and an F16 GGUF written by bench/write_gguf.py from a random
~0.2B-parameter consolidated checkpoint made here (F16 values checked in one pass). Each load
runs `--runs` times with and without the checks, alternating, in this process (files warm in
the page cache after the first); the figures are the fastest of each.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

import torch

import mistral7b
from mistral7b.weights import consolidated, gguf_file, safetensors_files, validate
from mistral7b.weights.gguf_parse import open_gguf

_SPENT = {"seconds": 0.0}


def _timed(fn):
    def wrapper(*args, **kwargs):
        t = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            _SPENT["seconds"] += time.perf_counter() - t
    return wrapper


@contextmanager
def checks(on: bool):
    """The tensor data checks as they are (timed), or replaced by no-ops."""
    modules = (gguf_file, safetensors_files, consolidated)
    names = ("check_values", "check_quantized")
    saved = {(m, n): getattr(m, n) for m in modules for n in names if hasattr(m, n)}
    for (m, n), fn in saved.items():
        setattr(m, n, _timed(fn) if on else (lambda *a, **k: None))
    try:
        yield
    finally:
        for (m, n), fn in saved.items():
            setattr(m, n, fn)


def write_f16_gguf(folder: Path) -> Path:
    """A random consolidated checkpoint (dim 1024, 12 layers, vocab 32000: 0.23B params),
    turned into an F16 GGUF by bench/write_gguf.py."""
    from safetensors.torch import save_file

    from mistral7b.config import ModelConfig
    from mistral7b.weights.names import expected_shapes

    cfg = ModelConfig(dim=1024, n_layers=12, head_dim=64, hidden_dim=4096, n_heads=16,
                      n_kv_heads=4, norm_eps=1e-5, vocab_size=32000, rope_theta=1e6,
                      sliding_window=None, max_seq_len=4096)
    src = folder / "src"
    src.mkdir(parents=True)
    (src / "params.json").write_text(json.dumps(cfg.to_params_json()))
    g = torch.Generator().manual_seed(0)
    state = {name: (torch.randn(shape, generator=g) * 0.02).to(torch.bfloat16)
             for name, shape in expected_shapes(cfg).items()}
    save_file(state, str(src / "consolidated.safetensors"))
    script = Path(__file__).with_name("write_gguf.py")
    subprocess.run([sys.executable, str(script), str(src), str(folder), "--name", "random",
                    "--types"], check=True, stdout=subprocess.DEVNULL)
    return folder / "random.F16.gguf"


def measure(path: str, runs: int) -> None:
    import gguf

    from mistral7b.default_model import default_model_path

    file = default_model_path() if path == "default" else Path(path)
    best = {True: float("inf"), False: float("inf")}
    in_checks = float("inf")
    for _ in range(runs):
        for on in (True, False):
            _SPENT["seconds"] = 0.0
            with checks(on):
                t = time.perf_counter()
                llm = mistral7b.load(path, device="cpu")
                seconds = time.perf_counter() - t
            del llm
            best[on] = min(best[on], seconds)
            if on:
                in_checks = min(in_checks, _SPENT["seconds"])
    line = (f"{path}: load {best[True]:.3f} s with the data checks, {best[False]:.3f} s "
            f"without; {in_checks:.3f} s inside them ({100 * in_checks / best[True]:.1f}% "
            "of the load)")
    if file.suffix == ".gguf":
        walk = reader = float("inf")
        for _ in range(runs):
            t = time.perf_counter()
            open_gguf(file)
            walk = min(walk, time.perf_counter() - t)
            t = time.perf_counter()
            gguf.GGUFReader(str(file))
            reader = min(reader, time.perf_counter() - t)
        line += (f"; header walk {walk:.3f} s beside gguf.GGUFReader's own parse "
                 f"{reader:.3f} s")
    print(line, flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("paths", nargs="*")
    ap.add_argument("--runs", type=int, default=3)
    args = ap.parse_args()
    torch.set_num_threads(1)
    print(f"MAX_ABS_VALUE {validate.MAX_ABS_VALUE:g}; torch threads 1", flush=True)
    with tempfile.TemporaryDirectory(prefix="check-cost-") as tmp:
        paths = args.paths or ["default", str(write_f16_gguf(Path(tmp)))]
        for path in paths:
            measure(path, args.runs)


if __name__ == "__main__":
    main()
