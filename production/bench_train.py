"""Training-step benchmark: forward + backward + AdamW step for each attention mode, in one process.

    python -m production.bench_train --size small --block 256 --batch-size 1 --steps 10 [--json]

Each mode gets the size preset with its paper experiment (standard = paper_baseline, ...), random token
batches (timing does not depend on the data), `--warmup` untimed steps, then `--steps` timed steps with the
device synced before the clock is read. Prints ms/step, tokens/s, MFU where the peak is known, and each
mode's step-time ratio to standard.
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import sys
import time

import torch

from production.cli import Parser
from production.config import SIZES, resolve_model, resolve_train
from production.errors import UserError
from production.model import GPT
from production.runtime import environment, peak_flops, resolve_runtime, retain_cpu_heap, synchronize
from production.train_cmd import MODEL_FLAGS
from production.trainer import build_optimizer

MODE_EXPS = {
    "standard": "paper_baseline",
    "bottleneck": "paper_bottleneck",
    "decoupled": "paper_decoupled",
    "gqa": "paper_gqa",
}


def time_mode(mode: str, args, runtime) -> dict:
    overrides = {field: getattr(args, flag) for flag, field in MODEL_FLAGS.items() if hasattr(args, flag)}
    model_cfg = resolve_model(args.size, MODE_EXPS[mode], overrides)
    train_cfg = resolve_train(args.size, MODE_EXPS[mode], {"batch_size": args.batch_size, "steps": args.steps})
    torch.manual_seed(0)
    model = GPT(model_cfg).to(runtime.device)
    optimizer = build_optimizer(model, train_cfg, runtime.device)
    fwd = torch.compile(model) if runtime.compile else model
    B, T = train_cfg.batch_size, model_cfg.block_size
    gen = torch.Generator().manual_seed(0)
    batches = [torch.randint(0, model_cfg.vocab_size, (B, T + 1), generator=gen) for _ in range(4)]

    def step(i: int) -> None:
        xy = batches[i % len(batches)].to(runtime.device)
        with runtime.autocast():
            _, loss = fwd(xy[:, :-1], xy[:, 1:])
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    for i in range(args.warmup):
        step(i)
    times = []
    for i in range(args.steps):
        synchronize(runtime.device)
        t0 = time.perf_counter()
        step(i)
        synchronize(runtime.device)
        times.append(time.perf_counter() - t0)
    ms = 1000 * statistics.median(times)
    tok_s = B * T / (ms / 1000)
    peak = peak_flops(runtime.device, runtime.dtype)
    result = {
        "ms_per_step": ms,
        "ms_mean": 1000 * statistics.fmean(times),
        "tok_s": tok_s,
        "n_params": model.num_params(),
        "attn_dim": model_cfg.attn_dim,
        "mfu": None if peak is None else model.flops_per_token(T) * tok_s / peak,
    }
    return result


def main(argv: list[str] | None = None) -> int:
    p = Parser(
        prog="python -m production.bench_train",
        description=__doc__.split("\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--size", default="small", help=f"size preset: {', '.join(SIZES)}")
    for flag in ("n_layer", "d_model", "n_head", "d_ff", "block"):
        p.add_argument(f"--{flag.replace('_', '-')}", type=int)
    p.add_argument("--batch-size", type=int, help="micro-batch (default: the preset's)")
    p.add_argument("--steps", type=int, default=10, help="timed steps per mode")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps per mode")
    p.add_argument("--modes", default=",".join(MODE_EXPS), help="comma-separated attention modes")
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", default="auto")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None)
    p.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    args = p.parse_args(argv)
    try:
        modes = [m.strip() for m in args.modes.split(",") if m.strip()]
        unknown = [m for m in modes if m not in MODE_EXPS]
        if unknown or not modes:
            raise UserError(f"unknown mode(s) {unknown}; valid: {', '.join(MODE_EXPS)}")
        if args.steps < 1 or args.warmup < 0:
            raise UserError("--steps must be >= 1 and --warmup >= 0")
        runtime = resolve_runtime(args.device, args.dtype, args.compile)
        if torch.device(runtime.device).type == "cpu":
            retain_cpu_heap()
        results = {}
        for m in modes:  # one model alive at a time; collect the previous one before building the next
            results[m] = time_mode(m, args, runtime)
            gc.collect()
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    base = results.get("standard")
    for r in results.values():
        r["ratio_to_standard"] = None if base is None else r["ms_per_step"] / base["ms_per_step"]
    cfg = resolve_model(
        args.size, "paper_baseline", {f: getattr(args, k) for k, f in MODEL_FLAGS.items() if hasattr(args, k)}
    )
    report = {
        "modes": results,
        "device": environment(runtime.device),
        "config": {
            "size": args.size,
            "d_model": cfg.d_model,
            "n_layer": cfg.n_layer,
            "n_head": cfg.n_head,
            "block_size": cfg.block_size,
            "batch_size": args.batch_size or SIZES[args.size]["batch_size"],
            "dtype": runtime.dtype,
            "compile": runtime.compile,
            "steps": args.steps,
            "warmup": args.warmup,
        },
    }
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    c = report["config"]
    print(
        f"{args.size}: d_model={c['d_model']} n_layer={c['n_layer']} block={c['block_size']} "
        f"batch={c['batch_size']} on {report['device']['device_name']} ({runtime.device}, {runtime.dtype}, "
        f"compile={runtime.compile}), median of {args.steps} steps after {args.warmup} warm-up"
    )
    print(f"{'mode':<11}{'params':>10}{'ms/step':>10}{'tok/s':>11}{'vs std':>8}{'MFU':>7}")
    for m, r in results.items():
        ratio = "-" if r["ratio_to_standard"] is None else f"{r['ratio_to_standard']:.3f}"
        mfu = "-" if r["mfu"] is None else f"{100 * r['mfu']:.1f}%"
        print(f"{m:<11}{r['n_params'] / 1e6:>9.1f}M{r['ms_per_step']:>10.1f}{r['tok_s']:>11,.0f}{ratio:>8}{mfu:>7}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
