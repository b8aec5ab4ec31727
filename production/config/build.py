"""Presets + overrides -> ModelConfig and TrainConfig. Torch-free: `main.py` runs these checks before it
imports torch, so a mistake in a flag answers at once; `production.config.resolve` adds the runtime."""

from __future__ import annotations

from dataclasses import fields

from production.config.fields import BY_NAME, RESOLVED_SECTIONS, check_types, flag_of
from production.config.presets import EXPERIMENTS, SIZES, check_preset
from production.config.recipe import TrainConfig
from production.core.errors import UserError
from production.model.config import ModelConfig

TRAIN_OVERRIDES = tuple(f.name for f in fields(TrainConfig))


def check_overrides(overrides: dict | None) -> dict:
    """The given (non-None) overrides, each a model, recipe or runtime field of the right type."""
    values = {k: v for k, v in (overrides or {}).items() if v is not None}
    unknown = sorted(k for k in values if k not in BY_NAME or BY_NAME[k].section not in RESOLVED_SECTIONS)
    if unknown:
        raise UserError(f"unknown override(s) {unknown}: not a model, recipe or runtime setting")
    check_types(values)
    return values


def resolve_model(size: str, exp: str, overrides: dict | None = None) -> ModelConfig:
    """Size preset + experiment preset + overrides -> a validated ModelConfig.

    The mode decides which width fields apply: standard and gqa attend at d_model width, bottleneck at the
    preset attn_dim, decoupled at sem_dim + geo_dim. An override that contradicts the mode is an error.
    """
    check_preset(size, exp)
    o = {k: v for k, v in (overrides or {}).items() if v is not None}
    unknown = [k for k in o if k not in BY_NAME or BY_NAME[k].section != "model"]
    if unknown:
        valid = [f for f in BY_NAME if BY_NAME[f].section == "model"]
        raise UserError(f"unknown model override(s) {sorted(unknown)}; valid: {', '.join(valid)}")
    s, e = SIZES[size], EXPERIMENTS[exp]
    mode = e["attn_mode"]
    dims = {k: o.get(k, s[k]) for k in ("d_model", "n_layer", "n_head", "d_ff", "block_size")}
    flags = {k: o.get(k, e[k]) for k in ("null_attn", "tie_qk", "rope")}
    foreign = {
        "standard": ("sem_dim", "geo_dim", "kv_heads"),
        "bottleneck": ("sem_dim", "geo_dim", "kv_heads"),
        "decoupled": ("kv_heads",),
        "gqa": ("sem_dim", "geo_dim"),
    }[mode]
    bad = [n for n in foreign if n in o]
    if bad:
        raise UserError(f"{flag_of(bad[0])} does not apply to {mode} attention ({exp})")
    sem = geo = None
    kv_heads = o.get("kv_heads", s["kv_heads"]) if mode == "gqa" else dims["n_head"]
    if mode == "decoupled":
        sem, geo = o.get("sem_dim", s["sem_dim"]), o.get("geo_dim", s["geo_dim"])
    width = {"standard": dims["d_model"], "gqa": dims["d_model"], "bottleneck": s["attn_dim"]}.get(mode)
    attn_dim = o.get("attn_dim", width if sem is None else sem + geo)
    return ModelConfig(
        attn_mode=mode,
        **dims,
        attn_dim=attn_dim,
        sem_dim=sem,
        geo_dim=geo,
        kv_heads=kv_heads,
        **flags,
        dropout=o.get("dropout", 0.0),
    )


def resolve_train(size: str, exp: str, overrides: dict | None = None) -> TrainConfig:
    """Recipe defaults: lr from the exp; batch, accum, steps (and nano's eval cadence) from the size;
    min_lr = 0.1 lr; warmup min(200, steps // 10) steps."""
    check_preset(size, exp)
    o = {k: v for k, v in (overrides or {}).items() if v is not None}
    unknown = set(o) - set(TRAIN_OVERRIDES)
    if unknown:
        raise UserError(f"unknown train override(s) {sorted(unknown)}; valid: {', '.join(TRAIN_OVERRIDES)}")
    s, e = SIZES[size], EXPERIMENTS[exp]
    lr = o.pop("lr", e["lr"])
    steps = o.pop("steps", s["steps"])
    size_defaults = {k: s[k] for k in ("batch_size", "grad_accum", "eval_every", "eval_iters") if k in s}
    return TrainConfig(
        lr=lr,
        min_lr=o.pop("min_lr", round(0.1 * lr, 12)),
        warmup_steps=o.pop("warmup_steps", min(200, steps // 10)),
        steps=steps,
        **{**size_defaults, **o},
    )
