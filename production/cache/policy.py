"""Cache policies: which kind each cached stream of each layer is stored in, and the exact residual window.

Grammar (strict; unknown keys or kinds, bad numbers and bad layer ranges are errors):
    policy  := layers | segment ("|" segment)*              one policy for every layer, or one per layer range
    segment := "L" first ["-" last] ":" layers               ranges cover every layer exactly once
    layers  := "fp16" | "bf16" | "fp32"                      every stream stored plainly
             | item ("," item)*                              every stream of the model named exactly once
    item    := key "=" spec | "resid=" N
    key     := ksem | kgeo | v (decoupled)  |  k | v (standard, bottleneck, gqa)
    spec    := kind ["@" qb] ["+rot" [seed]] ["+ch"]
    kind    := fp16 | bf16 | fp32 | q8_0 | q4_0 | q4_1 | nf4 | q3_1 | q2_1
qb: values per block (default 32; 2..1024, a multiple of 2, of 4 for q2_1, of 8 for q3_1). `+rot` rotates each
head's values by a randomised Hadamard transform before quantizing (seed 0 unless given: `+rot7`); `+ch`
quantizes per channel over groups of qb tokens (KIVI) instead of runs of qb values of the token-major stream.
e.g. `ksem=q4_0@32,kgeo=q8_0@32,v=q4_0@32,resid=128` or `L0:fp16|L1-3:ksem=q2_1@64+rot,kgeo=q4_1@32+ch,v=q3_1@64,
resid=128`. `auto` and `none` are resolved by the commands.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from production.cache.formats import FORMATS, QUANT_KINDS
from production.core.errors import UserError

# The paper's heterogeneous policy: 4-bit semantic keys and values, 8-bit geometric (RoPE) keys, exact window.
PAPER_POLICY = "ksem=q4_0@32,kgeo=q8_0@32,v=q4_0@32,resid=128"
PLAIN_KINDS = ("fp16", "bf16", "fp32")
# policy-string key -> stream name
POLICY_KEYS = {"k": "k", "v": "v", "ksem": "k_sem", "kgeo": "k_geo"}


@dataclass(frozen=True)
class StreamSpec:
    kind: str  # fp16 | bf16 | fp32 | one of production.cache.formats.FORMATS
    qb: int = 32  # values per quantization block (quantized kinds); tokens per group with `channel`
    rot: int | None = None  # seed of the randomised Hadamard rotation, None for no rotation
    channel: bool = False  # per-channel blocks over qb tokens (KIVI) instead of runs of the flat stream

    @property
    def plain(self) -> bool:
        return self.kind in PLAIN_KINDS

    def __str__(self) -> str:
        if self.plain:
            return self.kind
        rot = "" if self.rot is None else "+rot" if self.rot == 0 else f"+rot{self.rot}"
        return f"{self.kind}@{self.qb}{rot}{'+ch' if self.channel else ''}"


@dataclass(frozen=True)
class LayerPolicy:
    """The streams of one layer: stream name -> StreamSpec, and the exact window of its quantized streams."""

    streams: dict
    resid: int = 0

    def __post_init__(self):
        if all(s.plain for s in self.streams.values()):  # nothing is quantized: no window to keep
            object.__setattr__(self, "resid", 0)

    def __str__(self) -> str:
        if all(s.kind == "fp16" for s in self.streams.values()):
            return "fp16"
        keys = {v: k for k, v in POLICY_KEYS.items()}
        return ",".join([f"{keys[n]}={s}" for n, s in self.streams.items()] + [f"resid={self.resid}"])


@dataclass(frozen=True)
class KVPolicy:
    """One LayerPolicy per layer of the model."""

    layers: tuple

    @classmethod
    def uniform(cls, layer: LayerPolicy, n_layer: int) -> KVPolicy:
        return cls((layer,) * n_layer)

    def __str__(self) -> str:
        return by_layer(self.layers)


def by_layer(items) -> str:
    """One value per layer, as policies and reports write it: `x` when every layer has it, else the runs of
    consecutive equal values by layer range, `L0:x|L1-3:y`."""
    runs: list[list] = []  # [first, last, value]
    for i, item in enumerate(items):
        if runs and runs[-1][2] == item:
            runs[-1][1] = i
        else:
            runs.append([i, i, item])
    if len(runs) == 1:
        return str(runs[0][2])
    return "|".join(f"L{a}{'' if a == b else f'-{b}'}:{item}" for a, b, item in runs)


def parse_policy(text: str, streams: list[str], n_layer: int) -> KVPolicy:
    """Strict parse of a policy string for a model of `n_layer` layers whose cache has `streams` per layer
    (e.g. ["k_sem", "k_geo", "v"])."""
    text = text.strip()
    if "|" not in text and not re.match(r"L[^=,]*:", text):  # no layer ranges
        return KVPolicy.uniform(parse_layer_policy(text, streams), n_layer)
    layers: list[tuple[str, LayerPolicy] | None] = [None] * n_layer
    for segment in text.split("|"):
        segment = segment.strip()
        m = re.fullmatch(r"L(\d+)(?:-(\d+))?:(.+)", segment, flags=re.S)
        if not m:
            example = f"L0:fp16|L1-{n_layer - 1}:" if n_layer > 2 else "L0:fp16|L1:" if n_layer == 2 else "L0:"
            example += PAPER_POLICY if "k_sem" in streams else "k=q8_0,v=q8_0"
            raise UserError(
                f"bad layer range {segment!r} in KV policy {text!r}; expected L<first>[-<last>]:<policy>, e.g. "
                f"{example}"
            )
        first = int(m.group(1))
        last = first if m.group(2) is None else int(m.group(2))
        name = segment.partition(":")[0]
        if last < first:
            raise UserError(f"layer range {name} in KV policy {text!r} runs backwards")
        if last >= n_layer:
            raise UserError(f"layer range {name} in KV policy {text!r} goes past the model's layers L0-{n_layer - 1}")
        layer = parse_layer_policy(m.group(3), streams)
        for i in range(first, last + 1):
            if layers[i] is not None:
                raise UserError(f"KV policy {text!r} sets layer {i} twice ({layers[i][0]} and {name})")
            layers[i] = (name, layer)
    missing = [str(i) for i, layer in enumerate(layers) if layer is None]
    if missing:
        raise UserError(
            f"KV policy {text!r} gives no policy for layer(s) {', '.join(missing)}; its ranges must cover "
            f"L0-{n_layer - 1} exactly once"
        )
    return KVPolicy(tuple(layer for _, layer in layers))


def parse_layer_policy(text: str, streams: list[str]) -> LayerPolicy:
    """Strict parse of one layer's policy (no ranges) for the cache `streams`."""
    text = text.strip()
    if text in PLAIN_KINDS:
        return LayerPolicy({s: StreamSpec(text) for s in streams})
    key_of = {stream: key for key, stream in POLICY_KEYS.items()}
    valid_keys = [key_of[s] for s in streams]
    example = ",".join(f"{k}=q8_0@32" for k in valid_keys) + ",resid=0"
    specs, resid, seen = {}, 0, set()
    for item in text.split(","):
        key, sep, value = (part.strip() for part in item.partition("="))
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
    return LayerPolicy({s: specs[s] for s in streams}, resid)


def parse_spec(value: str) -> StreamSpec:
    """`kind[@qb][+rot[seed]][+ch]` -> StreamSpec."""
    m = re.fullmatch(r"([a-z0-9_]+)(?:@(\d+))?((?:\+[a-z]+\d*)*)", value.strip())
    kinds = [*PLAIN_KINDS, *QUANT_KINDS]
    if not m or m.group(1) not in kinds:
        raise UserError(
            f"unknown KV cache kind {value!r}; valid: {', '.join(kinds)} (quantized ones take @qb, +rot, +ch)"
        )
    kind, qb, modifiers = m.group(1), m.group(2), m.group(3)
    if kind in PLAIN_KINDS:
        if qb is not None or modifiers:
            raise UserError(f"{kind} is stored plainly and takes no block size or modifier, got {value!r}")
        return StreamSpec(kind)
    rot, channel = None, False
    for mod in modifiers.split("+")[1:]:
        r = re.fullmatch(r"rot(\d*)", mod)
        if r and rot is None:
            rot = int(r.group(1) or 0)
        elif mod == "ch" and not channel:
            channel = True
        else:
            raise UserError(f"bad modifier +{mod} in {value!r}; valid: +rot, +rot<seed>, +ch (each once)")
    qb = 32 if qb is None else int(qb)
    multiple = FORMATS[kind].qb_multiple
    if qb < 2 or qb % multiple or qb > 1024:
        raise UserError(f"{kind} needs a block size in [2, 1024] that is a multiple of {multiple}, got {value!r}")
    return StreamSpec(kind, qb, rot, channel)
