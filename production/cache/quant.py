"""Block quantization formats for the KV cache (production.cache.formats): q8_0, q4_0, q4_1 (llama.cpp),
nf4 (QLoRA), and the 3- and 2-bit affine formats q3_1 and q2_1.

Two layers:
- `encode(x, kind) -> (scale, codes)` / `decode(scale, codes, kind)` work on any block size the format allows
  and keep scales and codes in separate tensors, the layout the cache stores and reads fast: 4-bit codes packed
  as adjacent pairs, 2-bit codes four to a byte (code 4j + i in bits 2i..2i+1 of byte j), 3-bit codes as two
  planes: their low two bits as 2-bit codes (qb/4 bytes), then their high bits eight to a byte (code 8j + i at
  bit i of byte j; qb/8 bytes).
- `quantize_blocks(x, kind)` / `dequantize_blocks(b, kind)` produce and read the interoperable bytes of blocks
  of 32: for q8_0, q4_0 and q4_1 exactly llama.cpp's `block_q8_0` (fp16 d, 32 int8), `block_q4_0` (fp16 d, 16
  bytes of nibbles) and `block_q4_1` (fp16 d, fp16 m, 16 bytes of nibbles), bit-identical to
  `quantize_row_q8_0_ref` / `quantize_row_q4_0_ref` / `quantize_row_q4_1_ref`; nf4 as q4_0's struct; q3_1 and
  q2_1 as fp16 d, fp16 m, then the codes in the cache layout (12 and 8 bytes).

The reference semantics, reproduced in strict fp32 (each operation rounded, as the C source reads):
  q8_0: amax = max|x|; d = amax / 127; id = d ? 1/d : 0; q = roundf(x * id) (half away from zero).
  q4_0: m = the x of largest |x| (first on ties); d = m / -8; id = d ? 1/d : 0;
        q = min(15, (int8)(x * id + 8.5f)) with truncation toward zero.
  q4_1: lo, hi = min x, max x; d = (hi - lo) / 15; id = d ? 1/d : 0; q = min(15, (int8)((x - lo) * id + 0.5f)).
  q3_1, q2_1: as q4_1 with 7 and 3 in place of 15 (8 and 4 levels).
  d (and m = lo) are stored as fp16 (round to nearest even); dequant m + q * d (q8_0: q * d; q4_0: (q - 8) * d).
  Where 1/d overflows to inf (|d| below ~2.9e-39) the C conversion of a non-finite float to an integer yields 0
  on x86; we write code 0 there too.
A build that contracts x*id + 8.5f into one FMA (gcc -march=native) can differ from the C source in rare
near-integer cases; we follow the source.
"""

from __future__ import annotations

import functools

import torch

from production.cache.formats import FORMATS, QUANT_KINDS

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
    return _format(kind).code_bytes(qb)


def block_bytes(kind: str, qb: int = LLAMA_BLOCK) -> int:
    """Bytes per block: fp16 scales + codes (at qb 32: q8_0 34, q4_0 and nf4 18, q4_1 20, q3_1 16, q2_1 12)."""
    return _format(kind).block_bytes(qb)


def _format(kind: str):
    if kind not in FORMATS:
        raise ValueError(f"unknown quantization kind {kind!r}; valid: {', '.join(QUANT_KINDS)}")
    return FORMATS[kind]


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


def _pack_bits(q: torch.Tensor, bits: int) -> torch.Tensor:
    """Codes (..., n) of `bits` bits (1 or 2) -> (..., n * bits / 8) bytes, code (8 / bits) j + i at bits
    bits * i .. bits * i + bits - 1 of byte j."""
    per_byte = 8 // bits
    q = q.to(torch.uint8).unflatten(-1, (-1, per_byte))
    out = q[..., 0]
    for i in range(1, per_byte):
        out = out | (q[..., i] << (bits * i))
    return out


@functools.cache
def _code_table(bits: int, device: str) -> torch.Tensor:
    """The lookup table of 2- or 3-bit unpacking: entry i is the int32 whose little-endian bytes are the four codes
    that index i encodes. 2 bits: i is one byte of codes (code k at bits 2k .. 2k+1). 3 bits: i = (h << 8) | l,
    l the byte of the codes' low bits (as 2 bits), h the nibble of their high bits (code k's at bit k)."""
    codes = [
        [((i >> (2 * k)) & 3) | (((i >> (8 + k)) & 1) << 2) for k in range(4)]
        for i in range(256 if bits == 2 else 4096)
    ]
    return torch.tensor([int.from_bytes(bytes(c), "little") for c in codes], dtype=torch.int32, device=device)


def _pack(q: torch.Tensor, bits: int) -> torch.Tensor:
    """Unsigned codes (..., qb) -> cache-layout bytes (..., qb * bits / 8); 8-bit codes stay int8. 3-bit codes
    are two planes: the low two bits of every code (as 2-bit codes), then the high bits (as 1-bit codes)."""
    if bits == 8:
        return q
    if bits == 4:
        return _pack_pairs(q)
    if bits == 2:
        return _pack_bits(q, 2)
    return torch.cat([_pack_bits(q & 3, 2), _pack_bits(q >> 2, 1)], dim=-1)


def _unpack(packed: torch.Tensor, bits: int) -> torch.Tensor:
    """Cache-layout bytes (..., qb * bits / 8) -> uint8 codes (..., qb) (bits 2, 3, 4). 2 and 3 bits: one table
    lookup per four codes (index_select with int32 indices, several times faster on CPU than shifting and masking
    every code); the looked-up int32 values, read as bytes, are the codes."""
    if bits == 4:
        return _unpack_pairs(packed)
    if bits == 2:
        index, n = packed.int(), packed.shape[-1]
    else:  # byte j of the 2-bit plane holds the low bits of codes 4j .. 4j+3, nibble j of the 1-bit plane the high
        n = packed.shape[-1] * 2 // 3
        high = _unpack_pairs(packed[..., n:]).to(torch.int32).bitwise_left_shift_(8)
        index = high.bitwise_or_(packed[..., :n])
    codes = _code_table(bits, str(packed.device)).index_select(0, index.reshape(-1)).view(torch.uint8)
    return codes.view(*packed.shape[:-1], 4 * n)


def _llama_nibbles(q: torch.Tensor) -> torch.Tensor:
    """llama.cpp layout: code j in the low nibble of byte j, code j + qb/2 in the high nibble."""
    half = q.shape[-1] // 2
    return (q[..., :half] | (q[..., half:] << 4)).to(torch.uint8)


def _from_llama_nibbles(packed: torch.Tensor) -> torch.Tensor:
    return torch.cat([packed & 0x0F, packed >> 4], dim=-1)


def _codes(x: torch.Tensor, kind: str) -> tuple[torch.Tensor, torch.Tensor]:
    """x (..., n_blocks, qb) -> scale fp16 (..., n_blocks), or (..., n_blocks, 2) = (d, m) for the affine
    formats, and unpacked codes (..., n_blocks, qb): int8 for q8_0, uint8 0 .. 2^bits - 1 otherwise."""
    x = x.float()
    fmt = _format(kind)
    if fmt.scales == 2:
        # the first minimum and maximum, as C's `v < min` / `v > max` scans find them (-0.0 and 0.0 tie)
        lo = torch.gather(x, -1, x.argmin(dim=-1, keepdim=True))
        hi = torch.gather(x, -1, x.argmax(dim=-1, keepdim=True))
        top = 2**fmt.bits - 1
        d = (hi - lo) / top
        y = (x - lo) * _safe_reciprocal(d) + 0.5
        q = torch.where(torch.isfinite(y), torch.trunc(y), torch.zeros_like(y)).clamp(max=top)
        return torch.cat([d, lo], dim=-1).half(), q.to(torch.uint8)
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
    # nf4
    scale = x.abs().amax(dim=-1, keepdim=True).half()  # normalise by the stored (fp16) absmax
    y = (x * _safe_reciprocal(scale.float())).clamp(-1, 1)
    q = torch.bucketize(y, on_device(NF4_MIDPOINTS, x.device))  # nearest codebook entry
    return scale.squeeze(-1), q.to(torch.uint8)


@functools.cache
def _on_device(table: torch.Tensor, device: str) -> torch.Tensor:
    """A constant table's copy on `device`, made once (no host-to-device copy per call, as a CUDA graph needs)."""
    return table.to(device)


def on_device(table: torch.Tensor, device: torch.device | str) -> torch.Tensor:
    return _on_device(table, str(device))


def encode(x: torch.Tensor, kind: str) -> tuple[torch.Tensor, torch.Tensor]:
    """x (..., n_blocks, qb) float -> scale fp16 (..., n_blocks) or (..., n_blocks, 2), and codes
    (..., n_blocks, code_bytes) in the cache layout."""
    scale, q = _codes(x, kind)
    return scale, _pack(q, FORMATS[kind].bits)


@functools.cache
def _nf4_pair_table(dtype: torch.dtype, device: str) -> torch.Tensor:
    """Row b: the codebook values of the two nf4 codes in cache-layout byte b (low nibble first)."""
    b = torch.arange(256)
    return torch.stack([NF4_CODEBOOK[b & 15], NF4_CODEBOOK[b >> 4]], dim=-1).to(dtype=dtype, device=device)


def _levels(codes: torch.Tensor, kind: str, dtype: torch.dtype) -> torch.Tensor:
    """Cache-layout codes (..., n_blocks, code_bytes) -> the unscaled levels (..., n_blocks, qb): int8 for q8_0
    and q4_0 (whose -8 is applied to the uint8 codes, wrapping to -8..7, so no float pass is spent on it), the
    codebook values for nf4, uint8 codes for the affine kinds."""
    if kind == "q8_0":
        return codes
    if kind == "q4_0":
        return _unpack_pairs(codes).sub_(8).view(torch.int8)
    if kind == "nf4":  # one lookup per byte of two codes (index_select with int32 indices: fastest on CPU)
        values = _nf4_pair_table(dtype, str(codes.device)).index_select(0, codes.int().reshape(-1))
        return values.view(*codes.shape[:-1], 2 * codes.shape[-1])
    return _unpack(codes, FORMATS[kind].bits)


def decode(
    scale: torch.Tensor, codes: torch.Tensor, kind: str, dtype=torch.float32, channels: int | None = None
) -> torch.Tensor:
    """scale and cache-layout codes as `encode` returns them -> values (..., n_blocks, qb).

    channels: the blocks come in groups of `channels`, one block per channel of qb tokens (a per-channel stream);
    the values are then returned token-major, (..., n_blocks / channels, qb, channels), transposed after scaling
    (a float transpose after contiguous passes measured twice as fast as converting through a transposed view).
    The scales multiply in place (a mixed int * float op is several times slower on CPU)."""
    fmt = _format(kind)
    scale = scale.to(dtype)
    scale = scale.unsqueeze(-1) if fmt.scales == 1 else scale  # (..., n_blocks, 1 or 2): d, and m
    values = _levels(codes, kind, dtype).to(dtype).mul_(scale[..., 0:1])
    values = values.add_(scale[..., 1:2]) if fmt.scales == 2 else values
    if channels is None:
        return values
    return values.unflatten(-2, (-1, channels)).transpose(-1, -2).contiguous()  # (..., groups, qb, channels)


def quantize_blocks(x: torch.Tensor, kind: str) -> torch.Tensor:
    """x (..., n*32) float -> uint8 (..., n, block_bytes): the block structs (fp16 scales first; llama.cpp's
    own for q8_0, q4_0 and q4_1)."""
    fmt = _format(kind)
    if x.shape[-1] % LLAMA_BLOCK:
        raise ValueError(f"last dim {x.shape[-1]} is not a multiple of {LLAMA_BLOCK}")
    scale, q = _codes(x.reshape(*x.shape[:-1], -1, LLAMA_BLOCK), kind)
    codes = q.view(torch.uint8) if fmt.bits == 8 else _llama_nibbles(q) if fmt.bits == 4 else _pack(q, fmt.bits)
    scale = scale.reshape(*q.shape[:-1], fmt.scales)
    scale_bytes = scale.contiguous().view(torch.uint8).reshape(*q.shape[:-1], 2 * fmt.scales)  # little-endian
    return torch.cat([scale_bytes, codes], dim=-1)


def dequantize_blocks(b: torch.Tensor, kind: str) -> torch.Tensor:
    """uint8 (..., n, block_bytes) -> float32 (..., n*32)."""
    fmt = _format(kind)
    if b.dtype != torch.uint8 or b.shape[-1] != block_bytes(kind):
        raise ValueError(f"{kind} blocks are uint8 (..., n, {block_bytes(kind)}), got {b.dtype} {tuple(b.shape)}")
    n_scale = 2 * fmt.scales
    scale = b[..., :n_scale].contiguous().view(torch.float16)
    scale = scale.squeeze(-1) if fmt.scales == 1 else scale
    codes = b[..., n_scale:].contiguous()
    if fmt.bits == 8:
        codes = codes.view(torch.int8)
    elif fmt.bits == 4:
        codes = _pack_pairs(_from_llama_nibbles(codes))
    return decode(scale, codes, kind).flatten(-2)
