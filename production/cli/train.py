"""`main.py --mode train`: options -> ResolvedRun -> data -> run directory -> the training loop."""

from __future__ import annotations

import dataclasses
import shlex
import sys
import time
from pathlib import Path

from production.config.fields import BY_NAME, RESOLVED_SECTIONS, with_defaults
from production.config.resolve import ResolvedRun, resolve
from production.core.atomic import write_json
from production.core.errors import UserError
from production.core.layout import RunDir, default_run_dir
from production.data.splits import TokenSplits, load_splits
from production.train.checkpoint import check_resumable, load_checkpoint
from production.train.distributed import DistContext, barrier, init_distributed, shutdown
from production.train.loop import Job, train
from production.tune.store import DecisionStore


def run(values: dict, argv: list[str]) -> int:
    """Validate everything (on every rank of a torchrun job), then rank 0 writes and all ranks train."""
    v = with_defaults(values)
    overrides = {k: x for k, x in v.items() if BY_NAME[k].section in RESOLVED_SECTIONS}
    resolved = resolve(v["size"], v["exp"], overrides)
    ctx, device = init_distributed(v["dist"], resolved.runtime.device)
    resolved = dataclasses.replace(resolved, runtime=dataclasses.replace(resolved.runtime, device=device))
    try:
        return _run(v, argv, resolved, ctx)
    finally:
        shutdown(ctx)


def _run(v: dict, argv: list[str], resolved: ResolvedRun, ctx: DistContext) -> int:
    say = print if ctx.is_main else (lambda *a, **k: None)
    batch = resolved.train.batch_size * resolved.train.grad_accum
    if ctx.active and batch % ctx.world_size:
        raise UserError(
            f"the global batch ({resolved.train.batch_size} x {resolved.train.grad_accum} windows) does not divide "
            f"over {ctx.world_size} ranks; choose --batch-size/--grad-accum whose product is a multiple of "
            f"{ctx.world_size}"
        )
    record = resolved.to_dict()
    record["runtime"] = {**resolved.runtime.to_dict(), "world_size": ctx.world_size, "dist": ctx.strategy}
    splits = load_splits(v["data"], v["cache_dir"], resolved.model.block_size, resolved.model.vocab_size)
    record["data"] = splits.info
    out_dir = v["out_dir"] or default_run_dir(resolved.size, resolved.exp, resolved.train.seed)
    run = RunDir(Path(out_dir))
    resume = find_resume(v, run, record, ctx.is_main, say)
    if resume is not None and resume[1]["step"] >= resolved.train.steps:
        say(f"{resume[0]} is already at step {resume[1]['step']} of {resolved.train.steps}: nothing to train")
        return 0
    check_stop_at(v["stop_at"], resume)
    barrier(ctx)  # every rank has checked the run directory before rank 0 writes into it
    record["out_dir"] = str(out_dir)
    if ctx.is_main:
        run.path.mkdir(parents=True, exist_ok=True)
        write_json(run.resolved_config, record)
    describe(resolved, record["model"]["n_params"], splits, run, ctx, say)
    if resolved.train.steps == 0:
        say(f"--steps 0: wrote {run.resolved_config}; nothing trained")
        return 0
    barrier(ctx)
    job = Job(
        record,
        resolved.model,
        resolved.train,
        resolved.runtime,
        splits,
        run,
        argv,
        resume,
        v["stop_at"],
        DecisionStore(v["tuner_store"]),
        v["save_every_s"],
        v["tracker"],
        v["tracker_group"],
        ctx,
    )
    summary = train(job)
    if summary["interrupted"]:
        if ctx.is_main:
            print(f"\n{interrupted_message(summary, resolved.train.steps, run, argv, ctx)}", file=sys.stderr)
        return 130
    if summary["done"]:
        say(f"done: step {summary['step']}, best val loss {summary['best_val_loss']:.4f}; checkpoints in {out_dir}")
    else:
        say(f"stopped at step {summary['step']}/{resolved.train.steps}; continue with --resume ({run.last})")
    return 0


def find_resume(v: dict, run: RunDir, record: dict, is_main: bool, say) -> tuple[Path, dict] | None:
    """(path, checkpoint) to resume from, checked against the resolved config; None for a fresh run. A run
    directory that holds a log but no checkpoint is a start interrupted before anything was saved: its log is
    set aside and the run starts over, with or without --resume."""
    if v["resume_path"] is not None:
        return checked(v["resume_path"], record)
    if run.last.exists():
        if not v["resume"]:
            raise UserError(f"{run.path} already holds a run; pass --resume to continue it, or --out-dir for a new one")
        return checked(run.last, record)
    if run.best.exists():
        raise UserError(f"{run.path} holds best.pt but no last.pt to resume; move it away or use another --out-dir")
    if run.log.exists():
        aside = run.path / f"{run.log.name}.interrupted-{int(time.time())}"
        if is_main:
            run.log.rename(aside)
        say(f"{run.path} holds no checkpoint yet (an interrupted start): starting over, its log moved to {aside.name}")
        return None
    if v["resume"]:
        raise UserError(f"nothing to resume: {run.path} holds no last.pt (start without --resume)")
    return None


def checked(path: Path, record: dict) -> tuple[Path, dict]:
    ckpt = load_checkpoint(path)
    check_resumable(ckpt, record, path)
    return path, ckpt


def interrupted_message(summary: dict, steps: int, run: RunDir, argv: list[str], ctx: DistContext) -> str:
    """What Ctrl-C leaves behind, and the command that continues (or restarts) the run."""
    launcher = f"torchrun --nproc-per-node {ctx.world_size} main.py" if ctx.active else "python main.py"
    if summary["saved_step"] is None:
        return (
            f"interrupted before the first checkpoint; nothing to keep in {run.path}. "
            f"The same command starts over:\n  {launcher} {shlex.join(argv)}"
        )
    return (
        f"interrupted at step {summary['step']}/{steps}; {run.last} holds step {summary['saved_step']}. "
        f"Continue with:\n  {launcher} {shlex.join(resume_argv(argv))}"
    )


def resume_argv(argv: list[str]) -> list[str]:
    """argv that continues this run from its own last.pt: any --resume-path dropped, --resume added."""
    kept, skip = [], False
    for arg in argv:
        if skip or arg.startswith("--resume-path"):
            skip = arg == "--resume-path" and not skip
            continue
        kept.append(arg)
    return kept if "--resume" in kept else [*kept, "--resume"]


def check_stop_at(stop_at: int | None, resume: tuple[Path, dict] | None) -> None:
    if resume is not None and stop_at is not None and stop_at <= resume[1]["step"]:
        raise UserError(f"--stop-at {stop_at} is not past the checkpoint's step {resume[1]['step']}")


def describe(resolved: ResolvedRun, n_params: int, splits: TokenSplits, run: RunDir, ctx: DistContext, say) -> None:
    """Three lines: the model, the data, where and how it runs."""
    m, d, r = resolved.model, splits.info, resolved.runtime
    say(
        f"model: {m.attn_mode} d_model={m.d_model} n_layer={m.n_layer} n_head={m.n_head} attn_dim={m.attn_dim} "
        f"({n_params / 1e6:.2f}M params)"
    )
    say(
        f"data: {d['source']} [{d['format']}], {d['n_tokens']:,} tokens "
        f"(train {d['train_tokens']:,} / val {d['val_tokens']:,})"
    )
    compile_text = "auto (measured)" if r.compile is None else r.compile
    where = f"; {ctx.strategy} over {ctx.world_size} ranks" if ctx.active else ""
    say(f"runtime: {r.device} {r.dtype} compile={compile_text}{where}; run dir {run.path}")
