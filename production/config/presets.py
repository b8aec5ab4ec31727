"""Size and experiment presets (docs/ARCHITECTURE.md, "Presets"). Plain dicts, matched exactly; an unknown
name is an error that lists the valid ones."""

from production.core.errors import UserError

DEFAULT_SIZE, DEFAULT_EXP = "nano", "paper_decoupled"

# fmt: off
# `steps` is the default training length when --steps is not given: the paper's 6000 for the
# real sizes; nano is the CPU demo, sized (with more frequent, shorter evals) to finish in minutes
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

# attention variant, its flags and learning rate per experiment
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


def check_preset(size: str, exp: str) -> None:
    if size not in SIZES:
        raise UserError(f"unknown size {size!r}; valid sizes: {', '.join(SIZES)}")
    if exp not in EXPERIMENTS:
        raise UserError(f"unknown exp {exp!r}; valid exps: {', '.join(EXPERIMENTS)}")
