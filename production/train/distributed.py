"""Distributed training on PyTorch's own engine: torchrun launches, DDP or FSDP2 (`fully_shard`) wraps.

torchrun's launch contract (RANK, WORLD_SIZE, LOCAL_RANK) is read by production.core.launch; the rendezvous
address is read by `init_process_group` itself. Everything else is an explicit option (`--dist ddp|fsdp`).

Checkpoints stay rank-independent: model and optimizer state are gathered into full, name-keyed state dicts
(torch.distributed.checkpoint.state_dict) that a single process loads, and a single process's checkpoint loads
under any world size.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from torch.nn.parallel import DistributedDataParallel

from production.core.errors import UserError
from production.core.launch import launch_place, launched_by_torchrun

STRATEGIES = ("ddp", "fsdp")


@dataclass(frozen=True)
class DistContext:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    strategy: str | None = None  # None: a plain single process

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.strategy is not None


def init_distributed(requested: str | None, device: str) -> tuple[DistContext, str]:
    """Join the torchrun job (if any) and pick the strategy. Returns the context and this rank's device."""
    if not launched_by_torchrun():
        if requested is not None:
            raise UserError(f"--dist {requested} needs a torchrun launch, e.g. torchrun --nproc_per_node 2 main.py ...")
        return DistContext(), device
    rank, world, local = launch_place()
    kind = torch.device(device).type
    if kind == "cuda":
        device = f"cuda:{local}"
        torch.cuda.set_device(local)
    elif kind != "cpu":
        raise UserError(f"distributed training runs on CUDA (nccl) or CPU (gloo), not {kind}")
    if not dist.is_initialized():
        dist.init_process_group("nccl" if kind == "cuda" else "gloo")
    return DistContext(rank, world, local, requested or "ddp"), device


def wrap(model: torch.nn.Module, ctx: DistContext, device: str) -> torch.nn.Module:
    """DDP around the model, or FSDP2 `fully_shard` per block then the root (bf16 params on CUDA)."""
    if ctx.active:
        model.wte.sparse = False  # the wrappers reduce dense gradients (same values, one dense buffer more)
    if ctx.strategy == "ddp":
        ids = [ctx.local_rank] if torch.device(device).type == "cuda" else None
        return DistributedDataParallel(model, device_ids=ids, broadcast_buffers=False)  # buffers: fixed RoPE tables
    if ctx.strategy == "fsdp":
        mp = None
        if torch.device(device).type == "cuda":
            mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
        kwargs = {"mp_policy": mp} if mp is not None else {}
        for block in model.blocks:
            fully_shard(block, **kwargs)
        fully_shard(model, **kwargs)
        return model
    return model


@contextlib.contextmanager
def grad_sync(wrapped: torch.nn.Module, ctx: DistContext, sync: bool):
    """Synchronise gradients only on the last micro-step of an accumulation."""
    if ctx.strategy == "ddp" and not sync:
        with wrapped.no_sync():
            yield
    else:
        if ctx.strategy == "fsdp":
            wrapped.set_requires_gradient_sync(sync)
        yield


def all_reduce_sum(t: torch.Tensor, ctx: DistContext) -> torch.Tensor:
    if ctx.active:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def full_model_state(model: torch.nn.Module) -> dict:
    """Full (unsharded) model state on CPU, keyed by the plain model's names (a collective under FSDP)."""
    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def full_optimizer_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    return get_optimizer_state_dict(model, optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def load_optimizer_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer, state: dict) -> None:
    set_optimizer_state_dict(model, optimizer, state, options=StateDictOptions(full_state_dict=True))


def barrier(ctx: DistContext) -> None:
    if ctx.active:
        dist.barrier()


def shutdown(ctx: DistContext) -> None:
    if ctx.active and dist.is_initialized():
        dist.destroy_process_group()
