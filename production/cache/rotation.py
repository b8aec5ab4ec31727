"""Randomised Hadamard rotations of a head's values before quantization (QuaRot, Ashkboos et al. 2024; QuIP#,
Tseng et al. 2024).

An orthogonal R spreads a few large channels over the whole head, so a block's scale is no longer set by one
outlier. A stream stores x @ R per head; keys stay exact under it because queries rotate too
((q R) . (k R) = q . k), and the attention output over rotated values rotates back (y R^T).

R = diag(s) H / sqrt(n): random signs s, then a Hadamard matrix H. A Hadamard matrix of order n exists here when
n = 2^a * 12^b (every per-head width of the presets but two: Sylvester's construction for 2^a, Paley's for 12,
Kronecker products for the rest). Other widths (6 and 18 at `large`) are split into such orders, largest
first (18 = 16 + 2, 6 = 4 + 2), and rotated block-diagonally. The signs come from a generator seeded by the
policy's seed, the layer and the stream, so a policy string fixes every rotation.
"""

from __future__ import annotations

import functools
import math
import zlib

import torch


def _is_hadamard_order(n: int) -> bool:
    while n % 12 == 0:
        n //= 12
    return n & (n - 1) == 0


@functools.cache
def paley12() -> torch.Tensor:
    """A Hadamard matrix of order 12: Paley's construction I over GF(11)."""
    q = 11
    residues = {(i * i) % q for i in range(1, q)}
    chi = [0] + [1 if i in residues else -1 for i in range(1, q)]
    Q = torch.tensor([[chi[(i - j) % q] for j in range(q)] for i in range(q)], dtype=torch.float64)
    S = torch.zeros(q + 1, q + 1, dtype=torch.float64)
    S[0, 1:], S[1:, 0], S[1:, 1:] = 1, -1, Q
    return S + torch.eye(q + 1, dtype=torch.float64)


def hadamard(n: int) -> torch.Tensor:
    """A +-1 Hadamard matrix of order n = 2^a * 12^b (H H^T = n I), float64."""
    if not _is_hadamard_order(n):
        raise ValueError(f"no Hadamard construction here for order {n}")
    H = torch.ones(1, 1, dtype=torch.float64)
    while n % 12 == 0:
        H, n = torch.kron(H, paley12()), n // 12
    sylvester = torch.tensor([[1.0, 1.0], [1.0, -1.0]], dtype=torch.float64)
    while n > 1:
        H, n = torch.kron(H, sylvester), n // 2
    return H


def hadamard_blocks(d: int) -> list[int]:
    """Split d into Hadamard orders, largest first: [d] when d itself is one."""
    blocks = []
    while d:
        b = max(n for n in range(1, d + 1) if _is_hadamard_order(n))
        blocks.append(b)
        d -= b
    return blocks


def head_rotation(d: int, generator: torch.Generator) -> torch.Tensor:
    """One head's R (d, d), float32, orthogonal: random signs, then block-diagonal normalised Hadamards."""
    H = torch.block_diag(*[hadamard(b) / math.sqrt(b) for b in hadamard_blocks(d)])
    signs = torch.randint(0, 2, (d,), generator=generator, dtype=torch.float64) * 2 - 1
    return (signs[:, None] * H).float()


def stream_rotation(heads: int, d: int, seed: int, layer: int, stream: str) -> torch.Tensor:
    """The rotations (heads, d, d) of one stream of one layer, each head with its own signs."""
    generator = torch.Generator().manual_seed(zlib.crc32(f"{seed}/{layer}/{stream}".encode()))
    return torch.stack([head_rotation(d, generator) for _ in range(heads)])


def rotate(x: torch.Tensor, R: torch.Tensor) -> torch.Tensor:
    """x (..., heads * d) -> x @ R per head, float32; R (heads, d, d). In fp32 even under autocast: the rotated
    values are what gets rounded and quantized."""
    heads, d, _ = R.shape
    with torch.autocast(x.device.type, enabled=False):
        return torch.einsum("...hd,hde->...he", x.float().unflatten(-1, (heads, d)), R).flatten(-2)


def rotate_heads(x: torch.Tensor, R: torch.Tensor, inverse: bool = False) -> torch.Tensor:
    """x (B, heads, T, d) float32 -> x @ R (or x @ R^T) per head, in fp32 even under autocast."""
    with torch.autocast(x.device.type, enabled=False):
        return torch.einsum("bhtd,hed->bhte" if inverse else "bhtd,hde->bhte", x, R)
