"""Block quantization formats for the KV cache: q8_0, q4_0 (llama.cpp) and nf4 (QLoRA).

Two layers:
- `encode(x, kind) -> (scale, codes)` / `decode(scale, codes, kind)` work on any even block size qb and keep
  scales and codes in separate tensors, the layout the cache stores and reads fast (4-bit codes packed as
  adjacent pairs, which unpack with contiguous integer ops).
- `quantize_blocks(x, kind)` / `dequantize_blocks(b, kind)` produce and read the interoperable bytes: for q8_0
  and q4_0 exactly llama.cpp's `block_q8_0` (fp16 d, 32 int8) and `block_q4_0` (fp16 d, 16 bytes of nibbles),
  bit-identical to `quantize_row_q8_0_ref` / `quantize_row_q4_0_ref`.

The reference semantics, reproduced in strict fp32 (each operation rounded, as the C source reads):
  q8_0: amax = max|x|; d = amax / 127; id = d ? 1/d : 0; q = roundf(x * id) (half away from zero).
  q4_0: m = the x of largest |x| (first on ties); d = m / -8; id = d ? 1/d : 0;
        q = min(15, (int8)(x * id + 8.5f)) with truncation toward zero.
  d is stored as fp16 (round to nearest even). Where 1/d overflows to inf (|d| below ~2.9e-39) the C
  conversion of a non-finite float to an integer yields 0 on x86; we write code 0 there too.
A build that contracts x*id + 8.5f into one FMA (gcc -march=native) can differ from the C source in rare
near-integer cases; we follow the source.
"""

from __future__ import annotations

import torch

from production.cache.policy import QUANT_KINDS

# QLoRA's NormalFloat4 codebook on [-1, 1] (Dettmers et al., 2023, appendix E)
NF4_CODEBOOK = torch.tensor(
    [
        -1.0,
        -0.6961928009986877,
        -0.5250730514526367,
        -0.39491748809814453,
        -0.28444138169288635,
        -0.18477343022823334,
        -0.09105003625154495,
        0.0,
        0.07958029955625534,
        0.16093020141124725,
        0.24611230194568634,
        0.33791524171829224,
        0.44070982933044434,
        0.5626170039176941,
        0.7229568362236023,
        1.0,
    ]
)
NF4_MIDPOINTS = (NF4_CODEBOOK[1:] + NF4_CODEBOOK[:-1]) / 2

LLAMA_BLOCK = 32


def code_bytes(kind: str, qb: int) -> int:
    """Bytes of codes per block of qb values."""
    return qb if kind == "q8_0" else qb // 2


def block_bytes(kind: str, qb: int = LLAMA_BLOCK) -> int:
    """Bytes per block: fp16 scale + codes (q8_0@32: 34, q4_0@32 and nf4@32: 18)."""
    return 2 + code_bytes(kind, qb)


def _round_half_away(x: torch.Tensor) -> torch.Tensor:
    """C's roundf, exact in fp32: trunc, then step away from zero when the dropped fraction is >= 0.5."""
    t = torch.trunc(x)
    return t + torch.sign(x) * ((x - t).abs() >= 0.5)


def _safe_reciprocal(d: torch.Tensor) -> torch.Tensor:
    return torch.where(d == 0, torch.zeros_like(d), 1.0 / d)


def _pack_pairs(q: torch.Tensor) -> torch.Tensor:
    """Cache layout: q (..., qb) codes 0..15 -> (..., qb/2) bytes, code 2j in the low nibble of byte j and code
    2j + 1 in the high nibble, so unpacking is three contiguous integer ops (see _unpack_pairs)."""
    return (q[..., 0::2] | (q[..., 1::2] << 4)).to(torch.uint8)


def _unpack_pairs(packed: torch.Tensor) -> torch.Tensor:
    """(..., qb/2) cache-layout bytes -> (..., qb) uint8 codes. Each byte b = lo | hi << 4 widens to the int16
    lo | hi << 8 = b + 15 * (b & 0xF0), whose little-endian bytes are (lo, hi): codes 2j, 2j + 1 in order."""
    wide = packed.to(torch.int16)
    pairs = torch.add(wide, wide & 0xF0, alpha=15)
    return pairs.view(torch.uint8)


def _llama_nibbles(q: torch.Tensor) -> torch.Tensor:
    """llama.cpp layout: code j in the low nibble of byte j, code j + qb/2 in the high nibble."""
    half = q.shape[-1] // 2
    return (q[..., :half] | (q[..., half:] << 4)).to(torch.uint8)


def _from_llama_nibbles(packed: torch.Tensor) -> torch.Tensor:
    return torch.cat([packed & 0x0F, packed >> 4], dim=-1)


def _codes(x: torch.Tensor, kind: str) -> tuple[torch.Tensor, torch.Tensor]:
    """x (..., n_blocks, qb) -> scale (..., n_blocks) fp16 and unpacked codes (..., n_blocks, qb): int8 for
    q8_0, uint8 0..15 for q4_0 and nf4."""
    x = x.float()
    if kind == "q8_0":
        d = x.abs().amax(dim=-1, keepdim=True) / 127
        y = x * _safe_reciprocal(d)
        q = torch.where(torch.isfinite(y), _round_half_away(y), torch.zeros_like(y))
        return d.squeeze(-1).half(), q.to(torch.int8)
    if kind == "q4_0":
        idx = x.abs().argmax(dim=-1, keepdim=True)  # first index of the largest magnitude
        m = torch.gather(x, -1, idx)
        m = torch.where(m == 0, torch.zeros_like(m), m)  # C starts from +0.0f: an all-zero block gives d = -0.0
        d = m / -8
        y = x * _safe_reciprocal(d) + 8.5
        q = torch.where(torch.isfinite(y), torch.trunc(y), torch.zeros_like(y)).clamp(max=15)
        return d.squeeze(-1).half(), q.to(torch.uint8)
    if kind == "nf4":
        scale = x.abs().amax(dim=-1, keepdim=True).half()  # normalise by the stored (fp16) absmax
        y = (x * _safe_reciprocal(scale.float())).clamp(-1, 1)
        q = torch.bucketize(y, NF4_MIDPOINTS.to(x.device))  # nearest codebook entry
        return scale.squeeze(-1), q.to(torch.uint8)
    raise ValueError(f"unknown quantization kind {kind!r}; valid: {', '.join(QUANT_KINDS)}")


def encode(x: torch.Tensor, kind: str) -> tuple[torch.Tensor, torch.Tensor]:
    """x (..., n_blocks, qb) float -> scale (..., n_blocks) fp16 and codes (..., n_blocks, code_bytes) in the
    cache layout: int8 for q8_0, nibble pairs for q4_0 and nf4."""
    scale, q = _codes(x, kind)
    return scale, q if kind == "q8_0" else _pack_pairs(q)


def decode(scale: torch.Tensor, codes: torch.Tensor, kind: str, dtype=torch.float32) -> torch.Tensor:
    """scale (..., n_blocks) fp16, cache-layout codes (..., n_blocks, code_bytes) -> values (..., n_blocks, qb).
    q4_0's -8 is applied to the uint8 codes (wrapping to the int8 values -8..7), so no float pass is spent on
    it; the scale multiplies in place (a mixed int * float op is several times slower on CPU)."""
    d = scale.to(dtype).unsqueeze(-1)
    if kind == "q8_0":
        return codes.to(dtype).mul_(d)
    q = _unpack_pairs(codes)
    if kind == "q4_0":
        return q.sub_(8).view(torch.int8).to(dtype).mul_(d)
    if kind == "nf4":
        return NF4_CODEBOOK.to(device=codes.device, dtype=dtype)[q.long()].mul_(d)
    raise ValueError(f"unknown quantization kind {kind!r}; valid: {', '.join(QUANT_KINDS)}")


def quantize_blocks(x: torch.Tensor, kind: str) -> torch.Tensor:
    """x (..., n*32) float -> uint8 (..., n, block_bytes): the llama.cpp block structs (fp16 scale first)."""
    if x.shape[-1] % LLAMA_BLOCK:
        raise ValueError(f"last dim {x.shape[-1]} is not a multiple of {LLAMA_BLOCK}")
    scale, q = _codes(x.reshape(*x.shape[:-1], -1, LLAMA_BLOCK), kind)
    codes = q.view(torch.uint8) if kind == "q8_0" else _llama_nibbles(q)
    scale_bytes = scale.contiguous().view(torch.uint8).reshape(*scale.shape, 2)  # little-endian fp16
    return torch.cat([scale_bytes, codes], dim=-1)


def dequantize_blocks(b: torch.Tensor, kind: str) -> torch.Tensor:
    """uint8 (..., n, block_bytes) -> float32 (..., n*32)."""
    if b.dtype != torch.uint8 or b.shape[-1] != block_bytes(kind):
        raise ValueError(f"{kind} blocks are uint8 (..., n, {block_bytes(kind)}), got {b.dtype} {tuple(b.shape)}")
    scale = b[..., :2].contiguous().view(torch.float16).squeeze(-1)
    codes = b[..., 2:].contiguous()
    codes = codes.view(torch.int8) if kind == "q8_0" else _pack_pairs(_from_llama_nibbles(codes))
    return decode(scale, codes, kind).flatten(-2)
