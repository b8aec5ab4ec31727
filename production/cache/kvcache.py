"""The KV cache: per layer one stream per cached tensor, each of the kind its policy names
(docs/ARCHITECTURE.md, "KV cache").

- `PlainStream` stores fp16/bf16/fp32 values as they are.
- `QuantStream` stores a token-major flat sequence quantized in blocks of qb values: a stream of width D is
  quantized in groups of G = lcm(D, qb) / D tokens, so blocks may span tokens and nothing is padded. The
  newest `resid` tokens (plus any incomplete group) stay exact in an fp16 window.
- `KVCache` holds the layers; `nbytes()` equals `estimate_bytes()` exactly.

Every stream has the same contract: `append(x)` with x (B, T, D), `read(t0, t1, dtype)` -> (B, t1 - t0, D),
`nbytes()`. Values enter quantized streams rounded to fp16 first, so a token quantizes to the same bytes whether it
arrived in a prefill or a decode step. Plain streams store values in their own dtype.
"""

from __future__ import annotations

import math

import torch

from production.cache.policy import KVPolicy, StreamSpec
from production.cache.quant import block_bytes, code_bytes, decode, encode

# Tokens per attention chunk during decode. Big chunks mean few, large ops (8k-16k were fastest at 16k context
# on a 2-core CPU); the tuner's decode plan may choose per device and context.
DEFAULT_CHUNK_TOKENS = 8192
PLAIN_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}


def group_tokens(width: int, qb: int) -> int:
    """Tokens per quantization group: the fewest whole tokens whose values fill whole blocks."""
    return math.lcm(width, qb) // width


class PlainStream:
    """Values stored as they are in fp16, bf16 or fp32: (B, max_seq, D)."""

    def __init__(self, spec: StreamSpec, batch: int, max_seq: int, width: int, device):
        self.spec, self.width, self.length = spec, width, 0
        self.data = torch.zeros(batch, max_seq, width, dtype=PLAIN_DTYPES[spec.kind], device=device)

    def append(self, x: torch.Tensor) -> None:
        T = x.shape[1]
        self.data[:, self.length : self.length + T] = x
        self.length += T

    def read(self, t0: int, t1: int, dtype: torch.dtype) -> torch.Tensor:
        return self.data[:, t0:t1].to(dtype)

    def nbytes(self) -> int:
        return self.data.nbytes

    def tensors(self) -> list[torch.Tensor]:
        return [self.data]

    @staticmethod
    def estimate(spec: StreamSpec, batch: int, max_seq: int, width: int, resid: int) -> int:
        return batch * max_seq * width * PLAIN_DTYPES[spec.kind].itemsize


class QuantStream:
    """Token-major flat blocks for tokens [0, n_q) plus an exact fp16 window for tokens [n_q, length).

    n_q is the largest multiple of the group size G that leaves at least `resid` tokens in the window, so the
    window holds between resid and resid + G - 1 tokens (fewer only at the start)."""

    def __init__(self, spec: StreamSpec, batch: int, max_seq: int, width: int, device, resid: int):
        self.spec, self.width, self.resid = spec, width, resid
        self.group = group_tokens(width, spec.qb)
        n_blocks = (max_seq // self.group) * self.group * width // spec.qb
        self.scale = torch.zeros(batch, n_blocks, dtype=torch.float16, device=device)
        code_dtype = torch.int8 if spec.kind == "q8_0" else torch.uint8
        self.codes = torch.zeros(batch, n_blocks, code_bytes(spec.kind, spec.qb), dtype=code_dtype, device=device)
        self.window = torch.zeros(batch, resid + self.group - 1, width, dtype=torch.float16, device=device)
        self.length = self.n_q = 0

    def append(self, x: torch.Tensor) -> None:
        B, T, D = x.shape
        x = x.to(torch.float16)
        new_length = self.length + T
        new_n_q = max(0, new_length - self.resid) // self.group * self.group
        if new_n_q > self.n_q:  # some tokens leave the window: quantize them group by group
            pending = torch.cat([self.window[:, : self.length - self.n_q], x], dim=1)
            leaving = pending[:, : new_n_q - self.n_q].float().reshape(B, -1, self.spec.qb)
            b0 = self.n_q * D // self.spec.qb
            scale, codes = encode(leaving, self.spec.kind)
            self.scale[:, b0 : b0 + scale.shape[1]] = scale
            self.codes[:, b0 : b0 + codes.shape[1]] = codes
            kept = pending[:, new_n_q - self.n_q :]
            self.window[:, : kept.shape[1]] = kept
        else:
            self.window[:, self.length - self.n_q : new_length - self.n_q] = x
        self.length, self.n_q = new_length, new_n_q

    def read(self, t0: int, t1: int, dtype: torch.dtype) -> torch.Tensor:
        """Tokens [t0, t1) as (B, t1 - t0, D): dequantized blocks for the quantized part, the window after."""
        parts = []
        if t0 < self.n_q:
            q1 = min(t1, self.n_q)
            D, qb = self.width, self.spec.qb
            b0, b1 = t0 * D // qb, -(-q1 * D // qb)  # the blocks covering values [t0*D, q1*D)
            values = decode(self.scale[:, b0:b1], self.codes[:, b0:b1], self.spec.kind, dtype).flatten(1)
            offset = t0 * D - b0 * qb
            parts.append(values[:, offset : offset + (q1 - t0) * D].view(-1, q1 - t0, D))
        if t1 > self.n_q:
            w0 = max(t0, self.n_q) - self.n_q
            parts.append(self.window[:, w0 : t1 - self.n_q].to(dtype))
        return parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)

    def nbytes(self) -> int:
        return self.scale.nbytes + self.codes.nbytes + self.window.nbytes

    def tensors(self) -> list[torch.Tensor]:
        return [self.scale, self.codes, self.window]

    @staticmethod
    def estimate(spec: StreamSpec, batch: int, max_seq: int, width: int, resid: int) -> int:
        G = group_tokens(width, spec.qb)
        n_blocks = (max_seq // G) * G * width // spec.qb
        return batch * (n_blocks * block_bytes(spec.kind, spec.qb) + (resid + G - 1) * width * 2)


def stream_class(spec: StreamSpec):
    return PlainStream if spec.plain else QuantStream


def build_stream(spec: StreamSpec, batch: int, max_seq: int, width: int, device, resid: int):
    if spec.plain:
        return PlainStream(spec, batch, max_seq, width, device)
    return QuantStream(spec, batch, max_seq, width, device, resid)


class LayerCache:
    """The streams of one layer, filled in lockstep. Attention reads them `chunk_tokens` tokens at a time with
    the matmul strategy `impl` (see production.cache.attend)."""

    def __init__(
        self,
        policy: KVPolicy,
        widths: dict[str, int],
        batch: int,
        max_seq: int,
        device=None,
        chunk_tokens: int = DEFAULT_CHUNK_TOKENS,
        impl: str = "auto",
    ):
        self.streams = {
            name: build_stream(policy.streams[name], batch, max_seq, width, device, policy.resid)
            for name, width in widths.items()
        }
        self.max_seq, self.chunk_tokens, self.impl = max_seq, chunk_tokens, impl

    @property
    def length(self) -> int:
        return next(iter(self.streams.values())).length

    def chunks(self) -> list[tuple[int, int]]:
        """Token ranges covering [0, length) for attention: `chunk_tokens` at a time over the part every stream
        holds quantized (pure dequantization), then the exact windows in one final range."""
        n = self.length
        split = min([s.n_q for s in self.streams.values() if isinstance(s, QuantStream)], default=n)
        bounds = sorted({*range(0, split, self.chunk_tokens), split, n} - {0} | {0})
        return [(a, b) for a, b in zip(bounds, bounds[1:], strict=False) if b > a]

    def append(self, values: dict[str, torch.Tensor]) -> None:
        """values: stream name -> (B, T, D) for every stream of the layer."""
        T = next(iter(values.values())).shape[1]
        if self.length + T > self.max_seq:
            raise ValueError(f"KV cache full: {self.length} + {T} tokens > max_seq {self.max_seq}")
        for name, stream in self.streams.items():
            stream.append(values[name])

    def nbytes(self) -> int:
        return sum(s.nbytes() for s in self.streams.values())


class KVCache:
    """Per-layer caches for one model, preallocated for max_seq tokens of `batch` sequences."""

    def __init__(
        self,
        policy: KVPolicy,
        widths: dict[str, int],
        n_layer: int,
        batch: int,
        max_seq: int,
        device=None,
        chunk_tokens: int = DEFAULT_CHUNK_TOKENS,
        impl: str = "auto",
    ):
        self.policy, self.widths, self.batch, self.max_seq = policy, widths, batch, max_seq
        self.layers = [LayerCache(policy, widths, batch, max_seq, device, chunk_tokens, impl) for _ in range(n_layer)]

    @property
    def length(self) -> int:
        return self.layers[0].length

    def nbytes(self) -> int:
        return sum(layer.nbytes() for layer in self.layers)

    def nbytes_by_stream(self) -> dict[str, int]:
        return {name: sum(layer.streams[name].nbytes() for layer in self.layers) for name in self.widths}


@torch.no_grad()
def fill_random(cache: KVCache, n_tokens: int, generator: torch.Generator, chunk: int = 4096) -> None:
    """Append n_tokens of unit-normal K/V to every layer (for benchmarks: decode cost does not depend on values)."""
    device = cache.layers[0].streams[next(iter(cache.widths))].tensors()[0].device
    for layer in cache.layers:
        for t0 in range(0, n_tokens, chunk):
            T = min(chunk, n_tokens - t0)
            values = {
                name: torch.randn(cache.batch, T, width, generator=generator) for name, width in cache.widths.items()
            }
            layer.append({name: v.to(device) for name, v in values.items()})


def estimate_bytes(policy: KVPolicy, widths: dict[str, int], n_layer: int, batch: int, max_seq: int) -> int:
    """Closed-form bytes of a KVCache: equals KVCache(...).nbytes() exactly."""
    return n_layer * sum(
        stream_class(policy.streams[name]).estimate(policy.streams[name], batch, max_seq, width, policy.resid)
        for name, width in widths.items()
    )
