"""Memory-mapped access to one or more .safetensors files, with errors that name the file."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from mistral7b.errors import ModelFileError
from mistral7b.weights.validate import check_values


class SafetensorsFiles:
    """Tensor name -> file over a set of safetensors files (a sharded checkpoint or one file)."""

    def __init__(self, files: list[Path]) -> None:
        self._handles = {}
        self._where: dict[str, Path] = {}
        self._checked: set[str] = set()
        self.n_bytes = sum(file.stat().st_size for file in files if file.is_file())
        for file in files:
            handle = _open(file)
            self._handles[file] = handle
            for name in handle.keys():  # noqa: SIM118 - safe_open is not iterable
                self._where[name] = file

    def keys(self) -> list[str]:
        return list(self._where)

    def file_of(self, name: str) -> Path:
        return self._where[name]

    def shape(self, name: str) -> tuple[int, ...]:
        handle = self._handles[self._where[name]]
        return tuple(handle.get_slice(name).get_shape())

    def get(self, name: str) -> torch.Tensor:
        """The tensor, memory-mapped; float values are checked on first read (validate.py)."""
        file = self._where[name]
        try:
            tensor = self._handles[file].get_tensor(name)
        except (SafetensorError, RuntimeError, OSError) as exc:
            raise ModelFileError(file, f"cannot read tensor {name!r}: {exc}") from None
        if name not in self._checked:
            check_values(name, tensor, file)
            self._checked.add(name)
        return tensor


    def part(self, name: str, dim: int, start: int, stop: int) -> torch.Tensor:
        """Indices start..stop-1 along `dim`, reading only those values (rows: a view into
        the map; columns: a copy), checked instead of the whole tensor's."""
        file = self._where[name]
        try:
            whole = self._handles[file].get_tensor(name)  # mapped, not read
        except (SafetensorError, RuntimeError, OSError) as exc:
            raise ModelFileError(file, f"cannot read tensor {name!r}: {exc}") from None
        tensor = whole.narrow(dim, start, stop - start)
        if dim:
            # Columns: a strided view would make a slow, non-contiguous weight. Copy them,
            # then hand the mapped pages back (unwritten, so they may simply be dropped).
            from mistral7b.quant.memory import release

            tensor = tensor.contiguous()
            release(whole, unmodified=True)
        check_values(name, tensor, file)
        return tensor


def _open(file: Path):
    if not file.is_file():
        raise ModelFileError(file, "file not found")
    size = file.stat().st_size
    if size < 8:
        raise ModelFileError(file, f"truncated safetensors file ({size} bytes; the header "
                                   "alone needs at least 8)")
    try:
        return safe_open(str(file), framework="pt", device="cpu")
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise ModelFileError(file, f"corrupt or truncated safetensors file ({exc})") from None
