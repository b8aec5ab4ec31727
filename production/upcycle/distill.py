"""The distillation objective of an upcycled student, in the shape of the model's own: forward(x, y) returns
(None, loss), so the harness's trainer (checkpoints, resume, events, provenance) runs it unchanged.

Two phases, switched by the trainer's step (`at_step`):
1. steps [0, layer_steps): teacher-forced, layer-wise matching of attention outputs. Each student attention
   layer gets the teacher's input to that layer and matches the teacher's output, by squared error relative to
   the teacher output's mean square, averaged over layers. Only the attention weights learn; errors do not
   compound through depth while the surgery's approximations are repaired.
2. from layer_steps on: end-to-end KL(teacher || student) of the next-token distributions on the same windows.
The teacher is frozen and is not part of the student's state (checkpoints hold the student only).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from production.model.gpt import GPT


class Distiller(nn.Module):
    def __init__(self, student: GPT, teacher: GPT, layer_steps: int):
        super().__init__()
        self.student, self.layer_steps, self.step = student, layer_steps, 0
        for p in teacher.parameters():
            p.requires_grad_(False)
        self._teacher = [teacher.eval()]  # a list: not a submodule, so not in state_dict() or parameters()

    @property
    def teacher(self) -> GPT:
        return self._teacher[0]

    def at_step(self, step: int) -> None:
        """The trainer's step, which picks the phase."""
        self.step = step

    @property
    def phase(self) -> str:
        return "layers" if self.step < self.layer_steps else "logits"

    def forward(self, x: torch.Tensor, y: torch.Tensor | None = None):
        return None, (self.layer_loss(x) if self.phase == "layers" else self.kl_loss(x))

    def layer_loss(self, x: torch.Tensor) -> torch.Tensor:
        captured: list[tuple[torch.Tensor, torch.Tensor]] = []
        hooks = [
            b.attn.register_forward_hook(lambda m, args, out: captured.append((args[0], out)))
            for b in self.teacher.blocks
        ]
        try:
            with torch.no_grad():
                self.teacher.features(x)
        finally:
            for h in hooks:
                h.remove()
        student = self.student
        rope = student.rotary(0, x.shape[1]) if student.rotary is not None else None
        losses = []
        for i, (block, (inputs, target)) in enumerate(zip(student.blocks, captured, strict=True)):
            out, target = block.attn(inputs, student.layer_rope(rope, i)).float(), target.float()
            losses.append((out - target).square().mean() / target.square().mean().clamp_min(1e-8))
        return torch.stack(losses).mean()

    def kl_loss(self, x: torch.Tensor) -> torch.Tensor:
        """Mean over tokens of KL(teacher || student), in nats."""
        logits = self.student.head(self.student.features(x)).float()
        with torch.no_grad():
            target = self.teacher(x)[0].float()
        V = logits.shape[-1]
        return F.kl_div(
            F.log_softmax(logits.view(-1, V), -1), F.log_softmax(target.view(-1, V), -1), log_target=True,
            reduction="batchmean",
        )  # fmt: skip
