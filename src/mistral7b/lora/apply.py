"""Which linear layers LoRA adapts, and the swaps that put LoRA into a model and take it out.

`apply_lora` replaces chosen linears of a loaded Transformer (wq, wk, wv, wo of each
attention, w1, w2, w3 of each feed-forward) by `LoRALinear(base, ...)`; `merge_lora` swaps
plain `nn.Linear` modules with the update folded in back in; `remove_lora` puts the bases back.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING

import torch
from torch import nn

from mistral7b.config import ModelConfig
from mistral7b.lora.layers import (
    FrozenQuantLinear,
    InputGradLinear,
    LoRALinear,
    is_frozen_quantized,
)
from mistral7b.modules import swap_module
from mistral7b.weights.names import LINEAR_LAYERS, hf_module

if TYPE_CHECKING:
    from mistral7b.model import Transformer

# Every linear layer LoRA may adapt (`wq`), with its module path inside a block
# (`attention.wq`) and PEFT's `target_modules` name for it (`q_proj`).
_PATHS = {path.rsplit(".", 1)[1]: path for path in LINEAR_LAYERS}
TARGETS = tuple(_PATHS)
HF_TARGETS = {target: hf_module(path) for target, path in _PATHS.items()}


def target_names(config: ModelConfig, targets: Iterable[str] = TARGETS,
                 layers: Iterable[int] | None = None) -> list[str]:
    """Module paths for `targets` in `layers` (all by default): `layers.3.attention.wq`."""
    targets = list(targets)
    unknown = [t for t in targets if t not in _PATHS]
    if unknown or not targets:
        raise ValueError(f"unknown LoRA target(s) {unknown or targets}: choose from "
                         f"{', '.join(TARGETS)}")
    layer_ids = range(config.n_layers) if layers is None else layers
    return [f"layers.{i}.{_PATHS[t]}" for i in layer_ids for t in targets]


def apply_lora(model: Transformer, *, rank: int = 16, alpha: float = 32.0, dropout: float = 0.0,
               targets: Iterable[str] = TARGETS, layers: Iterable[int] | None = None,
               use_rslora: bool = False) -> list[str]:
    """Wrap the target linear layers of `model` with fresh LoRALinear modules (B = 0).

    The whole model stays frozen except the new lora_A / lora_B weights. Returns the wrapped
    module paths.
    """
    names = target_names(model.config, targets, layers)
    scale = alpha / (math.sqrt(rank) if use_rslora else rank)
    for name in names:
        module = model.get_submodule(name)
        if isinstance(module, LoRALinear):
            raise TypeError(f"{name} already has a LoRA adapter: merge or remove it first")
        swap_module(model, name, LoRALinear(module, rank, scale, dropout))
    return names


def lora_modules(model: Transformer) -> Iterator[tuple[str, LoRALinear]]:
    for name, module in model.named_modules():
        if isinstance(module, LoRALinear):
            yield name, module


def lora_parameters(model: Transformer) -> list[torch.Tensor]:
    return [p for _, m in lora_modules(model) for p in (m.lora_A.weight, m.lora_B.weight)]


def lora_state_dict(model: Transformer) -> dict[str, torch.Tensor]:
    """The adapter in our names: `layers.{i}.attention.wq.lora_A.weight` -> tensor."""
    out = {}
    for name, m in lora_modules(model):
        out[f"{name}.lora_A.weight"] = m.lora_A.weight.detach()
        out[f"{name}.lora_B.weight"] = m.lora_B.weight.detach()
    return out


def merge_lora(model: Transformer) -> list[str]:
    """Replace every LoRALinear by a plain nn.Linear with the update folded in."""
    found = list(lora_modules(model))
    for name, m in found:
        swap_module(model, name, m.merged())
    return [name for name, _ in found]


def remove_lora(model: Transformer) -> list[str]:
    """Undo apply_lora: put each LoRALinear's base module back."""
    found = list(lora_modules(model))
    for name, m in found:
        swap_module(model, name, m.base)
    return [name for name, _ in found]


def quantize_frozen(model: Transformer, bits: int = 8, targets: Iterable[str] = TARGETS) -> int:
    """Swap the target nn.Linear layers for FrozenQuantLinear (QLoRA's base); returns the
    bytes their weights take now. Call before apply_lora."""
    total = 0
    for name in target_names(model.config, targets):
        module = model.get_submodule(name)
        if not isinstance(module, nn.Linear):
            raise TypeError(f"{name} is a {type(module).__name__}, not a float nn.Linear: "
                             "quantize before adding LoRA")
        q = FrozenQuantLinear(module.weight, bits)
        total += q.nbytes
        swap_module(model, name, q)
    return total


def wrap_quantized_outside_lora(model: Transformer) -> list[str]:
    """Make every frozen quantized layer that LoRA does not wrap pass gradients to its input
    (InputGradLinear), so a model loaded with `quant=` can be trained with LoRA."""
    lora_bases = {id(m.base) for _, m in lora_modules(model)}
    names = [name for name, m in model.named_modules()
             if is_frozen_quantized(m) and id(m) not in lora_bases
             and not isinstance(m, InputGradLinear)]
    wrapped = {id(m.layer) for m in model.modules() if isinstance(m, InputGradLinear)}
    names = [n for n in names if id(model.get_submodule(n)) not in wrapped]
    for name in names:
        swap_module(model, name, InputGradLinear(model.get_submodule(name)))
    return names
