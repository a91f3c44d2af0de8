"""GGUF checkpoints, read with the `gguf` package over a memory map.

GGUF keeps q/k rows in the interleaved rotary layout (llama.cpp's converter undoes HF's
permutation), so only names change. Quantized tensors are handed over raw (`raw()`: the block
bytes and their type) for quantized kernels, or dequantized to float (`tensor()`).

The header is checked before `gguf.GGUFReader` walks it, so a file that claims more tensors
or metadata than it could hold fails at once with a clear message instead of a long walk.
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
from mistral7b.weights.names import expected_shapes, format_name

# Values dequantized at a time by tensor_as (16 MB of float32).
_DEQUANT_VALUES = 1 << 22
# GGUF tensor types that hold plain floats (everything else is quantized blocks).
FLOAT_TYPES = frozenset({"F32", "F16", "BF16"})

GGUF_MAGIC = b"GGUF"
SUPPORTED_VERSIONS = (2, 3)
# Smallest possible encodings: a key/value (key length u64, 1-byte key, type u32, 1-byte value)
# and a tensor info (name length u64, 1-byte name, n_dims u32, one dim u64, type u32, offset u64).
_MIN_KV_BYTES = 8 + 1 + 4 + 1
_MIN_TENSOR_INFO_BYTES = 8 + 1 + 4 + 8 + 4 + 8


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
        size = _check_header(path)
        try:
            reader = gguf.GGUFReader(str(path), mode="c")  # copy-on-write: writable, never written
        except (ValueError, IndexError, KeyError, OverflowError, struct.error) as exc:
            unknown = re.search(r"(\d+)\)? is not a valid GGMLQuantizationType", str(exc))
            if unknown:
                raise ModelFileError(path, f"unknown quantization type {unknown.group(1)}; this "
                                           "reader knows the types of gguf "
                                           f"{_gguf_version()}") from None
            raise ModelFileError(path, f"corrupt GGUF metadata ({exc})") from None
        self._gguf = gguf
        self._reader = reader
        by_name = {t.name: t for t in reader.tensors}
        for t in reader.tensors:
            end = int(t.data_offset) + int(t.n_bytes)
            if end > size:
                raise ModelFileError(path, f"tensor {t.name!r} needs bytes up to {end} but the "
                                           f"file has {size}: the file is truncated")
        meta = _metadata(reader)
        tied = "output.weight" not in by_name
        vocab = None
        if "token_embd.weight" in by_name:
            vocab = int(by_name["token_embd.weight"].shape[-1])
        self.metadata = meta
        self.config = ModelConfig.from_gguf_metadata(meta, path, vocab, tied)
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
        t = self._tensors[name]
        return RawTensor(name, t.tensor_type, self.shape(name), t.data)

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
            return torch.from_numpy(raw.data.view(np.int16)).view(torch.bfloat16).reshape(raw.shape)
        return torch.from_numpy(self._dequantize(name, raw.data, raw.qtype)).reshape(raw.shape)


def _gguf_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("gguf")
    except PackageNotFoundError:
        return "(unknown version)"


def _check_header(path: Path) -> int:
    try:
        size = path.stat().st_size
        with path.open("rb") as f:
            head = f.read(24)
    except FileNotFoundError:
        raise ModelFileError(path, "file not found") from None
    except OSError as exc:
        raise ModelFileError(path, f"cannot read: {exc.strerror or exc}") from None
    if len(head) < 4 or head[:4] != GGUF_MAGIC:
        raise ModelFileError(path, f"not a GGUF file (magic {head[:4]!r}, expected {GGUF_MAGIC!r})")
    if len(head) < 24:
        raise ModelFileError(path, f"truncated GGUF header ({size} bytes)")
    version, n_tensors, n_kv = struct.unpack("<IQQ", head[4:24])
    if version not in SUPPORTED_VERSIONS:
        raise ModelFileError(path, f"unsupported GGUF version {version} (supported: "
                                   f"{', '.join(map(str, SUPPORTED_VERSIONS))})")
    room = size - 24
    if n_kv * _MIN_KV_BYTES > room or n_tensors * _MIN_TENSOR_INFO_BYTES > room:
        raise ModelFileError(path, f"header claims {n_tensors} tensors and {n_kv} metadata "
                                   f"entries, more than a {size}-byte file can hold")
    return size


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
