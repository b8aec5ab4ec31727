"""The training loop (DESIGN.md 6): AdamW, warmup + cosine, clipping, grad accumulation, evals on fixed
validation windows, atomic checkpoints, exact resume, and the train.jsonl event log."""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from production.atomic import write_text
from production.checkpoint import save_atomic
from production.config import ModelConfig, TrainConfig
from production.data import TokenSplits, WindowSampler, fixed_batches, stack_windows
from production.distributed import (
    DistContext,
    all_reduce_sum,
    barrier,
    full_model_state,
    full_optimizer_state,
    grad_sync,
    load_optimizer_state,
    wrap,
)
from production.errors import UserError
from production.model import GPT
from production.runtime import RuntimeConfig, environment, peak_flops, retain_cpu_heap, synchronize
from production.train_tuning import tune_training
from production.tuner import DecisionStore

# Recipe fields a resumed run may change; anything else differing from the checkpoint is an error.
RESUME_MAY_CHANGE = ("steps", "eval_every", "eval_iters", "log_every")


class TrainingError(RuntimeError):
    """The run cannot go on (e.g. a non-finite loss); the last good checkpoint is kept."""


@dataclass(frozen=True)
class RunDir:
    path: Path

    @property
    def log(self) -> Path:
        return self.path / "train.jsonl"

    @property
    def last(self) -> Path:
        return self.path / "last.pt"

    @property
    def best(self) -> Path:
        return self.path / "best.pt"

    @property
    def resolved_config(self) -> Path:
        return self.path / "resolved_config.json"

    def has_run(self) -> bool:
        return any(p.exists() for p in (self.log, self.last, self.best))


class EventLog:
    """Appends one JSON object per line: {"type", "step", "time", ...}. Without a path (ranks other than 0 of a
    distributed run) it writes nothing."""

    def __init__(self, path: Path | None):
        self.file = None if path is None else open(path, "a", buffering=1)  # noqa: SIM115 (closed by close())

    def write(self, type: str, step: int, **fields) -> None:
        if self.file is not None:
            self.file.write(json.dumps({"type": type, "step": step, "time": round(time.time(), 3), **fields}) + "\n")

    def close(self) -> None:
        if self.file is not None:
            self.file.close()


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Learning rate for the update that takes the model from `step` to `step + 1`: linear warmup over
    warmup_steps, then cosine from lr to min_lr at the last step."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    progress = min(1.0, (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps))
    return cfg.min_lr + 0.5 * (cfg.lr - cfg.min_lr) * (1.0 + math.cos(math.pi * progress))


def build_optimizer(model: GPT, cfg: TrainConfig, device: str, fused: bool = True) -> torch.optim.AdamW:
    """AdamW; weight decay on 2-D weights only (not norms, biases or null tokens). Fused (one pass over each
    tensor) on CUDA and CPU unless the parameters are sharded."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        (decay if p.dim() >= 2 and "null_" not in name else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    fused = fused and torch.device(device).type in ("cuda", "cpu")
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps, fused=fused or None)


@torch.no_grad()
def evaluate(fwd, tokens, batches: list[list[int]], block_size: int, runtime: RuntimeConfig, micro: int,
             ctx: DistContext, split: bool) -> float:  # fmt: skip
    """Mean loss over the fixed windows, `micro` windows per forward (the windows do not depend on it). With
    `split`, ranks take turns over the batches and the sums are reduced; otherwise every rank runs them all
    (FSDP: every forward is a collective)."""
    fwd.eval()
    total = torch.zeros(2, device=runtime.device)  # loss sum, window count
    mine = batches[ctx.rank :: ctx.world_size] if split else batches
    for starts in mine:
        for i in range(0, len(starts), micro):
            x, y = stack_windows(tokens, starts[i : i + micro], block_size)
            with runtime.autocast():
                _, loss = fwd(x.to(runtime.device), y.to(runtime.device))
            total += torch.stack([loss.float() * len(x), torch.tensor(float(len(x)), device=runtime.device)])
    fwd.train()
    if split:
        all_reduce_sum(total, ctx)
    return (total[0] / total[1]).item()


def check_resumable(ckpt: dict, resolved: dict, path: Path) -> None:
    saved = ckpt["config"]
    if saved["model"] != resolved["model"]:
        diff = sorted(k for k in resolved["model"] if saved["model"].get(k) != resolved["model"][k])
        raise UserError(
            f"checkpoint {path} is from another model config (differs in {', '.join(diff)}); "
            "resume with the same --size/--exp/overrides or start a new --out-dir"
        )
    diff = sorted(
        k for k in resolved["train"] if k not in RESUME_MAY_CHANGE and saved["train"].get(k) != resolved["train"][k]
    )
    if diff:
        raise UserError(
            f"checkpoint {path} was trained with a different recipe ({', '.join(diff)}); "
            "pass the original values to resume it"
        )
    if (saved["data"]["format"], saved["data"]["n_tokens"]) != (
        resolved["data"]["format"],
        resolved["data"]["n_tokens"],
    ):
        raise UserError(
            f"checkpoint {path} was trained on {saved['data']['source']} ({saved['data']['n_tokens']} tokens), "
            f"not {resolved['data']['source']} ({resolved['data']['n_tokens']} tokens)"
        )


def truncate_log(path: Path, step: int) -> None:
    """Drop events logged after `step`: they belong to the part of the run that the resume replays."""
    if not path.exists():
        return
    lines = [ln for ln in path.read_text().splitlines() if ln.strip() and json.loads(ln)["step"] <= step]
    write_text(path, "".join(ln + "\n" for ln in lines))


def train(
    resolved: dict,
    model_cfg: ModelConfig,
    cfg: TrainConfig,
    runtime: RuntimeConfig,
    splits: TokenSplits,
    run: RunDir,
    argv: list[str],
    resume: tuple[Path, dict] | None = None,
    stop_at: int | None = None,
    store: DecisionStore | None = None,
    ctx: DistContext | None = None,
) -> dict:
    """Train to cfg.steps (or stop_at) and return the final summary. `resolved` is the resolved config
    written beside the run; it is stored in every checkpoint. `resume` is (path, checkpoint) of a checkpoint
    already checked with `check_resumable`. `store` remembers the tuner's runtime decisions. Under torchrun
    (`ctx`), every rank runs this; only rank 0 writes files and prints."""
    ctx = ctx or DistContext()
    device = runtime.device
    heap_retained = torch.device(device).type == "cpu" and retain_cpu_heap()
    torch.manual_seed(cfg.seed)
    model = GPT(model_cfg)  # initialised on CPU so weights are identical on every device and rank
    step, best_val = 0, math.inf
    if resume is not None:
        resume_path, ckpt = resume
        model.load_state_dict(ckpt["model"])
        torch.set_rng_state(ckpt["rng"]["torch"])
        if torch.device(device).type == "cuda" and ckpt["rng"].get("cuda") is not None:
            torch.cuda.set_rng_state_all(ckpt["rng"]["cuda"])
        step, best_val = ckpt["step"], ckpt["best_val_loss"]
        if ctx.is_main:
            truncate_log(run.log, step)
    model.to(device)
    val_batches = fixed_batches(splits.val, model_cfg.block_size, cfg.batch_size, cfg.eval_iters)
    tokens_per_step = cfg.batch_size * cfg.grad_accum * model_cfg.block_size

    log = EventLog(run.log if ctx.is_main else None)
    say = print if ctx.is_main else (lambda *a, **k: None)
    env = {**environment(device), "cpu_heap_retained": heap_retained, "world_size": ctx.world_size,
           "dist": ctx.strategy}  # fmt: skip
    meta = dict(argv=argv, config=resolved, n_params=model.num_params(), env=env)
    if resume is not None:
        log.write("resume_meta", step, resumed_from=str(resume_path), **meta)
    else:
        log.write("meta", step, **meta)

    def tuner_event(decision: str, value, source: str, **details) -> None:
        log.write("tuner", step, decision=decision, value=value, source=source, **details)
        if decision != "tuning_time":
            say(f"tuner: {decision} = {value} ({source})")

    world = ctx.world_size if ctx.active else 1
    plan = tune_training(model, cfg, runtime, store if ctx.is_main else None, tuner_event, world)
    micro_batch, grad_accum = plan.micro_batch, plan.grad_accum  # grad_accum counts micro-batches of all ranks
    wrapped = wrap(model, ctx, device)
    fwd = torch.compile(wrapped) if plan.compile else wrapped
    optimizer = build_optimizer(model, cfg, device, fused=ctx.strategy != "fsdp")
    if resume is not None:
        load_optimizer_state(model, optimizer, ckpt["optimizer"])
    # one seeded stream of micro-batches, the same on every rank; rank r trains on micro-batches r, r + W, ...
    sampler = WindowSampler(splits.train, model_cfg.block_size, micro_batch, cfg.seed)
    if resume is not None:
        sampler.load_state_dict(ckpt["sampler"])
    local_accum = grad_accum // ctx.world_size

    def checkpoint(path: Path, with_optimizer: bool) -> None:
        """Every rank takes part (gathering sharded state is a collective); rank 0 writes."""
        state = {"model": full_model_state(model), "config": resolved, "step": step, "best_val_loss": best_val}
        if with_optimizer:
            rng = {"torch": torch.get_rng_state(),
                   "cuda": torch.cuda.get_rng_state_all() if torch.device(device).type == "cuda" else None}  # fmt: skip
            state.update(optimizer=full_optimizer_state(model, optimizer), sampler=sampler.state_dict(), rng=rng)
        if ctx.is_main:
            save_atomic(state, path)
        barrier(ctx)

    recent_losses: list[float] = []  # training losses since the last eval -> the eval's train_loss

    def run_eval() -> None:
        nonlocal best_val
        split = ctx.strategy != "fsdp"  # FSDP forwards are collectives: every rank runs every batch
        eval_fwd = model if ctx.strategy == "ddp" else fwd  # DDP's inner model: no gradient hooks needed
        val = evaluate(eval_fwd, splits.val, val_batches, model_cfg.block_size, runtime, micro_batch, ctx, split)
        if not math.isfinite(val):
            log.write("error", step, message=f"non-finite validation loss {val}")
            raise TrainingError(f"validation loss is {val} at step {step}; stopped, {run.last} is the last good state")
        train_loss = sum(recent_losses) / len(recent_losses) if recent_losses else None
        recent_losses.clear()
        if val < best_val:
            best_val = val
            checkpoint(run.best, with_optimizer=False)
        ppl = math.exp(min(val, 50.0))
        log.write("eval", step, train_loss=train_loss, val_loss=val, val_ppl=ppl, best_val_loss=best_val)
        checkpoint(run.last, with_optimizer=True)
        shown = "-" if train_loss is None else f"{train_loss:.4f}"
        if ctx.is_main:
            tqdm.write(f"step {step}/{cfg.steps} | val {val:.4f} (ppl {ppl:.1f}) | train {shown} | best {best_val:.4f}")

    peak = peak_flops(device, runtime.dtype)
    wall_start = time.perf_counter()
    if step == 0:
        run_eval()
    bar = tqdm(total=cfg.steps, initial=step, desc="train", unit="step", disable=None if ctx.is_main else True,
               dynamic_ncols=True)  # fmt: skip
    end = cfg.steps if stop_at is None else min(stop_at, cfg.steps)
    interval_start, interval_steps = time.perf_counter(), 0
    while step < end:
        lr = lr_at(step, cfg)
        for group in optimizer.param_groups:
            group["lr"] = lr
        loss_sum, done_local = torch.zeros((), device=device), 0
        for i in range(grad_accum):
            if i % ctx.world_size != ctx.rank:
                sampler.skip_batch()
                continue
            x, y = sampler.next_batch()
            done_local += 1
            with grad_sync(wrapped, ctx, sync=done_local == local_accum), runtime.autocast():
                _, loss = fwd(x.to(device, non_blocking=True), y.to(device, non_blocking=True))
                (loss / local_accum).backward()
            loss_sum += loss.detach().float()
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        interval_steps += 1
        loss_val = all_reduce_sum(loss_sum, ctx).item() / grad_accum
        if not math.isfinite(loss_val):
            log.write("error", step, message=f"non-finite training loss {loss_val}")
            bar.close()
            raise TrainingError(
                f"training loss is {loss_val} at step {step}; stopped, {run.last} holds the last good state"
            )
        recent_losses.append(loss_val)
        bar.update(1)
        bar.set_postfix(loss=f"{loss_val:.3f}", lr=f"{lr:.2e}")
        if step == 1 or step % cfg.log_every == 0 or step == cfg.steps:
            synchronize(device)
            dt = (time.perf_counter() - interval_start) / interval_steps
            norm = grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm  # DTensor under FSDP
            extra = {}
            if peak is not None:  # CUDA: model FLOPs utilisation over all ranks, and this rank's peak memory
                extra["mfu"] = (
                    model.flops_per_token(model_cfg.block_size) * tokens_per_step / dt / (peak * ctx.world_size)
                )
                extra["peak_mem_bytes"] = torch.cuda.max_memory_allocated(device)
            log.write("train", step, loss=loss_val, lr=lr, tok_s=tokens_per_step / dt, ms_per_step=1000 * dt,
                      grad_norm=norm.item(), tokens_seen=step * tokens_per_step, **extra)  # fmt: skip
            if bar.disable:
                say(f"step {step}/{cfg.steps} | loss {loss_val:.4f} | lr {lr:.2e} | {1000 * dt:.0f} ms/step "
                    f"| {tokens_per_step / dt:,.0f} tok/s", flush=True)  # fmt: skip
            interval_start, interval_steps = time.perf_counter(), 0
        if step % cfg.eval_every == 0 or step == cfg.steps:
            run_eval()
            interval_start, interval_steps = time.perf_counter(), 0
    bar.close()
    wall = time.perf_counter() - wall_start
    if step < cfg.steps:  # stopped early on request: make sure the exact state at `step` is saved
        if step % cfg.eval_every != 0:
            checkpoint(run.last, with_optimizer=True)
        log.close()
        say(f"stopped at step {step}/{cfg.steps}; continue with --resume ({run.last})")
        return {"step": step, "best_val_loss": best_val, "done": False}
    log.write("done", step, best_val_loss=best_val, wall_s=wall)
    log.close()
    return {"step": step, "best_val_loss": best_val, "done": True}
