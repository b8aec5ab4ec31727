"""Static one-token decode steps: every position a step reads or writes is held in device tensors, so the step's
kernels are the same at every length and one captured CUDA graph replays for all steps of a context bucket
(production.sample.graphs captures and replays them; this module makes the cache ready for it).

While a `StaticStep` is attached, each layer's cache appends the new token with `append_static` (offsets from
the counters) and attention runs the fused kernel with its counts read from memory over a fixed number of splits
(the bucket's; the splits past the cached tokens are empty and weigh nothing). Whether a quantized stream
flushes a group at this step depends only on its length, so the host knows it: a step's graph is keyed by its
bucket and its flush pattern. The host mirrors the lengths and advances them after each step.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from production.cache.kvcache import KVCache, QuantStream


def context_bucket(n: int) -> int:
    """The next power of two of n (at least 1024): steps whose lengths share it share one captured graph."""
    return max(1024, 1 << max(0, n - 1).bit_length())


@dataclass
class LayerStep:
    """What one layer's cache reads during a static step: device counters (views into StaticStep.counters) and
    the host's flush flags and bucket of the step."""

    pos: torch.Tensor  # (1,) int64: tokens before the new one
    n: torch.Tensor  # (1,) int64: tokens after it
    n_q: dict[str, torch.Tensor]  # stream -> (1,) int64: its quantized tokens after the step (0 for plain streams)
    flush: dict[str, bool] = field(default_factory=dict)
    bucket: int = 0


class StaticStep:
    """Counters of a static decode step for every layer of `cache`, attached to its layers until `detach()`."""

    def __init__(self, cache: KVCache):
        self.cache = cache
        self.names = list(cache.widths)
        device = cache.layers[0].streams[self.names[0]].tensors()[0].device
        size = 2 + len(cache.layers) * len(self.names)
        self.counters = torch.zeros(size, dtype=torch.int64, device=device)
        self.host = torch.zeros(size, dtype=torch.int64, pin_memory=device.type == "cuda")
        for i, layer in enumerate(cache.layers):
            base = 2 + i * len(self.names)
            n_q = {name: self.counters[base + j : base + j + 1] for j, name in enumerate(self.names)}
            layer.step = LayerStep(self.counters[0:1], self.counters[1:2], n_q)

    def prepare(self) -> tuple[int, tuple[bool, ...]]:
        """Set the counters for appending one token now; returns the step's graph key (bucket, flush pattern)."""
        n = self.cache.length
        if n + 1 > self.cache.max_seq:
            raise ValueError(f"KV cache full: {n} + 1 tokens > max_seq {self.cache.max_seq}")
        bucket = min(context_bucket(n + 1), self.cache.max_seq)
        self.host[0], self.host[1] = n, n + 1
        pattern = []
        for i, layer in enumerate(self.cache.layers):
            for j, name in enumerate(self.names):
                stream = layer.streams[name]
                flush = isinstance(stream, QuantStream) and stream.flushes(n)
                layer.step.flush[name] = flush
                self.host[2 + i * len(self.names) + j] = (
                    stream.n_q + stream.group if flush else getattr(stream, "n_q", 0)
                )
                pattern.append(flush)
            layer.step.bucket = bucket
        self.counters.copy_(self.host)
        return bucket, tuple(pattern)

    def advance(self) -> None:
        """Mirror the step on the host: one more token everywhere, a group more quantized where it flushed."""
        for layer in self.cache.layers:
            for name, stream in layer.streams.items():
                stream.length += 1
                if layer.step.flush[name]:
                    stream.n_q += stream.group

    def detach(self) -> None:
        for layer in self.cache.layers:
            layer.step = None
