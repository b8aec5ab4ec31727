"""Decode benchmark: one-token decode steps over a filled KV cache, per context length and cache policy.

    python -m production.bench.decode --size small --exp paper_baseline,paper_decoupled \\
        --context 1024,4096,16384 --policies "fp16;ksem=q4_0@32,kgeo=q8_0@32,v=q4_0@32,resid=128"

The cache is filled with `context` tokens of random K/V (decode cost does not depend on the values), then
`--warmup` untimed steps, then `--rounds` round-robin passes over all rows of `--steps` timed real decode steps
each, through the whole model, with the device synced around each. Reports the median ms per token, the
cache's allocated bytes, and the effective GB/s of cache read (bytes holding the context / step time). All in
one process, so ratios between rows are fair.
Policies are separated by ';' (or by ',' where unambiguous: a new policy starts when a key repeats; a per-layer
policy, with its '|' between layer ranges, always ends at a ';'); a policy
whose streams do not match a model (ksem for a standard model) is skipped for that model.
"""

from __future__ import annotations

import json
import re
import statistics
import sys
import time
from dataclasses import dataclass

import torch

from production.cache import triton_decode
from production.cache.attend import IMPLS
from production.cache.kvcache import DEFAULT_CHUNK_TOKENS, estimate_bytes, fill_random
from production.cache.policy import PAPER_POLICY, parse_policy
from production.config.fields import add_arguments
from production.config.presets import EXPERIMENTS, SIZES
from production.config.resolve import resolve
from production.core.entry import Parser, command
from production.core.errors import UserError
from production.core.runtime import RuntimeConfig, environment, resolve_runtime, retain_cpu_heap, synchronize
from production.model.attention import cache_widths
from production.model.gpt import GPT
from production.sample.graphs import GraphedDecoder
from production.train.checkpoint import load_model

DEFAULT_QUANT = {"decoupled": PAPER_POLICY}


def split_policies(text: str) -> list[str]:
    """'fp16,ksem=q4_0,kgeo=q8_0,v=q4_0,resid=128,k=q8_0,v=q8_0' -> ['fp16', 'ksem=...,resid=128', 'k=q8_0,v=q8_0']."""
    policies = []
    for chunk in text.split(";"):
        if "|" in chunk or re.match(r"\s*L\d", chunk):  # a per-layer policy: whole, up to the next ';'
            policies.append(chunk.strip())
            continue
        group: list[str] = []
        for item in (i.strip() for i in chunk.split(",")):
            if not item:
                continue
            key = item.partition("=")[0]
            if "=" not in item or key in {g.partition("=")[0] for g in group} or (group and "resid=" in group[-1]):
                if group:
                    policies.append(",".join(group))
                group = []
            if "=" not in item:
                policies.append(item)
            else:
                group.append(item)
        if group:
            policies.append(",".join(group))
    return policies


@torch.no_grad()
def decode_step(model: GPT, cache, runtime, stepper: GraphedDecoder | None = None) -> float:
    """Seconds for one real decode step through the whole model (device synced before and after); through
    `stepper` (CUDA graphs) when given."""
    token = torch.zeros(cache.batch, 1, dtype=torch.long, device=runtime.device)
    synchronize(runtime.device)
    t0 = time.perf_counter()
    if stepper is not None:  # applies the run's autocast itself
        stepper(token)
    else:
        with runtime.autocast():
            model(token, cache=cache, last_only=True)
    synchronize(runtime.device)
    return time.perf_counter() - t0


@dataclass(frozen=True)
class Timing:
    """How decode steps are timed: `warmup` untimed steps per row, then `rounds` round-robin passes of `steps`
    timed steps each, for `batch` sequences; attention reads `chunk` tokens at a time with strategy `impl` (a row's
    own "impl" wins)."""

    steps: int = 3
    rounds: int = 3
    warmup: int = 2
    chunk: int = DEFAULT_CHUNK_TOKENS
    impl: str = "auto"
    batch: int = 1
    graphs: bool = False  # decode steps through CUDA graphs (production.sample.graphs); a row's own "graphs" wins


def time_rows(rows: list[dict], timing: Timing, runtime) -> None:
    """Fill every row's cache ({model, context, policy}), then time the rows round-robin, so drift in machine
    speed lands on all rows alike; each row gets the median step (ms_per_token), its cache's bytes and the
    effective GB/s of cache read."""
    for row in rows:
        capacity = row["context"] + timing.warmup + timing.rounds * timing.steps
        impl = row.get("impl", timing.impl)
        row["cache"] = row["model"].new_cache(row["policy"], timing.batch, capacity, timing.chunk, impl)
        fill_random(row["cache"], row["context"], seed=0)
        graphs = row.get("graphs", timing.graphs)
        row["stepper"] = GraphedDecoder(row["model"], row["cache"], runtime.autocast) if graphs else None
        for _ in range(timing.warmup):
            decode_step(row["model"], row["cache"], runtime, row["stepper"])
        row["times"] = []
    for _ in range(timing.rounds):
        for row in rows:
            row["times"] += [
                decode_step(row["model"], row["cache"], runtime, row["stepper"]) for _ in range(timing.steps)
            ]
    for row in rows:
        if row["stepper"] is not None:
            row["stepper"].close()
        row.pop("stepper")
        cache = row.pop("cache")
        ms = 1000 * statistics.median(row.pop("times"))
        context_bytes = estimate_bytes(row["policy"], cache.widths, cache.heads, timing.batch, row["context"])
        row.update(
            ms_per_token=ms,
            cache_bytes=cache.nbytes(),
            context_bytes=context_bytes,
            gb_s=context_bytes / (ms / 1000) / 1e9,
        )


def build_models(args, runtime: RuntimeConfig) -> list[tuple[str, GPT]]:
    if args.ckpt is not None:
        model, ckpt = load_model(args.ckpt, runtime.device)
        return [(ckpt["config"].get("exp", "ckpt"), model)]
    overrides = {"n_layer": args.n_layer, "d_model": args.d_model, "n_head": args.n_head}
    models = []
    for exp in [e.strip() for e in args.exp.split(",") if e.strip()]:
        torch.manual_seed(0)
        models.append((exp, GPT(resolve(args.size, exp, overrides).model).to(runtime.device).eval()))
    return models


def build_parser() -> Parser:
    p = Parser(prog="python -m production.bench.decode", description=__doc__.split("\n")[0])
    p.add_argument("--ckpt", help="benchmark this checkpoint's model (else --size/--exp with random weights)")
    p.add_argument("--size", default="small", help=f"size preset: {', '.join(SIZES)}")
    p.add_argument("--exp", default="paper_decoupled", help="comma-separated experiment presets")
    add_arguments(p, ["n_layer", "d_model", "n_head"])
    p.add_argument("--context", default="1024,4096,16384", help="comma-separated context lengths")
    p.add_argument("--policies", help=f"cache policies (default: fp16 and, for decoupled, {PAPER_POLICY})")
    p.add_argument("--steps", type=int, default=3, help="timed decode steps per row and round")
    p.add_argument("--rounds", type=int, default=3, help="round-robin rounds over all rows")
    p.add_argument("--warmup", type=int, default=2, help="untimed decode steps per row")
    p.add_argument("--chunk", type=int, default=DEFAULT_CHUNK_TOKENS, help="tokens per attention chunk")
    p.add_argument("--impl", default="auto", choices=IMPLS, help="cached-attention strategy (triton: fused, CUDA)")
    p.add_argument("--graphs", action="store_true", help="decode steps through CUDA graphs (fused kernel; CUDA)")
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", default="auto")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    return p


def check_args(args) -> list[int]:
    """The context lengths; every other bad value is a UserError."""
    try:
        contexts = [int(c) for c in args.context.split(",") if c.strip()]
    except ValueError as e:
        raise UserError(f"--context needs positive integers, got {args.context!r}") from e
    if not contexts or min(contexts) < 1:
        raise UserError(f"--context needs positive integers, got {args.context!r}")
    if args.steps < 1 or args.rounds < 1 or args.warmup < 0 or args.chunk < 1:
        raise UserError("--steps, --rounds and --chunk must be >= 1, --warmup >= 0")
    if args.ckpt is None:
        unknown = [e for e in args.exp.split(",") if e.strip() and e.strip() not in EXPERIMENTS]
        if unknown:
            raise UserError(f"unknown exp {unknown[0]!r}; valid exps: {', '.join(EXPERIMENTS)}")
    return contexts


def build_rows(models: list[tuple[str, GPT]], contexts: list[int], policies_text: str | None) -> list[dict]:
    """One row per model, context and policy that applies to the model (a policy naming streams of another
    attention mode is skipped for it, unless there is only one model)."""
    rows = []
    for exp, model in models:
        streams = list(cache_widths(model.cfg))
        default_quant = DEFAULT_QUANT.get(model.cfg.attn_mode, "k=q8_0@32,v=q4_0@32,resid=128")
        texts = split_policies(policies_text) if policies_text else ["fp16", default_quant]
        policies = []
        for text in texts:
            try:
                policies.append(parse_policy(text, streams, model.cfg.n_layer))
            except UserError:
                if len(models) == 1:
                    raise
        rows += [{"exp": exp, "model": model, "context": c, "policy": p} for c in contexts for p in policies]
    return rows


@command()
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    contexts = check_args(args)
    runtime = resolve_runtime(args.device, args.dtype, compile=False)
    if (args.impl == "triton" or args.graphs) and not triton_decode.available(runtime.device):
        raise UserError(triton_decode.why_unavailable(runtime.device))
    if torch.device(runtime.device).type == "cpu":
        retain_cpu_heap()
    models = build_models(args, runtime)
    rows = build_rows(models, contexts, args.policies)
    time_rows(rows, Timing(args.steps, args.rounds, args.warmup, args.chunk, args.impl, graphs=args.graphs), runtime)
    keys = ("ms_per_token", "cache_bytes", "context_bytes", "gb_s")
    results = [
        {
            "exp": r["exp"],
            "attn_mode": r["model"].cfg.attn_mode,
            "context": r["context"],
            "policy": str(r["policy"]),
            **{k: r[k] for k in keys},
        }
        for r in rows
    ]
    cfg = models[0][1].cfg
    config = {
        "size": args.size if args.ckpt is None else None,
        "ckpt": args.ckpt,
        "d_model": cfg.d_model,
        "n_layer": cfg.n_layer,
        "n_head": cfg.n_head,
        "dtype": runtime.dtype,
        "steps": args.steps,
        "rounds": args.rounds,
        "warmup": args.warmup,
        "chunk_tokens": args.chunk,
        "impl": args.impl,
        "graphs": args.graphs,
    }
    report = {"results": results, "device": environment(runtime.device), "config": config}
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    print(
        f"decode on {report['device']['device_name']} ({runtime.device}, {runtime.dtype}), d_model={cfg.d_model} "
        f"n_layer={cfg.n_layer}, median of {args.rounds} x {args.steps} steps, rows interleaved"
    )
    print(f"{'exp':<24}{'context':>8}  {'policy':<48}{'ms/token':>9}{'cache MiB':>11}{'GB/s':>7}")
    for r in results:
        print(
            f"{r['exp']:<24}{r['context']:>8}  {r['policy']:<48}{r['ms_per_token']:>9.2f}"
            f"{r['cache_bytes'] / 2**20:>11.2f}{r['gb_s']:>7.2f}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
