"""LoRA adapter files, both read by `read_adapter` / `apply_lora_file`:

- PEFT (`adapter_config.json` + `adapter_model.safetensors`), as HF transformers + peft save
  them: `base_model.model.model.layers.{i}.self_attn.q_proj.lora_A.weight`, scale
  `lora_alpha / r` (or `lora_alpha / sqrt(r)` with `use_rslora`). HF permutes the rows of
  q_proj/k_proj for its half-split rotary (DESIGN §2.6); the rows of a LoRA B follow the rows
  of W, so B of wq/wk is permuted with `interleaved_to_hf` on save and `hf_to_interleaved`
  on load. A acts on the input side and is never permuted.
- Mistral (`lora.safetensors`, mistral-finetune's format, which mistral-inference's
  `load_lora` reads): our own names, `layers.{i}.attention.wq.lora_A.weight`, rows in the
  consolidated (interleaved) layout. mistral-finetune multiplies by a fixed `scaling` that it
  writes to `params.json` under `lora.scaling` beside the file; when that file is absent the
  scale is 2.0, the default of mistral-inference's `load_lora(path, scaling=2.0)`.

Files are written to a temporary name and renamed, so a reader never sees half a file.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from mistral7b.atomic import write_atomically
from mistral7b.config import ModelConfig
from mistral7b.errors import ModelFileError
from mistral7b.lora.apply import HF_TARGETS, TARGETS, lora_modules, lora_state_dict, target_names
from mistral7b.lora.layers import LoRALinear, is_frozen_quantized
from mistral7b.modules import swap_module
from mistral7b.weights.names import (
    expected_shapes,
    format_name,
    hf_to_interleaved,
    interleaved_to_hf,
    rotary_heads,
)

if TYPE_CHECKING:
    from mistral7b.api import LLM
    from mistral7b.model import Transformer

PEFT_CONFIG = "adapter_config.json"
PEFT_WEIGHTS = "adapter_model.safetensors"
MISTRAL_WEIGHTS = "lora.safetensors"
MISTRAL_PARAMS = "params.json"
MISTRAL_DEFAULT_SCALING = 2.0   # mistral-inference's load_lora default


@dataclass
class Adapter:
    """A LoRA adapter in our naming and layout, whatever file it came from.

    `tensors`: `layers.{i}.attention.wq.lora_A.weight` (r, in) / `.lora_B.weight` (out, r),
    B rows in the interleaved (consolidated) layout. `scales`: module path -> scale.
    """

    tensors: dict[str, torch.Tensor]
    scales: dict[str, float]
    rank: int
    alpha: float
    dropout: float = 0.0
    targets: tuple[str, ...] = TARGETS
    format: str = "ours"
    source: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def modules(self) -> list[str]:
        return sorted({k.rsplit(".", 2)[0] for k in self.tensors},
                      key=lambda n: (int(n.split(".")[1]), n))


def _target_of(module_path: str) -> str:
    return module_path.rsplit(".", 1)[1]


def _hf_module(module_path: str) -> str:
    """`layers.3.attention.wq` -> `model.layers.3.self_attn.q_proj` (via the one name table)."""
    return format_name(module_path + ".weight", "hf").removesuffix(".weight")


def _rotary_heads(module_path: str, config: ModelConfig) -> int | None:
    return rotary_heads(module_path + ".weight", config)


def adapter_from_model(model: Transformer, *, alpha: float | None = None,
                       dropout: float = 0.0,
                       tensors: dict[str, torch.Tensor] | None = None) -> Adapter:
    """The model's LoRA modules as an Adapter (tensors copied to CPU). `tensors`: the LoRA
    weights in lora_state_dict's names when the model holds only shards of them (FSDP)."""
    mods = list(lora_modules(model))
    if not mods:
        raise ValueError("the model has no LoRA modules")
    ranks = {m.rank for _, m in mods}
    rank = max(ranks)
    scale0 = mods[0][1].scale
    if tensors is None:
        tensors = {k: v.detach().to("cpu").clone() for k, v in lora_state_dict(model).items()}
    targets = tuple(t for t in TARGETS if any(_target_of(n) == t for n, _ in mods))
    return Adapter(tensors, {n: m.scale for n, m in mods}, rank,
                   alpha if alpha is not None else scale0 * rank, dropout, targets)


def save_peft(adapter: Adapter, folder: str | Path, config: ModelConfig, *,
              base_model: str | None = None) -> Path:
    """Write `adapter_config.json` + `adapter_model.safetensors` as peft saves them."""
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    uniform = {round(s * adapter.rank / adapter.alpha, 9) for s in adapter.scales.values()}
    if uniform != {1.0}:
        raise ValueError("PEFT export needs one scale alpha/r for every module")
    tensors = {}
    for key, t in adapter.tensors.items():
        module, kind = key.rsplit(".", 2)[0], key.rsplit(".", 2)[1]   # kind: lora_A / lora_B
        heads = _rotary_heads(module, config)
        if kind == "lora_B" and heads is not None:
            t = interleaved_to_hf(t, heads)
        tensors[f"base_model.model.{_hf_module(module)}.{kind}.weight"] = t.contiguous()
    layers = sorted({int(m.split(".")[1]) for m in adapter.modules})
    peft_config: dict[str, Any] = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model,
        "r": adapter.rank,
        "lora_alpha": adapter.alpha,
        "lora_dropout": adapter.dropout,
        "target_modules": sorted(HF_TARGETS[t] for t in adapter.targets),
        "layers_to_transform": None if len(layers) == config.n_layers else layers,
        "bias": "none",
        "fan_in_fan_out": False,
        "use_rslora": False,
        "use_dora": False,
        "modules_to_save": None,
        "rank_pattern": {},
        "alpha_pattern": {},
        "inference_mode": True,
        "init_lora_weights": True,
    }
    _atomic_write_bytes(folder / PEFT_CONFIG, json.dumps(peft_config, indent=2).encode())
    write_atomically(folder / PEFT_WEIGHTS,
                     lambda p: save_file(tensors, str(p), metadata={"format": "pt"}))
    return folder


def save_mistral(adapter: Adapter, folder: str | Path, config: ModelConfig) -> Path:
    """Write mistral-finetune's `lora.safetensors` and a `params.json` with `lora.scaling`."""
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    scales = set(adapter.scales.values())
    if len(scales) != 1:
        raise ValueError("the Mistral format has one scaling for all modules")
    tensors = {k: v.contiguous() for k, v in adapter.tensors.items()}
    params = config.to_params_json()
    params["lora"] = {"enable": True, "rank": adapter.rank, "dropout": adapter.dropout,
                      "scaling": scales.pop()}
    write_atomically(folder / MISTRAL_WEIGHTS, lambda p: save_file(tensors, str(p)))
    _atomic_write_bytes(folder / MISTRAL_PARAMS, json.dumps(params, indent=2).encode())
    return folder


def read_adapter(path: str | Path, config: ModelConfig) -> Adapter:
    """Read a PEFT folder/file or a Mistral `lora.safetensors` (folder or file), checked
    against `config`. The kind is told by the files and tensor names, never by the path."""
    path = Path(path).expanduser()
    if not path.exists():
        raise ModelFileError(path, "no such LoRA adapter file or folder")
    if path.is_dir():
        if (path / PEFT_CONFIG).is_file():
            return _read_peft(path, config)
        if (path / MISTRAL_WEIGHTS).is_file():
            return _read_mistral(path / MISTRAL_WEIGHTS, config)
        if (path / "adapter_model.bin").is_file():
            raise ModelFileError(path, "adapter_model.bin is a pickle, which mistral7b never "
                                       "loads; save the adapter with safe_serialization=True")
        raise ModelFileError(path, f"not a LoRA adapter folder: no {PEFT_CONFIG} (PEFT) and no "
                                   f"{MISTRAL_WEIGHTS} (Mistral)")
    names = _safetensors_names(path)
    if any(n.startswith("base_model.model.") for n in names):
        if not (path.parent / PEFT_CONFIG).is_file():
            raise ModelFileError(path, f"a PEFT adapter needs its {PEFT_CONFIG} beside it")
        return _read_peft(path.parent, config, weights=path)
    return _read_mistral(path, config)


def _safetensors_names(path: Path) -> list[str]:
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            return list(f.keys())
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise ModelFileError(path, f"not a readable safetensors file ({exc})") from None


def _load_tensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise ModelFileError(path, f"not a readable safetensors file ({exc})") from None


_PEFT_KEY = re.compile(
    r"^base_model\.model\.(?P<module>.+)\.(?P<kind>lora_[AB])(?:\.[\w-]+)?\.weight$")


def _read_peft(folder: Path, config: ModelConfig, weights: Path | None = None) -> Adapter:
    cfg_path = folder / PEFT_CONFIG
    try:
        cfg = json.loads(cfg_path.read_text())
    except (OSError, ValueError) as exc:
        raise ModelFileError(cfg_path, f"cannot read the PEFT config ({exc})") from None
    if cfg.get("peft_type", "LORA") != "LORA":
        raise ModelFileError(cfg_path, f"peft_type {cfg.get('peft_type')!r} is not LoRA")
    for key, why in (("use_dora", "DoRA"), ("alpha_pattern", "per-module alpha_pattern"),
                     ("fan_in_fan_out", "fan_in_fan_out")):
        if cfg.get(key):
            raise ModelFileError(cfg_path, f"{why} adapters are not supported")
    if cfg.get("bias", "none") != "none":
        raise ModelFileError(cfg_path, f"bias={cfg['bias']!r}: only bias='none' is supported")
    weights = weights or folder / PEFT_WEIGHTS
    if not weights.is_file():
        raise ModelFileError(folder, f"{PEFT_WEIGHTS} is missing")
    hf_to_ours = {_hf_module(m): m for m in target_names(config)}
    tensors: dict[str, torch.Tensor] = {}
    for key, t in _load_tensors(weights).items():
        match = _PEFT_KEY.match(key)
        if match is None or match["module"] not in hf_to_ours:
            raise ModelFileError(weights, f"tensor {key!r} is not a LoRA weight of a "
                                          "q/k/v/o/gate/up/down projection")
        module = hf_to_ours[match["module"]]
        heads = _rotary_heads(module, config)
        if match["kind"] == "lora_B" and heads is not None:
            t = hf_to_interleaved(t, heads)
        tensors[f"{module}.{match['kind']}.weight"] = t
    alpha = float(cfg.get("lora_alpha", 8))
    rslora = bool(cfg.get("use_rslora"))
    scales = {}
    for module in _modules_of(tensors, weights, config):
        r = tensors[f"{module}.lora_A.weight"].shape[0]
        scales[module] = alpha / (math.sqrt(r) if rslora else r)
    rank = int(cfg.get("r", 8))
    return Adapter(tensors, scales, rank, alpha, float(cfg.get("lora_dropout", 0.0)),
                   _targets_of(scales), "peft", str(folder),
                   {"base_model": cfg.get("base_model_name_or_path")})


def _read_mistral(path: Path, config: ModelConfig) -> Adapter:
    tensors = _load_tensors(path)
    valid = set(target_names(config))
    for key in tensors:
        module, _, rest = key.rpartition(".lora_")
        if module not in valid or rest not in ("A.weight", "B.weight"):
            raise ModelFileError(path, f"tensor {key!r} is not a LoRA weight of the form "
                                       "layers.{i}.attention.wq.lora_A.weight")
    scaling, rank, dropout = MISTRAL_DEFAULT_SCALING, None, 0.0
    params_path = path.parent / MISTRAL_PARAMS
    if params_path.is_file():
        try:
            lora = json.loads(params_path.read_text()).get("lora") or {}
        except ValueError as exc:
            raise ModelFileError(params_path, f"not valid JSON ({exc})") from None
        scaling = float(lora.get("scaling", scaling))
        rank = lora.get("rank")
        dropout = float(lora.get("dropout", 0.0))
    modules = _modules_of(tensors, path, config)
    scales = {m: scaling for m in modules}
    rank = int(rank or max(tensors[f"{m}.lora_A.weight"].shape[0] for m in modules))
    return Adapter(tensors, scales, rank, scaling * rank, dropout, _targets_of(scales),
                   "mistral", str(path))


def _modules_of(tensors: dict[str, torch.Tensor], source: Path,
                config: ModelConfig) -> list[str]:
    """Module paths with both A and B present and shapes that fit the model."""
    shapes = expected_shapes(config)
    modules = sorted({k.rsplit(".", 2)[0] for k in tensors})
    if not modules:
        raise ModelFileError(source, "the adapter holds no LoRA weights")
    for m in modules:
        a, b = tensors.get(f"{m}.lora_A.weight"), tensors.get(f"{m}.lora_B.weight")
        if a is None or b is None:
            raise ModelFileError(source, f"{m} has lora_{'A' if a is None else 'B'} missing")
        out_f, in_f = shapes[f"{m}.weight"]
        if a.dim() != 2 or b.dim() != 2 or a.shape[1] != in_f or b.shape[0] != out_f \
                or a.shape[0] != b.shape[1]:
            raise ModelFileError(
                source, f"{m}: lora_A {list(a.shape)} / lora_B {list(b.shape)} do not fit a "
                        f"({out_f}, {in_f}) weight of this model")
    return modules


def _targets_of(scales: dict[str, float]) -> tuple[str, ...]:
    present = {_target_of(m) for m in scales}
    return tuple(t for t in TARGETS if t in present)


def apply_adapter(model: Transformer, adapter: Adapter, *, merge: bool) -> list[str]:
    """Put `adapter` into `model`: wrapped as LoRALinear modules (kept separate, so it can be
    removed or trained further), or merged into the weights (no extra cost per token).

    Over integer (quantized) layers the adapter always stays separate: merging would turn
    them back into float weights or need a second rounding."""
    names = adapter.modules
    for name in names:
        module = model.get_submodule(name)
        if isinstance(module, LoRALinear):
            raise TypeError(f"{name} already has a LoRA adapter: merge or remove it first")
        a = adapter.tensors[f"{name}.lora_A.weight"]
        b = adapter.tensors[f"{name}.lora_B.weight"]
        lora = LoRALinear(module, a.shape[0], adapter.scales[name], 0.0)
        with torch.no_grad():
            lora.lora_A.weight.copy_(a)
            lora.lora_B.weight.copy_(b)
        lora.requires_grad_(False)
        swap_module(model, name, lora)
        if merge and not is_frozen_quantized(module):
            swap_module(model, name, lora.merged())
    return names


def apply_lora_file(llm_or_model: LLM | Transformer, path: str | Path,
                    merge: bool = False) -> Adapter:
    """Load a PEFT or Mistral LoRA adapter from `path` into an LLM (or a Transformer).

    merge=True folds it into the weights (merged copies of just the adapted weights);
    merge=False keeps LoRALinear modules (exactly the unmerged computation).
    """
    model = llm_or_model if isinstance(llm_or_model, nn.Module) else llm_or_model.model
    adapter = read_adapter(path, model.config)
    apply_adapter(model, adapter, merge=merge)
    return adapter


def _atomic_write_bytes(path: Path, data: bytes) -> None:
    write_atomically(path, lambda p: p.write_bytes(data))
