"""Short steps in one C++ call: every layer of a decode or speculative verification step.

A small model's decode step is mostly Python and op dispatch: ~40 ops per layer, each a few
microseconds of interpreter and dispatcher around a product of a few dozen microseconds.
`FusedDecode` hands the whole layer stack to `DecodeStack` (kernels/csrc/step.cpp) once per
step: norms, rotary embedding, the cache write, grouped-query attention over the paged pool
and the SwiGLU feed-forward, calling our int4/int8 kernel (or at::linear for float32 weights)
directly. The embedding, final norm and output projection stay the model's own modules.

Every number is computed by the same kernel on the same shapes as model.py's step, so the
logits are equal to the bit (tests/test_fused_step.py); it is used by `Engine.step` when it
applies:

- the model is on the CPU and computes in float32 (a float32 model, or a quantized one over a
  bfloat16 table and KV cache: Transformer.compute_in_float32), and our kernel library runs
  here (native.ops());
- every linear of every layer is our native int4/int8 or K-quant layer or a plain float32
  nn.Linear without bias, every norm a plain RMSNorm, and no module has a hook: a LoRA wrapper, a
  served adapter, tensor parallel (its all-reduces are hooks) or PyTorch's fallback kernels
  keep the eager path;
- the step feeds at most PAGED_MAX_T (16) tokens to each row: decode, speculative
  verification, short chunks; longer pre-fill chunks stay eager (SDPA).

The stack holds the model's own tensors, the parameters themselves (no copy, no detached
alias), so in-place changes, `param.data = ...` included, are seen; a swapped module,
parameter or buffer is noticed at the next step (`current`) and the stack is rebuilt.
`MISTRAL7B_FUSED_STEP=0` turns it off (`Engine.use_fused_step`, per engine).
"""

from __future__ import annotations

import operator
import os
from typing import Any

import torch
from torch import nn
from torch.nn.modules import module as module_hooks

from mistral7b.attention_plan import AttentionPlan
from mistral7b.cache import KVPool
from mistral7b.kernels import native
from mistral7b.model import RMSNorm, Transformer
from mistral7b.quant.klinear import KQuantLinear
from mistral7b.quant.layers import Int4Linear, Int8Linear
from mistral7b.rope import rope_angles

_LINEARS = (("attention", "wq"), ("attention", "wk"), ("attention", "wv"), ("attention", "wo"),
            ("feed_forward", "w1"), ("feed_forward", "w2"), ("feed_forward", "w3"))


def enabled() -> bool:
    """The default of `Engine.use_fused_step`: on unless MISTRAL7B_FUSED_STEP=0."""
    return os.environ.get("MISTRAL7B_FUSED_STEP", "1") != "0"


class FusedDecode:
    """One model's layer stack as a DecodeStack, with what it was built from."""

    def __init__(self, model: Transformer, stack: Any, checks: list[tuple[dict, str, Any]],
                 hooks: list[dict]):
        self.model = model
        self.stack = stack
        self._dicts, self._keys, self._values = (list(c) for c in zip(*checks))
        # the step calls no module's forward: a hook anywhere (tensor parallel's all-reduces
        # and call broadcast, a user's) means the eager path
        self._hooks = hooks

    @classmethod
    def build(cls, model: Transformer) -> FusedDecode | None:
        """The fused step for `model`, or None where it does not apply (see the module doc)."""
        ops = native.ops()
        cfg = model.config
        if (ops is None or model.table_device.type != "cpu" or type(model) is not Transformer
                or (model.compute_dtype or model.table_dtype) != torch.float32
                or "forward" in model.__dict__):
            return None
        hooks = _all_hooks(model)
        if any(map(len, hooks)):
            return None
        stack = torch.classes.mistral7b_qmm.DecodeStack(cfg.n_heads, cfg.n_kv_heads,
                                                        cfg.head_dim, float(cfg.norm_eps))
        checks: list[tuple[dict, str, Any]] = []
        for layer in model.layers:
            norms: list[RMSNorm] = []
            for key in ("attention_norm", "ffn_norm"):
                norm = layer._modules.get(key)
                if type(norm) is not RMSNorm or norm.weight.dtype != torch.float32:
                    return None
                norms.append(norm)
                checks += [(layer._modules, key, norm), (norm._parameters, "weight", norm.weight)]
            for part, name in _LINEARS:
                parent = layer._modules[part]
                assert parent is not None
                lin = parent._modules.get(name)
                if lin is None or not _add_linear(stack, lin):
                    return None
                checks.append((parent._modules, name, lin))
                store = lin._buffers if isinstance(lin, _QUANTIZED) else \
                    lin._parameters
                checks += [(store, key, t) for key, t in store.items()]
            stack.add_layer(norms[0].weight, norms[1].weight)   # the parameters themselves
        checks.append((model._modules, "layers", model.layers))
        return cls(model, stack, checks, hooks)

    def current(self) -> bool:
        """Whether every module, parameter and buffer the stack was built from is still the
        model's (a swap anywhere means: build again)."""
        found = map(dict.get, self._dicts, self._keys)
        return all(map(operator.is_, found, self._values)) and not any(map(len, self._hooks))

    def __call__(self, tokens: torch.Tensor, positions: torch.Tensor, pool: KVPool,
                 plan: AttentionPlan, logits_index: torch.Tensor | None = None) -> torch.Tensor:
        """tokens, positions (B, T) -> float32 logits (B, T, V), or with `logits_index`
        (B, n) those positions' only (B, n, V): Transformer.forward's contract."""
        model, cfg = self.model, self.model.config
        B, T = tokens.shape
        x = model.embed(tokens).reshape(B * T, cfg.dim)
        cos, sin = rope_angles(positions.reshape(-1), cfg.head_dim, cfg.rope_theta)
        slots, gather, start, stop, mask = plan.query_keys()
        h = self.stack.forward(x, cos, sin, pool.k, pool.v, slots, gather, start, stop, mask)
        return model.head(h.view(B, T, cfg.dim), logits_index)


def _all_hooks(model: nn.Module) -> list[dict]:
    """The hook dicts of every module of the model, and the global ones."""
    return [d for m in model.modules() for d in (m._forward_hooks, m._forward_pre_hooks,
                                                  m._backward_hooks, m._backward_pre_hooks)
            ] + [module_hooks._global_forward_hooks, module_hooks._global_forward_pre_hooks]


_QUANTIZED = (Int4Linear, Int8Linear, KQuantLinear)


def _add_linear(stack: Any, lin: nn.Module) -> bool:
    if type(lin) is KQuantLinear:
        stack.add_klinear(lin.qweight, lin.scales, lin.super_d, lin.super_min, lin.bits,
                          lin.group, lin.out_features)
        return True
    if isinstance(lin, (Int4Linear, Int8Linear)) and type(lin) in (Int4Linear, Int8Linear):
        if lin.kernel != "native":
            return False
        stack.add_linear(lin.qweight, lin.scales, lin.mins, lin.bits, lin.group,
                         float(lin.offset), lin.out_features, None)
        return True
    if (type(lin) is nn.Linear and lin.bias is None and lin.weight.dtype == torch.float32
            and lin.weight.device.type == "cpu"):
        stack.add_linear(None, None, None, 0, 0, 0.0, lin.out_features, lin.weight)
        return True
    return False
