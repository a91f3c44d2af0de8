"""Writing a safetensors file one tensor at a time (the reading side: safetensors_files.py).

The format: an 8-byte little-endian header length, a JSON header giving each tensor's
dtype, shape and [begin, end) byte offsets into the data, then the data. Every offset is
known from the shapes alone, so the header is written first and the tensors after it as they
come: memory stays at one tensor whatever the file's size.
"""

from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass
from typing import BinaryIO

import torch

ST_DTYPES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
             torch.int8: "I8", torch.uint8: "U8"}


@dataclass(frozen=True)
class Entry:
    """One tensor of the file: its name, dtype and shape, known before its data."""

    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * torch.empty(0, dtype=self.dtype).element_size()


def header(entries: list[Entry], metadata: dict[str, str] | None = None) -> bytes:
    """The length prefix and JSON header of a file holding `entries` in this order."""
    table: dict[str, object] = {"__metadata__": metadata} if metadata else {}
    offset = 0
    for e in entries:
        table[e.name] = {"dtype": ST_DTYPES[e.dtype], "shape": list(e.shape),
                         "data_offsets": [offset, offset + e.nbytes]}
        offset += e.nbytes
    blob = json.dumps(table, separators=(",", ":")).encode()
    # Data starts on a 64-byte boundary (8 for the size + the header): an int8 weight used
    # in place from the map then meets the kernel's alignment whenever its offset does.
    blob += b" " * (-(len(blob) + 8) % 64)
    return struct.pack("<Q", len(blob)) + blob


class StreamWriter:
    """Writes the tensors of `entries`, in order, into the open binary file `f` (the header
    is written at once); each `write` checks the tensor against its planned entry."""

    def __init__(self, f: BinaryIO, entries: list[Entry],
                 metadata: dict[str, str] | None = None) -> None:
        self._f = f
        self._entries = iter(entries)
        f.write(header(entries, metadata))

    def write(self, name: str, t: torch.Tensor) -> None:
        e = next(self._entries)
        if (e.name, e.dtype, e.shape) != (name, t.dtype, tuple(t.shape)):
            raise RuntimeError(f"planned {e} but got {name} {t.dtype} {tuple(t.shape)}")
        self._f.write(tensor_bytes(t))


def tensor_bytes(t: torch.Tensor) -> memoryview:
    """The raw bytes of a tensor (made contiguous on the CPU first)."""
    t = t.detach().cpu().contiguous()
    return t.view(torch.uint8).reshape(-1).numpy().data
