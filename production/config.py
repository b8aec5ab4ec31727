"""Configuration: dataclasses, size and experiment presets, and their resolution.

One config path: CLI or manifest -> `resolve()` -> dataclasses -> objects. Every effective value ends up in
`resolved_config.json`. Presets are plain dicts matched exactly; unknown names are errors listing valid ones.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields

from production.errors import UserError

GPT2_VOCAB_SIZE = 50257
ATTN_MODES = ("standard", "bottleneck", "decoupled", "gqa")


# fmt: off
# DESIGN.md 3.2. `steps` is the default training length when --steps is not given: the paper's 6000 for the
# real sizes; nano is the CPU demo, sized (with more frequent, shorter evals) to finish in about three minutes
# on 2 CPU cores.
SIZES: dict[str, dict] = {
    "nano":   dict(d_model=256,  n_layer=4,  n_head=4,  d_ff=1024, block_size=256,  batch_size=8, grad_accum=1,
                   attn_dim=48,  sem_dim=16,  geo_dim=32,  kv_heads=1, steps=150, eval_every=50, eval_iters=10),
    "tiny":   dict(d_model=512,  n_layer=6,  n_head=8,  d_ff=2048, block_size=1024, batch_size=16, grad_accum=1,
                   attn_dim=96,  sem_dim=32,  geo_dim=64,  kv_heads=2, steps=6000),
    "small":  dict(d_model=768,  n_layer=12, n_head=12, d_ff=3072, block_size=1024, batch_size=8, grad_accum=1,
                   attn_dim=144, sem_dim=48,  geo_dim=96,  kv_heads=3, steps=6000),
    "medium": dict(d_model=1024, n_layer=24, n_head=16, d_ff=4096, block_size=2048, batch_size=4, grad_accum=1,
                   attn_dim=192, sem_dim=64,  geo_dim=128, kv_heads=4, steps=6000),
    "large":  dict(d_model=1536, n_layer=24, n_head=16, d_ff=6144, block_size=2048, batch_size=2, grad_accum=1,
                   attn_dim=288, sem_dim=96,  geo_dim=192, kv_heads=4, steps=6000),
    "1b":     dict(d_model=2048, n_layer=18, n_head=16, d_ff=8192, block_size=4096, batch_size=2, grad_accum=8,
                   attn_dim=768, sem_dim=256, geo_dim=512, kv_heads=4, steps=6000),
}

# DESIGN.md 3.3
EXPERIMENTS: dict[str, dict] = {
    "paper_baseline":          dict(attn_mode="standard",   null_attn=False, tie_qk=False, rope=True,  lr=3e-4),
    "paper_bottleneck":        dict(attn_mode="bottleneck", null_attn=True,  tie_qk=False, rope=True,  lr=3e-4),
    "paper_decoupled":         dict(attn_mode="decoupled",  null_attn=False, tie_qk=True,  rope=True,  lr=3e-4),
    "paper_decoupled_null":    dict(attn_mode="decoupled",  null_attn=True,  tie_qk=True,  rope=True,  lr=3e-4),
    "paper_decoupled_notieqk": dict(attn_mode="decoupled",  null_attn=False, tie_qk=False, rope=True,  lr=3e-4),
    "paper_decoupled_norope":  dict(attn_mode="decoupled",  null_attn=False, tie_qk=True,  rope=False, lr=3e-4),
    "paper_gqa":               dict(attn_mode="gqa",        null_attn=False, tie_qk=False, rope=True,  lr=3e-4),
    "paper_baseline_lr2e4":    dict(attn_mode="standard",   null_attn=False, tie_qk=False, rope=True,  lr=2e-4),
    "paper_baseline_lr3e4":    dict(attn_mode="standard",   null_attn=False, tie_qk=False, rope=True,  lr=3e-4),
    "paper_baseline_lr4e4":    dict(attn_mode="standard",   null_attn=False, tie_qk=False, rope=True,  lr=4e-4),
}
# fmt: on


@dataclass(frozen=True)
class ModelConfig:
    """Architecture. Fields that do not apply to a mode are None (sem_dim/geo_dim outside decoupled)."""

    attn_mode: str
    d_model: int
    n_layer: int
    n_head: int
    d_ff: int
    block_size: int
    attn_dim: int  # total Q/K (and V) width across heads; d_model for standard and gqa
    sem_dim: int | None
    geo_dim: int | None
    kv_heads: int
    null_attn: bool
    tie_qk: bool
    rope: bool
    rope_base: float = 10000.0
    vocab_size: int = GPT2_VOCAB_SIZE
    dropout: float = 0.0

    def __post_init__(self):
        if self.attn_mode not in ATTN_MODES:
            raise UserError(f"unknown attn_mode {self.attn_mode!r}; valid: {', '.join(ATTN_MODES)}")
        for name in ("d_model", "n_layer", "n_head", "d_ff", "block_size", "attn_dim", "kv_heads", "vocab_size"):
            if getattr(self, name) < 1:
                raise UserError(f"{name} must be a positive integer, got {getattr(self, name)}")
        if not 0.0 <= self.dropout < 1.0:
            raise UserError(f"dropout must be in [0, 1), got {self.dropout}")
        H = self.n_head
        if self.d_model % H:
            raise UserError(f"n_head={H} does not divide d_model={self.d_model}; pick a divisor of d_model")
        if self.attn_dim % H:
            raise UserError(f"n_head={H} does not divide attn_dim={self.attn_dim}")
        if self.attn_mode in ("standard", "gqa") and self.attn_dim != self.d_model:
            raise UserError(
                f"{self.attn_mode} attention has attn_dim = d_model = {self.d_model}, "
                f"got {self.attn_dim}; use --exp paper_bottleneck for a narrower attention"
            )
        if self.attn_mode == "decoupled":
            if self.sem_dim is None or self.geo_dim is None or self.sem_dim < 1 or self.geo_dim < 1:
                raise UserError("decoupled attention needs positive sem_dim and geo_dim")
            if self.sem_dim + self.geo_dim != self.attn_dim:
                raise UserError(
                    f"decoupled attention needs attn_dim = sem_dim + geo_dim, got "
                    f"{self.attn_dim} != {self.sem_dim} + {self.geo_dim}"
                )
            if self.sem_dim % H or self.geo_dim % H:
                raise UserError(f"n_head={H} must divide sem_dim={self.sem_dim} and geo_dim={self.geo_dim}")
        elif self.sem_dim is not None or self.geo_dim is not None:
            raise UserError(f"sem_dim/geo_dim apply to decoupled attention only, not {self.attn_mode}")
        if self.attn_mode == "gqa":
            if H % self.kv_heads:
                raise UserError(f"kv_heads={self.kv_heads} must divide n_head={H}")
            if self.tie_qk and self.kv_heads != H:
                raise UserError("tie_qk needs K as wide as Q; gqa with kv_heads < n_head cannot tie them")
        elif self.kv_heads != H:
            raise UserError(f"kv_heads applies to gqa only; {self.attn_mode} uses kv_heads = n_head = {H}")
        if self.rope and self.rope_dim % 2:
            raise UserError(f"RoPE needs an even rotated head dim, got {self.rope_dim}")

    @property
    def head_dim(self) -> int:
        """Per-head width of Q, K and V (the concatenated sem+geo width in decoupled mode)."""
        return self.attn_dim // self.n_head

    @property
    def rope_dim(self) -> int:
        """Per-head width that RoPE rotates: the geometric part in decoupled mode, the full head elsewhere."""
        if self.attn_mode == "decoupled":
            return self.geo_dim // self.n_head
        return self.head_dim

    def to_dict(self) -> dict:
        return asdict(self)


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


MODEL_OVERRIDES = (
    "d_model",
    "n_layer",
    "n_head",
    "d_ff",
    "block_size",
    "attn_dim",
    "sem_dim",
    "geo_dim",
    "kv_heads",
    "null_attn",
    "tie_qk",
    "rope",
    "dropout",
)
TRAIN_OVERRIDES = tuple(f.name for f in fields(TrainConfig))


def check_preset(size: str, exp: str) -> None:
    if size not in SIZES:
        raise UserError(f"unknown size {size!r}; valid sizes: {', '.join(SIZES)}")
    if exp not in EXPERIMENTS:
        raise UserError(f"unknown exp {exp!r}; valid exps: {', '.join(EXPERIMENTS)}")


def resolve_model(size: str, exp: str, overrides: dict | None = None) -> ModelConfig:
    """Size preset + experiment preset + overrides -> a validated ModelConfig.

    The mode decides which width fields apply: standard and gqa attend at d_model width, bottleneck at the
    preset attn_dim, decoupled at sem_dim + geo_dim. An override that contradicts the mode is an error.
    """
    check_preset(size, exp)
    o = {k: v for k, v in (overrides or {}).items() if v is not None}
    unknown = set(o) - set(MODEL_OVERRIDES)
    if unknown:
        raise UserError(f"unknown model override(s) {sorted(unknown)}; valid: {', '.join(MODEL_OVERRIDES)}")
    s, e = SIZES[size], EXPERIMENTS[exp]
    mode = e["attn_mode"]
    dims = {k: o.get(k, s[k]) for k in ("d_model", "n_layer", "n_head", "d_ff", "block_size")}
    flags = {k: o.get(k, e[k]) for k in ("null_attn", "tie_qk", "rope")}
    n_head = dims["n_head"]

    def not_for_mode(*names):
        bad = [n for n in names if n in o]
        if bad:
            raise UserError(f"--{bad[0].replace('_', '-')} does not apply to {mode} attention ({exp})")

    if mode == "standard":
        not_for_mode("sem_dim", "geo_dim", "kv_heads")
        attn_dim, sem, geo, kv = o.get("attn_dim", dims["d_model"]), None, None, n_head
    elif mode == "bottleneck":
        not_for_mode("sem_dim", "geo_dim", "kv_heads")
        attn_dim, sem, geo, kv = o.get("attn_dim", s["attn_dim"]), None, None, n_head
    elif mode == "decoupled":
        not_for_mode("kv_heads")
        sem, geo = o.get("sem_dim", s["sem_dim"]), o.get("geo_dim", s["geo_dim"])
        attn_dim, kv = o.get("attn_dim", sem + geo), n_head
    else:  # gqa
        not_for_mode("sem_dim", "geo_dim")
        attn_dim, sem, geo, kv = o.get("attn_dim", dims["d_model"]), None, None, o.get("kv_heads", s["kv_heads"])
    return ModelConfig(
        attn_mode=mode,
        **dims,
        attn_dim=attn_dim,
        sem_dim=sem,
        geo_dim=geo,
        kv_heads=kv,
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
