"""KV-cache memory, estimated in closed form and measured on the real cache objects.

Measurement by device: CUDA caching-allocator deltas (allocated, reserved, peak); MPS driver and current
allocation deltas; CPU the exact storage bytes of every buffer the cache holds (the same on the meta device,
where the buffers have sizes but no memory: the benchmark measures CPU caches there unless it decodes).
"""

from __future__ import annotations

import gc
import time

import torch

from production.cache.kvcache import KVCache, estimate_bytes, fill_random
from production.cache.policy import KVPolicy, by_layer
from production.core.runtime import peak_rss_bytes, synchronize


def _device_counters(device: str) -> dict:
    kind = torch.device(device).type
    synchronize(device)
    if kind == "cuda":
        return {"allocated": torch.cuda.memory_allocated(device), "reserved": torch.cuda.memory_reserved(device)}
    if kind == "mps":
        return {"allocated": torch.mps.current_allocated_memory(), "driver": torch.mps.driver_allocated_memory()}
    return {}


def storage_bytes(tensors) -> int:
    """Bytes of every distinct storage behind the tensors."""
    # keyed by the storage object itself (_cdata), not its address: every meta storage has address 0
    storages = {t.untyped_storage()._cdata: t.untyped_storage().nbytes() for t in tensors}
    return sum(storages.values())


def cache_tensors(cache: KVCache, stream: str | None = None) -> list[torch.Tensor]:
    """Every buffer of the cache (or of one stream across layers)."""
    if stream is None:
        return [t for layer in cache.layers for t in layer.tensors()]
    rotations = [layer.rotations[stream] for layer in cache.layers if stream in layer.rotations]
    return [t for layer in cache.layers for t in layer.streams[stream].tensors()] + rotations


def _measurement(kind: str, before: dict, after: dict, device: str, stored: int) -> tuple[int, dict]:
    """(measured bytes, the measurement record) for one allocation on `kind`."""
    details = {"storage_bytes": stored}
    if kind == "cuda":
        details["allocated_delta"] = after["allocated"] - before["allocated"]
        details["reserved_delta"] = after["reserved"] - before["reserved"]
        details["peak_delta"] = torch.cuda.max_memory_allocated(device) - before["allocated"]
        return details["allocated_delta"], {"method": "cuda_allocator", **details}
    if kind == "mps":
        details["allocated_delta"] = after["allocated"] - before["allocated"]
        details["driver_delta"] = after["driver"] - before["driver"]
        return details["driver_delta"], {"method": "mps_driver", **details}
    return stored, {"method": "cpu_storage", **details}  # cpu, or meta (the same storage sizes, no pages)


def measure_cache(
    widths: dict[str, int], heads: int, policy: KVPolicy, batch: int, context: int, device: str
) -> tuple[dict, KVCache]:
    """Allocate the cache with stream `widths` of `heads` K/V heads under `policy` (one entry per layer) for
    `context` tokens and measure it. Returns the record {policy, estimate_bytes, measured_bytes, measurement,
    per_stream} and the cache."""
    estimate = estimate_bytes(policy, widths, heads, batch, context)
    kind = torch.device(device).type
    gc.collect()
    if kind == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    before = _device_counters(device)
    cache = KVCache(policy, widths, heads, batch, context, device)
    after = _device_counters(device)
    measured, measurement = _measurement(kind, before, after, device, storage_bytes(cache_tensors(cache)))
    per_stream = {
        name: {
            "kind": by_layer([layer.streams[name] for layer in policy.layers]),  # `L0:q3_1@64|L1-3:...`
            "width": width,
            "estimate_bytes": estimate_bytes(policy, widths, heads, batch, context, streams=[name]),
            "measured_bytes": storage_bytes(cache_tensors(cache, name)),
        }
        for name, width in widths.items()
    }
    record = {
        "policy": str(policy),
        "estimate_bytes": estimate,
        "measured_bytes": measured,
        "measurement": measurement,
        "per_stream": per_stream,
    }
    return record, cache


@torch.no_grad()
def time_decode_step(model, cache: KVCache, device: str) -> dict:
    """Fill all but the last two slots with random K/V, run one warm-up and one timed decode step of `model`
    (a GPT), so the timed step attends over the full context. Reports ms and peak memory during the step."""
    fill_random(cache, cache.max_seq - 2)
    token = torch.zeros(cache.batch, 1, dtype=torch.long, device=device)
    model(token, cache=cache, last_only=True)
    kind = torch.device(device).type
    if kind == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    base = _device_counters(device)
    synchronize(device)
    t0 = time.perf_counter()
    model(token, cache=cache, last_only=True)
    synchronize(device)
    out = {"ms": 1000 * (time.perf_counter() - t0), "context": cache.length - 1}
    if kind == "cuda":
        out["peak_bytes"] = torch.cuda.max_memory_allocated(device)
        out["step_peak_delta"] = out["peak_bytes"] - base["allocated"]
    else:
        out["peak_rss_bytes"] = peak_rss_bytes()
    return out
