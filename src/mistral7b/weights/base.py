"""What every checkpoint reader gives the loader: a config and tensors in our naming and layout."""

from __future__ import annotations

from abc import ABC, abstractmethod
from pathlib import Path

import torch

from mistral7b.config import ModelConfig


class CheckpointReader(ABC):
    """One checkpoint on disk. Tensors come back on the CPU, memory-mapped where the format
    allows, in our names (weights/names.py) and in the interleaved rotary layout."""

    path: Path
    config: ModelConfig
    format: str  # "consolidated" | "hf" | "gguf"

    @abstractmethod
    def names(self) -> set[str]:
        """Our names of the tensors present."""

    @abstractmethod
    def shape(self, name: str) -> tuple[int, ...]:
        """Logical (out, in) shape of a tensor without reading its data."""

    @abstractmethod
    def tensor(self, name: str) -> torch.Tensor:
        """The tensor as floats (dequantized if stored quantized)."""

    def tensor_as(self, name: str, dtype: torch.dtype) -> torch.Tensor:
        """The tensor as `dtype` floats. Readers of quantized formats convert a slice at a
        time, never holding the whole float32 form (a 7B GGUF's embedding is 0.5 GB of it)."""
        t = self.tensor(name)
        return t if t.dtype == dtype or not t.is_floating_point() else t.to(dtype)

    def tensor_part(self, name: str, dim: int, start: int, stop: int) -> torch.Tensor:
        """Indices start..stop-1 along `dim` of a tensor, as floats, reading only that part
        where the format allows (tensor parallel: each rank's slice, distributed/tp.py)."""
        return self.tensor(name).narrow(dim, start, stop - start)

    def forget(self, name: str) -> None:
        """Drop what the reader keeps for tensor `name` after handing it out, so that its
        mapped pages may be discarded (a later `tensor(name)` reads the file afresh)."""

    def size_bytes(self) -> int:
        """Bytes of weights on disk (the file, or the weight files of the folder)."""
        path = Path(self.path)
        if path.is_file():
            return path.stat().st_size
        return sum(f.stat().st_size for pattern in ("*.safetensors", "*.pth", "*.gguf")
                   for f in path.glob(pattern) if f.is_file())

    def source(self, name: str) -> str:
        """The file a tensor lives in, for error messages."""
        return str(self.path)

    def close(self) -> None:
        """Release file handles and maps (tensors already handed out stay valid)."""
