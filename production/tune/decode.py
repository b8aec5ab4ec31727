"""Decode plan: the fastest way to read this cache on this device, measured on the live cache and remembered.

Candidates are the cached-attention matmul strategies (production.cache.attend.IMPLS) times chunk sizes, and
on CUDA with triton the fused kernel times split sizes (its `chunk_tokens` is the split; 0: the kernel's default).
Each is timed on the live cache (read-only: queries of the real shapes attend over it), once per distinct layer
policy (a per-layer policy's layers differ) weighted by how many layers share it, a few repetitions, median.
The default (auto, DEFAULT_CHUNK_TOKENS) is kept unless a candidate beats it by more than the hysteresis, so
noise does not flip plans. Keyed by device, stream widths and kinds, and context bucket
(the next power of two of the cache length).
"""

from __future__ import annotations

import collections
import statistics
import time

import torch

from production.cache import triton_decode
from production.cache.attend import attend_cache
from production.cache.kvcache import DEFAULT_CHUNK_TOKENS, KVCache, LayerCache
from production.core.runtime import synchronize
from production.tune.store import DecisionStore

CANDIDATES = [(impl, chunk) for impl in ("bmm", "blockdiag") for chunk in (2048, 8192, 32768)]
TRITON_CANDIDATES = [("triton", split) for split in (0, 1024, 4096)]
HYSTERESIS = 0.05
REPEATS = 3
MIN_CONTEXT = 1024  # below this every candidate takes microseconds: timing noise would pick, so keep the default


def context_bucket(n: int) -> int:
    return 1 << max(0, n - 1).bit_length()


def plan_decode(
    cache: KVCache, n_head: int, kv_heads: int, device: str, device_sig: str, store: DecisionStore | None
) -> dict:
    """Choose (impl, chunk_tokens) for every layer of `cache`; returns the decision record."""
    shapes = {
        "widths": cache.widths,
        "kv_heads": kv_heads,
        "policy": str(cache.policy),
        "bucket": context_bucket(cache.length),
        "batch": cache.batch,
    }
    if cache.length < MIN_CONTEXT:
        reason = f"context {cache.length} < {MIN_CONTEXT}: too short to measure"
        layer = cache.layers[0]
        return {
            "impl": layer.impl,
            "chunk_tokens": layer.chunk_tokens,
            "source": "default",
            "bucket": shapes["bucket"],
            "reason": reason,
        }
    decision = store.get("decode", device_sig, f"h{n_head}", shapes) if store else None
    source = "store"
    if decision is None:
        source = "measured"
        timings = {
            f"{impl}@{chunk}": time_candidate(cache, impl, chunk, n_head, kv_heads, device)
            for impl, chunk in [("auto", DEFAULT_CHUNK_TOKENS), *candidates(device)]
        }
        default = timings[f"auto@{DEFAULT_CHUNK_TOKENS}"]
        best = min(timings, key=timings.get)
        if timings[best] > (1 - HYSTERESIS) * default:
            best = f"auto@{DEFAULT_CHUNK_TOKENS}"
        impl, chunk = best.split("@")
        decision = {"impl": impl, "chunk_tokens": int(chunk), "ms": timings[best], "timings": timings}
        if store:
            store.put("decode", device_sig, f"h{n_head}", shapes, decision)
    for layer in cache.layers:
        apply_plan(layer, decision["impl"], decision["chunk_tokens"])
    return {**decision, "source": source, "bucket": shapes["bucket"]}


def candidates(device: str) -> list[tuple[str, int]]:
    fused = triton_decode.available(device) and torch.device(device).type == "cuda"
    return CANDIDATES + (TRITON_CANDIDATES if fused else [])


def apply_plan(layer: LayerCache, impl: str, chunk: int) -> None:
    """Set a layer's strategy; for the fused kernel `chunk` is its split (0: the default)."""
    layer.impl = impl
    if impl == "triton":
        layer.split_tokens = chunk or None
    else:
        layer.chunk_tokens = chunk


def time_candidate(cache: KVCache, impl: str, chunk: int, n_head: int, kv_heads: int, device: str) -> float:
    """Median ms of the cached attention of all layers with this strategy: one layer of each distinct layer
    policy, times the number of layers with that policy; queries have the model's real shapes."""
    first: dict[str, int] = {}  # layer policy -> its first layer
    for i, policy in enumerate(cache.policy.layers):
        first.setdefault(str(policy), i)
    counts = collections.Counter(str(policy) for policy in cache.policy.layers)
    q = {
        s: torch.randn(cache.batch, n_head, 1, cache.widths[s] // kv_heads, device=device)
        for s in cache.widths
        if s != "v"
    }
    total = 0.0
    for policy, i in first.items():
        layer = cache.layers[i]
        saved = layer.impl, layer.chunk_tokens, layer.split_tokens
        apply_plan(layer, impl, chunk)
        times = []
        for _ in range(REPEATS):
            synchronize(device)
            t0 = time.perf_counter()
            attend_cache(layer, q, "v")
            synchronize(device)
            times.append(time.perf_counter() - t0)
        layer.impl, layer.chunk_tokens, layer.split_tokens = saved
        total += counts[policy] * statistics.median(times)
    return 1000 * total
