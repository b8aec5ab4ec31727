"""Generation: prefill the prompt into a KV cache, then one-token decode steps (or, with policy `none`, a full
recomputation of the whole sequence at every step, the reference the cache is checked against)."""

from __future__ import annotations

import contextlib
import time

import torch

from production.cache.policy import KVPolicy
from production.config.sampling import SamplingConfig
from production.core.runtime import synchronize
from production.model.gpt import GPT
from production.sample.graphs import GraphedDecoder


def pick_next(logits: torch.Tensor, cfg: SamplingConfig, generator: torch.Generator) -> torch.Tensor:
    """logits (B, vocab) -> next ids (B, 1): argmax, or a sample at temperature from the top-k."""
    if cfg.greedy:
        return logits.argmax(dim=-1, keepdim=True)
    logits = logits.float() / cfg.temperature
    if cfg.top_k is not None and cfg.top_k < logits.shape[-1]:
        kth = torch.topk(logits, cfg.top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    return torch.multinomial(probs.cpu(), 1, generator=generator).to(logits.device)


@torch.no_grad()
def generate(
    model: GPT,
    prompt: torch.Tensor,
    cfg: SamplingConfig,
    policy: KVPolicy | None,
    max_seq: int,
    autocast=None,
    on_prefill=None,
    stop=None,
    cuda_graphs: bool = False,
) -> dict:
    """prompt (B, T) ids -> {"ids": (B, n <= max_new_tokens), "cache_bytes", "prefill_ms", "ms_per_token",
    "decode_plan"}. policy None means no cache: every step recomputes the full sequence. on_prefill(cache), if
    given, runs once the prompt is in the cache (the decode planner); its result is returned as "decode_plan".
    stop(ids (B, n)), if given, is asked after each new token whether to end early. cuda_graphs: decode steps
    through production.sample.graphs (static steps over the fused kernel, captured as CUDA graphs on CUDA)."""
    autocast = autocast or contextlib.nullcontext
    model.eval()
    device = model.wte.weight.device
    generator = torch.Generator().manual_seed(cfg.seed)
    ids = prompt.to(device)
    cache = None if policy is None else model.new_cache(policy, ids.shape[0], max_seq)
    out, step_times = [], []
    t0 = time.perf_counter()
    with autocast():
        logits, _ = model(ids, cache=cache, last_only=True)
    synchronize(str(device))
    prefill_ms = 1000 * (time.perf_counter() - t0)
    plan = on_prefill(cache) if on_prefill is not None and cache is not None else None
    stepper = GraphedDecoder(model, cache, autocast) if cuda_graphs and cache is not None else None
    for i in range(cfg.max_new_tokens):
        nxt = pick_next(logits[:, -1].float(), cfg, generator)
        out.append(nxt)
        if i == cfg.max_new_tokens - 1 or (stop is not None and stop(torch.cat(out, dim=1))):
            break
        t0 = time.perf_counter()
        if stepper is not None:  # applies the run's autocast itself (without its weight cache)
            logits = stepper(nxt)
        else:
            with autocast():
                if cache is None:
                    ids = torch.cat([ids, nxt], dim=1)
                    logits, _ = model(ids, last_only=True)
                else:
                    logits, _ = model(nxt, cache=cache, last_only=True)
        synchronize(str(device))
        step_times.append(time.perf_counter() - t0)
    if stepper is not None:
        stepper.close()
    return {
        "ids": torch.cat(out, dim=1),
        "cache_bytes": 0 if cache is None else cache.nbytes(),
        "prefill_ms": prefill_ms,
        "ms_per_token": 1000 * sum(step_times) / len(step_times) if step_times else None,
        "decode_plan": plan,
    }
