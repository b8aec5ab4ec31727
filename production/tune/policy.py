"""`--kv-policy auto`: the smallest cache policy that passes the quality guard (production.tune.guard).

1. Sensitivities (production.tune.sensitivity): every stream of every layer probed under every searched spec
   (2-, 3-, 4- and 8-bit kinds, block sizes 32-128, with and without rotation, per-channel keys).
2. For each residual window (0 and 128 tokens), the path of policies ordered by predicted quality per byte,
   from the cheapest to fp16.
3. On each path, a bisection with the real guard for the cheapest policy that passes (the path's policies
   are assumed to get better as they grow): the first point is judged first, then the last within
   --max-cache-bytes, then midpoints. At most `max_candidates` judgments in all; the cheapest passing policy
   wins, else fp16 (exact by definition). Every accepted policy was measured by the guard.
For decoupled models the winner's sem/geo precision swap (in every layer) is judged too and reported as a
counterfactual.
"""

from __future__ import annotations

import time

import torch

from production.cache.policy import KVPolicy, LayerPolicy
from production.config.sampling import GuardLimits
from production.core.errors import UserError
from production.model.gpt import GPT
from production.tune.guard import Judge
from production.tune.sensitivity import measure_sensitivity, quality_path

SEARCH_RESID = (0, 128)


def swapped(policy: KVPolicy) -> KVPolicy | None:
    """The decoupled policy with semantic and geometric key specs exchanged in every layer (None if that changes
    nothing)."""
    if "k_sem" not in policy.layers[0].streams:
        return None
    layers = tuple(
        LayerPolicy({**layer.streams, "k_sem": layer.streams["k_geo"], "k_geo": layer.streams["k_sem"]}, layer.resid)
        for layer in policy.layers
    )
    return None if layers == policy.layers else KVPolicy(layers)


def bisect_path(path: list, judge, budget: int, cap: int | None) -> tuple[int | None, list[dict]]:
    """The index of the cheapest point judged to pass on `path` [(bytes, damage, policy)], within `cap` bytes and
    `budget` judgments (None if none passed), and the judgments made."""
    last = len(path) - 1
    while last >= 0 and cap is not None and path[last][0] > cap:
        last -= 1
    tried: list[dict] = []
    verdict: dict[int, bool] = {}

    def passes(i: int) -> bool | None:
        if i not in verdict:
            if len(tried) >= budget:
                return None
            tried.append({**judge(path[i][2]), "path_index": i, "predicted_damage": path[i][1]})
            verdict[i] = tried[-1]["passed"]
        return verdict[i]

    if last < 0:
        return None, tried
    first = passes(0)
    if first is not False:  # the cheapest passes (or no judgment was left)
        return (0 if first else None), tried
    exact = all(s.kind == "fp16" for layer in path[last][2].layers for s in layer.streams.values())
    if not exact and not passes(last):  # nothing within the cap passes (or no judgment was left)
        return None, tried
    lo, hi = 0, last  # path[lo] fails; path[hi] passes (or is the exact fp16 end, never judged)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        verdict_mid = passes(mid)
        if verdict_mid is None:
            break
        lo, hi = (lo, mid) if verdict_mid else (mid, hi)
    return (None if exact and hi == last else hi), tried


def search_policy(
    model: GPT,
    tokens: torch.Tensor,
    prefill: int,
    max_seq: int,
    limits: GuardLimits,
    max_cache_bytes: int | None,
    max_candidates: int,
    autocast,
    resids: tuple[int, ...] = SEARCH_RESID,
    sensitivity: dict | None = None,
) -> dict:
    """Sensitivities (measured unless given, for the same model and tokens), paths for the residual windows
    `resids`, guarded bisection; returns the decision record (policy, bytes, guard, tries...)."""
    t0 = time.perf_counter()
    judge = Judge(model, tokens, prefill, max_seq, limits, autocast)
    sensitivity = sensitivity or measure_sensitivity(model, tokens, prefill, autocast)
    paths = {resid: quality_path(sensitivity, model, max_seq, resid, limits) for resid in resids}
    cheapest = min(path[0][0] for path in paths.values())
    if max_cache_bytes is not None and cheapest > max_cache_bytes:
        raise UserError(
            f"no cache policy fits --max-cache-bytes {max_cache_bytes} at max_seq {max_seq} (the smallest needs "
            f"{cheapest})"
        )
    tried, passing = [], []
    for n, (resid, path) in enumerate(paths.items()):
        budget = (max_candidates - len(tried)) // (len(paths) - n)  # spread what is left over the paths left
        index, judged = bisect_path(path, judge, budget, max_cache_bytes)
        tried += [{**t, "resid": resid} for t in judged]
        if index is not None:
            passing.append(next(t for t in judged if t["path_index"] == index))
    if passing:
        best = min(passing, key=lambda t: t["bytes"])
        winner = (next(p for path in paths.values() for _, _, p in path if str(p) == best["policy"]), best)
    else:  # nothing cheaper passed within the budget of tries: the fp16 cache is exact by definition
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
        "path_lengths": {str(resid): len(path) for resid, path in paths.items()},
        "sensitivity": sensitivity,
        "counterfactuals": counterfactuals,
        "seconds": time.perf_counter() - t0,
    }
