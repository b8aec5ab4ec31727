"""`main.py --mode upcycle`: a teacher -> for each target cache size, surgery, distillation through the harness's
trainer, and a row of the report (upcycle.json, schema dba.upcycle/1; upcycle.png).

Each target gets its own run directory under --out-dir (resolved_config.json with the teacher and the kept
RoPE pairs, train.jsonl, best.pt / last.pt: a checkpoint like any other, for --mode eval, sample and
mem128k). Perplexities are measured on the same held-out validation windows for teacher and student; KV bytes
per token are for all layers at 131072 tokens (the quantized windows' fixed bytes included), against the
teacher's fp16 cache with its own K/V heads (GQA-aware).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from production.cache.kvcache import estimate_bytes
from production.cache.policy import parse_policy
from production.config.recipe import TrainConfig
from production.config.sampling import MAX_CANDIDATES, GuardLimits
from production.core.atomic import write_json
from production.core.errors import UserError
from production.core.layout import RunDir, checkpoint_file
from production.core.runtime import RuntimeConfig
from production.core.vocab import GPT2_VOCAB_SIZE
from production.data.splits import TokenSplits, fixed_batches, stack_windows
from production.model.attention import cache_widths
from production.model.gpt import GPT
from production.model.hf import is_hf_dir, load_hf_llama
from production.train.checkpoint import load_checkpoint, load_model
from production.train.distributed import DistContext
from production.train.loop import Job, evaluate, train
from production.tune.auto import AutoRequest, auto_policy
from production.tune.store import DecisionStore
from production.upcycle.distill import Distiller
from production.upcycle.surgery import check_teacher, dims_for_ratio, upcycle

SCHEMA = "dba.upcycle/1"
BYTES_CONTEXT = 131072


@dataclass(frozen=True)
class Target:
    label: str
    sem: int  # per head
    geo: int


def load_teacher(path: Path, device: str) -> tuple[GPT, dict]:
    """A harness checkpoint (run directory or .pt) or a Hugging Face Llama directory, checked as a teacher."""
    if is_hf_dir(path):
        model, info = load_hf_llama(path, device), {"kind": "huggingface"}
    else:
        model, ckpt = load_model(checkpoint_file(path), device)
        info = {"kind": "harness", "exp": ckpt["config"].get("exp"), "step": ckpt["step"]}
    check_teacher(model.cfg)
    cfg = model.cfg
    info.update(source=str(path), attn_mode=cfg.attn_mode, n_head=cfg.n_head, kv_heads=cfg.kv_heads,
                head_dim=cfg.head_dim, n_layer=cfg.n_layer, vocab_size=cfg.vocab_size)  # fmt: skip
    if cfg.vocab_size != GPT2_VOCAB_SIZE:
        raise UserError(
            f"the teacher's vocabulary has {cfg.vocab_size} tokens but the data is GPT-2 tokens "
            f"({GPT2_VOCAB_SIZE}); teacher and student must share the data's tokenizer"
        )
    return model.eval(), info


def parse_targets(cfg, ratios: str | None, sem_dim: int | None, geo_dim: int | None) -> list[Target]:
    """--target-kv-ratio R[,R...] and/or --sem-dim/--geo-dim (totals over heads, as the presets count)."""
    targets = []
    for text in (ratios or "").split(","):
        if text.strip():
            try:
                ratio = float(text)
            except ValueError as e:
                raise UserError(f"--target-kv-ratio needs numbers, got {text!r}") from e
            sem, geo = dims_for_ratio(cfg, ratio)
            targets.append(Target(f"{ratio:g}x", sem, geo))
    if (sem_dim is None) != (geo_dim is None):
        raise UserError("give --sem-dim and --geo-dim together")
    if sem_dim is not None:
        if sem_dim % cfg.n_head or geo_dim % cfg.n_head:
            raise UserError(f"--sem-dim and --geo-dim are totals over the {cfg.n_head} heads: multiples of it")
        targets.append(Target(f"sem{sem_dim}_geo{geo_dim}", sem_dim // cfg.n_head, geo_dim // cfg.n_head))
    if not targets:
        raise UserError("--mode upcycle needs --target-kv-ratio R (comma-separated) or --sem-dim and --geo-dim")
    return targets


def heldout_nll(model: GPT, splits: TokenSplits, batches, runtime: RuntimeConfig) -> float:
    """Mean next-token loss (nats) on the fixed validation windows."""
    return evaluate(model, splits.val, batches, model.cfg.block_size, runtime, HELDOUT_BATCH, DistContext(), False)


@torch.no_grad()
def logit_error(teacher: GPT, student: GPT, ids: torch.Tensor) -> dict:
    """How far the student's next-token logits are from the teacher's on `ids`: max |delta logit| and the mean
    KL(teacher || student) per token, in nats."""
    t, s = teacher(ids)[0].float(), student(ids)[0].float()
    kl = torch.nn.functional.kl_div(s.log_softmax(-1), t.log_softmax(-1), log_target=True, reduction="none")
    return {"max_abs_logit": (t - s).abs().max().item(), "kl": kl.sum(-1).mean().item()}


def kv_bytes_per_token(cfg, policy: str) -> float:
    """Cache bytes per token over all layers at BYTES_CONTEXT tokens (batch 1)."""
    widths = cache_widths(cfg)
    total = estimate_bytes(parse_policy(policy, list(widths), cfg.n_layer), widths, cfg.kv_heads, 1, BYTES_CONTEXT)
    return total / BYTES_CONTEXT


def calibration_ids(splits: TokenSplits, block: int, n_windows: int = 8) -> torch.Tensor:
    """Fixed training windows for the surgery's statistics."""
    starts = fixed_batches(splits.train, block, n_windows, 1)[0]
    return stack_windows(splits.train, starts, block)[0]


@dataclass(frozen=True)
class Setup:
    """What every target shares: the teacher, data, recipe, runtime and where things go."""

    teacher: GPT
    teacher_info: dict
    splits: TokenSplits
    train_cfg: TrainConfig
    layer_steps: int
    runtime: RuntimeConfig
    out_dir: Path
    argv: list[str]
    store: DecisionStore
    cache_dir: Path
    resume: bool


def target_record(setup: Setup, student: GPT, target: Target, pairs: list[list[int]]) -> dict:
    """The run's resolved-config record: the student's model, the recipe, and where it came from."""
    cfg = student.cfg
    return {
        "size": None,
        "exp": f"upcycle_{target.label}",
        "model": {**cfg.to_dict(), "n_params": student.num_params()},
        "train": setup.train_cfg.to_dict(),
        "runtime": setup.runtime.to_dict(),
        "data": setup.splits.info,
        "upcycle": {"teacher": setup.teacher_info, "target": target.label, "layer_steps": setup.layer_steps,
                    "rope_pairs": pairs},
    }  # fmt: skip


def check_run_dirs(out_dir: Path, targets: list[Target], resume: bool) -> None:
    """Nothing is written over an earlier run: a target's non-empty run directory needs --resume and its last.pt."""
    for target in targets:
        run = RunDir(out_dir / target.label)
        if run.path.exists() and any(run.path.iterdir()) and not (resume and run.last.exists()):
            raise UserError(f"{run.path} already holds a run; pass --resume to continue it, or another --out-dir")


def distill(setup: Setup, student: GPT, record: dict, run: RunDir) -> dict:
    """Train the student with the Distiller objective in its own run directory (resumable)."""
    resume = (run.last, load_checkpoint(run.last)) if setup.resume and run.last.exists() else None
    run.path.mkdir(parents=True, exist_ok=True)
    write_json(run.resolved_config, {**record, "out_dir": str(run.path)})
    job = Job(
        record, student.cfg, setup.train_cfg, setup.runtime, setup.splits, run, setup.argv, resume,
        store=setup.store, init_weights=student.state_dict(),
        objective=lambda model: Distiller(model, setup.teacher, setup.layer_steps),
    )  # fmt: skip
    return train(job)


def run_target(setup: Setup, target: Target, val_batches, teacher_nll: float) -> dict:
    """Surgery, the perplexity right after it, distillation, the perplexity after it, and the cache's bytes."""
    t0 = time.perf_counter()
    calib = calibration_ids(setup.splits, setup.teacher.cfg.block_size).to(setup.runtime.device)
    student, pairs = upcycle(setup.teacher, calib, target.sem, target.geo)
    surgery_nll = heldout_nll(student, setup.splits, val_batches, setup.runtime)
    probe = stack_windows(setup.splits.val, val_batches[0], setup.teacher.cfg.block_size)[0].to(setup.runtime.device)
    surgery_error = logit_error(setup.teacher, student, probe)
    print(
        f"{target.label}: after surgery, held-out ppl ratio {math.exp(surgery_nll - teacher_nll):.3f}, "
        f"max |dlogit| {surgery_error['max_abs_logit']:.3f}, KL {surgery_error['kl']:.4f} nats/token"
    )
    run = RunDir(setup.out_dir / target.label)
    record = target_record(setup, student, target, pairs)
    summary = distill(setup, student, record, run)
    best, best_ckpt = load_model(run.best, setup.runtime.device)
    distilled_nll = heldout_nll(best, setup.splits, val_batches, setup.runtime)
    request = AutoRequest(GuardLimits(), None, MAX_CANDIDATES, BYTES_CONTEXT, setup.cache_dir)
    policy, _ = auto_policy(best, run.best, best_ckpt, [], request, setup.runtime, setup.store)
    teacher_bytes = kv_bytes_per_token(setup.teacher.cfg, "fp16")
    student_fp16, student_policy = kv_bytes_per_token(best.cfg, "fp16"), kv_bytes_per_token(best.cfg, policy)
    return {
        "target": target.label,
        "sem_dim": best.cfg.sem_dim,
        "geo_dim": best.cfg.geo_dim,
        "rope_pairs": pairs,
        "run_dir": str(run.path),
        "policy": policy,
        "kv_bytes_per_token": {"teacher_fp16": teacher_bytes, "student_fp16": student_fp16,
                               "student_policy": student_policy},
        "kv_ratio_vs_teacher_fp16": {"student_fp16": teacher_bytes / student_fp16,
                                     "student_policy": teacher_bytes / student_policy},
        "ppl": {"teacher": math.exp(teacher_nll), "after_surgery": math.exp(surgery_nll),
                "after_distill": math.exp(distilled_nll)},
        "ppl_ratio": {"after_surgery": math.exp(surgery_nll - teacher_nll),
                      "after_distill": math.exp(distilled_nll - teacher_nll)},
        "logit_error": {"after_surgery": surgery_error, "after_distill": logit_error(setup.teacher, best, probe)},
        "steps": {"layer": min(setup.layer_steps, summary["step"]), "total": summary["step"]},
        "wall_s": time.perf_counter() - t0,
    }  # fmt: skip


HELDOUT_BATCHES, HELDOUT_BATCH = 10, 8  # 80 fixed validation windows, as the nano preset's evaluations use


def upcycle_report(setup: Setup, targets: list[Target]) -> dict:
    val_batches = fixed_batches(setup.splits.val, setup.teacher.cfg.block_size, HELDOUT_BATCH, HELDOUT_BATCHES)
    teacher_nll = heldout_nll(setup.teacher, setup.splits, val_batches, setup.runtime)
    rows = [run_target(setup, target, val_batches, teacher_nll) for target in targets]
    return {
        "schema": SCHEMA,
        "teacher": {**setup.teacher_info, "ppl": math.exp(teacher_nll),
                    "kv_bytes_per_token_fp16": kv_bytes_per_token(setup.teacher.cfg, "fp16")},
        "data": setup.splits.info,
        "heldout": {"windows": HELDOUT_BATCH * HELDOUT_BATCHES, "block": setup.teacher.cfg.block_size},
        "recipe": {**setup.train_cfg.to_dict(), "layer_steps": setup.layer_steps},
        "targets": rows,
    }  # fmt: skip
