"""`main.py --mode upcycle`: teacher -> targets -> per target surgery and distillation -> upcycle.json and
upcycle.png in --out-dir (production.upcycle.run)."""

from __future__ import annotations

import json
from pathlib import Path

from production.config.fields import with_defaults
from production.config.recipe import TrainConfig
from production.core.atomic import write_json
from production.core.errors import UserError
from production.core.layout import RunDir
from production.core.runtime import resolve_runtime
from production.data.splits import load_splits
from production.tune.store import DecisionStore
from production.upcycle.figure import plot_upcycle
from production.upcycle.run import Setup, load_teacher, parse_targets, upcycle_report

# the distillation recipe's defaults (a CPU-sized run at nano: a few minutes per target)
DEFAULTS = {"steps": 200, "batch_size": 8, "eval_every": 50, "eval_iters": 5, "lr": 3e-4, "log_every": 10}


def recipe(v: dict) -> TrainConfig:
    d = {k: v[k] if v[k] is not None else DEFAULTS[k] for k in DEFAULTS}
    lr = d["lr"]
    return TrainConfig(
        lr=lr,
        min_lr=v["min_lr"] if v["min_lr"] is not None else 0.1 * lr,
        warmup_steps=v["warmup_steps"] if v["warmup_steps"] is not None else min(200, d["steps"] // 10),
        steps=d["steps"],
        batch_size=d["batch_size"],
        grad_accum=1,
        eval_every=d["eval_every"],
        eval_iters=d["eval_iters"],
        seed=v["seed"] if v["seed"] is not None else 1337,
        weight_decay=v["weight_decay"] if v["weight_decay"] is not None else 0.1,
        grad_clip=v["grad_clip"] if v["grad_clip"] is not None else 1.0,
        log_every=d["log_every"],
    )


def run(values: dict, argv: list[str]) -> int:
    v = with_defaults(values)
    train_cfg = recipe(v)
    runtime = resolve_runtime(v["device"], v["dtype"], compile=False)
    teacher, info = load_teacher(Path(v["teacher"]), runtime.device)
    targets = parse_targets(teacher.cfg, v["target_kv_ratio"], v["sem_dim"], v["geo_dim"])
    out_dir = Path(v["out_dir"] or f"runs/upcycle_{Path(v['teacher']).resolve().name}")
    for target in targets:  # nothing is written over an earlier run unless it is resumed
        run_dir = RunDir(out_dir / target.label)
        if run_dir.path.exists() and any(run_dir.path.iterdir()) and not v["resume"]:
            raise UserError(
                f"{run_dir.path} already holds a run; pass --resume to continue it or choose another --out-dir"
            )
    splits = load_splits(v["data"], v["cache_dir"], teacher.cfg.block_size, teacher.cfg.vocab_size)
    setup = Setup(
        teacher, info, splits, train_cfg, v["layer_steps"], runtime, out_dir, argv, DecisionStore(v["tuner_store"]),
        Path(v["cache_dir"]), v["resume"],
    )  # fmt: skip
    heads = f"{info['kv_heads']} K/V heads of {info['head_dim']}"
    plan = f"{train_cfg.steps} steps each ({v['layer_steps']} layer-wise)"
    print(f"upcycle {info['source']} ({info['attn_mode']}, {heads}) -> {', '.join(t.label for t in targets)}; {plan}")
    report = upcycle_report(setup, targets)
    out_dir.mkdir(parents=True, exist_ok=True)
    write_json(out_dir / "upcycle.json", report)
    plot_upcycle(report, out_dir / "upcycle.png")
    for row in report["targets"]:
        r, k = row["ppl_ratio"], row["kv_ratio_vs_teacher_fp16"]
        print(f"{row['target']}: cache {k['student_fp16']:.2f}x smaller (fp16), {k['student_policy']:.1f}x with "
              f"{row['policy']}; ppl ratio {r['after_surgery']:.3f} after surgery, {r['after_distill']:.3f} after "
              f"{row['steps']['total']} steps")  # fmt: skip
    print(f"wrote {out_dir / 'upcycle.json'} and {out_dir / 'upcycle.png'}")
    print(json.dumps({"upcycle": str(out_dir / "upcycle.json")}))
    return 0
