"""Random LoRA adapters for the embedded default model, written as real adapter files."""

from __future__ import annotations

from pathlib import Path

import torch


def write_default_model_adapter(path: Path, *, seed: int, targets: tuple[str, ...],
                                fmt: str = "peft", std: float = 0.2) -> Path:
    """A rank-2 adapter on `targets` of every third layer, random A and B (N(0, std)), saved
    as PEFT (`fmt="peft"`) or Mistral (`"mistral"`) files in `path`."""
    import mistral7b
    from mistral7b.lora import (
        adapter_from_model,
        apply_lora,
        lora_parameters,
        save_mistral,
        save_peft,
    )

    llm = mistral7b.load("default")
    apply_lora(llm.model, rank=2, alpha=4, targets=targets, layers=range(0, 30, 3))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in lora_parameters(llm.model):
            p.copy_(torch.randn(p.shape, generator=g) * std)
    save = save_peft if fmt == "peft" else save_mistral
    save(adapter_from_model(llm.model), path, llm.config)
    return path
