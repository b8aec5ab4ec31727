"""The training loop: AdamW with warmup + cosine, clipping, gradient accumulation, evaluations on fixed
validation windows, atomic checkpoints, exact resume and the train.jsonl event log (docs/ARCHITECTURE.md,
"Training"). It reads top to bottom in `train`:

    state = restore(job, log)                     model, tuned runtime, optimizer, sampler; resumed if asked
    evaluate_and_checkpoint(...)                  at step 0, every eval_every steps and at the last step
    loss, grad_norm, lr = train_step(state, job)  one optimizer step; a non-finite loss stops before it

Under torchrun every rank runs this; only rank 0 writes files and prints.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn
from tqdm import tqdm

from production.config.recipe import TrainConfig
from production.core.entry import held_interrupts
from production.core.errors import TrainingError
from production.core.layout import EventLog, RunDir, truncate_log
from production.core.runtime import RuntimeConfig, environment, peak_flops, retain_cpu_heap, synchronize
from production.data.splits import TokenSplits, WindowSampler, fixed_batches, stack_windows
from production.model.config import ModelConfig
from production.model.gpt import GPT
from production.train.checkpoint import save_checkpoint
from production.train.distributed import (
    DistContext,
    all_reduce_sum,
    barrier,
    full_model_state,
    full_optimizer_state,
    grad_sync,
    load_optimizer_state,
    wrap,
)
from production.train.optim import build_optimizer, lr_at
from production.train.tracker import open_tracker
from production.tune.store import DecisionStore
from production.tune.training import tune_training


@dataclass
class Job:
    """A training run as the train command resolved and checked it."""

    resolved: dict  # the resolved-config record (resolved_config.json), stored in every checkpoint
    model_cfg: ModelConfig
    cfg: TrainConfig
    runtime: RuntimeConfig
    splits: TokenSplits
    run: RunDir
    argv: list[str]
    resume: tuple[Path, dict] | None = None  # (path, checkpoint) already checked by check_resumable
    stop_at: int | None = None
    store: DecisionStore | None = None  # remembers the tuner's runtime decisions
    save_every_s: float = 300.0  # last.pt at least this often between evaluations (seconds of work)
    tracker: str = "none"  # tensorboard | wandb | none: mirrors the event log (rank 0)
    tracker_group: str | None = None
    ctx: DistContext = field(default_factory=DistContext)
    # a fresh run starts from these weights instead of random ones (an upcycled student)
    init_weights: dict | None = None
    # what the training steps minimise: objective(model) -> a module whose forward(x, y) returns (None, loss),
    # told each step by at_step(step) (production.upcycle.distill); None: the model's own cross-entropy.
    # Evaluations always report the model's cross-entropy.
    objective: Callable[[GPT], nn.Module] | None = None

    def say(self, *args, **kwargs) -> None:
        if self.ctx.is_main:
            print(*args, **kwargs)


@dataclass
class State:
    model: GPT
    wrapped: nn.Module  # the DDP / FSDP2 wrapper (the model itself in a single process)
    fwd: nn.Module  # what runs the forward: `wrapped`, compiled when the tuner chose it
    loss_fwd: nn.Module  # what the training steps call: `fwd`, or the job's objective
    optimizer: torch.optim.Optimizer
    sampler: WindowSampler
    micro_batch: int
    grad_accum: int  # micro-batches per optimizer step over all ranks (micro_batch x grad_accum = global batch)
    val_batches: list[list[int]]
    step: int = 0
    best_val: float = math.inf
    recent_losses: list[float] = field(default_factory=list)  # since the last eval -> its train_loss
    eval_pending: bool = True  # the evaluation due at `step` has not run yet
    saved_step: int | None = None  # the step last.pt holds
    saved_at: float = field(default_factory=time.perf_counter)  # when last.pt was written (or the run began)
    step_start: dict = field(default_factory=dict)  # sampler and RNG state where `step` ended (see rewind)


def train(job: Job) -> dict:
    """Train to cfg.steps (or stop_at). Returns {"step", "best_val_loss", "done", "interrupted", "saved_step"}
    (saved_step: the step last.pt holds, None before the first checkpoint). Ctrl-C stops the run at a step
    boundary: `interrupt` saves that step first."""
    cfg, run = job.cfg, job.run
    heap_retained = torch.device(job.runtime.device).type == "cpu" and retain_cpu_heap()
    if job.resume is not None and job.ctx.is_main:
        truncate_log(run.log, job.resume[1]["step"])
    end = cfg.steps if job.stop_at is None else min(job.stop_at, cfg.steps)
    mirror = open_tracker(job.tracker, run.path, job.tracker_group, job.resolved) if job.ctx.is_main else None
    with EventLog(run.log if job.ctx.is_main else None, mirror) as log:
        state = None
        try:
            state = restore(job, log, heap_retained)
            wall_start = time.perf_counter()
            run_steps(state, job, log, end)
            if state.step < cfg.steps:  # stopped early on request: make sure the exact state at `step` is saved
                if state.saved_step != state.step:
                    save(state, job, run.last, with_optimizer=True)
                return summary(state, done=False)
        except KeyboardInterrupt:
            return interrupt(state, job, log)
        log.write("done", state.step, best_val_loss=state.best_val, wall_s=time.perf_counter() - wall_start)
        return summary(state, done=True)


def run_steps(state: State, job: Job, log: EventLog, end: int) -> None:
    """The loop: optimizer steps to `end`, train events every log_every steps, evaluations (and checkpoints)
    every eval_every steps and at the last step, and last.pt every save_every_s seconds of work between them."""
    cfg = job.cfg
    if state.eval_pending:  # step 0 of a fresh run, or a checkpoint saved before its step's evaluation ran
        evaluate_and_checkpoint(state, job, log)
    show = None if job.ctx.is_main else True
    with tqdm(total=cfg.steps, initial=state.step, desc="train", unit="step", disable=show) as bar:
        interval = Interval()
        while state.step < end:
            loss, grad_norm, lr = train_step(state, job, log)
            interval.steps += 1
            bar.update(1)
            bar.set_postfix(loss=f"{loss:.3f}", lr=f"{lr:.2e}")
            if state.step == 1 or state.step % cfg.log_every == 0 or state.step == cfg.steps:
                log_progress(state, job, log, loss, grad_norm, lr, interval.seconds_per_step(job), bar.disable)
                interval = Interval()
            if state.eval_pending:
                evaluate_and_checkpoint(state, job, log)
                interval = Interval()
            elif state.step % cfg.log_every == 0 and checkpoint_due(state, job):
                save(state, job, job.run.last, with_optimizer=True)


def checkpoint_due(state: State, job: Job) -> bool:
    """Whether save_every_s has passed since last.pt was written. Under torchrun the ranks' clocks differ and
    a save is a collective: any rank that is due makes every rank save."""
    due = time.perf_counter() - state.saved_at >= job.save_every_s
    if job.ctx.active:
        due = all_reduce_sum(torch.tensor(float(due), device=job.runtime.device), job.ctx).item() > 0
    return due


def interrupt(state: State | None, job: Job, log: EventLog) -> dict:
    """After Ctrl-C. A single process saves its last completed step (the sampler and RNG rewound to where that
    step ended, the half-accumulated gradients dropped) unless last.pt holds it already. Under torchrun the
    ranks stop at different steps and cannot gather a checkpoint, so the last saved one stands."""
    if state is None:  # still restoring: nothing new to save
        saved = None if job.resume is None else job.resume[1]["step"]
        step = saved or 0
        log.write("interrupted", step, saved_step=saved)
        return {"step": step, "best_val_loss": math.inf, "done": False, "interrupted": True, "saved_step": saved}
    if not job.ctx.active and state.saved_step is not None and state.saved_step != state.step:
        rewind(state, job)
        save(state, job, job.run.last, with_optimizer=True)
    log.write("interrupted", state.step, saved_step=state.saved_step)
    return {**summary(state, done=False), "interrupted": True}


def summary(state: State, done: bool) -> dict:
    return {
        "step": state.step,
        "best_val_loss": state.best_val,
        "done": done,
        "interrupted": False,
        "saved_step": state.saved_step,
    }


def restore(job: Job, log: EventLog, heap_retained: bool) -> State:
    """The model (initialised on CPU, so weights are identical on every device and rank) with the resumed
    checkpoint's weights and RNG state, the meta event, the tuner's runtime plan, the distributed wrapper, the
    optimizer and the window sampler."""
    ctx, cfg, device = job.ctx, job.cfg, job.runtime.device
    torch.manual_seed(cfg.seed)
    model = GPT(job.model_cfg)
    step, best_val, ckpt = 0, math.inf, None
    if job.resume is not None:
        resume_path, ckpt = job.resume
        model.load_state_dict(ckpt["model"])
        torch.set_rng_state(ckpt["rng"]["torch"])
        if torch.device(device).type == "cuda" and ckpt["rng"].get("cuda") is not None:
            torch.cuda.set_rng_state_all(ckpt["rng"]["cuda"])
        step, best_val = ckpt["step"], ckpt["best_val_loss"]
    elif job.init_weights is not None:
        model.load_state_dict(job.init_weights)
    model.to(device)
    env = {
        **environment(device),
        "cpu_heap_retained": heap_retained,
        "world_size": ctx.world_size,
        "dist": ctx.strategy,
    }
    meta = dict(argv=job.argv, config=job.resolved, n_params=model.num_params(), env=env)
    if ckpt is not None:
        log.write("resume_meta", step, resumed_from=str(resume_path), **meta)
    else:
        log.write("meta", step, **meta)

    def tuner_event(decision: str, value, source: str, **details) -> None:
        log.write("tuner", step, decision=decision, value=value, source=source, **details)
        if decision != "tuning_time":
            job.say(f"tuner: {decision} = {value} ({source})")

    world = ctx.world_size if ctx.active else 1
    plan = tune_training(model, cfg, job.runtime, job.store if ctx.is_main else None, tuner_event, world)
    wrapped = wrap(model, ctx, device)
    optimizer = build_optimizer(model, cfg, device, fused=ctx.strategy != "fsdp")
    # one seeded stream of micro-batches, the same on every rank; rank r trains on micro-batches r, r + W, ...
    sampler = WindowSampler(job.splits.train, job.model_cfg.block_size, plan.micro_batch, cfg.seed)
    if ckpt is not None:
        load_optimizer_state(model, optimizer, ckpt["optimizer"])
        sampler.load_state_dict(ckpt["sampler"])
    val_batches = fixed_batches(job.splits.val, job.model_cfg.block_size, cfg.batch_size, cfg.eval_iters)
    fwd = torch.compile(wrapped) if plan.compile else wrapped
    loss_fwd = fwd if job.objective is None else job.objective(model)
    state = State(
        model, wrapped, fwd, loss_fwd, optimizer, sampler, plan.micro_batch, plan.grad_accum, val_batches, step,
        best_val,
    )  # fmt: skip
    if ckpt is not None:
        state.recent_losses = list(ckpt.get("recent_losses", []))
        state.eval_pending, state.saved_step = ckpt.get("eval_pending", False), step
    state.step_start = snapshot(state, device)
    return state


def snapshot(state: State, device: str) -> dict:
    """What a step consumes from the sampler and the RNGs, as it stands between two steps."""
    cuda = torch.device(device).type == "cuda"
    return {
        "sampler": state.sampler.state_dict(),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if cuda else None,
    }


def rewind(state: State, job: Job) -> None:
    """Back to the end of step `state.step` after a step was cut short: its windows and random numbers will be
    drawn again after a resume, and its partial gradients are dropped."""
    state.sampler.load_state_dict(state.step_start["sampler"])
    torch.set_rng_state(state.step_start["torch"])
    if state.step_start["cuda"] is not None:
        torch.cuda.set_rng_state_all(state.step_start["cuda"])
    state.optimizer.zero_grad(set_to_none=True)


def train_step(state: State, job: Job, log: EventLog) -> tuple[float, float, float]:
    """One optimizer step over the global batch: this rank's share of the micro-batches (gradients synchronised
    on its last one), clipping, then AdamW at this step's learning rate. A non-finite loss or gradient norm stops
    the run before optimizer.step(), so the bad step never touches the weights.
    Returns (mean loss over the global batch, gradient norm, learning rate)."""
    ctx, device = job.ctx, job.runtime.device
    local_accum = state.grad_accum // ctx.world_size
    loss_sum, done_local = torch.zeros((), device=device), 0
    if hasattr(state.loss_fwd, "at_step"):
        state.loss_fwd.at_step(state.step)
    for i in range(state.grad_accum):
        if i % ctx.world_size != ctx.rank:
            state.sampler.skip_batch()
            continue
        x, y = state.sampler.next_batch()
        done_local += 1
        with grad_sync(state.wrapped, ctx, sync=done_local == local_accum), job.runtime.autocast():
            _, loss = state.loss_fwd(x.to(device, non_blocking=True), y.to(device, non_blocking=True))
            (loss / local_accum).backward()
        loss_sum += loss.detach().float()
    grad_norm = torch.nn.utils.clip_grad_norm_(state.model.parameters(), job.cfg.grad_clip)
    if hasattr(grad_norm, "full_tensor"):  # a DTensor under FSDP
        grad_norm = grad_norm.full_tensor()
    loss, norm = all_reduce_sum(loss_sum, ctx).item() / state.grad_accum, grad_norm.item()
    for name, value in (("training loss", loss), ("gradient norm", norm)):
        if not math.isfinite(value):
            log.write("error", state.step + 1, message=f"non-finite {name} {value}")
            last = f"{job.run.last} holds the last good state"
            raise TrainingError(f"{name} is {value} at step {state.step + 1}; stopped, {last}")
    lr = lr_at(state.step, job.cfg)
    with held_interrupts():  # a Ctrl-C never leaves the weights half-updated or the step count behind them
        for group in state.optimizer.param_groups:
            group["lr"] = lr
        state.optimizer.step()
        state.optimizer.zero_grad(set_to_none=True)
        state.step += 1
        state.recent_losses.append(loss)
        state.eval_pending = state.step % job.cfg.eval_every == 0 or state.step == job.cfg.steps
        state.step_start = snapshot(state, device)
    return loss, norm, lr


@torch.no_grad()
def evaluate(
    fwd: nn.Module,
    tokens,
    batches: list[list[int]],
    block_size: int,
    runtime: RuntimeConfig,
    micro: int,
    ctx: DistContext,
    split: bool,
) -> float:
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


def evaluate_and_checkpoint(state: State, job: Job, log: EventLog) -> None:
    """Validation loss on the fixed windows; best.pt when it improves, last.pt always, and an eval event."""
    ctx, step = job.ctx, state.step
    split = ctx.strategy != "fsdp"  # FSDP forwards are collectives: every rank runs every batch
    eval_fwd = state.model if ctx.strategy == "ddp" else state.fwd  # DDP's inner model: no gradient hooks needed
    val = evaluate(
        eval_fwd,
        job.splits.val,
        state.val_batches,
        job.model_cfg.block_size,
        job.runtime,
        state.micro_batch,
        ctx,
        split,
    )
    if not math.isfinite(val):
        log.write("error", step, message=f"non-finite validation loss {val}")
        raise TrainingError(f"validation loss is {val} at step {step}; stopped, {job.run.last} is the last good state")
    recent = state.recent_losses
    train_loss = sum(recent) / len(recent) if recent else None
    ppl = math.exp(min(val, 50.0))
    with held_interrupts():  # the eval event, best.pt and last.pt land together or not at all
        recent.clear()
        state.eval_pending = False
        if val < state.best_val:
            state.best_val = val
            save(state, job, job.run.best, with_optimizer=False)
        log.write("eval", step, train_loss=train_loss, val_loss=val, val_ppl=ppl, best_val_loss=state.best_val)
        save(state, job, job.run.last, with_optimizer=True)
    if ctx.is_main:
        shown = "-" if train_loss is None else f"{train_loss:.4f}"
        tqdm.write(
            f"step {step}/{job.cfg.steps} | val {val:.4f} (ppl {ppl:.1f}) | train {shown} | best {state.best_val:.4f}"
        )


def save(state: State, job: Job, path: Path, with_optimizer: bool) -> None:
    """Every rank takes part (gathering sharded state is a collective); rank 0 writes."""
    cuda = torch.device(job.runtime.device).type == "cuda"
    ckpt = {
        "model": full_model_state(state.model),
        "config": job.resolved,
        "step": state.step,
        "best_val_loss": state.best_val,
    }
    if with_optimizer:
        rng = {"torch": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state_all() if cuda else None}
        ckpt.update(
            optimizer=full_optimizer_state(state.model, state.optimizer),
            sampler=state.sampler.state_dict(),
            rng=rng,
            recent_losses=list(state.recent_losses),
            eval_pending=state.eval_pending,
        )
    if job.ctx.is_main:
        save_checkpoint(ckpt, path)
    if path == job.run.last:
        state.saved_step, state.saved_at = state.step, time.perf_counter()
    barrier(job.ctx)


class Interval:
    """Wall time since it was made, over the steps counted in it."""

    def __init__(self):
        self.start, self.steps = time.perf_counter(), 0

    def seconds_per_step(self, job: Job) -> float:
        synchronize(job.runtime.device)
        return (time.perf_counter() - self.start) / self.steps


def log_progress(
    state: State, job: Job, log: EventLog, loss: float, grad_norm: float, lr: float, dt: float, quiet_bar: bool
) -> None:
    """The train event (and a printed line where no progress bar is shown)."""
    tokens_per_step = job.cfg.batch_size * job.cfg.grad_accum * job.model_cfg.block_size
    extra = {}
    peak = peak_flops(job.runtime.device, job.runtime.dtype)
    if peak is not None:  # CUDA: model FLOPs utilisation over all ranks, and this rank's peak memory
        flops = state.model.flops_per_token(job.model_cfg.block_size) * tokens_per_step / dt
        extra = {
            "mfu": flops / (peak * job.ctx.world_size),
            "peak_mem_bytes": torch.cuda.max_memory_allocated(job.runtime.device),
        }
    log.write(
        "train",
        state.step,
        loss=loss,
        lr=lr,
        tok_s=tokens_per_step / dt,
        ms_per_step=1000 * dt,
        grad_norm=grad_norm,
        tokens_seen=state.step * tokens_per_step,
        **extra,
    )
    if quiet_bar:
        job.say(
            f"step {state.step}/{job.cfg.steps} | loss {loss:.4f} | lr {lr:.2e} | {1000 * dt:.0f} ms/step "
            f"| {tokens_per_step / dt:,.0f} tok/s",
            flush=True,
        )
