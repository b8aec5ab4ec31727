"""What `main.py` checks before it imports torch: flags, presets, overrides, paths and formats, through the
same functions the mode's command then calls again (resolving a config or opening a token file's header costs
microseconds), so a mistake answers in a fraction of a second. What needs torch to know, such as whether CUDA
is present, a checkpoint's contents or a policy's streams, is checked by the command itself."""

from __future__ import annotations

import importlib.util
import re

from production.config.build import check_overrides, resolve_model, resolve_train
from production.config.evaluation import parse_multiples, parse_scalings, split_policies
from production.config.fields import BY_NAME, RESOLVED_SECTIONS, section
from production.config.sampling import SamplingConfig
from production.core.errors import UserError
from production.core.layout import checkpoint_file
from production.data.files import open_tokens

DEVICE = re.compile(r"auto|cpu|mps|cuda(:\d+)?")
SAMPLING_OPTIONS = ("max_new_tokens", "temperature", "top_k", "greedy", "seed")


def check_device(device: str) -> None:
    if not DEVICE.fullmatch(device):
        raise UserError(f"unsupported device {device!r}; use auto, cpu, cuda, cuda:N or mps")


def check_train(v: dict) -> None:
    """`v`: every field (with_defaults)."""
    check_device(v["device"])
    overrides = check_overrides({k: x for k, x in v.items() if BY_NAME[k].section in RESOLVED_SECTIONS})
    resolve_model(v["size"], v["exp"], section(overrides, "model"))
    resolve_train(v["size"], v["exp"], section(overrides, "train"))
    if v["data"] is not None:
        open_tokens(v["data"])
    if v["tracker"] != "none" and importlib.util.find_spec(v["tracker"]) is None:
        raise UserError(f"--tracker {v['tracker']} needs the `{v['tracker']}` package: pip install {v['tracker']}")
    if v["save_every_s"] <= 0:
        raise UserError(f"--save-every-s must be positive, got {v['save_every_s']}")
    if v["stop_at"] is not None and v["stop_at"] < 1:
        raise UserError(f"--stop-at must be a positive step, got {v['stop_at']}")
    if v["resume_path"] is not None and not v["resume_path"].is_file():
        raise UserError(f"--resume-path {v['resume_path']} is not a file (give a run's last.pt)")


def require_checkpoint(v: dict, mode: str, what: str = "a run directory, or its best.pt / last.pt") -> None:
    if v["ckpt"] is None:
        raise UserError(f"--mode {mode} needs --ckpt ({what})")
    checkpoint_file(v["ckpt"])


def check_sample(v: dict) -> None:
    check_device(v["device"])
    require_checkpoint(v, "sample")
    SamplingConfig(**{k: v[k] for k in SAMPLING_OPTIONS if v[k] is not None})
    if (v["prompt"] is None) == (v["prompt_tokens"] is None):
        raise UserError('give exactly one of --prompt TEXT or --prompt-tokens "ID ID ..."')
    if v["max_seq"] is not None and v["max_seq"] < 1:
        raise UserError(f"--max-seq must be positive, got {v['max_seq']}")


def check_export(v: dict) -> None:
    if v["ckpt"] is None or v["out"] is None:
        raise UserError("--mode export needs --ckpt (a checkpoint or run directory) and --out DIR")
    checkpoint_file(v["ckpt"])
    out = v["out"]
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} is a file; give a directory")
    if out.is_dir() and any(out.iterdir()) and not v["force"]:
        raise UserError(f"--out {out} exists and is not empty; pass --force to replace its export files")


def check_eval(v: dict) -> None:
    check_device(v["device"])
    require_checkpoint(v, "eval", "a run directory, or its best.pt / last.pt, or an export")
    parse_multiples(v["lengths"])
    parse_scalings(v["rope_scaling"])
    split_policies(v["kv_policy"])
    for name, low in (("windows", 1), ("chunk", 1), ("passkey_trials", 0)):
        if v[name] < low:
            raise UserError(f"{BY_NAME[name].cli} must be >= {low}, got {v[name]}")
    if v["data"] is not None:
        open_tokens(v["data"])
    if v["out"] is not None and v["out"].is_dir():
        raise UserError(f"--out {v['out']} is a directory; give the report's file name, e.g. {v['out']}/eval.json")


def check_upcycle(v: dict) -> None:
    """What can be known without torch: the teacher's path, numbers, the data file."""
    check_device(v["device"])
    teacher = v["teacher"]
    if teacher is None:
        raise UserError(
            "--mode upcycle needs --teacher (a standard/GQA run directory or a Hugging Face Llama directory)"
        )
    if not teacher.exists():
        raise UserError(f"--teacher {teacher} does not exist")
    if teacher.is_dir() and not (teacher / "config.json").exists():
        checkpoint_file(teacher)  # a run directory must hold best.pt or last.pt
    if v["target_kv_ratio"] is None and v["sem_dim"] is None:
        raise UserError("--mode upcycle needs --target-kv-ratio R (comma-separated) or --sem-dim and --geo-dim")
    for name, low in (("layer_steps", 0), ("steps", 1)):
        if v[name] is not None and v[name] < low:
            raise UserError(f"{BY_NAME[name].cli} must be >= {low}, got {v[name]}")
    if v["data"] is not None:
        open_tokens(v["data"])


CHECKS = {"train": check_train, "sample": check_sample, "export": check_export, "eval": check_eval}
CHECKS["upcycle"] = check_upcycle
