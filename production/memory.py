"""KV-cache memory, estimated in closed form and measured on the real cache objects (DESIGN.md 8).

Measurement by device: CUDA caching-allocator deltas (allocated, reserved, peak); MPS driver and current
allocation deltas; CPU the exact storage bytes of every buffer the cache holds.
"""

from __future__ import annotations

import dataclasses
import gc
import resource
import time

import torch

from production.attention import cache_widths
from production.config import ModelConfig
from production.kvcache import KVCache, KVPolicy, estimate_bytes, fill_random
from production.runtime import synchronize


def standard_counterpart(cfg: ModelConfig) -> ModelConfig:
    """Standard attention with the same d_model, depth, heads and MLP: the architecture-only baseline."""
    return dataclasses.replace(cfg, attn_mode="standard", attn_dim=cfg.d_model, sem_dim=None, geo_dim=None,
                               kv_heads=cfg.n_head, null_attn=False, tie_qk=False, rope=True)  # fmt: skip


def _device_counters(device: str) -> dict:
    kind = torch.device(device).type
    synchronize(device)
    if kind == "cuda":
        return {"allocated": torch.cuda.memory_allocated(device), "reserved": torch.cuda.memory_reserved(device)}
    if kind == "mps":
        return {"allocated": torch.mps.current_allocated_memory(), "driver": torch.mps.driver_allocated_memory()}
    return {}


def storage_bytes(cache: KVCache) -> int:
    """Bytes of every distinct storage behind the cache's tensors."""
    seen, total = set(), 0
    for layer in cache.layers:
        for stream in layer.streams.values():
            for t in stream.tensors():
                storage = t.untyped_storage()
                if storage.data_ptr() not in seen:
                    seen.add(storage.data_ptr())
                    total += storage.nbytes()
    return total


def measure_cache(cfg: ModelConfig, policy: KVPolicy, batch: int, context: int, device: str) -> tuple[dict, KVCache]:
    """Allocate the cache for (cfg, policy) at `context` tokens and measure it. Returns the record and the cache."""
    widths = cache_widths(cfg)
    estimate = estimate_bytes(policy, widths, cfg.n_layer, batch, context)
    kind = torch.device(device).type
    gc.collect()
    if kind == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    before = _device_counters(device)
    cache = KVCache(policy, widths, cfg.n_layer, batch, context, device)
    after = _device_counters(device)
    stored = storage_bytes(cache)
    details = {"storage_bytes": stored}
    if kind == "cuda":
        details.update(allocated_delta=after["allocated"] - before["allocated"],
                       reserved_delta=after["reserved"] - before["reserved"],
                       peak_delta=torch.cuda.max_memory_allocated(device) - before["allocated"])  # fmt: skip
        measured, method = details["allocated_delta"], "cuda_allocator"
    elif kind == "mps":
        details.update(allocated_delta=after["allocated"] - before["allocated"],
                       driver_delta=after["driver"] - before["driver"])  # fmt: skip
        measured, method = details["driver_delta"], "mps_driver"
    else:
        measured, method = stored, "cpu_storage"
    per_stream = {}
    for name, width in widths.items():
        spec = policy.streams[name]
        one = KVPolicy({name: spec}, policy.resid)
        per_stream[name] = {
            "kind": str(spec),
            "width": width,
            "estimate_bytes": estimate_bytes(one, {name: width}, cfg.n_layer, batch, context),
            "measured_bytes": sum(t.untyped_storage().nbytes() for layer in cache.layers
                                  for t in layer.streams[name].tensors()),
        }  # fmt: skip
    record = {"policy": str(policy), "estimate_bytes": estimate, "measured_bytes": measured,
              "measurement": {"method": method, **details}, "per_stream": per_stream}  # fmt: skip
    return record, cache


@torch.no_grad()
def time_decode_step(model, cache: KVCache, device: str) -> dict:
    """Fill all but the last two slots with random K/V, run one warm-up and one timed decode step, so the timed
    step attends over the full context. Reports ms and peak memory during the step."""
    fill_random(cache, cache.max_seq - 2, torch.Generator().manual_seed(0))
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
        out["peak_rss_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB
    return out
