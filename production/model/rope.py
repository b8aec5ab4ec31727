"""Rotary position embedding (RoPE): rotate-half pairing, base 10000, absolute positions."""

from __future__ import annotations

import torch
from torch import nn


class Rotary(nn.Module):
    """cos/sin tables for positions [0, n), grown on demand. Dim i (i < D/2) rotates with dim i + D/2 at
    frequency base^(-2i/D). Angles are computed in float64 so positions near 128k keep their phase
    (float32 angles there would be off by ~0.01 rad); the tables are stored in float32."""

    def __init__(self, dim: int, base: float = 10000.0, n_positions: int = 1024):
        super().__init__()
        assert dim % 2 == 0, dim
        self.dim, self.base = dim, base
        self._build(n_positions, device=None)

    def _build(self, n: int, device) -> None:
        inv_freq = self.base ** (-torch.arange(0, self.dim, 2, dtype=torch.float64) / self.dim)  # (D/2,)
        angles = torch.arange(n, dtype=torch.float64)[:, None] * inv_freq[None, :]  # (n, D/2)
        angles = torch.cat([angles, angles], dim=-1)  # (n, D): dims i and i + D/2 share an angle
        self.register_buffer("cos", angles.cos().float().to(device), persistent=False)
        self.register_buffer("sin", angles.sin().float().to(device), persistent=False)

    def forward(self, start: int, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Tables for positions start .. start+length-1: cos, sin (length, D) float32."""
        if start + length > self.cos.shape[0]:
            self._build(max(2 * self.cos.shape[0], start + length), device=self.cos.device)
        return self.cos[start : start + length], self.sin[start : start + length]


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x (B, H, T, D) rotated with tables (T, D); computed in float32 (or wider), returned in x's dtype."""
    x1, x2 = x.chunk(2, dim=-1)
    rotated = torch.cat([-x2, x1], dim=-1)
    return (x * cos + rotated * sin).to(x.dtype)
