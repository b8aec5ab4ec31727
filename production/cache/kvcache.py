"""The KV cache: per layer one stream per cached tensor, each of the kind its policy names
(docs/ARCHITECTURE.md, "KV cache").

- `PlainStream` stores fp16/bf16/fp32 values as they are.
- `QuantStream` stores a token-major flat sequence quantized in blocks of qb values: a stream of width D is
  quantized in groups of G = lcm(D, qb) / D tokens, so blocks may span tokens and nothing is padded. The
  newest `resid` tokens (plus any incomplete group) stay exact in an fp16 window.
- `ChannelQuantStream` (`+ch`) quantizes each channel over groups of G = qb tokens instead (KIVI).
- `LayerCache` holds one layer's streams and the rotations of its `+rot` streams; `KVCache` holds the layers,
  each with its own LayerPolicy; `nbytes()` equals `estimate_bytes()` exactly.

Every stream has the same contract: `append(x)` with x (B, T, D), `read(t0, t1, dtype)` -> (B, t1 - t0, D),
`nbytes()`. Values enter quantized streams rounded to fp16 first, so a token quantizes to the same bytes whether it
arrived in a prefill or a decode step (a rotated one up to the last fp32 bit of its rotation, a product computed
batched or alone). Plain streams store values in their own dtype.
"""

from __future__ import annotations

import math

import torch

from production.cache.formats import FORMATS
from production.cache.policy import KVPolicy, LayerPolicy, StreamSpec
from production.cache.quant import block_bytes, code_bytes, decode, encode
from production.cache.rotation import rotate, stream_rotation

# Tokens per attention chunk during decode. Big chunks mean few, large ops (8k-16k were fastest at 16k context
# on a 2-core CPU); the tuner's decode plan may choose per device and context.
DEFAULT_CHUNK_TOKENS = 8192
PLAIN_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}


class PlainStream:
    """Values stored as they are in fp16, bf16 or fp32: (B, max_seq, D)."""

    def __init__(self, spec: StreamSpec, batch: int, max_seq: int, width: int, device):
        self.spec, self.width, self.length = spec, width, 0
        self.data = torch.zeros(batch, max_seq, width, dtype=PLAIN_DTYPES[spec.kind], device=device)

    def append(self, x: torch.Tensor) -> None:
        T = x.shape[1]
        self.data[:, self.length : self.length + T] = x
        self.length += T

    def append_static(self, x: torch.Tensor, pos: torch.Tensor, n_q: torch.Tensor, flush: bool) -> None:
        """One token x (B, 1, D) written at the position held in device tensor `pos` (production.cache.static);
        the host's length is advanced by the caller."""
        self.data.index_copy_(1, pos, x.to(self.data.dtype))

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
        self.group = self.group_tokens(width, spec.qb)
        n_blocks = self.n_blocks(max_seq, width, spec.qb)
        fmt = FORMATS[spec.kind]
        scale_shape = (batch, n_blocks) if fmt.scales == 1 else (batch, n_blocks, fmt.scales)
        self.scale = torch.zeros(scale_shape, dtype=torch.float16, device=device)
        code_dtype = torch.int8 if fmt.bits == 8 else torch.uint8
        self.codes = torch.zeros(batch, n_blocks, code_bytes(spec.kind, spec.qb), dtype=code_dtype, device=device)
        self.window = torch.zeros(batch, resid + self.group - 1, width, dtype=torch.float16, device=device)
        self.length = self.n_q = 0

    @staticmethod
    def group_tokens(width: int, qb: int) -> int:
        """Tokens per quantization group: the fewest whole tokens whose values fill whole blocks."""
        return math.lcm(width, qb) // width

    @classmethod
    def n_blocks(cls, max_seq: int, width: int, qb: int) -> int:
        """Blocks for the whole groups that fit in max_seq tokens."""
        G = cls.group_tokens(width, qb)
        return (max_seq // G) * G * width // qb

    def to_blocks(self, x: torch.Tensor) -> torch.Tensor:
        """Whole groups of tokens (B, n, D) -> their blocks (B, n * D / qb, qb)."""
        return x.reshape(x.shape[0], -1, self.spec.qb)

    def decode_tokens(self, t0: int, t1: int, dtype: torch.dtype) -> torch.Tensor:
        """Quantized tokens [t0, t1) (t1 <= n_q) as (B, t1 - t0, D): the blocks covering values [t0*D, t1*D)."""
        D, qb = self.width, self.spec.qb
        b0, b1 = t0 * D // qb, -(-t1 * D // qb)
        values = decode(self.scale[:, b0:b1], self.codes[:, b0:b1], self.spec.kind, dtype).flatten(1)
        offset = t0 * D - b0 * qb
        return values[:, offset : offset + (t1 - t0) * D].view(-1, t1 - t0, D)

    def append(self, x: torch.Tensor) -> None:
        B, T, D = x.shape
        x = x.to(torch.float16)
        new_length = self.length + T
        new_n_q = max(0, new_length - self.resid) // self.group * self.group
        if new_n_q > self.n_q:  # some tokens leave the window: quantize them group by group
            pending = torch.cat([self.window[:, : self.length - self.n_q], x], dim=1)
            leaving = self.to_blocks(pending[:, : new_n_q - self.n_q].float())
            b0 = self.n_blocks(self.n_q, D, self.spec.qb)
            scale, codes = encode(leaving, self.spec.kind)
            self.scale[:, b0 : b0 + scale.shape[1]] = scale
            self.codes[:, b0 : b0 + codes.shape[1]] = codes
            kept = pending[:, new_n_q - self.n_q :]
            self.window[:, : kept.shape[1]] = kept
        else:
            self.window[:, self.length - self.n_q : new_length - self.n_q] = x
        self.length, self.n_q = new_length, new_n_q

    def flushes(self, length: int) -> bool:
        """Whether appending one token to `length` tokens quantizes a group (it always leaves `resid` behind)."""
        return length + 1 - self.resid >= self.group and (length + 1 - self.resid) % self.group == 0

    def append_static(self, x: torch.Tensor, pos: torch.Tensor, n_q: torch.Tensor, flush: bool) -> None:
        """One token x (B, 1, D) with every offset in device tensors (production.cache.static): `pos` the tokens
        before it, `n_q` the quantized tokens after it. Without a flush it goes to window slot pos - n_q. A flush
        happens exactly when the window holds resid + G - 1 tokens, so its shapes are fixed: the oldest G of the
        window and x are quantized into the blocks after n_q - G tokens, and the newest resid stay."""
        x = x.to(torch.float16)
        if not flush:
            self.window.index_copy_(1, pos - n_q, x)
            return
        G = self.group
        pending = torch.cat([self.window[:, : self.resid + G - 1], x], dim=1)
        scale, codes = encode(self.to_blocks(pending[:, :G].float()), self.spec.kind)
        n_blocks = scale.shape[1]
        blocks = (n_q - G) // G * n_blocks + torch.arange(n_blocks, device=n_q.device)
        self.scale.index_copy_(1, blocks, scale)
        self.codes.index_copy_(1, blocks, codes)
        self.window[:, : self.resid] = pending[:, G:]

    def read(self, t0: int, t1: int, dtype: torch.dtype) -> torch.Tensor:
        """Tokens [t0, t1) as (B, t1 - t0, D): dequantized blocks for the quantized part, the window after."""
        parts = []
        if t0 < self.n_q:
            parts.append(self.decode_tokens(t0, min(t1, self.n_q), dtype))
        if t1 > self.n_q:
            w0 = max(t0, self.n_q) - self.n_q
            parts.append(self.window[:, w0 : t1 - self.n_q].to(dtype))
        return parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)

    def nbytes(self) -> int:
        return self.scale.nbytes + self.codes.nbytes + self.window.nbytes

    def tensors(self) -> list[torch.Tensor]:
        return [self.scale, self.codes, self.window]

    @classmethod
    def estimate(cls, spec: StreamSpec, batch: int, max_seq: int, width: int, resid: int) -> int:
        G = cls.group_tokens(width, spec.qb)
        n_blocks = cls.n_blocks(max_seq, width, spec.qb)
        return batch * (n_blocks * block_bytes(spec.kind, spec.qb) + (resid + G - 1) * width * 2)


class ChannelQuantStream(QuantStream):
    """Per-channel blocks (KIVI, Liu et al. 2024): tokens are quantized in groups of G = qb, each channel of a
    group forming one block of its G values over time; a group's D blocks are stored channel by channel. Keys
    whose outliers sit in fixed channels keep their other channels' precision this way. The newest tokens that do
    not fill a group stay exact in the window, with the `resid` newest."""

    @staticmethod
    def group_tokens(width: int, qb: int) -> int:
        return qb

    def to_blocks(self, x: torch.Tensor) -> torch.Tensor:
        B, n, D = x.shape
        return x.view(B, n // self.group, self.group, D).transpose(2, 3).reshape(B, -1, self.group)

    def whole_groups(self, t0: int, t1: int) -> bool:
        """Whether tokens [t0, t1) are whole quantized groups (readable by read_groups)."""
        return t0 % self.group == 0 and t1 % self.group == 0 and t1 <= self.n_q

    def read_groups(self, t0: int, t1: int, dtype: torch.dtype) -> torch.Tensor:
        """Whole quantized groups of tokens [t0, t1) as stored, channel-major: (B, groups, D, G). Keys in this
        layout are already transposed for q @ k^T, so attention reads them without reordering
        (production.cache.attend)."""
        D, G = self.width, self.group
        scale, codes = self.scale[:, t0 // G * D : t1 // G * D], self.codes[:, t0 // G * D : t1 // G * D]
        return decode(scale, codes, self.spec.kind, dtype).view(-1, (t1 - t0) // G, D, G)

    def decode_tokens(self, t0: int, t1: int, dtype: torch.dtype) -> torch.Tensor:
        D, G = self.width, self.group
        g0, g1 = t0 // G, -(-t1 // G)
        scale, codes = self.scale[:, g0 * D : g1 * D], self.codes[:, g0 * D : g1 * D]
        tokens = decode(scale, codes, self.spec.kind, dtype, channels=D).view(-1, (g1 - g0) * G, D)
        return tokens[:, t0 - g0 * G : t1 - g0 * G]


def stream_class(spec: StreamSpec):
    if spec.plain:
        return PlainStream
    return ChannelQuantStream if spec.channel else QuantStream


def build_stream(spec: StreamSpec, batch: int, max_seq: int, width: int, device, resid: int):
    if spec.plain:
        return PlainStream(spec, batch, max_seq, width, device)
    return stream_class(spec)(spec, batch, max_seq, width, device, resid)


def stream_bytes(spec: StreamSpec, width: int, heads: int, batch: int, max_seq: int, resid: int) -> int:
    """Closed-form bytes of one stream of one layer: its buffers, plus the rotation matrices (heads, d, d) fp32
    of a rotated stream (derived from the seed; they do not grow with the context)."""
    rotation = 0 if spec.rot is None else heads * (width // heads) ** 2 * 4
    return stream_class(spec).estimate(spec, batch, max_seq, width, resid) + rotation


class LayerCache:
    """The streams of one layer, filled in lockstep. A rotated stream (`+rot`) stores each head's values times
    its rotation (`rotations[name]`, (heads, d, d)); attention rotates the queries of a rotated key stream and
    rotates back the output over a rotated value stream (production.cache.attend). Attention reads the streams
    `chunk_tokens` tokens at a time with the matmul strategy `impl`; with impl "triton", `split_tokens` tokens
    per program of the fused kernel (None: its default)."""

    def __init__(
        self,
        policy: LayerPolicy,
        widths: dict[str, int],
        heads: int,
        batch: int,
        max_seq: int,
        device=None,
        chunk_tokens: int = DEFAULT_CHUNK_TOKENS,
        impl: str = "auto",
        layer: int = 0,
    ):
        self.streams = {
            name: build_stream(policy.streams[name], batch, max_seq, width, device, policy.resid)
            for name, width in widths.items()
        }
        self.rotations = {
            name: stream_rotation(heads, width // heads, spec.rot, layer, name).to(device)
            for name, width in widths.items()
            if (spec := policy.streams[name]).rot is not None
        }
        self.max_seq, self.chunk_tokens, self.impl = max_seq, chunk_tokens, impl
        self.split_tokens: int | None = None
        self.step = None  # a LayerStep while static decode steps run (production.cache.static)

    @property
    def length(self) -> int:
        return next(iter(self.streams.values())).length

    def chunks(self) -> list[tuple[int, int]]:
        """Token ranges covering [0, length) for attention: `chunk_tokens` at a time over the part every stream
        holds quantized (pure dequantization, ending on a whole group of every per-channel stream), then the rest
        in one final range."""
        n = self.length
        split = min([s.n_q for s in self.streams.values() if isinstance(s, QuantStream)], default=n)
        groups = [s.group for s in self.streams.values() if isinstance(s, ChannelQuantStream)]
        split -= split % math.lcm(*groups) if groups else 0
        bounds = sorted({*range(0, split, self.chunk_tokens), split, n} - {0} | {0})
        return [(a, b) for a, b in zip(bounds, bounds[1:], strict=False) if b > a]

    def append(self, values: dict[str, torch.Tensor]) -> None:
        """values: stream name -> (B, T, D) for every stream of the layer (rotated here where the policy says).
        With a static step attached (production.cache.static), one token at the offsets of its device counters."""
        T = next(iter(values.values())).shape[1]
        if self.step is None and self.length + T > self.max_seq:
            raise ValueError(f"KV cache full: {self.length} + {T} tokens > max_seq {self.max_seq}")
        for name, stream in self.streams.items():
            R = self.rotations.get(name)
            x = values[name] if R is None else rotate(values[name], R)
            if self.step is None:
                stream.append(x)
            else:
                stream.append_static(x, self.step.pos, self.step.n_q[name], self.step.flush[name])

    def tensors(self) -> list[torch.Tensor]:
        return [t for s in self.streams.values() for t in s.tensors()] + list(self.rotations.values())

    def nbytes(self) -> int:
        return sum(t.nbytes for t in self.tensors())


class KVCache:
    """Per-layer caches for one model, preallocated for max_seq tokens of `batch` sequences. `heads` is the
    number of K/V heads (every stream is `heads` heads wide)."""

    def __init__(
        self,
        policy: KVPolicy,
        widths: dict[str, int],
        heads: int,
        batch: int,
        max_seq: int,
        device=None,
        chunk_tokens: int = DEFAULT_CHUNK_TOKENS,
        impl: str = "auto",
    ):
        self.policy, self.widths, self.heads, self.batch, self.max_seq = policy, widths, heads, batch, max_seq
        self.layers = [
            LayerCache(layer, widths, heads, batch, max_seq, device, chunk_tokens, impl, i)
            for i, layer in enumerate(policy.layers)
        ]

    @property
    def length(self) -> int:
        return self.layers[0].length

    def nbytes(self) -> int:
        return sum(layer.nbytes() for layer in self.layers)


@torch.no_grad()
def fill_random(cache: KVCache, n_tokens: int, seed: int = 0, chunk: int = 4096) -> None:
    """Append n_tokens of unit-normal K/V to every layer, drawn on the cache's device (for benchmarks: decode cost
    does not depend on values)."""
    device = cache.layers[0].streams[next(iter(cache.widths))].tensors()[0].device
    generator = torch.Generator(device).manual_seed(seed)
    for layer in cache.layers:
        for t0 in range(0, n_tokens, chunk):
            T = min(chunk, n_tokens - t0)
            layer.append(
                {
                    name: torch.randn(cache.batch, T, width, generator=generator, device=device)
                    for name, width in cache.widths.items()
                }
            )


def estimate_bytes(policy: KVPolicy, widths: dict[str, int], heads: int, batch: int, max_seq: int, streams=None) -> int:
    """Closed-form bytes of a KVCache (of its `streams` only, if given): equals KVCache(...).nbytes() exactly."""
    return sum(
        stream_bytes(layer.streams[name], width, heads, batch, max_seq, layer.resid)
        for layer in policy.layers
        for name, width in widths.items()
        if streams is None or name in streams
    )
