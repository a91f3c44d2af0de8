"""Rotary position embeddings on interleaved pairs (2i, 2i+1) of each head vector.

This is the layout of Mistral's consolidated checkpoints and of GGUF files; HF checkpoints use
half-split pairs (i, i + head_dim/2) and are converted at load time (weights/names.py).
"""

from __future__ import annotations

import torch


def rope_angles(positions: torch.Tensor, head_dim: int, theta: float) -> tuple[torch.Tensor, ...]:
    """cos/sin of position * theta^(-2i/head_dim), float32, shape positions.shape + (head_dim/2,).

    Computed per forward from absolute positions (cheap: B*T*head_dim/2 products), so there
    is no table to size, grow or keep in sync with the cache.
    """
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=positions.device,
                                              dtype=torch.float32) / head_dim))
    angles = positions.to(torch.float32)[..., None] * inv_freq  # (..., head_dim/2)
    return torch.cos(angles), torch.sin(angles)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate each pair (x[2i], x[2i+1]) by its angle.

    x: (B, T, H, D); cos/sin: (B, T, D/2). Rotation in float32, result in x's dtype.
    """
    pairs = x.float().unflatten(-1, (-1, 2))           # (B, T, H, D/2, 2)
    x0, x1 = pairs[..., 0], pairs[..., 1]
    cos, sin = cos[:, :, None, :], sin[:, :, None, :]  # broadcast over heads
    out = torch.stack((x0 * cos - x1 * sin, x0 * sin + x1 * cos), dim=-1)
    return out.flatten(-2).type_as(x)
