import pytest

from production.config.build import resolve_model, resolve_train
from production.config.presets import EXPERIMENTS, SIZES
from production.core.errors import UserError
from production.model.gpt import GPT, param_count

# the size table of docs/ARCHITECTURE.md:
# (d_model, n_layer, n_head, d_ff, block, batch, grad accum, attn_dim, sem, geo, gqa kv_heads)
DOC_SIZES = {
    "nano": (256, 4, 4, 1024, 256, 8, 1, 48, 16, 32, 1),
    "tiny": (512, 6, 8, 2048, 1024, 16, 1, 96, 32, 64, 2),
    "small": (768, 12, 12, 3072, 1024, 8, 1, 144, 48, 96, 3),
    "medium": (1024, 24, 16, 4096, 2048, 4, 1, 192, 64, 128, 4),
    "large": (1536, 24, 16, 6144, 2048, 2, 1, 288, 96, 192, 4),
    "1b": (2048, 18, 16, 8192, 4096, 2, 8, 768, 256, 512, 4),
}
# the experiment table of docs/ARCHITECTURE.md: (attn_mode, null_attn, tie_qk, rope, lr)
DOC_EXPS = {
    "paper_baseline": ("standard", False, False, True, 3e-4),
    "paper_bottleneck": ("bottleneck", True, False, True, 3e-4),
    "paper_decoupled": ("decoupled", False, True, True, 3e-4),
    "paper_decoupled_null": ("decoupled", True, True, True, 3e-4),
    "paper_decoupled_notieqk": ("decoupled", False, False, True, 3e-4),
    "paper_decoupled_norope": ("decoupled", False, True, False, 3e-4),
    "paper_gqa": ("gqa", False, False, True, 3e-4),
    "paper_baseline_lr2e4": ("standard", False, False, True, 2e-4),
    "paper_baseline_lr3e4": ("standard", False, False, True, 3e-4),
    "paper_baseline_lr4e4": ("standard", False, False, True, 4e-4),
}


def test_presets_are_exactly_the_documented_tables():
    assert set(SIZES) == set(DOC_SIZES) and set(EXPERIMENTS) == set(DOC_EXPS)


@pytest.mark.parametrize("size", list(DOC_SIZES))
@pytest.mark.parametrize("exp", list(DOC_EXPS))
def test_every_preset_resolves_to_the_design_dims(size, exp):
    d, L, H, ff, block, batch, accum, attn, sem, geo, kv = DOC_SIZES[size]
    mode, null, tie, rope, lr = DOC_EXPS[exp]
    m, t = resolve_model(size, exp), resolve_train(size, exp)
    assert (m.d_model, m.n_layer, m.n_head, m.d_ff, m.block_size) == (d, L, H, ff, block)
    assert (m.attn_mode, m.null_attn, m.tie_qk, m.rope) == (mode, null, tie, rope)
    assert (t.lr, t.min_lr, t.batch_size, t.grad_accum) == (lr, pytest.approx(0.1 * lr), batch, accum)
    expect = {
        "standard": (d, None, None, H),
        "bottleneck": (attn, None, None, H),
        "decoupled": (attn, sem, geo, H),
        "gqa": (d, None, None, kv),
    }[mode]
    assert (m.attn_dim, m.sem_dim, m.geo_dim, m.kv_heads) == expect
    assert m.vocab_size == 50257


def test_small_parameter_difference_is_the_attention_projections():
    std = param_count(resolve_model("small", "paper_baseline"))
    dec = param_count(resolve_model("small", "paper_decoupled"))
    assert std - dec == 12 * (4 * 768**2 - (768 * 48 + 2 * 768 * 96 + 2 * 768 * 144))
    # standard small: tied embedding + 12 x (4 d^2 attention + 2 d d_ff MLP + 2 LayerNorms) + final LayerNorm
    assert std == 50257 * 768 + 12 * (4 * 768**2 + 2 * 768 * 3072 + 4 * 768) + 2 * 768


def test_counted_on_meta_equals_real_model():
    cfg = resolve_model("nano", "paper_bottleneck")
    assert param_count(cfg) == GPT(cfg).num_params()


@pytest.mark.parametrize(
    "size,exp,overrides,match",
    [
        ("huge", "paper_baseline", {}, "valid sizes: nano, tiny, small"),
        ("nano", "paper_flash", {}, "valid exps: paper_baseline"),
        ("nano", "paper_baseline", {"n_head": 3}, "does not divide d_model"),
        ("nano", "paper_baseline", {"sem_dim": 8}, "does not apply to standard"),
        ("nano", "paper_decoupled", {"attn_dim": 64}, r"attn_dim = sem_dim \+ geo_dim"),
        ("nano", "paper_gqa", {"kv_heads": 3}, "must divide n_head"),
        ("nano", "paper_decoupled", {"geo_dim": 20}, "even"),
        ("nano", "paper_baseline", {"attn_dim": 128}, "paper_bottleneck"),
    ],
)
def test_contradictory_or_unknown_settings_are_clear_errors(size, exp, overrides, match):
    with pytest.raises(UserError, match=match):
        resolve_model(size, exp, overrides)


def test_train_overrides_and_warmup_rule():
    t = resolve_train("small", "paper_decoupled", {"steps": 1000, "lr": 1e-3})
    assert (t.steps, t.warmup_steps, t.lr, t.min_lr) == (1000, 100, 1e-3, 1e-4)
    assert resolve_train("small", "paper_decoupled").warmup_steps == 200
    with pytest.raises(UserError, match="min_lr"):
        resolve_train("nano", "paper_baseline", {"lr": 1e-4, "min_lr": 1e-3})
