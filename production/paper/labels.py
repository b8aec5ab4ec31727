"""How the paper names variants, policies and sizes: shared by the figures and the tables."""

from __future__ import annotations

import collections

from production.cache.policy import PAPER_POLICY

NAMES = {
    "paper_baseline": "Standard",
    "paper_bottleneck": "Bottleneck",
    "paper_decoupled": "Decoupled",
    "paper_gqa": "GQA",
    "paper_decoupled_null": "Decoupled + null token",
    "paper_decoupled_notieqk": "Decoupled, untied Q/K",
    "paper_decoupled_norope": "Decoupled, no RoPE",
    "paper_baseline_lr2e4": "Standard, lr 2e-4",
    "paper_baseline_lr3e4": "Standard, lr 3e-4",
    "paper_baseline_lr4e4": "Standard, lr 4e-4",
}
COLORS = {"standard": "#4c72b0", "bottleneck": "#dd8452", "decoupled": "#55a868", "gqa": "#c44e52"}


def common_steps(aggs: list[dict]) -> int:
    return collections.Counter(a["steps"] for a in aggs).most_common(1)[0][0]


def label(agg: dict, group_steps: int) -> str:
    name = NAMES.get(agg["exp"], agg["exp"])
    return name if agg["steps"] == group_steps else f"{name} ({agg['steps'] // 1000}k steps)"


NAMED_POLICIES = {"fp16": "fp16", PAPER_POLICY: "Q4/Q8/Q4"}


def short_policy(policy: str) -> str:
    if policy in NAMED_POLICIES:
        return NAMED_POLICIES[policy]
    return f"per-layer, {policy.count('|') + 1} layer ranges" if "|" in policy else policy


def kv_label(kv: dict) -> str:
    """A run's measured cache policy in a few characters: fp16, Q4/Q8/Q4 (the paper's), or the tuner's choice
    (or any other policy) by its average bits per cached value, scales and windows included."""
    if kv["policy"] in NAMED_POLICIES:
        return NAMED_POLICIES[kv["policy"]]
    bits = f"{kv['bits_per_value']:.1f} bits/value"
    return f"tuned, {bits}" if kv["tuned"] else bits


def fmt_bytes(n: int | None) -> str:
    if n is None:
        return "--"
    if n >= 2**30:
        return f"{n / 2**30:.2f} GiB"
    return f"{n / 2**20:.0f} MiB" if n >= 2**20 else f"{n / 2**10:.0f} KiB"
