"""The block formats a KV-cache stream can be quantized in: what each block holds (needs no torch, so policies
are checked before torch is imported).

A block of qb values stores fp16 scales and qb codes of `bits` bits:
- symmetric formats (`scales` = 1) store d: q8_0 and q4_0 (llama.cpp) and nf4 (QLoRA's codebook);
- affine formats (`scales` = 2) store d and the block minimum m, value = m + q * d: q4_1 (llama.cpp) and this
  project's 3- and 2-bit siblings q3_1 and q2_1, which follow q4_1's recipe with 8 and 4 levels.
q8_0, q4_0 and q4_1 are bit-exact with llama.cpp's reference quantizers (production.cache.quant).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class BlockFormat:
    bits: int  # bits per code
    scales: int  # fp16 numbers per block: 1 (d) or 2 (d, m)
    qb_multiple: int  # block sizes must be multiples of this, so codes fill whole bytes

    def code_bytes(self, qb: int) -> int:
        return qb * self.bits // 8

    def block_bytes(self, qb: int) -> int:
        return 2 * self.scales + self.code_bytes(qb)


FORMATS = {
    "q8_0": BlockFormat(bits=8, scales=1, qb_multiple=2),
    "q4_0": BlockFormat(bits=4, scales=1, qb_multiple=2),
    "q4_1": BlockFormat(bits=4, scales=2, qb_multiple=2),
    "nf4": BlockFormat(bits=4, scales=1, qb_multiple=2),
    "q3_1": BlockFormat(bits=3, scales=2, qb_multiple=8),
    "q2_1": BlockFormat(bits=2, scales=2, qb_multiple=4),
}
QUANT_KINDS = tuple(FORMATS)
