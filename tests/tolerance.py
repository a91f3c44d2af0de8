"""How close float logits must be to a reference, and why (one place for the suite's bounds).

A logit is the end of a chain of float32 matmuls, norms and softmaxes; its rounding error
follows the size of the numbers flowing through that chain, not the logit's own value, and a
dependency's patch release may reorder a sum. So bounds are relative to the reference's scale:

    max |got - want| <= rel * max(|want|.max(), 1)

and references are computed in float64 where the reference program allows (HF transformers,
PEFT), so the bound holds only our own float32 error. FLOAT32 = 5e-5 is ~400 float32 ulps
(eps = 1.19e-7) of the largest logit. Measured on this suite (2026-11, torch 2.13,
transformers 5.24, peft 0.21): chunked/cached logits against HF in float64 <= 2e-6; the
largest is a merged PEFT adapter whose random update is as large as the weights (one extra
rounding of every merged weight, amplified through the layers): 1.0e-5. The bound sits 5x
above that and more than three orders of magnitude below what a real mistake gives (a wrong
window, q/k row order or rope base: the guard tests measure >= 0.19 of the scale).
"""

from __future__ import annotations

import torch

FLOAT32 = 5e-5


def rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    """max |got - want| over the reference's scale (in float64)."""
    got, want = got.double(), want.double()
    scale = max(want.abs().max().item(), 1.0)
    return (got - want).abs().max().item() / scale


def assert_close(got: torch.Tensor, want: torch.Tensor, rel: float = FLOAT32,
                 what: str = "") -> None:
    assert got.shape == want.shape, f"{what}: shape {tuple(got.shape)} != {tuple(want.shape)}"
    err = rel_err(got, want)
    assert err <= rel, f"{what}: max abs diff is {err:.3g} of the logits' scale (bound {rel:g})"
