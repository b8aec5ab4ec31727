"""Cache policies: which kind each cached stream is stored in, and the exact residual window.

Grammar (strict; unknown keys or kinds are errors):
    policy := "fp16" | "bf16" | "fp32"                      every stream stored plainly
            | item ("," item)*                              every stream of the model named exactly once
    item   := key "=" kind ["@" qb] | "resid=" N
    key    := ksem | kgeo | v (decoupled)  |  k | v (standard, bottleneck, gqa)
    kind   := fp16 | bf16 | fp32 | q8_0 | q4_0 | nf4        (qb: values per block, even, 2..1024, default 32)
e.g. `ksem=q4_0@32,kgeo=q8_0@32,v=q4_0@32,resid=128`. `auto` and `none` are resolved by the sample command.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from production.core.errors import UserError

# The paper's heterogeneous policy: 4-bit semantic keys and values, 8-bit geometric (RoPE) keys, exact window.
PAPER_POLICY = "ksem=q4_0@32,kgeo=q8_0@32,v=q4_0@32,resid=128"
PLAIN_KINDS = ("fp16", "bf16", "fp32")
QUANT_KINDS = ("q8_0", "q4_0", "nf4")
# policy-string key -> stream name
POLICY_KEYS = {"k": "k", "v": "v", "ksem": "k_sem", "kgeo": "k_geo"}


@dataclass(frozen=True)
class StreamSpec:
    kind: str  # fp16 | bf16 | fp32 | q8_0 | q4_0 | nf4
    qb: int = 32  # values per quantization block (quantized kinds)

    @property
    def plain(self) -> bool:
        return self.kind in PLAIN_KINDS

    def __str__(self) -> str:
        return self.kind if self.plain else f"{self.kind}@{self.qb}"


@dataclass(frozen=True)
class KVPolicy:
    streams: dict  # stream name -> StreamSpec
    resid: int = 0

    def __str__(self) -> str:
        if all(s.kind == "fp16" for s in self.streams.values()):
            return "fp16"
        keys = {v: k for k, v in POLICY_KEYS.items()}
        return ",".join([f"{keys[n]}={s}" for n, s in self.streams.items()] + [f"resid={self.resid}"])


def parse_policy(text: str, streams: list[str]) -> KVPolicy:
    """Strict parse of a policy string for a model whose cache has `streams` (e.g. ["k_sem", "k_geo", "v"])."""
    text = text.strip()
    if text in PLAIN_KINDS:
        return KVPolicy({s: StreamSpec(text) for s in streams})
    key_of = {stream: key for key, stream in POLICY_KEYS.items()}
    valid_keys = [key_of[s] for s in streams]
    example = ",".join(f"{k}=q8_0@32" for k in valid_keys) + ",resid=0"
    specs, resid, seen = {}, 0, set()
    for item in text.split(","):
        key, sep, value = item.strip().partition("=")
        if not sep or not value:
            raise UserError(f"bad KV policy item {item.strip()!r} in {text!r}; expected key=value, e.g. {example}")
        if key in seen:
            raise UserError(f"KV policy {text!r} sets {key} twice")
        seen.add(key)
        if key == "resid":
            if not re.fullmatch(r"\d+", value):
                raise UserError(f"KV policy resid must be a non-negative integer, got {value!r}")
            resid = int(value)
            continue
        if key not in valid_keys:
            raise UserError(
                f"unknown KV policy key {key!r} for this model; its keys are "
                f"{', '.join(valid_keys)}, resid (e.g. {example})"
            )
        specs[POLICY_KEYS[key]] = parse_spec(value)
    missing = [k for k in valid_keys if POLICY_KEYS[k] not in specs]
    if missing:
        raise UserError(f"KV policy {text!r} gives no kind for {', '.join(missing)} (e.g. {example})")
    return KVPolicy({s: specs[s] for s in streams}, resid)


def parse_spec(value: str) -> StreamSpec:
    m = re.fullmatch(r"([a-z0-9_]+)(?:@(\d+))?", value)
    kinds = [*PLAIN_KINDS, *QUANT_KINDS]
    if not m or m.group(1) not in kinds:
        raise UserError(f"unknown KV cache kind {value!r}; valid: {', '.join(kinds)} (quantized ones take @qb)")
    kind, qb = m.group(1), m.group(2)
    if kind in PLAIN_KINDS:
        if qb is not None:
            raise UserError(f"{kind} is stored plainly and takes no block size, got {value!r}")
        return StreamSpec(kind)
    qb = 32 if qb is None else int(qb)
    if qb < 2 or qb % 2 or qb > 1024:
        raise UserError(f"block size must be an even number of values in [2, 1024], got {value!r}")
    return StreamSpec(kind, qb)
