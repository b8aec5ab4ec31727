"""How much each layer's each stream suffers from each searched kind, and the quality-per-byte path built on it.

**Probes.** A unit is one stream of one layer. Its sensitivity to a spec is measured with only that unit in the
spec and every other unit fp16: the calibration prefix is prefilled once into an fp32 cache and copied into each
probe's cache (quantized and rotated as the probe's policy says), then the D calibration tokens run as one
causal chunk over it. Against the same pass with an fp16 cache: mean delta NLL of the true next tokens, mean
KL(fp16 || probe) and max |delta logit|. Probes use no residual window (resid = 0): the quantization's effect
alone.

**Damage** of a unit's spec: KL / (the guard's NLL limit) + (max |delta logit| / its limit)^2. Both terms add up
over independent small errors (KL and squared logit errors are second order), so the sum over units predicts
how close a whole policy comes to the guard. ΔNLL itself is first order and noisy (a probe can lower it by
chance), so it is reported, not summed.

**Path.** For each unit, the specs on the lower convex hull of (bytes, damage), from its cheapest spec to fp16.
Every unit starts at its cheapest; the upgrades of all units are taken in order of damage removed per byte
added, each step giving one policy. Bytes grow and predicted damage falls along the path; the search walks it
with the real guard (production.tune.policy).
"""

from __future__ import annotations

import math
import time

import torch
import torch.nn.functional as F
from tqdm import tqdm

from production.cache.kvcache import stream_bytes
from production.cache.policy import KVPolicy, LayerPolicy, StreamSpec, parse_spec
from production.config.sampling import GuardLimits
from production.model.attention import cache_widths
from production.model.gpt import GPT
from production.tune.guard import plain_policy

TOKEN_KINDS = ("q2_1", "q3_1", "q4_0", "nf4")  # runs of qb values of the token-major stream, with and without +rot
TOKEN_BLOCKS = (32, 64, 128)
CHANNEL_KINDS = ("q2_1", "q3_1", "q4_1")  # keys only: per channel over groups of G tokens (KIVI)
CHANNEL_GROUPS = (32, 64)
FP16 = StreamSpec("fp16")


def menu(stream: str) -> list[StreamSpec]:
    """The specs searched for one stream, fp16 last."""
    specs = [StreamSpec(k, qb, rot) for k in TOKEN_KINDS for qb in TOKEN_BLOCKS for rot in (None, 0)]
    specs.append(StreamSpec("q8_0", 32))
    if stream != "v":
        specs += [StreamSpec(k, g, None, True) for k in CHANNEL_KINDS for g in CHANNEL_GROUPS]
    return [*specs, FP16]


class Prober:
    """Teacher-forced logits of the calibration tokens through a cache of any policy, sharing one prefill."""

    def __init__(self, model: GPT, tokens: torch.Tensor, prefill: int, autocast):
        self.model, self.tokens, self.prefill, self.autocast = model, tokens, prefill, autocast
        self.D = tokens.shape[1] - prefill - 1
        base = model.new_cache(plain_policy(model, "fp32"), 1, prefill + self.D)
        with torch.no_grad(), autocast():
            model(tokens[:, :prefill], cache=base, last_only=True)
        self.prefix = [
            {n: s.read(0, prefill, torch.float32) for n, s in layer.streams.items()} for layer in base.layers
        ]
        self.targets = tokens[0, prefill + 1 :]
        self.reference = self.logits(plain_policy(model))
        self.reference_logp = F.log_softmax(self.reference, dim=-1)
        self.reference_p = self.reference_logp.exp()

    @torch.no_grad()
    def logits(self, policy: KVPolicy) -> torch.Tensor:
        """(D, vocab) logits predicting tokens[prefill + 1 ..]."""
        cache = self.model.new_cache(policy, 1, self.prefill + self.D)
        for layer, values in zip(cache.layers, self.prefix, strict=True):
            layer.append(values)
        with self.autocast():
            logits = self.model(self.tokens[:, self.prefill : self.prefill + self.D], cache=cache)[0][0]
        return logits.float()

    def metrics(self, policy: KVPolicy) -> dict:
        logits = self.logits(policy)
        logp = F.log_softmax(logits, dim=-1)
        nll = (
            -logp.gather(-1, self.targets[:, None]).mean()
            + self.reference_logp.gather(-1, self.targets[:, None]).mean()
        )
        kl = (self.reference_p * (self.reference_logp - logp)).sum(-1).mean()
        return {
            "delta_nll": nll.item(),
            "kl": max(kl.item(), 0.0),
            "max_abs_logit": (logits - self.reference).abs().max().item(),
        }


def measure_sensitivity(model: GPT, tokens: torch.Tensor, prefill: int, autocast) -> dict:
    """{"probes": [{layer, stream, spec, delta_nll, kl, max_abs_logit}], "prefill", "decode", "seconds"}: every
    unit under every spec of its menu (fp16 is exact and not probed)."""
    t0 = time.perf_counter()
    prober = Prober(model, tokens, prefill, autocast)
    fp16 = plain_policy(model).layers[0]
    units = [(layer, stream) for layer in range(model.cfg.n_layer) for stream in cache_widths(model.cfg)]
    jobs = [(layer, stream, spec) for layer, stream in units for spec in menu(stream) if spec != FP16]
    probes = []
    for layer, stream, spec in tqdm(jobs, desc="kv sensitivity", unit="probe", disable=None, leave=False):
        layers = [fp16] * model.cfg.n_layer
        layers[layer] = LayerPolicy({**fp16.streams, stream: spec})
        probes.append({"layer": layer, "stream": stream, "spec": str(spec), **prober.metrics(KVPolicy(tuple(layers)))})
    return {"probes": probes, "prefill": prefill, "decode": prober.D, "seconds": time.perf_counter() - t0}


def damage(probe: dict, limits: GuardLimits) -> float:
    nll_limit = min(limits.delta_nll, math.log(limits.ppl_ratio))
    return probe["kl"] / nll_limit + (probe["max_abs_logit"] / limits.max_abs_logit) ** 2


def lower_hull(points: list[tuple[int, float, StreamSpec]]) -> list[tuple[int, float, StreamSpec]]:
    """(bytes, damage, spec) -> the lower convex hull from the cheapest point to the least damaging one."""
    best: dict[int, tuple[int, float, StreamSpec]] = {}
    for p in points:  # one point per byte count: the least damaging
        if p[0] not in best or p[1] < best[p[0]][1]:
            best[p[0]] = p
    hull: list[tuple[int, float, StreamSpec]] = []
    for p in sorted(best.values(), key=lambda p: p[0]):
        while len(hull) >= 2:
            (x0, y0, _), (x1, y1, _) = hull[-2], hull[-1]
            if (x1 - x0) * (p[1] - y0) - (y1 - y0) * (p[0] - x0) > 0:  # a left turn: hull[-1] stays
                break
            hull.pop()
        hull.append(p)
    lowest = min(range(len(hull)), key=lambda i: (hull[i][1], hull[i][0]))
    return hull[: lowest + 1]


def quality_path(
    sensitivity: dict, model: GPT, max_seq: int, resid: int, limits: GuardLimits
) -> list[tuple[int, float, KVPolicy]]:
    """(bytes at max_seq, predicted damage, policy) from the cheapest policy to the least damaging one (fp16),
    one upgrade of one unit per step, the upgrade removing the most damage per added byte first."""
    widths, heads, n_layer = cache_widths(model.cfg), model.cfg.kv_heads, model.cfg.n_layer
    by_unit: dict[tuple[int, str], list] = {}
    for probe in sensitivity["probes"]:
        spec = parse_spec(probe["spec"])
        size = stream_bytes(spec, widths[probe["stream"]], heads, 1, max_seq, resid)
        by_unit.setdefault((probe["layer"], probe["stream"]), []).append((size, damage(probe, limits), spec))
    hulls = {}
    for (layer, stream), points in by_unit.items():
        fp16 = (stream_bytes(FP16, widths[stream], heads, 1, max_seq, resid), 0.0, FP16)
        hulls[(layer, stream)] = lower_hull([*points, fp16])
    steps = []
    for unit, hull in hulls.items():
        for i in range(len(hull) - 1):
            (b0, d0, _), (b1, d1, _) = hull[i], hull[i + 1]
            steps.append(((d0 - d1) / (b1 - b0), i, unit))
    steps.sort(key=lambda s: (-s[0], s[1]))
    position = dict.fromkeys(hulls, 0)

    def point() -> tuple[int, float, KVPolicy]:
        chosen = {unit: hulls[unit][i] for unit, i in position.items()}
        layers = tuple(LayerPolicy({s: chosen[(layer, s)][2] for s in widths}, resid) for layer in range(n_layer))
        return sum(c[0] for c in chosen.values()), sum(c[1] for c in chosen.values()), KVPolicy(layers)

    path = [point()]
    for _, i, unit in steps:
        if i + 1 > position[unit]:  # (a rounding tie could list a unit's steps out of order: never step back)
            position[unit] = i + 1
            path.append(point())
    return path
