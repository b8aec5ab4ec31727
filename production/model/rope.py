"""Rotary position embedding (RoPE): rotate-half pairing, base 10000, absolute positions; and the eval-time
context extensions that stretch it past the trained length by a factor s:

- linear: position interpolation (Chen et al. 2023, "Extending Context Window of Large Language Models via
  Positional Interpolation"): every angle divided by s;
- ntk: NTK-aware scaling (bloc97 2023, analysed in the YaRN paper): the base raised to base * s^(D / (D - 2)),
  so low frequencies stretch and the highest barely move;
- yarn: YaRN (Peng et al. 2023, "YaRN: Efficient Context Window Extension of Large Language Models"): each
  frequency interpolated by how many full turns it makes over the trained length (none above beta = 32
  turns, fully below alpha = 1), and the attention logits of the rotated dims sharpened by (0.1 ln s + 1)^2.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

SCALINGS = ("none", "linear", "ntk", "yarn")
YARN_ALPHA, YARN_BETA = 1.0, 32.0


@dataclass(frozen=True)
class RopeScaling:
    kind: str  # none | linear | ntk | yarn
    factor: float = 1.0  # s = target length / trained length
    trained_length: int = 1024

    def __post_init__(self):
        if self.kind not in SCALINGS:
            raise ValueError(f"unknown RoPE scaling {self.kind!r}; use one of {', '.join(SCALINGS)}")


def llama3_frequencies(freq: torch.Tensor, factor, low_freq_factor, high_freq_factor, original_max_position_embeddings):
    """Llama 3's built-in rescaling of RoPE frequencies (part of the trained model, not an eval-time extension).
    With L the original context: pairs whose wavelength 2 pi / f is below L / high_freq_factor keep f, those above
    L / low_freq_factor slow down to f / factor, and those between blend the two linearly in L / wavelength."""
    L = original_max_position_embeddings
    turns = L * freq / (2 * math.pi)  # L / wavelength
    blend = ((turns - low_freq_factor) / (high_freq_factor - low_freq_factor)).clamp(0.0, 1.0)  # 1: keep f
    return (1 - blend) * freq / factor + blend * freq


def scaled_frequencies(
    dim: int, base: float, scaling: RopeScaling | None, llama3: dict | None = None
) -> tuple[torch.Tensor, float]:
    """Per-pair angular frequencies (D/2,) in float64 under `scaling`, and the factor the cos/sin tables carry
    (YaRN's logit sharpening, split evenly between q and k). `llama3`: the model's own frequency rescaling
    (ModelConfig.rope_llama3), which the eval-time extensions do not stack on."""
    exponents = torch.arange(0, dim, 2, dtype=torch.float64) / dim
    if llama3 is not None:
        if scaling is not None and scaling.kind != "none" and scaling.factor > 1.0:
            raise ValueError("RoPE context extensions are not supported on top of Llama 3's own rescaling")
        return llama3_frequencies(base**-exponents, **llama3), 1.0
    s = 1.0 if scaling is None else scaling.factor
    if scaling is None or scaling.kind == "none" or s <= 1.0:
        return base**-exponents, 1.0
    if scaling.kind == "linear":
        return base**-exponents / s, 1.0
    if scaling.kind == "ntk":
        return (base * s ** (dim / (dim - 2))) ** -exponents, 1.0
    freq = base**-exponents
    turns = scaling.trained_length * freq / (2 * math.pi)  # full rotations over the trained length
    keep = ((turns - YARN_ALPHA) / (YARN_BETA - YARN_ALPHA)).clamp(0.0, 1.0)  # 1: high frequency, left alone
    return (1 - keep) * freq / s + keep * freq, 0.1 * math.log(s) + 1.0


class Rotary(nn.Module):
    """cos/sin tables for positions [0, n), grown on demand. Dim i (i < D/2) rotates with dim i + D/2 at
    frequency base^(-2i/D). Angles are computed in float64 so positions near 128k keep their phase
    (float32 angles there would be off by ~0.01 rad); the tables are stored in float32."""

    def __init__(
        self,
        dim: int,
        base: float = 10000.0,
        n_positions: int = 1024,
        scaling: RopeScaling | None = None,
        llama3: dict | None = None,
    ):
        super().__init__()
        assert dim % 2 == 0, dim
        self.dim, self.base, self.scaling, self.llama3 = dim, base, scaling, llama3
        self._build(n_positions, device=None)

    def _build(self, n: int, device) -> None:
        inv_freq, mscale = scaled_frequencies(self.dim, self.base, self.scaling, self.llama3)  # (D/2,)
        angles = torch.arange(n, dtype=torch.float64)[:, None] * inv_freq[None, :]  # (n, D/2)
        angles = torch.cat([angles, angles], dim=-1)  # (n, D): dims i and i + D/2 share an angle
        self.register_buffer("cos", (mscale * angles.cos()).float().to(device), persistent=False)
        self.register_buffer("sin", (mscale * angles.sin()).float().to(device), persistent=False)

    def forward(self, start: int, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Tables for positions start .. start+length-1: cos, sin (length, D) float32."""
        if start + length > self.cos.shape[0]:
            self._build(max(2 * self.cos.shape[0], start + length), device=self.cos.device)
        return self.cos[start : start + length], self.sin[start : start + length]

    def at(self, pos: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Tables for the positions in device tensor `pos` (n,) int64, read without the host knowing them (a
        static decode step); the tables must already cover them (call forward up to the largest first)."""
        return self.cos.index_select(0, pos), self.sin.index_select(0, pos)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x (B, H, T, D) rotated with tables (T, D); computed in float32 (or wider), returned in x's dtype."""
    x1, x2 = x.chunk(2, dim=-1)
    rotated = torch.cat([-x2, x1], dim=-1)
    return (x * cos + rotated * sin).to(x.dtype)
