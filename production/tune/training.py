"""Training runtime decisions, made once per device and model config, logged and remembered.

- device and precision: resolved by rule (cuda > mps > cpu; bf16 autocast where supported, fp32 on CPU);
- micro-batch / grad-accum split: on CUDA, the recipe's micro-batch is tried with a real forward + backward
  and halved (accumulation doubled, so the global batch is unchanged) until it fits; elsewhere the recipe's;
- torch.compile: on CUDA, when not fixed by --compile/--no-compile, eager and compiled forward + backward are
  timed after warm-up and compile is kept only if it is at least 3% faster; off elsewhere (inductor's CPU
  compile time outweighs its gain at these sizes).
Trials run on random tokens and leave no trace: gradients are cleared and RNG states restored.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass

import torch

from production.config.recipe import TrainConfig
from production.core.runtime import RuntimeConfig, device_signature, synchronize
from production.model.gpt import GPT
from production.tune.store import DecisionStore, config_hash

COMPILE_MIN_GAIN = 0.03
TRIAL_WARMUP, TRIAL_STEPS = 2, 3


@dataclass
class TrainingPlan:
    micro_batch: int
    grad_accum: int  # micro-batches per optimizer step (micro_batch x grad_accum = the recipe's global batch)
    compile: bool


def _trial_ms(fwd, model: GPT, micro: int, block: int, runtime: RuntimeConfig, steps: int) -> float:
    """Median ms of forward + backward on random tokens (after TRIAL_WARMUP untimed)."""
    x = torch.randint(0, model.cfg.vocab_size, (micro, block + 1), device=runtime.device)
    times = []
    for i in range(TRIAL_WARMUP + steps):
        synchronize(runtime.device)
        t0 = time.perf_counter()
        with runtime.autocast():
            _, loss = fwd(x[:, :-1], x[:, 1:])
        loss.backward()
        synchronize(runtime.device)
        if i >= TRIAL_WARMUP:
            times.append(1000 * (time.perf_counter() - t0))
        model.zero_grad(set_to_none=True)
    return statistics.median(times)


def _fitting_micro_batch(model: GPT, cfg: TrainConfig, block: int, runtime: RuntimeConfig) -> tuple[int, int, dict]:
    micro, accum, tried = cfg.batch_size, cfg.grad_accum, {}
    while True:
        try:
            tried[micro] = _trial_ms(model, model, micro, block, runtime, steps=1)
            return micro, accum, tried
        except torch.OutOfMemoryError as e:
            model.zero_grad(set_to_none=True)
            torch.cuda.empty_cache()
            tried[micro] = "out of memory"
            if micro == 1 or micro % 2:
                raise RuntimeError(f"a micro-batch of {micro} x {block} tokens does not fit on {runtime.device}") from e
            micro, accum = micro // 2, accum * 2


def distributed_split(batch: int, accum: int, world: int) -> tuple[int, int]:
    """The largest micro-batch <= the recipe's that cuts the global batch (batch x accum windows) into a number
    of micro-batches every rank gets an equal share of."""
    total = batch * accum
    for micro in range(batch, 0, -1):
        if total % micro == 0 and (total // micro) % world == 0:
            return micro, total // micro
    raise ValueError(f"a global batch of {total} windows does not split over {world} ranks")


def tune_training(
    model: GPT, cfg: TrainConfig, runtime: RuntimeConfig, store: DecisionStore | None, log, world: int = 1
) -> TrainingPlan:
    """Decide micro-batch split and compile for this run; each decision is logged via
    log(decision, value, source, **details) (source: rule, user, measured or store). Under torchrun (world > 1
    or any launch) the ranks must agree, so nothing is measured: the split is the largest micro-batch that
    gives every rank the same number of micro-batches, and compile is used only if --compile asks for it."""
    if world > 1:
        return _torchrun_plan(cfg, runtime, log, world)
    t0 = time.perf_counter()
    log("device", runtime.device, "rule", reason="cuda > mps > cpu unless --device")
    log("precision", runtime.dtype, "rule", reason="bf16 autocast with fp32 master weights where supported")
    sig, chash = device_signature(runtime.device), config_hash(model.cfg.to_dict())
    shapes = {
        "batch": cfg.batch_size,
        "accum": cfg.grad_accum,
        "block": model.cfg.block_size,
        "dtype": runtime.dtype,
        "compile": runtime.compile,
    }
    stored = store.get("train", sig, chash, shapes) if store else None
    if stored is not None:
        plan = TrainingPlan(stored["micro_batch"], stored["grad_accum"], stored["compile"])
        log("micro_batch", [plan.micro_batch, plan.grad_accum], "store", timings=stored.get("micro_timings"))
        log("compile", plan.compile, "store", timings=stored.get("compile_timings"))
    else:
        plan, record = _measured_plan(model, cfg, runtime, log)
        if store:
            store.put("train", sig, chash, shapes, record)
    log("tuning_time", round(time.perf_counter() - t0, 3), "measured")
    return plan


def _torchrun_plan(cfg: TrainConfig, runtime: RuntimeConfig, log, world: int) -> TrainingPlan:
    micro, accum = distributed_split(cfg.batch_size, cfg.grad_accum, world)
    use_compile = bool(runtime.compile)
    log("micro_batch", [micro, accum], "rule", reason=f"global batch split evenly over {world} ranks")
    source = "user" if runtime.compile is not None else "rule"
    log("compile", use_compile, source, reason="under torchrun compile is used only when asked for")
    return TrainingPlan(micro, accum, use_compile)


def _measured_plan(model: GPT, cfg: TrainConfig, runtime: RuntimeConfig, log) -> tuple[TrainingPlan, dict]:
    """The micro-batch split (probed on CUDA, the recipe's elsewhere) and compile (timed when not fixed by
    --compile/--no-compile), with the RNG state left as it was. Returns the plan and its store record."""
    cuda = torch.device(runtime.device).type == "cuda"
    block = model.cfg.block_size
    rng = torch.get_rng_state(), torch.cuda.get_rng_state_all() if cuda else None
    if cuda:
        micro, accum, micro_timings = _fitting_micro_batch(model, cfg, block, runtime)
        log("micro_batch", [micro, accum], "measured", timings=micro_timings)
    else:
        micro, accum, micro_timings = cfg.batch_size, cfg.grad_accum, None
        log("micro_batch", [micro, accum], "rule", reason="the recipe's split (memory is probed on CUDA only)")
    compile_timings = None
    if runtime.compile is not None:
        use_compile = runtime.compile
        reason = "fixed by --compile/--no-compile" if cuda else "off off CUDA"
        log("compile", use_compile, "user" if cuda else "rule", reason=reason)
    else:
        eager = _trial_ms(model, model, micro, block, runtime, TRIAL_STEPS)
        compiled = _trial_ms(torch.compile(model), model, micro, block, runtime, TRIAL_STEPS)
        use_compile = compiled <= (1 - COMPILE_MIN_GAIN) * eager
        compile_timings = {"eager_ms": eager, "compiled_ms": compiled}
        log("compile", use_compile, "measured", timings=compile_timings)
    torch.set_rng_state(rng[0])
    if cuda:
        torch.cuda.set_rng_state_all(rng[1])
    record = {
        "micro_batch": micro,
        "grad_accum": accum,
        "compile": use_compile,
        "micro_timings": micro_timings,
        "compile_timings": compile_timings,
    }
    return TrainingPlan(micro, accum, use_compile), record
