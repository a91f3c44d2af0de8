"""HF transformers checkpoints: config.json + model.safetensors or sharded model-*-of-*.safetensors.

HF stores wq/wk rows permuted for its half-split rotary; we undo that here (names.py).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from mistral7b.config import ModelConfig
from mistral7b.errors import ModelFileError
from mistral7b.weights.base import CheckpointReader
from mistral7b.weights.names import expected_shapes, format_name, hf_to_interleaved, rotary_heads
from mistral7b.weights.safetensors_files import SafetensorsFiles
from mistral7b.weights.validate import check_fits

INDEX = "model.safetensors.index.json"


def is_hf(folder: Path) -> bool:
    return (folder / "config.json").is_file()


class HFReader(CheckpointReader):
    format = "hf"

    def __init__(self, folder: Path) -> None:
        self.path = folder
        self.config = ModelConfig.from_hf_config(folder / "config.json")
        self._files = SafetensorsFiles(_weight_files(folder))
        present = set(self._files.keys())
        if not self.config.tied_embeddings and "lm_head.weight" not in present:
            self.config = self.config.with_(tied_embeddings=True)
        check_fits(self.config, folder / "config.json", len(present), self._files.n_bytes)
        # Our name -> HF name, for the tensors the model needs.
        self._hf = {ours: format_name(ours, "hf") for ours in expected_shapes(self.config)}
        self._hf = {ours: hf for ours, hf in self._hf.items() if hf in present}
        self._permuted: dict[str, torch.Tensor] = {}

    def names(self) -> set[str]:
        return set(self._hf)

    def shape(self, name: str) -> tuple[int, ...]:
        return self._files.shape(self._hf[name])

    def tensor(self, name: str) -> torch.Tensor:
        heads = rotary_heads(name, self.config)
        if not heads:
            return self._files.get(self._hf[name])
        if name not in self._permuted:
            # Permute in place: the file is mapped copy-on-write (MAP_PRIVATE), so the written
            # pages replace the file's pages instead of adding a second copy of wq/wk to the
            # resident set (1.3 GB for Mistral 7B). The file on disk is never modified; the
            # permuted tensor is kept so a second call does not permute twice.
            t = self._files.get(self._hf[name])
            t.copy_(hf_to_interleaved(t, heads))
            self._permuted[name] = t
        return self._permuted[name]

    def tensor_part(self, name: str, dim: int, start: int, stop: int) -> torch.Tensor:
        part = self._files.part(self._hf[name], dim, start, stop)
        if not rotary_heads(name, self.config):
            return part
        # Whole heads (tp.py cuts wq/wk rows at head boundaries), and the permutation acts
        # within each head: undo it on this rank's heads alone, in a copy of its rows.
        head_dim = self.config.head_dim
        if dim != 0 or start % head_dim or stop % head_dim:
            raise ValueError(f"{name}: a part of q/k rows must be whole heads")
        return hf_to_interleaved(part, (stop - start) // head_dim).contiguous()

    def forget(self, name: str) -> None:
        # Once forgotten, the un-permuted pages may be dropped (they revert to the file's
        # permuted bytes) and a later read permutes them again.
        self._permuted.pop(name, None)

    def source(self, name: str) -> str:
        return str(self._files.file_of(self._hf[name]))


def _weight_files(folder: Path) -> list[Path]:
    index = folder / INDEX
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        except (ValueError, KeyError, TypeError, RecursionError) as exc:
            raise ModelFileError(index, f"not a valid safetensors index ({exc!r:.200})") from None
        if not isinstance(weight_map, dict) or not all(
                isinstance(v, str) and v == Path(v).name and v not in ("", ".", "..")
                for v in weight_map.values()):
            raise ModelFileError(index, "weight_map must map tensor names to file names in "
                                        "this folder (no paths)")
        files = sorted({folder / name for name in weight_map.values()})
        missing = [f.name for f in files if not f.is_file()]
        if missing:
            raise ModelFileError(index, f"lists shard(s) that are missing: {', '.join(missing)}")
        return files
    single = folder / "model.safetensors"
    if single.is_file():
        return [single]
    shards = sorted(folder.glob("model-*-of-*.safetensors"))
    if shards:
        return shards
    raise ModelFileError(folder, "no model.safetensors, model-*-of-*.safetensors or "
                                 f"{INDEX} beside config.json")
