"""GGUF checkpoints, read over a memory map (the header by our own parser, gguf_parse.py).

GGUF keeps q/k rows in the interleaved rotary layout (llama.cpp's converter undoes HF's
permutation), so only names change. Quantized tensors are handed over raw (`raw()`: the block
bytes and their type) for quantized kernels, or dequantized to float (`tensor()`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from mistral7b.config import ModelConfig
from mistral7b.errors import ModelFileError
from mistral7b.weights.base import CheckpointReader
from mistral7b.weights.gguf_parse import GGMLType, open_gguf, tensor_view
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
    qtype: GGMLType
    shape: tuple[int, ...]     # logical (rows, cols) in PyTorch order
    data: np.ndarray


def is_gguf(path: Path) -> bool:
    return path.is_file() and path.suffix.lower() == ".gguf"


class GGUFReader(CheckpointReader):
    format = "gguf"

    def __init__(self, path: Path) -> None:
        self.path = path
        self._data, header = open_gguf(path)
        self.header = header
        by_name = header.tensors
        meta = {k: v for k, v in header.metadata.items() if not k.startswith("tokenizer.")}
        tied = "output.weight" not in by_name
        vocab = None
        if "token_embd.weight" in by_name:
            vocab = int(by_name["token_embd.weight"].dims[-1])
        self.metadata = meta
        self.config = ModelConfig.from_gguf_metadata(meta, path, vocab, tied)
        check_fits(self.config, path, len(by_name), sum(t.n_bytes for t in by_name.values()))
        self._checked: set[str] = set()
        self._tensors = {}
        for ours in expected_shapes(self.config):
            name = format_name(ours, "gguf")
            if name in by_name:
                self._tensors[ours] = by_name[name]

    def names(self) -> set[str]:
        return set(self._tensors)

    def shape(self, name: str) -> tuple[int, ...]:
        # GGUF lists dimensions fastest-first (ne[0] = columns); PyTorch wants (rows, cols).
        return self._tensors[name].shape

    def qtype(self, name: str) -> GGMLType:
        """How a tensor is stored, from the header alone (no data read)."""
        return self._tensors[name].type

    def raw(self, name: str, *, check: bool = True) -> RawTensor:
        """The tensor as stored; its values (floats) or block scales are checked on first use.
        `check=False` is for a caller that checks the bytes itself as it reads them (the
        kernel's GGUF repack), and checks here when it cannot tell."""
        t = self._tensors[name]
        raw = RawTensor(name, t.type, t.shape, tensor_view(self._data, t))
        if check and name not in self._checked:
            self._check(raw)
            self._checked.add(name)
        return raw

    def raw_part(self, name: str, dim: int, start: int, stop: int, *,
                 check: bool = True) -> RawTensor:
        """Rows (dim 0) or columns (dim 1) start..stop-1 of a 2-D tensor as stored, reading
        and checking only those bytes. Columns of a quantized tensor must be whole blocks."""
        t = self._tensors[name]
        rows, cols = t.shape
        kind = t.type
        data = tensor_view(self._data, t)
        if kind.name in FLOAT_TYPES:                   # (rows, cols) floats
            part = data[start:stop] if dim == 0 else np.ascontiguousarray(data[:, start:stop])
        else:                                          # a row is whole blocks of bytes
            blocks = data.reshape(rows, -1)
            if dim == 0:
                part = blocks[start:stop].reshape(-1)
            else:
                size = kind.block_size
                if start % size or stop % size:
                    raise ModelFileError(self.path, f"tensor {name!r} ({kind.name}): columns "
                                         f"{start}..{stop - 1} do not fall on its blocks of "
                                         f"{size} values")
                b0, b1 = start // size * kind.type_size, stop // size * kind.type_size
                part = np.ascontiguousarray(blocks[:, b0:b1]).reshape(-1)
        if dim == 1:
            # Rows of a few kB share pages: copying part of each touched every page of the
            # tensor. Hand them back (unwritten map pages: dropping them changes nothing).
            from mistral7b.quant.memory import release

            release(data, unmodified=True)
        shape = (stop - start, cols) if dim == 0 else (rows, stop - start)
        raw = RawTensor(name, kind, shape, part)
        if check:
            self._check(raw)
        return raw

    def _check(self, raw: RawTensor) -> None:
        if raw.qtype.name in FLOAT_TYPES:
            check_values(raw.name, self._float_view(raw), self.path)
        else:
            check_quantized(raw.name, raw.qtype, raw.data, self.path,
                            lambda data, qtype: self._dequantize(raw.name, data, qtype,
                                                                 raw.shape))

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
            part = blocks[r: r + step]
            floats = self._dequantize(name, part, raw.qtype, (part.shape[0], cols))
            out[r: r + step] = torch.from_numpy(floats).reshape(-1, cols)
        return out

    def _dequantize(self, name: str, data: np.ndarray, qtype: GGMLType,
                    shape: tuple[int, ...]) -> np.ndarray:
        """The blocks `data` of `shape` (rows, cols) as float32 (rows * cols values)."""
        rows_cols = (shape[0], shape[1]) if len(shape) == 2 else (1, shape[-1])
        own = _dequantize_own(qtype.name, data, rows_cols)
        if own is not None:
            return own
        import gguf  # its numpy dequantizers, for the types we do not read ourselves

        try:
            floats = gguf.quants.dequantize(data, gguf.GGMLQuantizationType(qtype.id))
        except (NotImplementedError, ValueError):
            raise ModelFileError(self.path, f"tensor {name!r}: quantization type "
                                            f"{qtype.name} is not supported") from None
        return np.ascontiguousarray(floats, dtype=np.float32)

    def tensor(self, name: str) -> torch.Tensor:
        raw = self.raw(name)
        kind = raw.qtype.name
        if kind in ("F32", "F16"):
            return torch.from_numpy(raw.data)
        if kind == "BF16":
            return self._float_view(raw)
        floats = self._dequantize(name, raw.data, raw.qtype, raw.shape)
        return torch.from_numpy(floats).reshape(raw.shape)


def _dequantize_own(kind: str, data: np.ndarray, shape: tuple[int, int]) -> np.ndarray | None:
    """The 4- and 8-bit types the quantized loader imports (quant/gguf_import.py), in float32
    by the same arithmetic as gguf's dequantizer (tests check it bit for bit); None for the
    others."""
    from mistral7b.kernels import native
    from mistral7b.quant.gguf_import import EXACT_INT4_TYPES, import_int4, import_q8_0

    fast = native.gguf_dequantize(kind, torch.from_numpy(data.reshape(-1)), *shape)
    if fast is not None:
        return fast.numpy()
    if kind == "Q8_0":
        return import_q8_0(data, shape).dequantize().numpy()
    if kind in EXACT_INT4_TYPES:
        return import_int4(kind, data, shape).dequantize().numpy()
    return None
