"""Every attention variant against a naive softmax attention written here, independently of the code under
test: explicit per-head score matrices, RoPE as complex rotation, the null column appended by hand."""

import dataclasses
import math

import pytest
import torch

from production.cache.policy import parse_policy
from production.config.build import resolve_model
from production.config.presets import EXPERIMENTS, SIZES
from production.model.attention import ATTENTION, DecoupledAttention, MultiHeadAttention, build_attention, cache_widths
from production.model.config import ATTN_MODES
from production.model.gpt import GPT
from production.model.rope import Rotary, apply_rope

TOL = 1e-6  # float64 math throughout; the RoPE tables are float32


def rope_ref(x: torch.Tensor, start: int = 0, base: float = 10000.0) -> torch.Tensor:
    """x (T, D): pair (i, i + D/2) is the complex number x_i + j x_{i+D/2}, rotated by pos * base^(-2i/D)."""
    T, D = x.shape
    half = D // 2
    pos = torch.arange(start, start + T, dtype=torch.float64)[:, None]
    theta = pos * base ** (-2 * torch.arange(half, dtype=torch.float64) / D)[None, :]
    z = torch.complex(x[:, :half], x[:, half:]) * torch.polar(torch.ones_like(theta), theta)
    return torch.cat([z.real, z.imag], dim=-1)


def softmax_attend(scores: torch.Tensor, v: torch.Tensor, null_scores=None, null_v=None) -> torch.Tensor:
    """scores (T, T) already scaled; v (T, Dv); optional null column (T,) with value (Dv,)."""
    T = scores.shape[0]
    out = torch.empty(T, v.shape[1], dtype=v.dtype)
    for i in range(T):
        s = scores[i, : i + 1]
        vals = v[: i + 1]
        if null_scores is not None:
            s = torch.cat([null_scores[i : i + 1], s])
            vals = torch.cat([null_v[None], vals])
        w = torch.exp(s - s.max())
        out[i] = (w / w.sum()) @ vals
    return out


def naive_mha(m: MultiHeadAttention, x: torch.Tensor, rope: bool) -> torch.Tensor:
    """x (T, d_model) -> (T, d_model) for standard / bottleneck / gqa."""
    H, Hkv = m.n_head, m.kv_heads
    q, k, v = x @ m.q.weight.T, x @ m.k.weight.T, x @ m.v.weight.T
    hd = q.shape[1] // H
    heads = []
    for h in range(H):
        g = h // (H // Hkv)  # the kv head this query head reads
        qh, kh, vh = q[:, h * hd : (h + 1) * hd], k[:, g * hd : (g + 1) * hd], v[:, g * hd : (g + 1) * hd]
        if rope:
            qh, kh = rope_ref(qh), rope_ref(kh)
        null_s = None if m.null_k is None else qh @ m.null_k[g] / math.sqrt(hd)
        null_v = None if m.null_v is None else m.null_v[g]
        heads.append(softmax_attend(qh @ kh.T / math.sqrt(hd), vh, null_s, null_v))
    return torch.cat(heads, dim=1) @ m.o.weight.T


def naive_decoupled(m: DecoupledAttention, x: torch.Tensor, rope: bool) -> torch.Tensor:
    """Sum of the two separately scaled score matrices, as docs/ARCHITECTURE.md defines it."""
    H, Hkv, s, g = m.n_head, m.kv_heads, m.sem_head, m.geo_head
    qs, ks = x @ m.q_sem.weight.T, x @ m.k_sem.weight.T
    qg, kg = x @ m.q_geo.weight.T, x @ m.k_geo.weight.T
    v = x @ m.v.weight.T
    dv = v.shape[1] // Hkv
    heads = []
    for h in range(H):
        j = h // (H // Hkv)  # the K/V head this query head reads
        qsh, ksh = qs[:, h * s : (h + 1) * s], ks[:, j * s : (j + 1) * s]
        qgh, kgh = qg[:, h * g : (h + 1) * g], kg[:, j * g : (j + 1) * g]
        if rope:
            qgh, kgh = rope_ref(qgh), rope_ref(kgh)
        scores = qsh @ ksh.T / math.sqrt(s) + qgh @ kgh.T / math.sqrt(g)
        null_s = null_v = None
        if m.null_k is not None:  # the null key's geometric part is not rotated
            null_s = qsh @ m.null_k[j, :s] / math.sqrt(s) + qgh @ m.null_k[j, s:] / math.sqrt(g)
            null_v = m.null_v[j]
        heads.append(softmax_attend(scores, v[:, j * dv : (j + 1) * dv], null_s, null_v))
    return torch.cat(heads, dim=1) @ m.o.weight.T


def module_for(exp: str, **overrides):
    cfg = resolve_model("nano", exp, {"d_model": 64, "n_head": 4, "block_size": 16, **overrides})
    torch.manual_seed(0)
    gpt = GPT(cfg).double()
    attn = gpt.blocks[0].attn
    with torch.no_grad():  # non-zero null token so its column matters
        for name, p in attn.named_parameters():
            if "null" in name:
                p.normal_(0, 1.0)
    return cfg, gpt, attn


def run_module(gpt: GPT, attn, x: torch.Tensor, start: int = 0) -> torch.Tensor:
    rope = gpt.rotary(start, x.shape[1]) if gpt.rotary is not None else None
    return attn(x, rope)


@pytest.mark.parametrize("exp", list(EXPERIMENTS))
def test_every_experiment_matches_naive_attention(exp):
    cfg, gpt, attn = module_for(exp)
    x = torch.randn(2, 11, cfg.d_model, dtype=torch.float64)
    y = run_module(gpt, attn, x)
    naive = naive_decoupled if cfg.attn_mode == "decoupled" else naive_mha
    for b in range(2):
        torch.testing.assert_close(y[b], naive(attn, x[b], cfg.rope), atol=TOL, rtol=0)


@pytest.mark.parametrize(
    "mode_exp,overrides",
    [
        ("paper_gqa", {"kv_heads": 2}),
        ("paper_gqa", {"null_attn": True}),
        ("paper_baseline", {"null_attn": True, "tie_qk": True}),
        ("paper_bottleneck", {"null_attn": False, "rope": False}),
        ("paper_decoupled", {"null_attn": True, "rope": False}),
    ],
)
def test_flag_combinations_match_naive_attention(mode_exp, overrides):
    cfg, gpt, attn = module_for(mode_exp, **overrides)
    x = torch.randn(1, 9, cfg.d_model, dtype=torch.float64)
    naive = naive_decoupled if cfg.attn_mode == "decoupled" else naive_mha
    torch.testing.assert_close(run_module(gpt, attn, x)[0], naive(attn, x[0], cfg.rope), atol=TOL, rtol=0)


@pytest.mark.parametrize("size", list(SIZES))
def test_every_size_preset_attention_shapes(size):
    """Each preset's real dims, one short sequence on the meta-free CPU path for the decoupled module."""
    cfg = resolve_model(size, "paper_decoupled_null", {"n_layer": 1})
    attn = DecoupledAttention(cfg).double()
    with torch.no_grad():
        attn.null_k.normal_()
        attn.null_v.normal_()
    rotary = Rotary(cfg.rope_dim, n_positions=8)
    x = torch.randn(1, 5, cfg.d_model, dtype=torch.float64)
    torch.testing.assert_close(attn(x, rotary(0, 5))[0], naive_decoupled(attn, x[0], True), atol=TOL, rtol=0)


def test_decoupled_concatenated_call_equals_sum_of_scaled_scores():
    """The q_cat/k_cat trick: one dot product on [q_sem/sqrt(s), q_geo/sqrt(g)] . [k_sem, k_geo]."""
    torch.manual_seed(1)
    s, g, T = 4, 8, 6
    q_sem, k_sem = torch.randn(T, s, dtype=torch.float64), torch.randn(T, s, dtype=torch.float64)
    q_geo, k_geo = torch.randn(T, g, dtype=torch.float64), torch.randn(T, g, dtype=torch.float64)
    separate = q_sem @ k_sem.T / math.sqrt(s) + q_geo @ k_geo.T / math.sqrt(g)
    q_cat = torch.cat([q_sem / math.sqrt(s), q_geo / math.sqrt(g)], dim=1)
    k_cat = torch.cat([k_sem, k_geo], dim=1)
    torch.testing.assert_close(q_cat @ k_cat.T, separate, atol=1e-12, rtol=0)


def test_tied_semantic_qk_is_one_tensor_trained_by_both_uses():
    cfg, gpt, attn = module_for("paper_decoupled")
    assert attn.q_sem.weight is attn.k_sem.weight
    assert attn.q_geo.weight is not attn.k_geo.weight  # the geometric path stays untied
    names = [n for n, _ in gpt.named_parameters()]
    assert sum("q_sem" in n or "k_sem" in n for n in names) == cfg.n_layer
    _, _, untied = module_for("paper_decoupled_notieqk")
    assert untied.q_sem.weight is not untied.k_sem.weight


def test_causal_and_the_first_query_splits_between_itself_and_null():
    cfg, gpt, attn = module_for("paper_decoupled_null")
    x = torch.randn(1, 10, cfg.d_model, dtype=torch.float64)
    y = run_module(gpt, attn, x)
    x2 = x.clone()
    x2[:, 6:] += 1.0
    torch.testing.assert_close(run_module(gpt, attn, x2)[:, :6], y[:, :6], atol=1e-12, rtol=0)
    # zero null key (its init) scores 0: query 0 mixes its own value with the null value by softmax weights
    with torch.no_grad():
        attn.null_k.zero_()
    H, s, g = attn.n_head, attn.sem_head, attn.geo_head
    v0 = (x[0, 0] @ attn.v.weight.T).view(H, -1)
    q_sem = (x[0, 0] @ attn.q_sem.weight.T).view(H, s)
    q_geo, k_geo = (x[0, 0] @ attn.q_geo.weight.T).view(H, g), (x[0, 0] @ attn.k_geo.weight.T).view(H, g)
    # tied semantic Q/K; the rotation at position 0 is the identity
    self_score = (q_sem * q_sem).sum(1) / math.sqrt(s) + (q_geo * k_geo).sum(1) / math.sqrt(g)
    w_self = torch.sigmoid(self_score)[:, None]  # softmax over [null score 0, self score]
    expected = (w_self * v0 + (1 - w_self) * attn.null_v).reshape(-1) @ attn.o.weight.T
    torch.testing.assert_close(run_module(gpt, attn, x)[0, 0], expected, atol=TOL, rtol=0)


def test_rope_preserves_norms_and_scores_depend_on_relative_position():
    rot = Rotary(16, n_positions=4)
    torch.manual_seed(2)
    q, k = torch.randn(1, 1, 1, 16), torch.randn(1, 1, 1, 16)

    def at(t, pos):
        return apply_rope(t, *rot(pos, 1))

    for pos in (0, 5, 1000, 131071):  # the table grows on demand
        torch.testing.assert_close(at(q, pos).norm(), q.norm(), atol=1e-5, rtol=0)
    score = (at(q, 7) * at(k, 3)).sum()
    for shift in (1, 100, 120000):
        torch.testing.assert_close((at(q, 7 + shift) * at(k, 3 + shift)).sum(), score, atol=1e-4, rtol=0)
    assert not torch.allclose((at(q, 8) * at(k, 3)).sum(), score)
    # rotate-half pairing against the complex reference, far from the origin
    x = torch.randn(5, 16, dtype=torch.float64)
    torch.testing.assert_close(apply_rope(x[None, None], *rot(130000, 5))[0, 0], rope_ref(x, 130000), atol=1e-6, rtol=0)


def test_norope_has_no_positional_signal():
    """Without RoPE (and no learned positions) a one-layer model's output at i depends only on the multiset
    of tokens <= i: permuting the prefix changes nothing."""
    cfg = resolve_model("nano", "paper_decoupled_norope", {"n_layer": 1, "d_model": 64, "block_size": 16})
    assert cfg.rope is False
    torch.manual_seed(0)
    gpt = GPT(cfg).double()
    assert gpt.rotary is None
    idx = torch.randint(0, cfg.vocab_size, (1, 8))
    perm = torch.cat([torch.randperm(7), torch.tensor([7])])
    last = gpt(idx)[0][0, -1]
    torch.testing.assert_close(gpt(idx[:, perm])[0][0, -1], last, atol=1e-9, rtol=0)
    with_rope = GPT(resolve_model("nano", "paper_decoupled", {"n_layer": 1, "d_model": 64})).double()
    assert not torch.allclose(with_rope(idx[:, perm])[0][0, -1], with_rope(idx)[0][0, -1])


def test_registry_covers_every_mode_and_rejects_unknown():

    assert set(ATTENTION) == set(ATTN_MODES)
    cfg = resolve_model("nano", "paper_baseline")
    object.__setattr__(cfg, "attn_mode", "sparse")
    with pytest.raises(ValueError, match="registered"):
        build_attention(cfg)


def test_grouped_decoupled_matches_naive_and_decodes_through_a_cache():
    """Decoupled attention with K/V heads shared by pairs of query heads (an upcycled GQA model's shape)."""
    cfg = dataclasses.replace(
        resolve_model("nano", "paper_decoupled", {"d_model": 64, "n_head": 4, "block_size": 16}),
        kv_heads=2,
        tie_qk=False,
        null_attn=True,
    )
    torch.manual_seed(0)
    gpt = GPT(cfg).double()
    attn = gpt.blocks[0].attn
    with torch.no_grad():
        attn.null_k.normal_(0, 1.0)
        attn.null_v.normal_(0, 1.0)
    assert attn.k_geo.out_features == 2 * cfg.geo_dim // 4 and cache_widths(cfg)["v"] == 2 * cfg.head_dim
    x = torch.randn(1, 9, cfg.d_model, dtype=torch.float64)
    torch.testing.assert_close(run_module(gpt, attn, x)[0], naive_decoupled(attn, x[0], True), atol=TOL, rtol=0)
    ids = torch.randint(0, cfg.vocab_size, (2, 12))
    gpt = gpt.float().eval()
    with torch.no_grad():
        full, _ = gpt(ids)
        cache = gpt.new_cache(parse_policy("fp32", list(cache_widths(cfg)), cfg.n_layer), 2, 16)
        steps = [gpt(ids[:, :5], cache=cache)[0]] + [gpt(ids[:, t : t + 1], cache=cache)[0] for t in range(5, 12)]
    torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=1e-5, rtol=1e-5)
