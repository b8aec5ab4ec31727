"""Checkpoints: written atomically (temp file + rename), read with weights_only=True (no code runs on load).
An export (`main.py --mode export`) is the same model as `model.safetensors` plus a `config.json` holding the
resolved config and provenance; every loader here accepts it where it accepts a checkpoint."""

from __future__ import annotations

import json
import pickle
from datetime import datetime, timezone
from pathlib import Path

import torch

from production.core.atomic import atomic_path, write_json
from production.core.errors import UserError
from production.core.layout import EXPORT_CONFIG, EXPORT_WEIGHTS, checkpoint_file
from production.core.runtime import environment
from production.model.config import ModelConfig
from production.model.gpt import GPT

try:  # an optional install (requirements-export.txt): only exports need it
    import safetensors.torch as safetensors_torch
except ModuleNotFoundError:
    safetensors_torch = None

EXPORT_FORMAT = "dba.export/1"

# Recipe fields a resumed run may change; anything else differing from the checkpoint is an error.
RESUME_MAY_CHANGE = ("steps", "eval_every", "eval_iters", "log_every")


def save_checkpoint(obj: dict, path: Path) -> None:
    with atomic_path(path) as tmp:
        torch.save(obj, tmp)


def load_checkpoint(path: str | Path, map_location: str = "cpu", mmap: bool = False) -> dict:
    """A checkpoint of this harness, named by its file or its run directory (`mmap`: tensors stay on disk until
    touched, for reading the config only)."""
    path = checkpoint_file(path)
    if path.name == EXPORT_WEIGHTS:
        return load_export(path)
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


def require_safetensors() -> None:
    if safetensors_torch is None:
        raise UserError("exports need the `safetensors` package: pip install -r requirements-export.txt")


def save_export(model: GPT, ckpt: dict, source: Path, out: Path) -> None:
    """model.safetensors (tied weights stored once) and config.json into `out`."""
    require_safetensors()
    out.mkdir(parents=True, exist_ok=True)
    with atomic_path(out / EXPORT_WEIGHTS) as tmp:
        safetensors_torch.save_model(model, str(tmp), metadata={"format": EXPORT_FORMAT})
    env = environment("cpu")
    record = {
        "format": EXPORT_FORMAT,
        "config": ckpt["config"],
        "step": ckpt["step"],
        "best_val_loss": ckpt["best_val_loss"],
        "source": str(source),
        "exported": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "git_commit": env["git_commit"],
        "git_dirty": env["git_dirty"],
        "torch": env["torch"],
    }
    write_json(out / EXPORT_CONFIG, record)


def load_export(weights: Path) -> dict:
    """An export read back as a checkpoint dict (model state, config, step, best val loss)."""
    require_safetensors()
    config_path = weights.with_name(EXPORT_CONFIG)
    try:
        record = json.loads(config_path.read_text())
        ckpt = {"config": record["config"], "step": record["step"], "best_val_loss": record["best_val_loss"]}
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise UserError(f"{config_path} is not the config.json of an export ({type(e).__name__}: {e})") from e
    model = GPT(model_config(ckpt, config_path))
    try:
        safetensors_torch.load_model(model, str(weights), strict=True, device="cpu")
    except Exception as e:  # a truncated file, or weights of another model
        raise UserError(f"{weights} does not hold this config's weights ({str(e).splitlines()[0]})") from e
    ckpt["model"] = model.state_dict()
    return ckpt
