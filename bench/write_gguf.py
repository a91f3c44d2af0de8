"""Write a checkpoint as GGUF for llama.cpp: F16 by streaming one tensor at a time with the
`gguf` package, then Q4_0 / Q8_0 / Q4_K_S / ... with llama.cpp's own quantizer
(`llama_cpp.llama_model_quantize`, from llama-cpp-python).

    python bench/write_gguf.py /work/bigckpt/consolidated /data/gguf --types Q4_0 Q8_0
    -> /data/gguf/mistral-7b-random.F16.gguf, ...Q4_0.gguf, ...Q8_0.gguf

The source is any checkpoint `mistral7b` reads (consolidated or HF folder): tensors come out
in our names and in the interleaved rotary layout, which is GGUF's. The tokenizer section is
built from the Mistral v1 SentencePiece file that mistral-common ships (pieces, scores, token
types and special ids, as llama.cpp's converter writes them), so llama.cpp and mistral7b both
tokenize the file's prompts the same way. Peak memory: one tensor (the mapped pages of each
source tensor are handed back once written).
"""

from __future__ import annotations

import argparse
import ctypes
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from mistral7b.quant.memory import release
from mistral7b.tokenizer.gguf import add_sentencepiece_metadata
from mistral7b.weights import open_checkpoint
from mistral7b.weights.names import expected_shapes, format_name

# llama.cpp's llama_ftype values (include/llama.h)
FTYPES = {"Q4_0": 2, "Q4_1": 3, "Q8_0": 7, "Q4_K_S": 14, "Q4_K_M": 15, "Q6_K": 18}
GGML_FILE_TYPE_F16 = 1


def spm_tokenizer_file() -> Path:
    import mistral_common

    path = Path(mistral_common.__file__).parent / "data" / "tokenizer.model.v1"
    if not path.is_file():
        raise SystemExit(f"{path} not found: mistral-common is needed for the v1 tokenizer")
    return path


def llama_writer(path: Path, c, name: str, file_type: int):
    """A `gguf.GGUFWriter` with the llama-architecture metadata of config `c` and the v1
    SentencePiece vocabulary, as llama.cpp's converter writes them."""
    import gguf

    w = gguf.GGUFWriter(str(path), "llama")
    w.add_name(name)
    w.add_file_type(file_type)
    w.add_block_count(c.n_layers)
    w.add_context_length(c.max_seq_len)
    w.add_embedding_length(c.dim)
    w.add_feed_forward_length(c.hidden_dim)
    w.add_head_count(c.n_heads)
    w.add_head_count_kv(c.n_kv_heads)
    w.add_key_length(c.head_dim)
    w.add_value_length(c.head_dim)
    w.add_rope_dimension_count(c.head_dim)
    w.add_rope_freq_base(c.rope_theta)
    w.add_layer_norm_rms_eps(c.norm_eps)
    w.add_vocab_size(c.vocab_size)
    if c.sliding_window:
        w.add_sliding_window(c.sliding_window)
    add_sentencepiece_metadata(w, spm_tokenizer_file())
    return w


def write_f16(src: Path, out: Path, name: str) -> Path:

    reader = open_checkpoint(src)
    c = reader.config
    path = out / f"{name}.F16.gguf"
    w = llama_writer(path, c, name, GGML_FILE_TYPE_F16)
    plan = []
    for ours, shape in expected_shapes(c).items():
        # llama.cpp keeps 1-D tensors (norms) in F32, matrices in F16.
        dtype = np.float32 if len(shape) == 1 else np.float16
        plan.append((ours, format_name(ours, "gguf"), shape, dtype))
        nbytes = int(np.prod(shape)) * np.dtype(dtype).itemsize
        w.add_tensor_info(format_name(ours, "gguf"), shape, np.dtype(dtype), nbytes)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    t0 = time.perf_counter()
    for i, (ours, _, shape, dtype) in enumerate(plan):
        t = reader.tensor(ours)
        arr = t.float().numpy().astype(dtype)
        w.write_tensor_data(arr)
        release(t)
        del arr
        if i % 20 == 0:
            print(f"  {i}/{len(plan)} tensors, {time.perf_counter() - t0:.0f}s", file=sys.stderr)
    w.close()
    return path


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
    ap.add_argument("src", type=Path, help="consolidated or HF checkpoint folder")
    ap.add_argument("out", type=Path, help="output folder")
    ap.add_argument("--name", default="mistral-7b-random")
    ap.add_argument("--types", nargs="*", default=["Q4_0", "Q8_0"], choices=sorted(FTYPES))
    ap.add_argument("--drop-f16", action="store_true", help="delete the F16 file at the end")
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    f16 = args.out / f"{args.name}.F16.gguf"
    if not f16.exists():
        t = time.perf_counter()
        write_f16(args.src, args.out, args.name)
        print(f"{f16}: {f16.stat().st_size / 1e9:.2f} GB in {time.perf_counter() - t:.0f}s")
    for qtype in args.types:
        t = time.perf_counter()
        path = quantize(f16, args.out, args.name, qtype)
        print(f"{path}: {path.stat().st_size / 1e9:.2f} GB in {time.perf_counter() - t:.0f}s")
    if args.drop_f16:
        f16.unlink()


if __name__ == "__main__":
    main()
