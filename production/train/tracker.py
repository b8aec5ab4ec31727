"""Experiment trackers, opt-in (`--tracker tensorboard|wandb`): they mirror the events of train.jsonl (train,
eval, tuner decisions, the resolved config, the final summary) from rank 0. TensorBoard through torch's own
SummaryWriter into `<run dir>/tensorboard/`; Weights & Biases through its client (its own login and settings,
e.g. WANDB_MODE=offline; nothing hard-coded). Each is an optional install (requirements-trackers.txt)."""

from __future__ import annotations

import json
from pathlib import Path

from production.core.errors import UserError

try:
    from torch.utils.tensorboard import SummaryWriter
except ModuleNotFoundError:  # torch's writer needs the tensorboard package
    SummaryWriter = None
try:
    import wandb
except ModuleNotFoundError:
    wandb = None

TRACKERS = ("none", "tensorboard", "wandb")
SECTION = {"train": "train", "eval": "eval", "done": "final"}  # event type -> scalar prefix


def numbers(fields: dict) -> dict[str, float]:
    return {k: float(v) for k, v in fields.items() if isinstance(v, int | float) and not isinstance(v, bool)}


class TensorBoardTracker:
    def __init__(self, run_dir: Path, group: str | None):
        self.writer = SummaryWriter(log_dir=str(run_dir / "tensorboard"))
        if group:
            self.writer.add_text("group", group)

    def event(self, type: str, step: int, fields: dict) -> None:
        if type in ("meta", "resume_meta"):
            self.writer.add_text("config", f"```\n{json.dumps(fields['config'], indent=2)}\n```", step)
        elif type == "tuner":
            self.writer.add_text(f"tuner/{fields['decision']}", f"{fields['value']} ({fields['source']})", step)
        elif type in SECTION:
            for name, value in numbers(fields).items():
                self.writer.add_scalar(f"{SECTION[type]}/{name}", value, step)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


class WandbTracker:
    def __init__(self, run_dir: Path, group: str | None, config: dict):
        self.run = wandb.init(
            project="dba", name=run_dir.name, group=group, config=config, dir=str(run_dir), resume="allow"
        )

    def event(self, type: str, step: int, fields: dict) -> None:
        if type == "tuner":
            self.run.summary[f"tuner/{fields['decision']}"] = str(fields["value"])
        elif type == "done":
            self.run.summary.update({f"final/{k}": v for k, v in numbers(fields).items()})
        elif type in SECTION:
            self.run.log({f"{SECTION[type]}/{k}": v for k, v in numbers(fields).items()}, step=step)

    def close(self) -> None:
        self.run.finish()


def check_tracker(name: str) -> None:
    """The tracker's package is installed (a missing one is one error line saying what to install)."""
    missing = {"tensorboard": SummaryWriter is None, "wandb": wandb is None}.get(name, False)
    if missing:
        raise UserError(f"--tracker {name} needs the `{name}` package: pip install {name}")


def open_tracker(name: str, run_dir: Path, group: str | None, config: dict):
    """The tracker for a run directory, or None for `none`."""
    check_tracker(name)
    if name == "tensorboard":
        return TensorBoardTracker(run_dir, group)
    if name == "wandb":
        return WandbTracker(run_dir, group, config)
    return None
