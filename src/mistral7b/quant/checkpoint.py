"""Our quantized checkpoint: what `mistral7b quantize` writes and `load()` reads without flags.

A consolidated folder that the consolidated reader opens unchanged:

    params.json                 the model config (ModelConfig.to_params_json)
    consolidated.safetensors    metadata {"format": "mistral7b-quantized", "version": "1",
                                "quant": "int4" | "int8", "group": "32", "source": ...}
    tokenizer files             copied from a source folder; from a GGUF source its tokenizer
                                metadata as `tokenizer.gguf` (a GGUF holding no tensors)

Tensors keep our names. Float tensors (embeddings, norms) are stored as they came. Each linear
weight `X.weight` (out, in) is stored in the portable form of layers.py:

    int8:  X.weight       (out, in)        int8     W = q * scale[:, None]
           X.weight_scale (out,)           float32  (or (out, in / 32): a GGUF Q8_0 source,
                                                    W = q * scale per group of 32 inputs)
    int4:  X.weight       (out, in / 2)    uint8    two values per byte, low nibble first
           X.weight_scale (out, in / g)    float32  W = q * scale + min, per group of g inputs
           X.weight_min   (out, in / g)    float32

The dtype of `X.weight` says which (a GGUF Q8_0/Q6_K tensor stays int8 in an int4 file); the
group is in / (number of scale columns). `output.weight` is always present, quantized (from
the embedding when the model ties them). The file is written one tensor at a time, the
safetensors header first (every size is known from the shapes), so memory stays bounded.
"""

from __future__ import annotations

import json
import shutil
import struct
from collections.abc import Callable, Iterator
from pathlib import Path

import torch

from mistral7b.errors import ModelFileError
from mistral7b.quant.convert import QuantWeight, check_mode, linear_names, source_weight
from mistral7b.quant.gguf_import import EXACT_INT4_TYPES
from mistral7b.quant.layers import Int4Weight, Int8Weight, int4_group_for
from mistral7b.quant.memory import release
from mistral7b.tokenizer.gguf_write import copy_tokenizer_metadata
from mistral7b.weights.base import CheckpointReader
from mistral7b.weights.gguf_file import FLOAT_TYPES, GGUFReader
from mistral7b.weights.names import expected_shapes
from mistral7b.weights.safetensors_write import Entry, StreamWriter

FORMAT = "mistral7b-quantized"
VERSION = "1"
WEIGHTS_FILE = "consolidated.safetensors"
TOKENIZER_GGUF = "tokenizer.gguf"
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                    "chat_template.jinja", "generation_config.json", "tekken.json")


def stored_quant(reader: CheckpointReader) -> str | None:
    """"int8"/"int4" for a checkpoint written by `mistral7b quantize`, else None."""
    if reader.format != "consolidated":
        return None
    meta = _metadata(Path(reader.path) / WEIGHTS_FILE)
    if meta.get("format") != FORMAT:
        return None
    if meta.get("version") != VERSION or meta.get("quant") not in ("int8", "int4"):
        raise ModelFileError(reader.path, f"quantized checkpoint of an unknown version "
                                          f"{meta.get('version')!r} / quant {meta.get('quant')!r}")
    return meta["quant"]


def read_stored_weight(reader: CheckpointReader, name: str, quant: str) -> QuantWeight:
    """The portable weight of linear `name` from one of our quantized checkpoints."""
    q = reader.tensor(name)
    scale = reader.tensor(name + "_scale")
    if q.dtype == torch.int8:
        grouped = scale.ndim == 2 and scale.shape[0] == q.shape[0] and scale.shape[1] > 0 \
            and q.shape[1] % scale.shape[1] == 0
        if scale.shape != (q.shape[0],) and not grouped:
            raise ModelFileError(reader.source(name), f"{name}_scale has shape "
                                                      f"{list(scale.shape)}, expected "
                                                      f"[{q.shape[0]}] or [{q.shape[0]}, groups]")
        return Int8Weight(q, scale.float())
    if q.dtype != torch.uint8 or name + "_min" not in reader.names():
        raise ModelFileError(reader.source(name), f"tensor {name!r} is not an int8 or int4 "
                                                  f"weight (dtype {q.dtype})")
    n_in = 2 * q.shape[1]
    if scale.ndim != 2 or scale.shape[0] != q.shape[0] or n_in % scale.shape[1]:
        raise ModelFileError(reader.source(name), f"{name}_scale has shape "
                                                  f"{list(scale.shape)} for an int4 weight of "
                                                  f"{q.shape[0]} x {n_in}")
    return Int4Weight(q, scale.float(), reader.tensor(name + "_min").float(),
                      n_in // scale.shape[1])


# ------------------------------------------------------------------------------- writing


def write_quantized(reader: CheckpointReader, out_dir: str | Path, quant: str, *,
                    group: int = 32,
                    progress: Callable[[str], object] | None = None) -> Path:
    """Quantize `reader`'s checkpoint into `out_dir` (created; must not hold a checkpoint)."""
    check_mode(quant)
    if stored_quant(reader) is not None:
        raise ModelFileError(reader.path, "this checkpoint is already quantized")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    config = reader.config
    linears = linear_names(config)
    floats = [n for n in expected_shapes(config) if n not in linears]
    present = reader.names()

    def weights() -> Iterator[tuple[str, dict[str, torch.Tensor]]]:
        for name in linears:
            source = name if name in present else "tok_embeddings.weight"
            w = source_weight(reader, source, quant, group)
            parts = {name: w.q, name + "_scale": w.scale}
            if isinstance(w, Int4Weight):
                parts[name + "_min"] = w.min
            yield name, parts
        for name in floats:
            yield name, {name: _float_tensor(reader, name)}

    # The header needs every tensor's dtype and shape before any data: the first pass
    # computes them from the decisions of `source_weight` without keeping any tensor.
    entries = list(_plan(reader, quant, group, linears, floats))
    meta = {"format": FORMAT, "version": VERSION, "quant": quant, "group": str(group),
            "source": str(reader.path)}
    path = out / WEIGHTS_FILE
    with path.open("wb") as f:
        writer = StreamWriter(f, entries, meta)
        for name, parts in weights():
            for part_name, t in parts.items():
                writer.write(part_name, t)
                release(t)
            if progress is not None:
                progress(name)
    (out / "params.json").write_text(json.dumps(config.to_params_json(), indent=2) + "\n")
    _copy_tokenizer(reader, out)
    return out


def _plan(reader: CheckpointReader, quant: str, group: int, linears: list[str],
          floats: list[str]) -> Iterator[Entry]:
    present = reader.names()
    for name in linears:
        source = name if name in present else "tok_embeddings.weight"
        out_f, in_f = reader.shape(source)
        g = int4_group_for(in_f, group) if quant == "int4" else None
        int8_scales: tuple[int, ...] = (out_f,)
        if isinstance(reader, GGUFReader):
            qtype = reader.raw(source).qtype.name
            if quant == "int4" and qtype in EXACT_INT4_TYPES:
                g = 32
            elif qtype not in FLOAT_TYPES:
                g = None
                if qtype == "Q8_0":  # copied with its scale per 32 (load.source_weight)
                    int8_scales = (out_f, in_f // 32)
        if g is None:
            yield Entry(name, torch.int8, (out_f, in_f))
            yield Entry(name + "_scale", torch.float32, int8_scales)
        else:
            yield Entry(name, torch.uint8, (out_f, in_f // 2))
            yield Entry(name + "_scale", torch.float32, (out_f, in_f // g))
            yield Entry(name + "_min", torch.float32, (out_f, in_f // g))
    for name in floats:
        yield Entry(name, _float_dtype(reader, name), tuple(reader.shape(name)))


def _float_dtype(reader: CheckpointReader, name: str) -> torch.dtype:
    if isinstance(reader, GGUFReader):
        qtype = reader.raw(name).qtype.name
        return {"F16": torch.float16, "BF16": torch.bfloat16}.get(qtype, torch.float32)
    return reader.tensor(name).dtype  # memory-mapped: no data is read


def _float_tensor(reader: CheckpointReader, name: str) -> torch.Tensor:
    t = reader.tensor(name)
    return t if t.dtype in (torch.float32, torch.float16, torch.bfloat16) else t.float()


def _metadata(path: Path) -> dict[str, str]:
    if not path.is_file():
        return {}
    try:
        with path.open("rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            if n > 100_000_000:
                return {}
            header = json.loads(f.read(n))
    except (OSError, struct.error, ValueError, UnicodeDecodeError):
        return {}  # the reader itself reports a corrupt file
    meta = header.get("__metadata__") if isinstance(header, dict) else None
    return meta if isinstance(meta, dict) else {}


def _copy_tokenizer(reader: CheckpointReader, out: Path) -> None:
    src = Path(reader.path)
    if isinstance(reader, GGUFReader):
        _write_tokenizer_gguf(reader, out / TOKENIZER_GGUF)
        return
    for file in sorted(src.iterdir()):
        if file.is_file() and (file.name in _TOKENIZER_FILES
                               or file.name.startswith("tokenizer.model")):
            shutil.copyfile(file, out / file.name)


def _write_tokenizer_gguf(reader: GGUFReader, path: Path) -> None:
    """The `tokenizer.*` metadata of a GGUF source (plus its architecture name) in a GGUF of
    its own, so the quantized folder keeps the vocabulary, merges and chat template."""
    import gguf

    header = reader.header
    writer = gguf.GGUFWriter(str(path), header.metadata.get("general.architecture", "llama"))
    copy_tokenizer_metadata(writer, header.metadata, header.types)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
