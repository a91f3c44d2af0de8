"""Mistral's consolidated format: params.json + consolidated.safetensors (or consolidated.00.pth).

The tensor names already are ours. A `.pth` is read only with `torch.load(weights_only=True)`:
a pickle that needs anything beyond plain tensors is refused, never executed.
"""

from __future__ import annotations

import pickle
from pathlib import Path

import torch

from mistral7b.config import ModelConfig
from mistral7b.errors import ModelFileError
from mistral7b.weights.base import CheckpointReader
from mistral7b.weights.safetensors_files import SafetensorsFiles
from mistral7b.weights.validate import check_fits, check_values


def is_consolidated(folder: Path) -> bool:
    return (folder / "params.json").is_file()


class ConsolidatedReader(CheckpointReader):
    format = "consolidated"

    def __init__(self, folder: Path) -> None:
        self.path = folder
        self.config = ModelConfig.from_params_json(folder / "params.json")
        st_files = sorted(folder.glob("consolidated*.safetensors"))
        pth_files = sorted(folder.glob("consolidated*.pth"))
        self._st: SafetensorsFiles | None = None
        self._pth: dict[str, torch.Tensor] = {}
        self._pth_file: Path | None = None
        if st_files:
            self._st = SafetensorsFiles(st_files)
        elif len(pth_files) == 1:
            self._pth_file = pth_files[0]
            self._pth = _load_pth(pth_files[0])
        elif len(pth_files) > 1:
            raise ModelFileError(folder, "model-parallel .pth shards (consolidated.01.pth, ...) "
                                         "are not supported; convert to one safetensors file")
        else:
            raise ModelFileError(folder, "no consolidated.safetensors or consolidated.00.pth "
                                         "beside params.json")
        if not self.config.tied_embeddings and "output.weight" not in self.names():
            self.config = self.config.with_(tied_embeddings=True)
        n_bytes = self._st.n_bytes if self._st else sum(
            t.numel() * t.element_size() for t in self._pth.values())
        check_fits(self.config, folder / "params.json", len(self.names()), n_bytes)
        self._checked: set[str] = set()

    def names(self) -> set[str]:
        return set(self._st.keys()) if self._st else set(self._pth)

    def shape(self, name: str) -> tuple[int, ...]:
        return self._st.shape(name) if self._st else tuple(self._pth[name].shape)

    def tensor(self, name: str) -> torch.Tensor:
        if self._st:
            return self._st.get(name)
        tensor = self._pth[name]
        if name not in self._checked:
            check_values(name, tensor, str(self._pth_file))
            self._checked.add(name)
        return tensor

    def tensor_part(self, name: str, dim: int, start: int, stop: int) -> torch.Tensor:
        if self._st:
            return self._st.part(name, dim, start, stop)
        return super().tensor_part(name, dim, start, stop)

    def source(self, name: str) -> str:
        return str(self._st.file_of(name) if self._st else self._pth_file)


def _load_pth(file: Path) -> dict[str, torch.Tensor]:
    try:
        state = torch.load(file, map_location="cpu", weights_only=True, mmap=True)
    except pickle.UnpicklingError as exc:
        raise ModelFileError(file, "refused: this .pth needs more than plain tensors to load "
                                   f"(weights_only=True rejected it: {exc})") from None
    except Exception as exc:  # noqa: BLE001 - torch's zip and pickle readers raise many kinds
        raise ModelFileError(file, f"corrupt or truncated .pth file ({exc!r:.300})") from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ModelFileError(file, "expected a flat dict of tensors")
    return state
