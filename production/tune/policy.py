"""`--kv-policy auto`: the smallest cache policy that passes a quality guard against an fp16 cache.

Guard: on real calibration tokens, prefill P tokens, then D teacher-forced decode steps, once with an fp16 cache
(the reference) and once with the candidate. Metrics over the D decode positions: max |delta logit|, mean
delta NLL of the true next token (nats), and the perplexity ratio exp(mean delta NLL). A candidate passes when
all three are within their limits.

Search: candidates are every per-stream choice of kind (q4_0, nf4, q8_0, fp16) at a block size (32 or 64) and
residual window (0 or 128), estimated in bytes at the cache's capacity, sorted by bytes; they are judged in that
order and the first to pass wins (a bounded number of tries, then fp16, which passes by definition). For
decoupled models the winner's sem/geo precision swap is judged too and reported as a counterfactual.
"""

from __future__ import annotations

import itertools
import math
import time

import torch
import torch.nn.functional as F

from production.cache.kvcache import estimate_bytes
from production.cache.policy import KVPolicy, StreamSpec
from production.config.sampling import GuardLimits
from production.core.errors import UserError
from production.model.attention import cache_widths
from production.model.gpt import GPT

SEARCH_KINDS = ("q4_0", "nf4", "q8_0", "fp16")
SEARCH_BLOCKS = (32, 64)
SEARCH_RESID = (0, 128)


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


def candidate_policies(streams: dict[str, int], n_layer: int, max_seq: int) -> list[tuple[int, KVPolicy]]:
    """(bytes at max_seq, policy) for every searched combination, cheapest first, duplicates removed."""
    seen, out = set(), []
    for kinds in itertools.product(SEARCH_KINDS, repeat=len(streams)):
        quantized = any(k != "fp16" for k in kinds)
        for qb, resid in itertools.product(SEARCH_BLOCKS if quantized else (32,), SEARCH_RESID if quantized else (0,)):
            policy = KVPolicy({s: StreamSpec(k, qb) for s, k in zip(streams, kinds, strict=True)}, resid)
            if str(policy) not in seen:
                seen.add(str(policy))
                out.append((estimate_bytes(policy, streams, n_layer, 1, max_seq), policy))
    return sorted(out, key=lambda bp: (bp[0], str(bp[1])))


def swapped(policy: KVPolicy) -> KVPolicy | None:
    """The decoupled policy with semantic and geometric key precisions exchanged (None if they are equal)."""
    s = policy.streams
    if "k_sem" not in s or s["k_sem"] == s["k_geo"]:
        return None
    return KVPolicy({**s, "k_sem": s["k_geo"], "k_geo": s["k_sem"]}, policy.resid)


class Judge:
    """Judges policies for one model and one calibration sequence against its fp16-cache reference."""

    def __init__(self, model: GPT, tokens: torch.Tensor, prefill: int, max_seq: int, limits: GuardLimits, autocast):
        self.model, self.tokens, self.prefill, self.max_seq = model, tokens, prefill, max_seq
        self.limits, self.autocast = limits, autocast
        self.widths = cache_widths(model.cfg)
        self.fp16 = KVPolicy({s: StreamSpec("fp16") for s in self.widths})
        self.reference = teacher_forced_logits(model, tokens, self.fp16, prefill, autocast)

    def bytes(self, policy: KVPolicy) -> int:
        return estimate_bytes(policy, self.widths, self.model.cfg.n_layer, 1, self.max_seq)

    def __call__(self, policy: KVPolicy) -> dict:
        logits = teacher_forced_logits(self.model, self.tokens, policy, self.prefill, self.autocast)
        metrics = guard_metrics(self.reference, logits, self.tokens[0, self.prefill + 1 :])
        return {
            "policy": str(policy),
            "bytes": self.bytes(policy),
            "guard": metrics,
            "passed": passes(metrics, self.limits),
        }


def search_policy(
    model: GPT,
    tokens: torch.Tensor,
    prefill: int,
    max_seq: int,
    limits: GuardLimits,
    max_cache_bytes: int | None,
    max_candidates: int,
    autocast,
) -> dict:
    """Judge candidates cheapest first; returns the decision record (policy, bytes, guard, tries...)."""
    t0 = time.perf_counter()
    judge = Judge(model, tokens, prefill, max_seq, limits, autocast)
    candidates = candidate_policies(judge.widths, model.cfg.n_layer, max_seq)
    pool = [p for b, p in candidates if max_cache_bytes is None or b <= max_cache_bytes]
    if not pool:
        raise UserError(
            f"no cache policy fits --max-cache-bytes {max_cache_bytes} at max_seq {max_seq} (the smallest needs "
            f"{candidates[0][0]})"
        )
    tried, winner = [], None
    for policy in pool:
        if str(policy) == "fp16" or len(tried) >= max_candidates:
            break
        tried.append(judge(policy))
        if tried[-1]["passed"]:
            winner = (policy, tried[-1])
            break
    if winner is None:  # nothing cheaper passed within the budget of tries: the fp16 cache is exact by definition
        fp16_bytes = judge.bytes(judge.fp16)
        if max_cache_bytes is not None and fp16_bytes > max_cache_bytes:
            raise UserError(
                f"no policy within --max-cache-bytes {max_cache_bytes} passed the guard in {len(tried)} tries; "
                "raise the budget, --tuner-max-candidates, or relax the guard"
            )
        exact = {"max_abs_logit": 0.0, "delta_nll": 0.0, "ppl_ratio": 1.0}
        winner = (judge.fp16, {"policy": "fp16", "bytes": fp16_bytes, "passed": True, "guard": exact})
    counterfactuals = []
    swap = swapped(winner[0])
    if swap is not None:
        done = {t["policy"]: t for t in tried}
        counterfactuals.append(done.get(str(swap)) or judge(swap))
    return {
        "policy": winner[1]["policy"],
        "bytes": winner[1]["bytes"],
        "fp16_bytes": judge.bytes(judge.fp16),
        "guard": winner[1]["guard"],
        "limits": limits.to_dict(),
        "candidates_tried": len(tried),
        "tried": tried,
        "counterfactuals": counterfactuals,
        "seconds": time.perf_counter() - t0,
    }
