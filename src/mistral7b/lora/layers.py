"""The LoRA layer and the frozen integer bases QLoRA trains over.

`LoRALinear(base)` wraps a frozen linear layer: B starts at zero, so a fresh adapter leaves
the logits unchanged; `merged()` folds B @ A * scale into a copy of the base weight (the base
may be memory-mapped read-only: it is never written to).

QLoRA: LoRA over a frozen integer base. Integer kernels have no backward, so the base's
forward runs as is and the input gradient dy @ W is computed from the weight dequantized
again (`frozen_linear`): training keeps only the small integer weights alive, never a float
copy. The base is either mistral7b.quant's Int8Linear (a model loaded with quant="int8") or
`FrozenQuantLinear` (`quantize_frozen(model, bits)`: int8 per output channel, or int4 in
groups of 64, dequantized elementwise: cheap in both directions, which mistral7b.quant's CPU
int4 kernel layout is not).
"""

from __future__ import annotations

import math
from typing import Any, Protocol, TypeGuard

import torch
import torch.nn.functional as F
from torch import nn

INT4_GROUP = 64


class FrozenQuantLinear(nn.Module):
    """A frozen linear layer stored as integers, dequantized on the fly (QLoRA's base).

    int8: w ≈ q * s with q in [-127, 127] and one scale per output row (out, 1).
    int4: w ≈ q * s with q in [-7, 7], one scale per group of 64 inputs (out, in / 64);
    two values per byte, (out, in / 2) uint8 (low nibble = even column).
    """

    qweight: torch.Tensor   # buffers, declared for type checkers
    scale: torch.Tensor

    def __init__(self, weight: torch.Tensor, bits: int) -> None:
        super().__init__()
        if bits not in (4, 8):
            raise ValueError(f"bits must be 8 or 4, got {bits}")
        self.out_features, self.in_features = weight.shape
        self.bits = bits
        self.dtype = weight.dtype
        w = weight.detach().float()
        if bits == 8:
            scale = w.abs().amax(dim=1, keepdim=True).clamp(min=1e-12) / 127       # (out, 1)
            q = torch.round(w / scale).clamp(-127, 127).to(torch.int8)
        else:
            if self.in_features % INT4_GROUP:
                raise ValueError(f"int4 needs in_features divisible by {INT4_GROUP}, got "
                                 f"{self.in_features}")
            g = w.view(self.out_features, -1, INT4_GROUP)                        # (out, G, 64)
            scale = g.abs().amax(dim=2).clamp(min=1e-12) / 7                       # (out, G)
            q4 = torch.round(g / scale[..., None]).clamp(-7, 7).to(torch.int8) + 8  # 1..15
            q4 = q4.view(self.out_features, -1).to(torch.uint8)                    # (out, in)
            q = q4[:, 0::2] | (q4[:, 1::2] << 4)                                   # (out, in/2)
        self.register_buffer("qweight", q.contiguous())
        self.register_buffer("scale", scale.to(torch.float32).contiguous())

    @property
    def nbytes(self) -> int:
        return self.qweight.nbytes + self.scale.nbytes

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The float weight (out, in) in `dtype` (default: the weight's original dtype)."""
        dtype = dtype or self.dtype
        if self.bits == 8:
            return (self.qweight.to(torch.float32) * self.scale).to(dtype)
        q = self.qweight
        q4 = torch.stack([q & 0x0F, q >> 4], dim=-1).view(self.out_features, -1)  # (out, in)
        w = (q4.to(torch.float32) - 8).view(self.out_features, -1, INT4_GROUP)
        return (w * self.scale[..., None]).view(self.out_features, -1).to(dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.dequantize(x.dtype))


class FrozenQuantized(Protocol):
    """What LoRA needs of an integer base layer besides its forward."""

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor: ...


def is_frozen_quantized(module: nn.Module) -> TypeGuard[FrozenQuantized]:
    """A linear layer whose weight is stored as integers and read through `dequantize()`:
    FrozenQuantLinear here, Int8Linear / Int4Linear of mistral7b.quant."""
    weight = getattr(module, "weight", None)
    float_weight = isinstance(weight, torch.Tensor) and weight.is_floating_point()
    return callable(getattr(module, "dequantize", None)) and not float_weight


class _FrozenLinearFn(torch.autograd.Function):
    """y = layer(x) with the layer's own forward (integer kernels have no autograd formula);
    backward dx = dy @ W with W dequantized again, so no float W is kept between the two."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, layer: nn.Module) -> torch.Tensor:
        ctx.layer = layer
        return layer(x)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return grad @ ctx.layer.dequantize(grad.dtype), None


def frozen_linear(layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """layer(x), differentiable in x also when `layer` is a frozen quantized layer."""
    if torch.is_grad_enabled() and x.requires_grad and is_frozen_quantized(layer):
        return _FrozenLinearFn.apply(x, layer)
    return layer(x)


class InputGradLinear(nn.Module):
    """A frozen quantized layer outside LoRA (the output projection, an untargeted layer)
    wrapped so gradients flow through it to the LoRA layers below; same forward."""

    def __init__(self, layer: nn.Module) -> None:
        super().__init__()
        self.layer = layer
        self.in_features, self.out_features = _features(layer)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return frozen_linear(self.layer, x)


class LoRALinear(nn.Module):
    """`base(x) + scale * lora_B(lora_A(dropout(x)))`; only lora_A and lora_B train.

    The LoRA weights live in `lora_dtype` (float32 by default, also when the base is bf16:
    they are the optimizer's master weights); the update is computed in that dtype and added
    in the base's. `base` is any module with in_features/out_features (nn.Linear,
    FrozenQuantLinear, or a quantized linear from elsewhere).
    """

    def __init__(self, base: nn.Module, rank: int, scale: float, dropout: float = 0.0, *,
                 lora_dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        if rank < 1:
            raise ValueError(f"LoRA rank must be >= 1, got {rank}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"LoRA dropout must be in [0, 1), got {dropout}")
        self.base = base
        self.in_features, self.out_features = _features(base)
        self.rank, self.scale = rank, float(scale)
        device = _device_of(base)
        self.lora_A = nn.Linear(self.in_features, rank, bias=False, device=device,
                                dtype=lora_dtype)
        self.lora_B = nn.Linear(rank, self.out_features, bias=False, device=device,
                                dtype=lora_dtype)
        # As in the paper: A random (Kaiming-uniform, like nn.Linear), B zero -> no change.
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B.weight)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    def extra_repr(self) -> str:
        return f"rank={self.rank}, scale={self.scale:g}"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = frozen_linear(self.base, x)
        h = self.dropout(x).to(self.lora_A.weight.dtype)
        return y + (self.lora_B(self.lora_A(h)) * self.scale).to(y.dtype)

    def delta_weight(self) -> torch.Tensor:
        """scale * B @ A, (out, in), in the LoRA dtype."""
        return (self.lora_B.weight @ self.lora_A.weight) * self.scale

    def merged(self) -> nn.Linear:
        """A plain nn.Linear holding base + scale * B @ A (a new tensor: the base is untouched)."""
        base = self.base
        weight = getattr(base, "weight", None)
        if is_frozen_quantized(base):  # the merged layer is float: quantize it again if needed
            w, dtype = base.dequantize(torch.float32), getattr(base, "dtype", torch.float32)
        elif isinstance(weight, torch.Tensor) and weight.is_floating_point():
            w, dtype = weight, weight.dtype
        else:
            raise TypeError(f"cannot merge a LoRA update into a {type(base).__name__}; keep "
                            "the adapter as separate layers (merge=False)")
        with torch.no_grad():
            new = (w.to(self.lora_A.weight.dtype) + self.delta_weight()).to(dtype)
        linear = nn.Linear(self.in_features, self.out_features, bias=False, device="meta")
        linear.weight = nn.Parameter(new, requires_grad=False)
        return linear


class AdapterRows:
    """Which served adapter each batch row of the current step uses, for every
    `MultiLoRALinear` of one model: the engine owns it and sets it around a forward
    (`Engine.step(..., adapters=[...])`); the layers read it. Slot 0 is "no adapter".

    Every layer holds `n_slots` adapters of `rank` columns each (smaller ranks zero-padded),
    so one column mask serves them all: mask[b, 0, c] = 1 where column c belongs to row b's
    slot, (B, 1, n_slots * rank), made once per step.

    `salts[i]` starts the prefix-cache digest chain of sequences run with adapter i: their KV
    depends on the adapter, so sequences of different adapters never share cached blocks.
    """

    def __init__(self) -> None:
        self.mask: torch.Tensor | None = None
        self.rank = 1
        self.salts: list[bytes] = [b""]

    @property
    def n_slots(self) -> int:
        return len(self.salts)

    def set(self, adapters: list[int] | None, device: torch.device) -> None:
        if adapters is None or not any(adapters):
            self.mask = None
            return
        bad = [i for i in adapters if not 0 <= i < self.n_slots]
        if bad:
            raise ValueError(f"adapter slot(s) {bad} are not loaded (0..{self.n_slots - 1})")
        index = torch.tensor(adapters, dtype=torch.long)
        slot_of_column = torch.arange(self.n_slots * self.rank) // self.rank
        self.mask = (index[:, None, None] == slot_of_column).float().to(device)

    def clear(self) -> None:
        self.mask = None


class MultiLoRALinear(nn.Module):
    """A frozen base and several LoRA adapters side by side, each batch row using its own:

        y[b] = base(x[b]) + B_s @ A_s @ x[b]           s = the slot of row b

    The adapters are stacked along the rank: A (N*R, in) holds slot s in rows s*R .. s*R+R-1,
    B (out, N*R) in the same columns, its scale folded in; slot 0 is zeros (the base alone)
    and a rank below R is padded with zeros, which add nothing. A step computes
    h = A x for all slots at once (N*R columns: a few dozen), zeroes the columns of the other
    slots with the rows' mask (exact: the products it drops are multiplied by 0), and adds
    B h: two small matmuls per layer whatever the mix of adapters in the batch.
    """

    A: torch.Tensor
    B: torch.Tensor

    def __init__(self, base: nn.Module, rows: AdapterRows) -> None:
        super().__init__()
        self.base = base
        self.rows = rows
        self.in_features, self.out_features = _features(base)
        device = _device_of(base)
        self.register_buffer("A", torch.zeros(1, self.in_features, device=device))
        self.register_buffer("B", torch.zeros(self.out_features, 1, device=device))
        self.n_slots, self.rank = 1, 1

    def extra_repr(self) -> str:
        return f"adapters={self.n_slots - 1}, rank={self.rank}"

    def resize(self, n_slots: int, rank: int) -> None:
        """Room for n_slots adapters of `rank` columns (existing ones kept, new room zeros)."""
        n, r = self.n_slots, self.rank
        if (n_slots, rank) == (n, r):
            return
        if n_slots < n or rank < r:
            raise ValueError("adapter slots and rank only grow")
        A = self.A.new_zeros(n_slots, rank, self.in_features)
        B = self.B.new_zeros(self.out_features, n_slots, rank)
        A[:n, :r] = self.A.view(n, r, -1)
        B[:, :n, :r] = self.B.view(-1, n, r)
        self.A, self.B = A.view(n_slots * rank, -1), B.view(-1, n_slots * rank)
        self.n_slots, self.rank = n_slots, rank

    def set_adapter(self, slot: int, a: torch.Tensor, b: torch.Tensor, scale: float) -> None:
        """Put lora_A a (r, in) and lora_B b (out, r) with `scale` in `slot` (>= 1); the
        layer must have room (resize) for the slot and a rank >= r."""
        r, R = a.shape[0], self.rank
        with torch.no_grad():
            self.A[slot * R: (slot + 1) * R].zero_()
            self.B[:, slot * R: (slot + 1) * R].zero_()
            self.A[slot * R: slot * R + r] = a.to(self.A)
            self.B[:, slot * R: slot * R + r] = b.to(self.B) * scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        mask = self.rows.mask
        if mask is None:
            return y
        h = F.linear(x.to(self.A.dtype), self.A) * mask          # (B, T, N*R)
        return y + F.linear(h, self.B).to(y.dtype)               # (B, T, out)


def _features(layer: nn.Module) -> tuple[int, int]:
    """(in_features, out_features) of any linear layer (nn.Linear, ours, quantized ones)."""
    n_in, n_out = getattr(layer, "in_features", None), getattr(layer, "out_features", None)
    if not isinstance(n_in, int) or not isinstance(n_out, int):
        raise TypeError(f"a {type(layer).__name__} is not a linear layer: LoRA adapts layers "
                        "with in_features and out_features")
    return n_in, n_out


def _device_of(module: nn.Module) -> torch.device:
    for t in module.parameters():
        return t.device
    for b in module.buffers():
        return b.device
    return torch.device("cpu")
