"""Make benchmark GGUFs of a checkpoint in llama.cpp's K-quant types too: an F16 GGUF by
`mistral7b export` (the package's writer, streaming, the source's own tokenizer), then
Q4_K_S / Q4_K_M / Q6_K / ... by llama.cpp's own quantizer (`llama_cpp.llama_model_quantize`,
from llama-cpp-python), which `mistral7b export` does not write (it writes F16/BF16/Q8_0/
Q4_0 itself).

    python bench/write_gguf.py /work/bigckpt/consolidated /data/gguf --types Q4_0 Q4_K_M
    -> /data/gguf/mistral-7b-random.F16.gguf, ...Q4_0.gguf, ...Q4_K_M.gguf
"""

from __future__ import annotations

import argparse
import ctypes
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

import mistral7b

# llama.cpp's llama_ftype values (include/llama.h)
FTYPES = {"Q4_0": 2, "Q4_1": 3, "Q8_0": 7, "Q4_K_S": 14, "Q4_K_M": 15, "Q6_K": 18}


def quantize(f16: Path, out: Path, name: str, qtype: str) -> Path:
    import llama_cpp

    path = out / f"{name}.{qtype}.gguf"
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = FTYPES[qtype]
    params.nthread = 2
    rc = llama_cpp.llama_model_quantize(str(f16).encode(), str(path).encode(),
                                        ctypes.byref(params))
    if rc != 0:
        raise SystemExit(f"llama_model_quantize {qtype} failed ({rc})")
    return path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("src", type=Path, help="checkpoint folder or .gguf file")
    ap.add_argument("out", type=Path, help="output folder")
    ap.add_argument("--name", default="mistral-7b-random")
    ap.add_argument("--types", nargs="*", default=["Q4_0", "Q8_0"], choices=sorted(FTYPES))
    ap.add_argument("--drop-f16", action="store_true", help="delete the F16 file at the end")
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    f16 = args.out / f"{args.name}.F16.gguf"
    if not f16.exists():
        t = time.perf_counter()
        mistral7b.export(args.src, to="gguf", type="f16", out=f16)
        print(f"{f16}: {f16.stat().st_size / 1e9:.2f} GB in {time.perf_counter() - t:.0f}s")
    for qtype in args.types:
        t = time.perf_counter()
        path = quantize(f16, args.out, args.name, qtype)
        print(f"{path}: {path.stat().st_size / 1e9:.2f} GB in {time.perf_counter() - t:.0f}s")
    if args.drop_f16:
        f16.unlink()


if __name__ == "__main__":
    main()
