"""Rotary position embedding (RoPE), rotate-half pairing, base 10000, absolute positions."""

from __future__ import annotations

import torch
from torch import nn


class Rotary(nn.Module):
    """Produces the cos/sin tables for a set of positions; `apply_rope` rotates with them.

    Pairing is rotate-half: dim i (i < D/2) rotates with dim i + D/2 at frequency base^(-2i/D).
    """

    def __init__(self, dim: int, base: float = 10000.0):
        super().__init__()
        assert dim % 2 == 0, dim
        inv_freq = base ** (-torch.arange(0, dim, 2, dtype=torch.float64) / dim)
        self.register_buffer("inv_freq", inv_freq.float(), persistent=False)

    def forward(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """positions (T,) int -> cos, sin (T, D) float32."""
        angles = positions.float()[:, None] * self.inv_freq[None, :]  # (T, D/2)
        angles = torch.cat([angles, angles], dim=-1)  # (T, D): same angle for dim i and i + D/2
        return angles.cos(), angles.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x (B, H, T, D) rotated at the positions the tables were built for; cos/sin (T, D). Returns x's dtype."""
    x1, x2 = x.chunk(2, dim=-1)
    rotated = torch.cat([-x2, x1], dim=-1)
    return (x * cos + rotated * sin).to(x.dtype)
