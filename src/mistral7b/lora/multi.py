"""Several adapters at once: stacked into the weights for every token (`--lora PATH[:SCALE]`,
repeatable), or served side by side and chosen per request (`serve --lora NAME=PATH`).

Stacking: adapters 1..k with scales w_i applied together are one LoRA of rank sum(r_i):

    sum_i w_i s_i B_i A_i  =  [w_1 s_1 B_1 | ... | w_k s_k B_k] @ [A_1; ...; A_k]

so `combine_adapters` concatenates them (exact, no approximation) and the result is applied
like any adapter (merged into float weights, or kept beside integer ones).

Serving: every adapted linear becomes a `MultiLoRALinear` holding all served adapters in
slots; the engine's `AdapterRows` says which slot each batch row uses in a step.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from mistral7b.errors import InputError
from mistral7b.lora.files import Adapter, apply_adapter, read_adapter
from mistral7b.lora.layers import AdapterRows, MultiLoRALinear
from mistral7b.modules import swap_module

if TYPE_CHECKING:
    from mistral7b.model import Transformer

LoraSpec = tuple[Path, float]


def parse_lora_spec(text: str) -> LoraSpec:
    """'out/adapter' -> (path, 1.0); 'out/adapter:0.5' -> (path, 0.5)."""
    path, sep, tail = text.rpartition(":")
    if sep and path:
        try:
            scale = float(tail)
        except ValueError:
            return Path(text).expanduser(), 1.0
        if not math.isfinite(scale):
            raise InputError(f"--lora {text}: the scale must be a finite number")
        return Path(path).expanduser(), scale
    return Path(text).expanduser(), 1.0


def parse_named_spec(text: str) -> tuple[str, LoraSpec]:
    """'NAME=PATH[:SCALE]' -> (name, (path, scale))."""
    name, sep, rest = text.partition("=")
    if not sep or not name or not rest:
        raise InputError(f"--lora {text}: a served adapter is NAME=PATH[:SCALE]")
    return name, parse_lora_spec(rest)


def lora_specs(lora: str | Path | Sequence[str | Path | tuple[str | Path, float]] | None
               ) -> list[LoraSpec]:
    """What `load(lora=...)` takes: a path, or a list of paths and (path, scale) pairs."""
    if lora is None:
        return []
    if isinstance(lora, (str, Path)):
        return [(Path(lora).expanduser(), 1.0)]
    out = []
    for item in lora:
        if isinstance(item, (str, Path)):
            out.append((Path(item).expanduser(), 1.0))
        elif isinstance(item, tuple) and len(item) == 2:
            out.append((Path(item[0]).expanduser(), float(item[1])))
        else:
            raise InputError(f"lora= takes paths or (path, scale) pairs, got {item!r}")
    return out


def scaled(adapter: Adapter, weight: float) -> Adapter:
    """The adapter with every module's scale multiplied by `weight`."""
    if weight == 1.0:
        return adapter
    return Adapter(adapter.tensors, {m: s * weight for m, s in adapter.scales.items()},
                   adapter.rank, adapter.alpha * weight, adapter.dropout, adapter.targets,
                   adapter.format, adapter.source, adapter.extra)


def combine_adapters(adapters: Sequence[Adapter]) -> Adapter:
    """One adapter equal to the sum of `adapters` (ranks concatenated, scales folded into B)."""
    if len(adapters) == 1:
        return adapters[0]
    modules = sorted({m for a in adapters for m in a.modules},
                     key=lambda n: (int(n.split(".")[1]), n))
    tensors: dict[str, torch.Tensor] = {}
    for m in modules:
        parts = [(a.tensors[f"{m}.lora_A.weight"].float(),
                  a.tensors[f"{m}.lora_B.weight"].float() * a.scales[m])
                 for a in adapters if m in a.scales]
        tensors[f"{m}.lora_A.weight"] = torch.cat([p[0] for p in parts], dim=0)
        tensors[f"{m}.lora_B.weight"] = torch.cat([p[1] for p in parts], dim=1)
    rank = max(tensors[f"{m}.lora_A.weight"].shape[0] for m in modules)
    targets = tuple(dict.fromkeys(t for a in adapters for t in a.targets))
    return Adapter(tensors, dict.fromkeys(modules, 1.0), rank, float(rank), 0.0, targets,
                   "combined", " + ".join(a.source for a in adapters))


def apply_lora_files(model: Transformer, specs: Sequence[LoraSpec], *,
                     merge: bool = True) -> Adapter:
    """Apply adapters (path, scale) together, for every token: merged into float weights, or
    kept beside integer (quantized) ones."""
    adapters = [scaled(read_adapter(path, model.config), w) for path, w in specs]
    adapter = combine_adapters(adapters)
    apply_adapter(model, adapter, merge=merge)
    return adapter


def add_served_adapter(model: Transformer, rows: AdapterRows, adapter: Adapter) -> int:
    """Serve `adapter` beside the others: its modules become MultiLoRALinear layers (once),
    it takes the next slot, and rows of a step choose it by that slot. Returns the slot.
    Every served layer keeps the same slots and rank (AdapterRows' one mask fits all)."""
    slot = rows.n_slots
    rank = max([rows.rank] + [adapter.tensors[f"{m}.lora_A.weight"].shape[0]
                              for m in adapter.modules])
    for name in adapter.modules:
        module = model.get_submodule(name)
        if not isinstance(module, MultiLoRALinear):   # over any linear, a LoRALinear too
            swap_module(model, name, MultiLoRALinear(module, rows))
    layers = [m for m in model.modules() if isinstance(m, MultiLoRALinear)]
    for m in layers:
        m.resize(slot + 1, rank)
    for name in adapter.modules:
        module = model.get_submodule(name)
        assert isinstance(module, MultiLoRALinear)
        module.set_adapter(slot, adapter.tensors[f"{name}.lora_A.weight"],
                           adapter.tensors[f"{name}.lora_B.weight"], adapter.scales[name])
    rows.rank = rank
    rows.salts.append(f"lora:{slot}:{adapter.source}".encode())
    return slot
