"""The training recipe: one validated dataclass (docs/ARCHITECTURE.md, "Training")."""

from __future__ import annotations

from dataclasses import asdict, dataclass

from production.core.errors import UserError


@dataclass(frozen=True)
class TrainConfig:
    """The training recipe. batch_size x grad_accum x block_size tokens make one optimizer step (global batch)."""

    lr: float
    min_lr: float
    warmup_steps: int
    steps: int
    batch_size: int
    grad_accum: int
    eval_every: int = 200
    eval_iters: int = 20
    seed: int = 1337
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    grad_clip: float = 1.0
    log_every: int = 10

    def __post_init__(self):
        if self.steps < 0:
            raise UserError(f"steps must be >= 0, got {self.steps}")
        for name in ("batch_size", "grad_accum", "eval_every", "eval_iters", "log_every"):
            if getattr(self, name) < 1:
                raise UserError(f"{name} must be a positive integer, got {getattr(self, name)}")
        if not self.lr > 0 or not 0 <= self.min_lr <= self.lr:
            raise UserError(f"need lr > 0 and 0 <= min_lr <= lr, got lr={self.lr} min_lr={self.min_lr}")
        if self.warmup_steps < 0:
            raise UserError(f"warmup_steps must be >= 0, got {self.warmup_steps}")

    def to_dict(self) -> dict:
        return asdict(self)
