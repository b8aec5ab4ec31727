"""Block formats against an independent scalar transcription of llama.cpp's reference quantizers
(`quantize_row_q8_0_ref`, `quantize_row_q4_0_ref`, `quantize_row_q4_1_ref` in ggml-quants.c), written here with
numpy float32 scalars; q3_1 and q2_1 (this project's formats) against the same recipe and their documented
byte layout."""

import math
import struct

import numpy as np
import pytest
import torch

from production.cache.quant import NF4_CODEBOOK, block_bytes, decode, dequantize_blocks, encode, quantize_blocks

f32 = np.float32


def c_float_to_int(v: np.float32) -> int:
    """C's (int) conversion of a float on x86: truncation; non-finite gives INT_MIN, whose low byte is 0."""
    return int(v) if math.isfinite(v) else -(2**31)


def ref_q8_0_block(x: np.ndarray) -> bytes:
    amax = f32(0.0)
    for v in x:
        amax = max(amax, f32(abs(v)))
    d = f32(amax / f32(127))
    with np.errstate(divide="ignore", over="ignore", invalid="ignore"):
        inv = f32(f32(1.0) / d) if d != 0 else f32(0.0)
        qs = []
        for v in x:
            x0 = f32(v * inv)
            r = math.copysign(math.floor(abs(float(x0)) + 0.5), float(x0)) if math.isfinite(x0) else x0  # roundf
            qs.append(c_float_to_int(r) & 0xFF)
    with np.errstate(over="ignore"):  # fp16 overflow to inf is part of the reference behaviour
        return np.float16(d).tobytes() + bytes(qs)


def ref_q4_0_block(x: np.ndarray) -> bytes:
    amax, mx = f32(0.0), f32(0.0)
    for v in x:
        if amax < abs(v):
            amax, mx = f32(abs(v)), f32(v)
    d = f32(mx / f32(-8))
    out = bytearray(16)
    with np.errstate(divide="ignore", over="ignore", invalid="ignore"):
        inv = f32(f32(1.0) / d) if d != 0 else f32(0.0)
        for j in range(16):
            x0, x1 = f32(x[j] * inv), f32(x[16 + j] * inv)
            xi0 = min(15, struct.unpack("b", bytes([c_float_to_int(f32(x0 + f32(8.5))) & 0xFF]))[0])
            xi1 = min(15, struct.unpack("b", bytes([c_float_to_int(f32(x1 + f32(8.5))) & 0xFF]))[0])
            out[j] = (xi0 & 0xFF) | ((xi1 << 4) & 0xFF)
    with np.errstate(over="ignore"):
        return np.float16(d).tobytes() + bytes(out)


def ref_affine_codes(x: np.ndarray, bits: int) -> tuple[bytes, list[int]]:
    """quantize_row_q4_1_ref's recipe with 2^bits levels: (fp16 d and m bytes, codes)."""
    lo, hi = f32(np.finfo(np.float32).max), f32(-np.finfo(np.float32).max)
    for v in x:
        if v < lo:
            lo = f32(v)
        if v > hi:
            hi = f32(v)
    top = 2**bits - 1
    with np.errstate(divide="ignore", over="ignore", invalid="ignore"):
        d = f32(f32(hi - lo) / f32(top))
        inv = f32(f32(1.0) / d) if d != 0 else f32(0.0)
        codes = []
        for v in x:
            x0 = f32(f32(v - lo) * inv)
            codes.append(min(top, struct.unpack("b", bytes([c_float_to_int(f32(x0 + f32(0.5))) & 0xFF]))[0]))
        return np.float16(d).tobytes() + np.float16(lo).tobytes(), codes


def ref_q4_1_block(x: np.ndarray) -> bytes:
    scales, q = ref_affine_codes(x, 4)
    return scales + bytes((q[j] & 0xFF) | ((q[16 + j] << 4) & 0xFF) for j in range(16))


def ref_q3_1_block(x: np.ndarray) -> bytes:
    """The low two bits of code 4j + i at bits 2i .. 2i+1 of byte j (8 bytes), then the high bit of code 8j + i at
    bit i of byte 8 + j (4 bytes)."""
    scales, q = ref_affine_codes(x, 3)
    low = bytes(sum((q[4 * j + i] & 3) << (2 * i) for i in range(4)) for j in range(8))
    high = bytes(sum((q[8 * j + i] >> 2) << i for i in range(8)) for j in range(4))
    return scales + low + high


def ref_q2_1_block(x: np.ndarray) -> bytes:
    """Code 4j + i in bits 2i .. 2i+1 of byte j."""
    scales, q = ref_affine_codes(x, 2)
    return scales + bytes(sum(q[4 * j + i] << (2 * i) for i in range(4)) for j in range(8))


REFERENCE = {
    "q8_0": ref_q8_0_block,
    "q4_0": ref_q4_0_block,
    "q4_1": ref_q4_1_block,
    "q3_1": ref_q3_1_block,
    "q2_1": ref_q2_1_block,
}


def adversarial_blocks() -> np.ndarray:
    rng = np.random.default_rng(0)
    blocks = [
        np.zeros(32),  # all zero
        -np.zeros(32),  # all negative zero
        np.r_[-3.0, 3.0, rng.uniform(-1, 1, 30)],  # tie for the largest magnitude, negative first
        np.r_[3.0, -3.0, rng.uniform(-1, 1, 30)],
        np.full(32, 7.0),  # constant
        np.r_[1e-40, -2e-41, np.zeros(30)],  # subnormal: 1/d overflows to inf
        rng.uniform(-1, 1, 32) * 1e-38,  # around the smallest normal
        rng.uniform(-1, 1, 32) * 3e-37,
        rng.uniform(-1, 1, 32) * 1e36,  # scale overflows fp16 to inf
        np.r_[3.4e38, -3.4e38, rng.uniform(-1, 1, 30)],  # near FLT_MAX
        np.r_[1.0, np.full(31, 0.5)],  # values landing on .5 after scaling
        np.r_[127.0, np.arange(31) - 15.5],  # q8_0: d = 1, exact halves -15.5 .. 14.5 round away from zero
        np.r_[-8.0, np.arange(31) / 2 - 7.5],  # q4_0: d = 1, x + 8.5 lands on integers and halves
        np.r_[127.0, 0.49999997, -0.49999997, 2.4999998, np.zeros(28)],  # just below .5: floor(x + .5) traps
        np.arange(32) - 15.5,
        np.linspace(-8, 8, 32),
        np.r_[65504.0 * 127, rng.uniform(-1, 1, 31)],
        np.r_[0.0, -0.0, np.ones(30)],  # min is a zero: the first one found, with its sign
        np.r_[-0.0, 0.0, -np.ones(30)],
        np.r_[0.0, np.arange(31) / 2],  # q4_1: d = 1, (x - m) + 0.5 lands on integers and halves
        np.r_[-3.0, 0.0, np.full(30, 3.0)],  # q2_1 / q3_1: exact midpoints between levels
    ]
    return np.stack(blocks).astype(np.float32)


def random_blocks(n=300) -> np.ndarray:
    rng = np.random.default_rng(1)
    scales = 10.0 ** rng.uniform(-6, 4, size=(n, 1))
    x = rng.standard_normal((n, 32)) * scales
    x[::7] = rng.standard_t(2, size=(len(x[::7]), 32))  # heavy tails
    x[::11] = np.round(x[::11] * 4) / 4  # exact quarter values: ties after scaling
    return x.astype(np.float32)


@pytest.mark.parametrize("kind", ["q8_0", "q4_0", "q4_1", "q3_1", "q2_1"])
@pytest.mark.parametrize("source", ["adversarial", "random"])
def test_bytes_equal_llama_cpp_reference(kind, source):
    x = adversarial_blocks() if source == "adversarial" else random_blocks()
    got = quantize_blocks(torch.from_numpy(x.reshape(1, -1)), kind)[0].numpy()
    assert got.shape == (len(x), block_bytes(kind))
    for i, block in enumerate(x):
        assert got[i].tobytes() == REFERENCE[kind](block), (kind, i, block[:4])


def test_block_sizes_match_llama_cpp_structs():
    assert (block_bytes("q8_0"), block_bytes("q4_0"), block_bytes("nf4"), block_bytes("q4_1")) == (34, 18, 18, 20)
    assert (block_bytes("q3_1"), block_bytes("q2_1"), block_bytes("q2_1", 128), block_bytes("q3_1", 64)) == (
        16,
        12,
        36,
        28,
    )  # 4 bytes of fp16 d and m, then 3 or 2 bits per value


def test_q4_0_nibble_order_and_round_trip_of_representable_values():
    d = 0.25
    q = np.r_[np.arange(16), 15 - np.arange(16)]  # value j has code j, value j + 16 has code 15 - j
    x = torch.tensor((q - 8) * d, dtype=torch.float32)  # x[0] = -2 is the largest magnitude: d = -2 / -8
    b = quantize_blocks(x, "q4_0")[0]
    assert [(byte & 0x0F, byte >> 4) for byte in b[2:].tolist()] == [(j, 15 - j) for j in range(16)]
    torch.testing.assert_close(dequantize_blocks(b[None], "q4_0"), x, atol=0, rtol=0)


def test_affine_formats_reach_every_level_and_round_trip_them_exactly():
    for kind, bits in (("q4_1", 4), ("q3_1", 3), ("q2_1", 2)):
        levels = 2**bits
        q = np.arange(32) % levels
        x = torch.tensor(-1.5 + 0.25 * q, dtype=torch.float32)  # m = -1.5, d = 0.25: every level used
        torch.testing.assert_close(dequantize_blocks(quantize_blocks(x, kind), kind), x, atol=0, rtol=0)


@pytest.mark.parametrize(
    "kind,rel_bound",
    [("q8_0", 0.5 / 127), ("q4_0", 1 / 8), ("nf4", 0.17), ("q4_1", 1 / 15), ("q3_1", 1 / 7), ("q2_1", 1 / 3)],
)
def test_round_trip_error_within_format_bound(kind, rel_bound):
    torch.manual_seed(0)
    x = torch.randn(64, 256) * torch.logspace(-3, 3, 64)[:, None]
    y = dequantize_blocks(quantize_blocks(x, kind), kind)
    absmax = x.view(64, -1, 32).abs().amax(-1, keepdim=True)
    err = ((y - x).view(64, -1, 32).abs() / absmax).max().item()
    # q8_0: half a step of amax/127 (plus fp16 scale rounding); q4_0: half a step of amax/8, except a full step
    # at the far end opposite the max element (levels reach only +7d); nf4: half the widest codebook gap;
    # affine kinds: half a step of (max - min) / (2^bits - 1), at most a step of 2 amax / (2^bits - 1)
    assert err <= rel_bound + 2e-3, err


def test_nf4_codebook_and_exact_levels():
    assert NF4_CODEBOOK.shape == (16,) and NF4_CODEBOOK[0] == -1 and NF4_CODEBOOK[7] == 0 and NF4_CODEBOOK[-1] == 1
    x = (NF4_CODEBOOK.repeat(2) * 2.0).view(1, 32)  # scale 2: every level is representable
    scale, codes = encode(x.view(1, 1, 32), "nf4")
    torch.testing.assert_close(decode(scale, codes, "nf4").view(1, 32), x, atol=1e-6, rtol=0)


@pytest.mark.parametrize("qb", [16, 64, 128])
def test_other_block_sizes_round_trip(qb):
    torch.manual_seed(0)
    x = torch.randn(3, 10, qb)
    for kind in ("q8_0", "q4_0", "nf4", "q4_1", "q3_1", "q2_1"):
        scale, codes = encode(x, kind)
        assert scale.shape == ((3, 10) if kind in ("q8_0", "q4_0", "nf4") else (3, 10, 2))
        assert codes.shape[-1] == block_bytes(kind, qb) - 2 * (scale.dim() - 1)
        bound = {"q3_1": 0.3, "q2_1": 0.7}.get(kind, 0.2)
        assert (decode(scale, codes, kind) - x).abs().max() < x.abs().max() * bound


def test_bad_shapes_are_errors():
    with pytest.raises(ValueError, match="multiple of 32"):
        quantize_blocks(torch.zeros(40), "q8_0")
    with pytest.raises(ValueError, match="unknown quantization kind"):
        quantize_blocks(torch.zeros(32), "q3_k")
    with pytest.raises(ValueError, match="uint8"):
        dequantize_blocks(torch.zeros(2, 34), "q8_0")
