"""`main.py --mode upcycle`: teacher -> targets -> per target surgery and distillation -> upcycle.json and
upcycle.png in --out-dir (production.upcycle.run)."""

from __future__ import annotations

import json
from pathlib import Path

from production.config.build import resolve_train
from production.config.fields import with_defaults
from production.config.recipe import TrainConfig
from production.core.atomic import write_json
from production.core.runtime import resolve_runtime
from production.data.splits import load_splits
from production.tune.store import DecisionStore
from production.upcycle.figure import plot_upcycle
from production.upcycle.run import Setup, check_run_dirs, load_teacher, parse_targets, upcycle_report

# the distillation recipe: the nano preset's, with these defaults (a CPU-sized run: a few minutes per target)
DEFAULTS = {"steps": 200, "batch_size": 8, "eval_every": 50, "eval_iters": 5, "lr": 3e-4}
RECIPE_FIELDS = ("steps", "batch_size", "eval_every", "eval_iters", "lr", "min_lr", "warmup_steps", "seed",
                 "weight_decay", "grad_clip", "log_every")  # fmt: skip


def recipe(v: dict) -> TrainConfig:
    """The recipe from the given flags over DEFAULTS, derived as training derives it (min_lr, warmup)."""
    given = {k: v[k] for k in RECIPE_FIELDS if v[k] is not None}
    return resolve_train("nano", "paper_decoupled", {**DEFAULTS, **given})


def run(values: dict, argv: list[str]) -> int:
    v = with_defaults(values)
    train_cfg = recipe(v)
    runtime = resolve_runtime(v["device"], v["dtype"], compile=False)
    teacher, info = load_teacher(Path(v["teacher"]), runtime.device)
    targets = parse_targets(teacher.cfg, v["target_kv_ratio"], v["sem_dim"], v["geo_dim"])
    out_dir = Path(v["out_dir"] or f"runs/upcycle_{Path(v['teacher']).resolve().name}")
    check_run_dirs(out_dir, targets, v["resume"])
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
