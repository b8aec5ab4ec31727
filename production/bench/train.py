"""Training-step benchmark: forward + backward + AdamW step for each attention mode, in one process.

    python -m production.bench.train --size small --block 256 --batch-size 1 --steps 10 [--json]

Each mode gets the size preset with its paper experiment (standard = paper_baseline, ...), random token
batches (timing does not depend on the data) and `--warmup` untimed steps; then the modes are timed
round-robin, `--rounds` rounds of `--steps` steps, with the device synced around each step. All modes are alive
at once (pass fewer `--modes` if memory is short). Prints ms/step, tokens/s, MFU where the peak is known, and each
mode's step-time ratio to standard.
"""

from __future__ import annotations

import json
import statistics
import sys
import time

import torch

from production.config.fields import add_arguments
from production.config.presets import SIZES
from production.config.resolve import resolve
from production.core.entry import Parser, command
from production.core.errors import UserError
from production.core.runtime import (
    RuntimeConfig,
    environment,
    peak_flops,
    peak_rss_bytes,
    retain_cpu_heap,
    synchronize,
)
from production.model.gpt import GPT
from production.train.optim import build_optimizer

MODE_EXPS = {
    "standard": "paper_baseline",
    "bottleneck": "paper_bottleneck",
    "decoupled": "paper_decoupled",
    "gqa": "paper_gqa",
}


class ModeBench:
    """One experiment's model, optimizer and fixed random batches, ready to time training steps."""

    def __init__(self, exp: str, args, runtime: RuntimeConfig):
        resolved = resolve(args.size, exp, {**dims(args), "batch_size": args.batch_size})
        self.cfg, train_cfg = resolved.model, resolved.train
        torch.manual_seed(0)
        self.runtime = runtime
        self.model = GPT(self.cfg).to(runtime.device)
        self.optimizer = build_optimizer(self.model, train_cfg, runtime.device)
        self.fwd = torch.compile(self.model) if runtime.compile else self.model
        self.B, self.T = train_cfg.batch_size, self.cfg.block_size
        gen = torch.Generator().manual_seed(0)
        self.batches = [torch.randint(0, self.cfg.vocab_size, (self.B, self.T + 1), generator=gen) for _ in range(4)]
        self.times: list[float] = []
        self.peak_bytes = 0  # CUDA: the most memory allocated during one of this mode's steps

    def step(self, i: int) -> float:
        """Seconds for one forward + backward + clip + AdamW step, device synced around it."""
        xy = self.batches[i % len(self.batches)].to(self.runtime.device)
        cuda = torch.device(self.runtime.device).type == "cuda"
        if cuda:
            torch.cuda.reset_peak_memory_stats(self.runtime.device)
        synchronize(self.runtime.device)
        t0 = time.perf_counter()
        with self.runtime.autocast():
            _, loss = self.fwd(xy[:, :-1], xy[:, 1:])
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        synchronize(self.runtime.device)
        seconds = time.perf_counter() - t0
        if cuda:
            self.peak_bytes = max(self.peak_bytes, torch.cuda.max_memory_allocated(self.runtime.device))
        return seconds

    def result(self) -> dict:
        ms = 1000 * statistics.median(self.times)
        tok_s = self.B * self.T / (ms / 1000)
        peak = peak_flops(self.runtime.device, self.runtime.dtype)
        return {
            "ms_per_step": ms,
            "ms_mean": 1000 * statistics.fmean(self.times),
            "tok_s": tok_s,
            "n_params": self.model.num_params(),
            "attn_dim": self.cfg.attn_dim,
            "mfu": None if peak is None else self.model.flops_per_token(self.T) * tok_s / peak,
            "peak_bytes": self.peak_bytes or None,
        }


def time_modes(modes: list[str], args, runtime) -> dict:
    """Each attention mode's paper experiment, timed by time_exps."""
    return time_exps({m: MODE_EXPS[m] for m in modes}, args, runtime)


def time_exps(exps: dict[str, str], args, runtime) -> dict:
    """label -> experiment: warm every one up (`--warmup` steps), then time them round-robin (`--rounds` rounds of
    `--steps` steps), so drift in the machine's speed lands on every one alike; each reports its median step."""
    benches = {label: ModeBench(exp, args, runtime) for label, exp in exps.items()}
    for b in benches.values():
        for i in range(args.warmup):
            b.step(i)
    for _ in range(args.rounds):
        for b in benches.values():
            b.times += [b.step(i) for i in range(args.steps)]
    return {label: b.result() for label, b in benches.items()}


DIM_FIELDS = ["n_layer", "d_model", "n_head", "d_ff", "block_size"]


def dims(args) -> dict:
    return {name: getattr(args, name) for name in DIM_FIELDS}


def build_parser() -> Parser:
    p = Parser(prog="python -m production.bench.train", description=__doc__.split("\n")[0])
    p.add_argument("--size", default="small", help=f"size preset: {', '.join(SIZES)}")
    add_arguments(p, [*DIM_FIELDS, "batch_size", "device", "dtype", "compile"])
    p.add_argument("--steps", type=int, default=4, help="timed steps per mode and round")
    p.add_argument("--rounds", type=int, default=3, help="round-robin rounds over the modes")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps per mode")
    p.add_argument("--modes", default=",".join(MODE_EXPS), help="comma-separated attention modes")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    return p


@command()
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    unknown = [m for m in modes if m not in MODE_EXPS]
    if unknown or not modes:
        raise UserError(f"unknown mode(s) {unknown}; valid: {', '.join(MODE_EXPS)}")
    if args.steps < 1 or args.rounds < 1 or args.warmup < 0:
        raise UserError("--steps and --rounds must be >= 1, --warmup >= 0")
    runtime = resolve(
        args.size, "paper_baseline", {"device": args.device, "dtype": args.dtype, "compile": args.compile}
    ).runtime
    if torch.device(runtime.device).type == "cpu":
        retain_cpu_heap()
    results = time_modes(modes, args, runtime)
    base = results.get("standard")
    for r in results.values():
        r["ratio_to_standard"] = None if base is None else r["ms_per_step"] / base["ms_per_step"]
    report = {"modes": results, "device": environment(runtime.device), "config": bench_config(args, runtime)}
    report["peak_rss_bytes"] = peak_rss_bytes()  # the whole process: every mode's model and optimizer, alive at once
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print_table(report, args, runtime)
    return 0


def bench_config(args, runtime: RuntimeConfig) -> dict:
    cfg = resolve(args.size, "paper_baseline", dims(args)).model
    return {
        "size": args.size,
        "d_model": cfg.d_model,
        "n_layer": cfg.n_layer,
        "n_head": cfg.n_head,
        "block_size": cfg.block_size,
        "batch_size": args.batch_size or SIZES[args.size]["batch_size"],
        "dtype": runtime.dtype,
        "compile": runtime.compile,
        "steps": args.steps,
        "rounds": args.rounds,
        "warmup": args.warmup,
    }


def print_table(report: dict, args, runtime: RuntimeConfig) -> None:
    c = report["config"]
    print(
        f"{args.size}: d_model={c['d_model']} n_layer={c['n_layer']} block={c['block_size']} "
        f"batch={c['batch_size']} on {report['device']['device_name']} ({runtime.device}, {runtime.dtype}, "
        f"compile={runtime.compile}), median of {args.rounds} x {args.steps} steps (modes interleaved) after "
        f"{args.warmup} warm-up"
    )
    print(f"{'mode':<11}{'params':>10}{'ms/step':>10}{'tok/s':>11}{'vs std':>8}{'MFU':>7}{'peak GiB':>10}")
    for m, r in report["modes"].items():
        ratio = "-" if r["ratio_to_standard"] is None else f"{r['ratio_to_standard']:.3f}"
        mfu = "-" if r["mfu"] is None else f"{100 * r['mfu']:.1f}%"
        peak = "-" if r["peak_bytes"] is None else f"{r['peak_bytes'] / 2**30:.2f}"
        print(
            f"{m:<11}{r['n_params'] / 1e6:>9.1f}M{r['ms_per_step']:>10.1f}{r['tok_s']:>11,.0f}{ratio:>8}{mfu:>7}"
            f"{peak:>10}"
        )
    print("vs std: this mode's step time over the standard model's (below 1 is faster); MFU and peak: CUDA only")
    print(f"peak resident memory of this process (all modes alive): {report['peak_rss_bytes'] / 2**30:.2f} GiB")


if __name__ == "__main__":
    sys.exit(main())
