"""Checkpoints: written atomically (temp file + rename), read with weights_only=True (no code runs on load)."""

from __future__ import annotations

import os
from pathlib import Path

import torch

from production.errors import UserError


def save_atomic(obj: dict, path: Path) -> None:
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def load_checkpoint(path: str | Path, map_location: str = "cpu") -> dict:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"checkpoint {path} does not exist")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # a truncated, foreign or code-carrying file: say which and why, no traceback
        raise UserError(
            f"checkpoint {path} cannot be read safely ({type(e).__name__}: {str(e).splitlines()[0]})"
        ) from e
    if not isinstance(ckpt, dict) or "model" not in ckpt or "config" not in ckpt:
        raise UserError(f"{path} is not a checkpoint of this harness (no model/config entries)")
    return ckpt


def load_model(path: str | Path, device: str = "cpu"):
    """The GPT stored in a checkpoint (best.pt or last.pt), on `device`, in eval mode; and the checkpoint."""
    from production.config import ModelConfig
    from production.model import GPT

    ckpt = load_checkpoint(path)
    fields = {k: v for k, v in ckpt["config"]["model"].items() if k != "n_params"}
    try:
        model = GPT(ModelConfig(**fields))
        model.load_state_dict(ckpt["model"])
    except (TypeError, RuntimeError) as e:
        raise UserError(f"checkpoint {path} does not match this code's model ({str(e).splitlines()[0]})") from e
    return model.to(device).eval(), ckpt
