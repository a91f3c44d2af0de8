"""Checkpoint readers, one per format, behind `open_checkpoint`."""

from __future__ import annotations

from pathlib import Path

from mistral7b.errors import ModelFileError
from mistral7b.weights.base import CheckpointReader


def open_checkpoint(path: str | Path) -> CheckpointReader:
    """A consolidated folder (params.json), an HF folder (config.json) or a .gguf file."""
    from mistral7b.weights.consolidated import ConsolidatedReader, is_consolidated
    from mistral7b.weights.gguf_file import GGUFReader, is_gguf
    from mistral7b.weights.hf import HFReader, is_hf

    path = Path(path).expanduser()
    if not path.exists():
        raise ModelFileError(path, "no such file or folder")
    if path.is_file():
        if is_gguf(path):
            return GGUFReader(path)
        if path.name == "params.json":
            return ConsolidatedReader(path.parent)
        if path.name == "config.json":
            return HFReader(path.parent)
        raise ModelFileError(path, "not a model: expected a .gguf file or a checkpoint folder")
    if is_consolidated(path):
        return ConsolidatedReader(path)
    if is_hf(path):
        return HFReader(path)
    ggufs = sorted(path.glob("*.gguf"))
    if len(ggufs) == 1:
        return GGUFReader(ggufs[0])
    raise ModelFileError(path, "not a checkpoint folder: expected params.json (consolidated), "
                               "config.json (HF) or a single .gguf file")


__all__ = ["CheckpointReader", "open_checkpoint"]
