"""The quality guard of `--kv-policy auto`: a cache policy against an fp16 cache on real calibration tokens.

Prefill P tokens, then D teacher-forced decode steps, once with an fp16 cache (the reference) and once with the
candidate. Metrics over the D decode positions: max |delta logit|, mean delta NLL of the true next token (nats),
and the perplexity ratio exp(mean delta NLL). A candidate passes when all three are within their limits.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from production.cache.kvcache import estimate_bytes
from production.cache.policy import KVPolicy, LayerPolicy, StreamSpec
from production.config.sampling import GuardLimits
from production.model.attention import cache_widths
from production.model.gpt import GPT


def guard_metrics(ref: torch.Tensor, cand: torch.Tensor, targets: torch.Tensor) -> dict:
    """ref, cand (N, vocab) logits at the same positions; targets (N,) the true next tokens."""
    ref, cand = ref.float(), cand.float()
    nll_ref = F.cross_entropy(ref, targets, reduction="none")
    nll_cand = F.cross_entropy(cand, targets, reduction="none")
    delta = (nll_cand - nll_ref).mean().item()
    return {"max_abs_logit": (cand - ref).abs().max().item(), "delta_nll": delta, "ppl_ratio": math.exp(delta)}


def passes(metrics: dict, limits: GuardLimits) -> bool:
    return (
        metrics["max_abs_logit"] <= limits.max_abs_logit
        and metrics["delta_nll"] <= limits.delta_nll
        and metrics["ppl_ratio"] <= limits.ppl_ratio
    )


def plain_policy(model: GPT, kind: str = "fp16") -> KVPolicy:
    return KVPolicy.uniform(LayerPolicy({s: StreamSpec(kind) for s in cache_widths(model.cfg)}), model.cfg.n_layer)


@torch.no_grad()
def teacher_forced_logits(model: GPT, tokens: torch.Tensor, policy: KVPolicy, prefill: int, autocast) -> torch.Tensor:
    """tokens (1, prefill + D + 1): prefill, then feed tokens[prefill .. prefill+D-1] one at a time.
    Returns the D decode-step logits (D, vocab), predicting tokens[prefill+1 .. prefill+D]."""
    D = tokens.shape[1] - prefill - 1
    cache = model.new_cache(policy, 1, prefill + D)
    with autocast():
        model(tokens[:, :prefill], cache=cache, last_only=True)
        steps = [model(tokens[:, t : t + 1], cache=cache)[0][0, -1] for t in range(prefill, prefill + D)]
    return torch.stack(steps)


class Judge:
    """Judges policies for one model and one calibration sequence against its fp16-cache reference."""

    def __init__(self, model: GPT, tokens: torch.Tensor, prefill: int, max_seq: int, limits: GuardLimits, autocast):
        self.model, self.tokens, self.prefill, self.max_seq = model, tokens, prefill, max_seq
        self.limits, self.autocast = limits, autocast
        self.widths = cache_widths(model.cfg)
        self.fp16 = plain_policy(model)
        self.reference = teacher_forced_logits(model, tokens, self.fp16, prefill, autocast)

    def bytes(self, policy: KVPolicy) -> int:
        return estimate_bytes(policy, self.widths, self.model.cfg.kv_heads, 1, self.max_seq)

    def __call__(self, policy: KVPolicy) -> dict:
        logits = teacher_forced_logits(self.model, self.tokens, policy, self.prefill, self.autocast)
        metrics = guard_metrics(self.reference, logits, self.tokens[0, self.prefill + 1 :])
        return {
            "policy": str(policy),
            "bytes": self.bytes(policy),
            "guard": metrics,
            "passed": passes(metrics, self.limits),
        }
