"""Checkpoints: written atomically (temp file + rename), read with weights_only=True (no code runs on load)."""

from __future__ import annotations

import pickle
from pathlib import Path

import torch

from production.core.atomic import atomic_path
from production.core.errors import UserError
from production.core.layout import checkpoint_file
from production.model.config import ModelConfig
from production.model.gpt import GPT

# Recipe fields a resumed run may change; anything else differing from the checkpoint is an error.
RESUME_MAY_CHANGE = ("steps", "eval_every", "eval_iters", "log_every")


def save_checkpoint(obj: dict, path: Path) -> None:
    with atomic_path(path) as tmp:
        torch.save(obj, tmp)


def load_checkpoint(path: str | Path, map_location: str = "cpu", mmap: bool = False) -> dict:
    """A checkpoint of this harness, named by its file or its run directory (`mmap`: tensors stay on disk until
    touched, for reading the config only)."""
    path = checkpoint_file(path)
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
    except Exception as e:
        if isinstance(e, pickle.UnpicklingError) and "Unsupported global" in str(e):
            # torch's advice here is an unsafe load: never pass it on
            raise UserError(
                f"{path} is not a checkpoint of this harness: it holds Python objects that only an unsafe load "
                "(one that runs code from the file) could read"
            ) from e
        raise UserError(
            f"{path} is not a readable checkpoint (truncated, or not written by torch.save: {type(e).__name__})"
        ) from e
    if not isinstance(ckpt, dict) or "model" not in ckpt or "config" not in ckpt:
        raise UserError(f"{path} is not a checkpoint of this harness (no model/config entries)")
    return ckpt


def model_config(ckpt: dict, path: Path) -> ModelConfig:
    """The ModelConfig recorded in a checkpoint."""
    fields = {k: v for k, v in ckpt["config"]["model"].items() if k != "n_params"}
    try:
        return ModelConfig(**fields)
    except TypeError as e:
        raise UserError(f"checkpoint {path} does not match this code's model ({str(e).splitlines()[0]})") from e


def load_model(path: str | Path, device: str = "cpu") -> tuple[GPT, dict]:
    """The GPT stored in a checkpoint (best.pt or last.pt), on `device`, in eval mode; and the checkpoint."""
    ckpt = load_checkpoint(path)
    model = GPT(model_config(ckpt, Path(path)))
    try:
        model.load_state_dict(ckpt["model"])
    except RuntimeError as e:
        raise UserError(f"checkpoint {path} does not match this code's model ({str(e).splitlines()[0]})") from e
    return model.to(device).eval(), ckpt


def check_resumable(ckpt: dict, resolved: dict, path: Path) -> None:
    """A checkpoint resumes only the run it came from: same model, same recipe (but RESUME_MAY_CHANGE), same
    data (format and size)."""
    saved = ckpt["config"]
    if saved["model"] != resolved["model"]:
        diff = sorted(k for k in resolved["model"] if saved["model"].get(k) != resolved["model"][k])
        raise UserError(
            f"checkpoint {path} is from another model config (differs in {', '.join(diff)}); "
            "resume with the same --size/--exp/overrides or start a new --out-dir"
        )
    changed = [k for k in resolved["train"] if k not in RESUME_MAY_CHANGE]
    diff = sorted(k for k in changed if saved["train"].get(k) != resolved["train"][k])
    if diff:
        raise UserError(
            f"checkpoint {path} was trained with a different recipe ({', '.join(diff)}); "
            "pass the original values to resume it"
        )
    was, now = saved["data"], resolved["data"]
    if (was["format"], was["n_tokens"]) != (now["format"], now["n_tokens"]):
        raise UserError(
            f"checkpoint {path} was trained on {was['source']} ({was['n_tokens']} tokens), "
            f"not {now['source']} ({now['n_tokens']} tokens)"
        )
