"""A Mistral-7B-shaped GGUF with random but valid blocks (Q4_0, Q4_1, Q8_0, or the mix of
Q4_K / Q5_K and Q6_K tensors of llama.cpp's Q4_K_M / Q5_K_M, with F32 norms and the preset's
Mistral SentencePiece vocabulary), written straight from random bytes in a minute: what load
and decode benchmarks need, where only the file's layout and size matter.

    python bench/random_gguf.py /tmp/m7b.Q4_0.gguf --type Q4_0
    python bench/random_gguf.py /tmp/m7b.Q4_K_M.gguf --type Q4_K_M
    mistral7b bench -m /tmp/m7b.Q4_0.gguf --vs-llama-cpp --repeat 1 --gen-tokens 8

Each block's f16 scales are drawn small and finite, so logits stay finite; the text the model
writes is noise.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from mistral7b.config import PRESETS
from mistral7b.exporter.gguf import llama_writer
from mistral7b.tokenizer.gguf_write import add_sentencepiece_metadata
from mistral7b.tokenizer.mistral import shipped_file
from mistral7b.weights.gguf_parse import TYPE_BY_NAME
from mistral7b.weights.names import expected_shapes, format_name

# llama_ftype of an all-Q4_0 / Q4_1 / Q8_0 file, and of the K-quant mixes
FILE_TYPE = {"Q4_0": 2, "Q4_1": 3, "Q8_0": 7, "Q4_K_M": 15, "Q5_K_M": 17}
# K-quant blocks: bytes, where the f16 factors sit, and the range they are drawn from (values
# up to ~0.2: Q4_K/Q5_K's d * 63 * 15 or 31, Q6_K's d * 127 * 32)
K_BLOCKS = {"Q4_K": (144, (0, 2), 2e-4), "Q5_K": (176, (0, 2), 1e-4), "Q6_K": (210, (208,), 4e-5)}


def tensor_type(file_type: str, name: str, n_layers: int) -> str:
    """The block type of one matrix: the file's type, or for Q4_K_M / Q5_K_M llama.cpp's
    recipe (llama_tensor_get_type): Q6_K for the output layer and for attn_v / ffn_down in
    the first and last eighth of the layers and every third one between, the rest Q4_K /
    Q5_K."""
    if not file_type.endswith("_K_M"):
        return file_type
    if name == "output.weight":
        return "Q6_K"
    if name.endswith(("attn_v.weight", "ffn_down.weight")):
        i = int(name.split(".")[1])
        if i < n_layers // 8 or i >= 7 * n_layers // 8 or (i - n_layers // 8) % 3 == 2:
            return "Q6_K"
    return file_type[:4]


def random_blocks(rows: int, cols: int, kind: str, rng: np.random.Generator) -> np.ndarray:
    if kind in K_BLOCKS:
        size, factors, top = K_BLOCKS[kind]
        blocks = rng.integers(0, 256, size=(rows, cols // 256, size), dtype=np.uint8)
        for at in factors:
            d = rng.uniform(top / 4, top, size=(rows, cols // 256)).astype(np.float16)
            blocks[:, :, at: at + 2] = d.view(np.uint8).reshape(rows, cols // 256, 2)
        return blocks.reshape(rows, -1)
    t = TYPE_BY_NAME[kind]
    blocks = rng.integers(0, 256, size=(rows, cols // t.block_size, t.type_size), dtype=np.uint8)
    scales = (2 if kind == "Q4_1" else 1)
    d = rng.uniform(5e-4, 2e-3, size=(rows, cols // t.block_size, scales)).astype(np.float16)
    if kind == "Q4_1":
        d[..., 1] *= -8                                   # m: a min near -8 d, as real files
    blocks[..., : 2 * scales] = d.view(np.uint8).reshape(rows, cols // t.block_size, 2 * scales)
    return blocks.reshape(rows, -1)


def main() -> None:
    import gguf

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("out", type=Path)
    p.add_argument("--type", choices=sorted(FILE_TYPE), default="Q4_0")
    p.add_argument("--preset", default="mistral-7b-v0.1")
    args = p.parse_args()
    c = PRESETS[args.preset]
    rng = np.random.default_rng(0)
    w = llama_writer(args.out, c, f"random-{args.preset}", FILE_TYPE[args.type])
    add_sentencepiece_metadata(w, shipped_file(c.vocab_size))
    plan = []
    for ours, shape in expected_shapes(c).items():
        name = format_name(ours, "gguf")
        if len(shape) == 1:
            plan.append((name, shape, None))
            w.add_tensor_info(name, shape, np.dtype(np.float32), shape[0] * 4)
        else:
            kind = tensor_type(args.type, name, c.n_layers)
            t = TYPE_BY_NAME[kind]
            nbytes = shape[0] * shape[1] // t.block_size * t.type_size
            qtype = gguf.GGMLQuantizationType[kind]
            plan.append((name, shape, kind))
            byte_shape = (shape[0], nbytes // shape[0])    # gguf-py takes quantized shapes in bytes
            w.add_tensor_info(name, byte_shape, np.dtype(np.uint8), nbytes, raw_dtype=qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    t0 = time.perf_counter()
    for name, shape, kind in plan:
        if kind is None:
            w.write_tensor_data(np.ones(shape, dtype=np.float32))
        else:
            w.write_tensor_data(random_blocks(shape[0], shape[1], kind, rng))
    w.close()
    size = args.out.stat().st_size
    print(f"{args.out}: {size / 1e9:.2f} GB in {time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()
