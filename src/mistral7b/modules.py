"""Replacing a submodule or a parameter of a model by its dotted path.

Quantization (quant/) and LoRA (lora/) change a model only this way, so model.py knows
nothing of either (DESIGN §5): `swap_module(model, "layers.3.attention.wq", Int4Linear(...))`.
"""

from __future__ import annotations

import torch
from torch import nn


def swap_module(model: nn.Module, name: str, new: nn.Module) -> None:
    """Put `new` where the submodule `name` (`layers.3.attention.wq`) is."""
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, new)


def set_parameter(model: nn.Module, name: str, t: torch.Tensor) -> None:
    """Make `t` the frozen parameter `name` (`layers.3.ffn_norm.weight`), storage and all:
    unlike `load_state_dict`, this also fills a model built on the meta device."""
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child,
            nn.Parameter(t, requires_grad=False))
