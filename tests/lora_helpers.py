"""Random LoRA adapters, written as real adapter files."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import torch


def write_random_adapter(path: Path, model: str | Path = "default", *, seed: int,
                         targets: tuple[str, ...] | None = None,
                         layers: Iterable[int] | None = None, rank: int = 2,
                         alpha: float = 4, fmt: str = "peft", std: float = 0.2) -> Path:
    """An adapter of `rank` on `targets` (all linears by default) of `layers` (all) of the
    model at `model`, random A and B (N(0, std)), saved as PEFT (`fmt="peft"`) or Mistral
    (`"mistral"`) files in `path`."""
    import mistral7b
    from mistral7b.lora import (
        TARGETS,
        adapter_from_model,
        apply_lora,
        lora_parameters,
        save_mistral,
        save_peft,
    )

    llm = mistral7b.load(model, device="cpu", dtype="float32")
    apply_lora(llm.model, rank=rank, alpha=alpha, targets=targets or TARGETS, layers=layers)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in lora_parameters(llm.model):
            p.copy_(torch.randn(p.shape, generator=g) * std)
    save = save_peft if fmt == "peft" else save_mistral
    save(adapter_from_model(llm.model), path, llm.config)
    return path


def write_default_model_adapter(path: Path, *, seed: int, targets: tuple[str, ...],
                                fmt: str = "peft", std: float = 0.2) -> Path:
    """A rank-2 adapter on `targets` of every third layer of the embedded default model."""
    return write_random_adapter(path, "default", seed=seed, targets=targets,
                                layers=range(0, 30, 3), fmt=fmt, std=std)
