"""GGUF checkpoints, read with the `gguf` package over a memory map.

GGUF keeps q/k rows in the interleaved rotary layout (llama.cpp's converter undoes HF's
permutation), so only names change. Quantized tensors are handed over raw (`raw()`: the block
bytes and their type) for quantized kernels, or dequantized to float (`tensor()`).

The header is walked and checked first (gguf_header.py: every length bounded by the bytes
left, tensor offsets as llama.cpp requires them), so `gguf.GGUFReader` only ever walks a
header whose counts fit the file.
"""

from __future__ import annotations

import re
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mistral7b.config import ModelConfig
from mistral7b.errors import ModelFileError
from mistral7b.weights.base import CheckpointReader
from mistral7b.weights.gguf_header import gguf_version, read_header
from mistral7b.weights.names import expected_shapes, format_name
from mistral7b.weights.validate import check_fits, check_quantized, check_values

# Values dequantized at a time by tensor_as (16 MB of float32).
_DEQUANT_VALUES = 1 << 22
# GGUF tensor types that hold plain floats (everything else is quantized blocks).
FLOAT_TYPES = frozenset({"F32", "F16", "BF16"})



@dataclass(frozen=True)
class RawTensor:
    """A GGUF tensor as stored: `data` is a uint8 (or float) view into the memory map."""

    name: str
    qtype: Any                 # gguf.GGMLQuantizationType
    shape: tuple[int, ...]     # logical (rows, cols) in PyTorch order
    data: np.ndarray


def is_gguf(path: Path) -> bool:
    return path.is_file() and path.suffix.lower() == ".gguf"


class GGUFReader(CheckpointReader):
    format = "gguf"

    def __init__(self, path: Path) -> None:
        import gguf  # the reader is only needed for GGUF files

        self.path = path
        header = read_header(path)
        try:
            reader = gguf.GGUFReader(str(path), mode="c")  # copy-on-write: writable, never written
        except (ValueError, IndexError, KeyError, OverflowError, struct.error) as exc:
            unknown = re.search(r"(\d+)\)? is not a valid GGMLQuantizationType", str(exc))
            if unknown:
                raise ModelFileError(path, f"unknown quantization type {unknown.group(1)}; this "
                                           "reader knows the types of gguf "
                                           f"{gguf_version()}") from None
            raise ModelFileError(path, f"corrupt GGUF metadata ({exc})") from None
        self._gguf = gguf
        self._reader = reader
        by_name = {t.name: t for t in reader.tensors}
        self.header = header
        meta = _metadata(reader)
        tied = "output.weight" not in by_name
        vocab = None
        if "token_embd.weight" in by_name:
            vocab = int(by_name["token_embd.weight"].shape[-1])
        self.metadata = meta
        self.config = ModelConfig.from_gguf_metadata(meta, path, vocab, tied)
        check_fits(self.config, path, header.n_tensors, sum(t.n_bytes for t in header.tensors))
        self._checked: set[str] = set()
        self._tensors = {}
        for ours in expected_shapes(self.config):
            name = format_name(ours, "gguf")
            if name in by_name:
                self._tensors[ours] = by_name[name]

    @property
    def gguf(self) -> Any:
        """The open `gguf.GGUFReader` (the tokenizer reads its metadata from the same map)."""
        return self._reader

    def names(self) -> set[str]:
        return set(self._tensors)

    def shape(self, name: str) -> tuple[int, ...]:
        # GGUF lists dimensions fastest-first (ne[0] = columns); PyTorch wants (rows, cols).
        return tuple(int(d) for d in reversed(self._tensors[name].shape.tolist()))

    def raw(self, name: str) -> RawTensor:
        """The tensor as stored; its values (floats) or block scales are checked on first use."""
        t = self._tensors[name]
        raw = RawTensor(name, t.tensor_type, self.shape(name), t.data)
        if name not in self._checked:
            if raw.qtype.name in FLOAT_TYPES:
                check_values(name, self._float_view(raw), self.path)
            else:
                check_quantized(name, raw.qtype, raw.data, self.path, self._gguf.quants.dequantize)
            self._checked.add(name)
        return raw

    @staticmethod
    def _float_view(raw: RawTensor) -> torch.Tensor:
        if raw.qtype.name == "BF16":
            return torch.from_numpy(raw.data.view(np.int16)).view(torch.bfloat16)
        return torch.from_numpy(raw.data)

    def tensor_as(self, name: str, dtype: torch.dtype) -> torch.Tensor:
        raw = self.raw(name)
        if raw.qtype.name in FLOAT_TYPES or len(raw.shape) != 2:
            return super().tensor_as(name, dtype)
        rows, cols = raw.shape
        blocks = raw.data.reshape(rows, -1)                    # a row is whole blocks
        out = torch.empty(rows, cols, dtype=dtype)
        step = max(1, _DEQUANT_VALUES // cols)
        for r in range(0, rows, step):
            floats = self._dequantize(name, blocks[r: r + step], raw.qtype)
            out[r: r + step] = torch.from_numpy(floats).reshape(-1, cols)
        return out

    def _dequantize(self, name: str, data: np.ndarray, qtype: Any) -> np.ndarray:
        try:
            floats = self._gguf.quants.dequantize(data, qtype)
        except NotImplementedError:
            raise ModelFileError(self.path, f"tensor {name!r}: quantization type "
                                            f"{qtype.name} is not supported") from None
        return np.ascontiguousarray(floats, dtype=np.float32)

    def tensor(self, name: str) -> torch.Tensor:
        gguf = self._gguf
        raw = self.raw(name)
        qt = gguf.GGMLQuantizationType
        if raw.qtype in (qt.F32, qt.F16):
            return torch.from_numpy(raw.data).reshape(raw.shape)
        if raw.qtype == qt.BF16:
            return self._float_view(raw).reshape(raw.shape)
        return torch.from_numpy(self._dequantize(name, raw.data, raw.qtype)).reshape(raw.shape)


def _metadata(reader: Any) -> dict[str, Any]:
    """Plain Python values of the metadata, skipping the (large) tokenizer arrays."""
    meta = {}
    for key, field in reader.fields.items():
        if key.startswith("tokenizer."):
            continue
        try:
            meta[key] = field.contents()
        except (ValueError, IndexError, UnicodeDecodeError):
            continue
    return meta
