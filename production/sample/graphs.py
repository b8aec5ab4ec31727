"""One-token decode steps replayed from CUDA graphs, so kernel launches do not dominate a step at batch 1.

A decode step launches a few hundred small kernels (per layer: projections, RoPE, the cache append, the fused
attention kernel, the split merge, the MLP); at batch 1 the GPU finishes each faster than Python launches it.
`GraphedDecoder` runs steps as static steps (production.cache.static: every position in device counters, the
attention over the bucket's fixed splits) and captures one CUDA graph per (context bucket, flush pattern) the
first time it meets one: that step runs for real on a side stream (warming up kernels and allocator), then the
same step is recorded; later steps with the key copy the token and counters in and replay. Without capture
(`capture=False`, and on CPU) the static steps run eagerly: the tests check them against ordinary steps.
"""

from __future__ import annotations

import contextlib

import torch

from production.cache import triton_decode
from production.cache.kvcache import KVCache
from production.cache.static import StaticStep
from production.model.gpt import GPT


class GraphedDecoder:
    """Decode steps for `cache` (prompt already prefilled) through the fused kernel, captured as CUDA graphs."""

    def __init__(self, model: GPT, cache: KVCache, autocast=None, capture: bool | None = None):
        """autocast: the run's autocast factory (or None); its dtype is reused with autocast's weight cache off,
        since cached casts made outside a capture would be freed under the graph. Call the decoder outside any
        autocast."""
        device = model.wte.weight.device
        if not triton_decode.available(device):
            raise ValueError("static decode steps run the fused kernel: " + triton_decode.why_unavailable(device))
        self.model, self.cache, self.device_type = model, cache, device.type
        self.autocast = contextlib.nullcontext
        if autocast is not None:
            with autocast():
                enabled, dtype = torch.is_autocast_enabled(device.type), torch.get_autocast_dtype(device.type)
            if enabled:
                self.autocast = lambda: torch.autocast(device.type, dtype=dtype, cache_enabled=False)
        self.capture = device.type == "cuda" if capture is None else capture
        if model.rotary is not None:
            model.rotary(0, cache.max_seq)  # RoPE tables for every position, built now, outside any capture
        self.token = torch.zeros(cache.batch, 1, dtype=torch.long, device=device)
        self.step = StaticStep(cache)
        self.graphs: dict[tuple, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self.pool = torch.cuda.graph_pool_handle() if self.capture else None

    def _forward(self) -> torch.Tensor:
        with self.autocast():
            return self.model(self.token, cache=self.cache, last_only=True)[0]

    @torch.no_grad()
    def __call__(self, token: torch.Tensor) -> torch.Tensor:
        """token (B, 1) -> logits (B, 1, vocab) of the next position; the token joins the cache."""
        if self.capture and torch.is_autocast_enabled(self.device_type):
            raise RuntimeError("call GraphedDecoder outside autocast: it applies the run's own, without weight caching")
        key = self.step.prepare()
        self.token.copy_(token)
        if not self.capture:
            logits = self._forward()
        elif key in self.graphs:
            graph, out = self.graphs[key]
            graph.replay()
            logits = out.clone()
        else:
            logits = self._run_and_capture(key)
        self.step.advance()
        return logits

    def _run_and_capture(self, key: tuple) -> torch.Tensor:
        """Run this step for real on a side stream, then record it (recording executes nothing)."""
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            logits = self._forward().clone()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            out = self._forward()
        self.graphs[key] = (graph, out)
        return logits

    def close(self) -> None:
        """Back to ordinary steps (the cache stays valid: the host mirrored every static step)."""
        self.step.detach()
        self.graphs.clear()
