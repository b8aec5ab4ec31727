"""KV compression benchmark: each cache policy's bytes, quality and decode speed on one trained checkpoint.

    python -m production.bench.compress --ckpt runs/nano_paper_decoupled_s1337 --out runs/compress_nano.json

For every policy (a fixed set of uniform kinds, the paper's, a KIVI-style one, and the tuner's own guarded choice
at --context tokens: `auto`, and `auto-resid0` with no exact window):
- bytes per cached token per layer at --context (windows and rotation matrices included), bits per cached
  value, and the ratio to the standard-attention fp16 cache of the same d_model and n_layer;
- the tuner's guard against an fp16 cache on the run's validation tokens (production.tune.guard, calibrated as
  --kv-policy auto is): max |delta logit|, delta NLL, perplexity ratio, passed;
- ms per decoded token at --decode-context tokens of random K/V, all rows timed round-robin in this process,
  and the ratio to the model's fp16 cache (the decoupled fp16 cache for decoupled models; an fp16 row is always
  measured).
Writes one JSON file and prints a Markdown table.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

from production.bench.decode import Timing, time_rows
from production.cache.kvcache import estimate_bytes
from production.cache.policy import PAPER_POLICY, POLICY_KEYS, parse_policy
from production.config.sampling import MAX_CANDIDATES, GuardLimits
from production.core.atomic import write_json
from production.core.entry import Parser, command
from production.core.errors import UserError
from production.core.layout import checkpoint_file
from production.core.runtime import environment, resolve_runtime, retain_cpu_heap
from production.data.corpus import CORPUS_CACHE_DIR
from production.model.attention import cache_widths
from production.train.checkpoint import load_model
from production.tune.auto import calibration_tokens
from production.tune.guard import Judge
from production.tune.policy import SEARCH_RESID, search_policy

UNIFORM = ["q4_0@32", "nf4@64", "q4_1@32", "q3_1@64", "q3_1@64+rot", "q2_1@64", "q2_1@64+rot", "q2_1@128+rot"]
# the tuner's choice (`--kv-policy auto`: windows of 0 or 128 tokens), and its choice without a window: the guard's
# calibration is short (at most the trained block), so a 128-token window covers much of it but little of 131072
AUTO = {"auto": SEARCH_RESID, "auto-resid0": (0,)}


def default_policies(streams: list[str], resid: int) -> list[str]:
    """fp16, the paper's policy (decoupled models), each UNIFORM kind on every stream, KIVI-style (2-bit keys per
    channel, 2-bit values per token), `auto` and `auto-resid0`."""
    keys = {stream: key for key, stream in POLICY_KEYS.items()}

    def policy(spec_of) -> str:
        return ",".join(f"{keys[s]}={spec_of(s)}" for s in streams) + f",resid={resid}"

    texts = ["fp16", *([PAPER_POLICY] if "k_sem" in streams else [])]
    texts += [policy(lambda s, spec=spec: spec) for spec in UNIFORM]
    texts.append(policy(lambda s: "q2_1@64" if s == "v" else "q2_1@64+ch"))
    return [*texts, *AUTO]


def build_parser() -> Parser:
    p = Parser(prog="python -m production.bench.compress", description=__doc__.split("\n")[0])
    p.add_argument("--ckpt", required=True, help="a checkpoint, run directory or export directory")
    p.add_argument("--policies", help="cache policies separated by ';' (default: the set in --help's text)")
    p.add_argument("--resid", type=int, default=128, help="the exact window of the default policies")
    p.add_argument("--context", type=int, default=131072, help="tokens the bytes (and auto) are sized for")
    p.add_argument("--decode-context", type=int, default=16384, help="tokens of K/V under the timed decode steps")
    p.add_argument("--steps", type=int, default=3, help="timed decode steps per row and round")
    p.add_argument("--rounds", type=int, default=3, help="round-robin rounds over all rows")
    p.add_argument("--out", type=Path, help="JSON report (default: compress.json beside the checkpoint)")
    p.add_argument("--device", default="cpu")
    return p


def measure(model, ckpt: dict, policies: list[str], context: int, decode_context: int, timing: Timing, runtime):
    """The rows of the report (see the module docstring); `auto` rows are searched first (sharing one set of
    sensitivity probes), then judged like the rest."""
    cfg = model.cfg
    widths, heads, streams = cache_widths(cfg), cfg.kv_heads, list(cache_widths(cfg))
    data = ckpt["config"].get("data", {})
    tokens, prefill, source = calibration_tokens(data, [], context, cfg.block_size, CORPUS_CACHE_DIR)
    tokens = tokens.to(runtime.device)
    judge = Judge(model, tokens, prefill, context, GuardLimits(), runtime.autocast)
    standard = context * cfg.n_layer * 2 * cfg.d_model * 2  # the standard-attention fp16 cache of these dims
    rows, timed, searches, sensitivity = [], [], {}, None
    for text in policies:
        row = {"name": text}
        if text in AUTO:
            searches[text] = search_policy(
                model, tokens, prefill, context, GuardLimits(), None, MAX_CANDIDATES, runtime.autocast, AUTO[text],
                sensitivity,
            )  # fmt: skip
            sensitivity = searches[text]["sensitivity"]
            text = searches[text]["policy"]
        policy = parse_policy(text, streams, cfg.n_layer)
        total = estimate_bytes(policy, widths, heads, 1, context)
        verdict = judge(policy)
        row.update(
            policy=str(policy),
            bytes=total,
            bytes_per_token_layer=total / (context * cfg.n_layer),
            bits_per_value=8 * total / (context * cfg.n_layer * sum(widths.values())),
            vs_standard_fp16=standard / total,
            **verdict["guard"],
            passed=verdict["passed"],
        )
        rows.append(row)
        timed.append({"model": model, "context": decode_context, "policy": policy})
    time_rows(timed, timing, runtime)
    fp16_ms = next(t["ms_per_token"] for r, t in zip(rows, timed, strict=True) if r["policy"] == "fp16")
    for r, t in zip(rows, timed, strict=True):
        r.update(decode_ms_per_token=t["ms_per_token"], decode_vs_fp16=t["ms_per_token"] / fp16_ms)
    calibration = {"source": source, "prefill": prefill, "decode": tokens.shape[1] - prefill - 1}
    return rows, searches, calibration


def table(rows: list[dict], decode_context: int) -> list[str]:
    lines = [
        f"| policy | B/token/layer | bits/value | vs standard fp16 | max abs dlogit | dNLL | ppl ratio | guard "
        f"| decode ms @{decode_context // 1024}k | vs fp16 |",
        "|---|---:|---:|---:|---:|---:|---:|---|---:|---:|",
    ]
    for r in rows:
        name = f"{r['name']}: {r['policy']}" if r["name"] in AUTO else r["policy"]
        lines.append(
            f"| `{name}` | {r['bytes_per_token_layer']:.1f} | {r['bits_per_value']:.2f} | "
            f"{r['vs_standard_fp16']:.1f}x | {r['max_abs_logit']:.3f} | {r['delta_nll']:+.4f} | "
            f"{r['ppl_ratio']:.4f} | {'pass' if r['passed'] else 'FAIL'} | {r['decode_ms_per_token']:.2f} | "
            f"{r['decode_vs_fp16']:.2f}x |"
        )
    return lines


@command()
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.context < 2 or args.decode_context < 2 or args.steps < 1 or args.rounds < 1 or args.resid < 0:
        raise UserError("--context and --decode-context must be >= 2, --steps and --rounds >= 1, --resid >= 0")
    runtime = resolve_runtime(args.device, "auto", compile=False)
    if torch.device(runtime.device).type == "cpu":
        retain_cpu_heap()
    ckpt_path = checkpoint_file(args.ckpt)
    model, ckpt = load_model(ckpt_path, runtime.device)
    model.eval()
    streams = list(cache_widths(model.cfg))
    texts = [t.strip() for t in args.policies.split(";") if t.strip()] if args.policies else None
    texts = list(dict.fromkeys(texts or default_policies(streams, args.resid)))
    texts = texts if "fp16" in texts else ["fp16", *texts]  # the decode ratios' baseline
    for text in texts:  # every policy checked before anything is measured
        if text not in AUTO:
            parse_policy(text, streams, model.cfg.n_layer)
    out = args.out or ckpt_path.parent / "compress.json"
    timing = Timing(args.steps, args.rounds)
    rows, searches, calibration = measure(model, ckpt, texts, args.context, args.decode_context, timing, runtime)
    report = {
        "ckpt": str(ckpt_path),
        "step": ckpt["step"],
        "model": model.cfg.to_dict(),
        "context": args.context,
        "decode_context": args.decode_context,
        "calibration": calibration,
        "limits": GuardLimits().to_dict(),
        "rows": rows,
        "auto": {name: {k: v for k, v in s.items() if k != "sensitivity"} for name, s in searches.items()},
        "sensitivity": next((s["sensitivity"] for s in searches.values()), None),
        "environment": environment(runtime.device),
    }
    write_json(out, report)
    print("\n".join(table(rows, args.decode_context)))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
