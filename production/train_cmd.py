"""`main.py --mode train`: arguments -> resolved config -> data -> run directory -> training."""

from __future__ import annotations

import argparse
from pathlib import Path

from production.atomic import write_json
from production.config import resolve_model, resolve_train
from production.errors import UserError
from production.runtime import resolve_runtime

DEFAULT_SIZE, DEFAULT_EXP = "nano", "paper_decoupled"
# CLI flag -> config field, for the overrides that map one to one
MODEL_FLAGS = {
    "n_layer": "n_layer",
    "d_model": "d_model",
    "n_head": "n_head",
    "d_ff": "d_ff",
    "block": "block_size",
    "attn_dim": "attn_dim",
    "sem_dim": "sem_dim",
    "geo_dim": "geo_dim",
    "kv_heads": "kv_heads",
    "null_attn": "null_attn",
    "tie_qk": "tie_qk",
    "rope": "rope",
    "dropout": "dropout",
}
TRAIN_FLAGS = (
    "batch_size",
    "grad_accum",
    "lr",
    "min_lr",
    "warmup_steps",
    "steps",
    "eval_every",
    "eval_iters",
    "log_every",
    "seed",
    "weight_decay",
    "grad_clip",
)


def resolve(args: argparse.Namespace) -> tuple[dict, tuple]:
    """Arguments -> (resolved config dict, (model_cfg, train_cfg, runtime)). Raises UserError."""
    from production.model import param_count

    size, exp = args.size or DEFAULT_SIZE, args.exp or DEFAULT_EXP
    model_cfg = resolve_model(size, exp, {field: getattr(args, flag) for flag, field in MODEL_FLAGS.items()})
    train_cfg = resolve_train(size, exp, {f: getattr(args, f) for f in TRAIN_FLAGS})
    runtime = resolve_runtime(args.device, args.dtype, args.compile)
    resolved = {
        "size": size,
        "exp": exp,
        "model": {**model_cfg.to_dict(), "n_params": param_count(model_cfg)},
        "train": train_cfg.to_dict(),
        "runtime": runtime.to_dict(),
    }
    return resolved, (model_cfg, train_cfg, runtime)


def load_data(args: argparse.Namespace, block_size: int, vocab_size: int):
    from production.corpus import embedded_tokens
    from production.data import open_tokens, split_tokens

    if args.data is not None:
        stream, fmt = open_tokens(args.data)
        source = str(args.data)
    else:
        path, source = embedded_tokens(args.cache_dir.expanduser())
        stream, fmt = open_tokens(path)
        fmt = "embedded"
    return split_tokens(stream, source, fmt, block_size, vocab_size)


def run(args: argparse.Namespace, argv: list[str]) -> int:
    """Validate everything (on every rank of a torchrun job), then rank 0 writes and all ranks train."""
    import dataclasses

    from production.checkpoint import load_checkpoint
    from production.distributed import barrier, init_distributed, shutdown
    from production.trainer import RunDir, check_resumable, train
    from production.tuner import DecisionStore

    resolved, (model_cfg, train_cfg, runtime) = resolve(args)
    ctx, device = init_distributed(args.dist, runtime.device)
    try:
        runtime = dataclasses.replace(runtime, device=device)
        if ctx.active and (train_cfg.batch_size * train_cfg.grad_accum) % ctx.world_size:
            raise UserError(
                f"the global batch ({train_cfg.batch_size} x {train_cfg.grad_accum} windows) does not divide over "
                f"{ctx.world_size} ranks; choose --batch-size/--grad-accum whose product is a multiple of "
                f"{ctx.world_size}"
            )
        resolved["runtime"] = {**runtime.to_dict(), "world_size": ctx.world_size, "dist": ctx.strategy}
        say = print if ctx.is_main else (lambda *a, **k: None)
        splits = load_data(args, model_cfg.block_size, model_cfg.vocab_size)
        resolved["data"] = splits.info
        out_dir = args.out_dir or Path("runs") / f"{resolved['size']}_{resolved['exp']}_s{train_cfg.seed}"
        run = RunDir(out_dir)
        resume = None
        if args.resume or args.resume_path:
            path = args.resume_path or run.last
            if not path.exists():
                raise UserError(f"nothing to resume: {path} does not exist (start without --resume)")
            ckpt = load_checkpoint(path)
            check_resumable(ckpt, resolved, path)
            if ckpt["step"] >= train_cfg.steps:
                say(f"{path} is already at step {ckpt['step']} of {train_cfg.steps}: nothing to train")
                return 0
            resume = (path, ckpt)
        elif run.has_run():
            raise UserError(f"{out_dir} already holds a run; pass --resume to continue it, or --out-dir for a new one")
        if args.stop_at is not None and args.stop_at < 1:
            raise UserError(f"--stop-at must be a positive step, got {args.stop_at}")
        if resume is not None and args.stop_at is not None and args.stop_at <= resume[1]["step"]:
            raise UserError(f"--stop-at {args.stop_at} is not past the checkpoint's step {resume[1]['step']}")
        barrier(ctx)  # every rank has checked the run directory before rank 0 writes into it

        resolved["out_dir"] = str(out_dir)
        if ctx.is_main:
            out_dir.mkdir(parents=True, exist_ok=True)
            write_json(run.resolved_config, resolved)
        m, d = resolved["model"], splits.info
        say(f"model: {m['attn_mode']} d_model={m['d_model']} n_layer={m['n_layer']} n_head={m['n_head']} "
            f"attn_dim={m['attn_dim']} ({m['n_params'] / 1e6:.2f}M params)")  # fmt: skip
        say(f"data: {d['source']} [{d['format']}], {d['n_tokens']:,} tokens "
            f"(train {d['train_tokens']:,} / val {d['val_tokens']:,})")  # fmt: skip
        compile_text = "auto (measured)" if runtime.compile is None else runtime.compile
        where = f"; {ctx.strategy} over {ctx.world_size} ranks" if ctx.active else ""
        say(f"runtime: {runtime.device} {runtime.dtype} compile={compile_text}{where}; run dir {out_dir}")
        if train_cfg.steps == 0:
            say(f"--steps 0: wrote {run.resolved_config}; nothing trained")
            return 0
        barrier(ctx)
        summary = train(resolved, model_cfg, train_cfg, runtime, splits, run, argv, resume, args.stop_at,
                        DecisionStore(args.tuner_store), ctx)  # fmt: skip
        if summary["done"]:
            say(f"done: step {summary['step']}, best val loss {summary['best_val_loss']:.4f}; checkpoints in {out_dir}")
        return 0
    finally:
        shutdown(ctx)
