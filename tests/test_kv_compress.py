"""KV compression past the paper: rotated and per-channel streams, 2/3-bit kinds in the cache, per-layer policies.

References are written here independently of the cache code: rotations as explicit per-head matrix products,
stream contents quantized from the raw values with `encode`/`decode` in the documented block layout, attention
as a plain softmax over repeated heads."""

import math
import re

import pytest
import torch

from production.cache.attend import attend_cache
from production.cache.kvcache import KVCache, LayerCache, estimate_bytes
from production.cache.policy import parse_layer_policy, parse_policy, parse_spec
from production.cache.quant import decode, encode
from production.cache.rotation import hadamard, hadamard_blocks, stream_rotation
from production.config.build import resolve_model
from production.config.presets import EXPERIMENTS, SIZES
from production.core.errors import UserError
from production.model.attention import cache_widths
from production.model.gpt import GPT

DEC = ["k_sem", "k_geo", "v"]


def preset_head_widths() -> set[int]:
    """Every per-head stream width of every size and exp preset."""
    widths = set()
    for size in SIZES:
        for exp in EXPERIMENTS:
            cfg = resolve_model(size, exp, {})
            widths |= {w // cfg.kv_heads for w in cache_widths(cfg).values()}
    return widths


def test_hadamard_constructions():
    for n in (1, 2, 4, 8, 12, 16, 24, 48, 96, 144):
        H = hadamard(n)
        assert set(H.unique().tolist()) <= {-1.0, 1.0}
        torch.testing.assert_close(H @ H.T, n * torch.eye(n, dtype=torch.float64), atol=0, rtol=0)
    assert hadamard_blocks(12) == [12] and hadamard_blocks(18) == [16, 2] and hadamard_blocks(6) == [4, 2]
    with pytest.raises(ValueError):
        hadamard(6)


@pytest.mark.parametrize("d", sorted(preset_head_widths() | {5, 7}))
def test_every_preset_head_width_gets_an_orthogonal_rotation(d):
    R = stream_rotation(3, d, seed=0, layer=1, stream="v")
    assert R.shape == (3, d, d)
    torch.testing.assert_close(R @ R.transpose(1, 2), torch.eye(d).expand(3, d, d), atol=1e-6, rtol=0)
    if len(hadamard_blocks(d)) == 1:  # a full Hadamard: every output mixes every input with weight 1/sqrt(d)
        torch.testing.assert_close(R.abs(), torch.full_like(R, d**-0.5))
    assert torch.equal(R, stream_rotation(3, d, 0, 1, "v"))  # the seed fixes it
    assert not torch.equal(R, stream_rotation(3, d, 1, 1, "v")) or d == 1


def test_rotation_leaves_scores_and_outputs_unchanged_in_fp32():
    """Keys and queries rotate together (q R . k R = q . k); values rotate, and the output rotates back."""
    torch.manual_seed(0)
    H, T, d = 4, 9, 12
    q, k, v = torch.randn(3, H, T, d).unbind(0)
    Rk, Rv = stream_rotation(H, d, 0, 0, "k"), stream_rotation(H, d, 0, 0, "v")  # fp32, as the cache keeps them
    qr, kr, vr = (torch.einsum("htd,hde->hte", t, R) for t, R in ((q, Rk), (k, Rk), (v, Rv)))
    torch.testing.assert_close(qr @ kr.transpose(1, 2), q @ k.transpose(1, 2), atol=1e-5, rtol=0)
    p = torch.softmax(q @ k.transpose(1, 2), dim=-1)
    back = torch.einsum("hte,hde->htd", p @ vr, Rv)  # y R^T
    torch.testing.assert_close(back, p @ v, atol=1e-6, rtol=0)


def expected_stream(x: torch.Tensor, text: str, resid: int, R: torch.Tensor | None) -> torch.Tensor:
    """What a stream of spec `text` holds for the raw values x (B, n, W), dequantized: rotated per head, rounded
    to fp16, the tokens before the window quantized in the spec's layout, the window exact."""
    spec = parse_spec(text)
    B, n, W = x.shape
    if R is not None:
        heads, d, _ = R.shape
        x = torch.einsum("bthd,hde->bthe", x.view(B, n, heads, d), R).reshape(B, n, W)
    x = x.half().float()
    G = spec.qb if spec.channel else math.lcm(W, spec.qb) // W
    n_q = max(0, n - resid) // G * G
    q = x[:, :n_q]
    if spec.channel:  # each channel of each group of G tokens is one block
        blocks = q.view(B, n_q // G, G, W).transpose(2, 3)
        q = decode(*encode(blocks, spec.kind), spec.kind).transpose(2, 3).reshape(B, n_q, W)
    else:  # runs of qb values of the flat token-major stream
        q = decode(*encode(q.reshape(B, -1, spec.qb), spec.kind), spec.kind).reshape(B, n_q, W)
    return torch.cat([q, x[:, n_q:]], dim=1)


def naive_attention(q, k, v, null_k=None, null_v=None):
    """q (B, H, Tq, d) scaled; k/v (B, n, Hkv, d): causal for the last Tq positions, heads repeated."""
    B, H, Tq, _ = q.shape
    n, Hkv = k.shape[1], k.shape[2]
    k = k.permute(0, 2, 1, 3).repeat_interleave(H // Hkv, dim=1)
    v = v.permute(0, 2, 1, 3).repeat_interleave(H // Hkv, dim=1)
    s = (q @ k.transpose(-1, -2)).masked_fill(torch.arange(n)[None, :] > torch.arange(n - Tq, n)[:, None], -math.inf)
    if null_k is not None:
        s = torch.cat([(q * null_k.repeat_interleave(H // Hkv, 0)[None, :, None]).sum(-1, keepdim=True), s], -1)
        v = torch.cat([null_v.repeat_interleave(H // Hkv, 0)[None, :, None].expand(B, -1, 1, -1), v], dim=2)
    return torch.softmax(s, dim=-1) @ v


SPECS = ["q4_1@32", "q3_1@64", "q2_1@32", "q2_1@128+rot", "q4_0@32+rot3", "q3_1@16+ch", "q2_1@8+rot+ch", "nf4@64+rot"]


@pytest.mark.parametrize("spec", SPECS)
@pytest.mark.parametrize("Hkv,d", [(2, 12), (1, 24), (4, 6)])
@pytest.mark.parametrize("resid", [0, 5])
def test_cached_attention_equals_dequantize_then_attend(spec, Hkv, d, resid):
    """Queries (GQA groups of 2, Tq 1 and 3, with and without a null column) over keys and values in `spec`,
    appended in uneven pieces (blocks span tokens, groups fill across appends), equal naive attention over the
    reference dequantized stream rotated back."""
    torch.manual_seed(0)
    B, H, n, W = 2, 2 * Hkv, 53, Hkv * d
    policy = parse_layer_policy(f"k={spec},v={spec},resid={resid}", ["k", "v"])
    layer = LayerCache(policy, {"k": W, "v": W}, Hkv, B, 64, None, chunk_tokens=16, impl="auto", layer=2)
    kx, vx = torch.randn(B, n, W) * 2, torch.randn(B, n, W)
    kx[..., 1] += 6  # an outlier channel
    for t0, t1 in [(0, 20), (20, 21), (21, 40), (40, 50)]:
        layer.append({"k": kx[:, t0:t1], "v": vx[:, t0:t1]})
    rot = "+rot" in spec
    Rk, Rv = (layer.rotations.get(s) for s in ("k", "v"))
    assert (Rk is not None) == rot and (Rv is not None) == rot
    for Tq in (1, 3):
        if Tq == 3:
            layer.append({"k": kx[:, 50:53], "v": vx[:, 50:53]})
        m = layer.length
        k = expected_stream(kx[:, :m], spec, resid, Rk)
        v = expected_stream(vx[:, :m], spec, resid, Rv)
        if rot:  # the reference attends in the original basis: rotate the stored values back
            k = torch.einsum("bthe,hde->bthd", k.view(B, m, Hkv, d), Rk).reshape(B, m, W)
            v = torch.einsum("bthe,hde->bthd", v.view(B, m, Hkv, d), Rv).reshape(B, m, W)
        for null in (False, True):
            q = torch.randn(B, H, Tq, d)
            null_k, null_v = (torch.randn(Hkv, d), torch.randn(Hkv, d)) if null else (None, None)
            got = attend_cache(layer, {"k": q}, "v", None if null_k is None else {"k": null_k}, null_v)
            ref = naive_attention(q, k.view(B, m, Hkv, d), v.view(B, m, Hkv, d), null_k, null_v)
            torch.testing.assert_close(got, ref, atol=2e-5, rtol=2e-5)


def test_channel_blocks_hold_one_channel_over_a_group_of_tokens():
    torch.manual_seed(0)
    B, W, G = 2, 5, 8
    layer = LayerCache(parse_layer_policy(f"k=q4_1@{G}+ch,v=fp16", ["k", "v"]), {"k": W, "v": W}, 1, B, 40)
    x = torch.randn(B, 21, W)
    layer.append({"k": x, "v": x})
    s = layer.streams["k"]
    assert (s.group, s.n_q, s.length) == (G, 16, 21)  # two whole groups quantized, 5 tokens wait in the window
    for g in range(2):
        for c in range(W):
            scale, codes = encode(x[:, g * G : (g + 1) * G, c].half().float()[:, None, :], "q4_1")
            assert torch.equal(s.scale[:, g * W + c], scale[:, 0]) and torch.equal(s.codes[:, g * W + c], codes[:, 0])


@pytest.mark.parametrize("width,heads", [(48, 4), (144, 12), (7, 1), (40, 5), (96, 8), (12, 2)])
@pytest.mark.parametrize(
    "spec", ["q4_1@32", "q3_1@64", "q3_1@8", "q2_1@128", "q2_1@4", "q4_0@64+rot", "q3_1@32+ch", "q2_1@64+rot9+ch"]
)
@pytest.mark.parametrize("resid", [0, 7, 128])
def test_nbytes_equals_closed_form_for_the_new_kinds(width, heads, spec, resid):
    policy = parse_policy(f"k={spec},v={spec},resid={resid}", ["k", "v"], 2)
    widths = {"k": width, "v": width + heads}
    for max_seq in (1, 100, 1000):
        cache = KVCache(policy, widths, heads, batch=3, max_seq=max_seq)
        assert cache.nbytes() == estimate_bytes(policy, widths, heads, 3, max_seq)


def test_bytes_per_value_of_the_new_kinds():
    """No padding: values x (bits + scale bits / qb) / 8, plus the window; rotations add heads * d^2 fp32."""
    widths, n = {"k_sem": 48, "k_geo": 96, "v": 144}, 4096

    def per_token(text: str) -> float:
        policy = parse_policy(text, DEC, 1)
        return (estimate_bytes(policy, widths, 12, 1, 2 * n) - estimate_bytes(policy, widths, 12, 1, n)) / n

    assert per_token("ksem=q2_1@128,kgeo=q2_1@128,v=q2_1@128,resid=0") == 288 * (2 + 32 / 128) / 8
    assert per_token("ksem=q3_1@64,kgeo=q3_1@64,v=q3_1@64,resid=0") == 288 * (3 + 32 / 64) / 8
    assert per_token("ksem=q4_1@32+ch,kgeo=q2_1@64+ch,v=q3_1@32,resid=0") == (48 * 5 + 96 * 2.5 + 144 * 4) / 8
    plain = parse_policy("ksem=q2_1@64,kgeo=q2_1@64,v=q2_1@64,resid=0", DEC, 1)
    rotated = parse_policy("ksem=q2_1@64+rot,kgeo=q2_1@64,v=q2_1@64+rot,resid=0", DEC, 1)
    extra = estimate_bytes(rotated, widths, 12, 1, n) - estimate_bytes(plain, widths, 12, 1, n)
    assert extra == 12 * (4 * 4 + 12 * 12) * 4


def test_per_layer_policies_parse_strictly_and_round_trip():
    text = (
        "L0:fp16|L1-2:ksem=q2_1@64+rot,kgeo=q4_1@32+ch,v=q3_1@64,resid=128"
        "|L3:ksem=q4_0@32,kgeo=q8_0@32,v=nf4@64,resid=0"
    )
    p = parse_policy(text, DEC, 4)
    assert str(p) == text and str(parse_policy(str(p), DEC, 4)) == text
    assert p.layers[1] == p.layers[2] and p.layers[0].resid == 0 and p.layers[1].resid == 128
    assert str(p.layers[1].streams["k_sem"]) == "q2_1@64+rot" and p.layers[1].streams["k_geo"].channel
    assert str(parse_policy("L0-1:fp16|L2-3:fp16", DEC, 4)) == "fp16"  # equal ranges merge
    assert str(parse_spec("q2_1@64+ch+rot0")) == "q2_1@64+rot+ch"  # modifiers in canonical order
    model = GPT(resolve_model("nano", "paper_decoupled", {"n_layer": 4})).eval()
    cache = model.new_cache(p, 1, 300)
    assert type(cache.layers[0].streams["v"]).__name__ == "PlainStream"
    assert type(cache.layers[2].streams["k_geo"]).__name__ == "ChannelQuantStream"
    assert set(cache.layers[1].rotations) == {"k_sem"} and not cache.layers[3].rotations
    assert cache.nbytes() == estimate_bytes(p, cache_widths(model.cfg), 4, 1, 300)


@pytest.mark.parametrize(
    "text,match",
    [
        ("ksem=q2_k,kgeo=q8_0,v=q4_0", "unknown KV cache kind 'q2_k'"),
        ("ksem=q4_0,kgeo=q8_0", "gives no kind for v"),
        ("ksem=q3_1@36,kgeo=q8_0,v=q4_0", "multiple of 8"),
        ("ksem=q2_1@6,kgeo=q8_0,v=q4_0", "multiple of 4"),
        ("ksem=q4_0+rott,kgeo=q8_0,v=q4_0", "bad modifier +rott"),
        ("ksem=q4_0+rot+rot1,kgeo=q8_0,v=q4_0", "bad modifier +rot1"),
        ("ksem=fp16+rot,kgeo=q8_0,v=q4_0", "takes no block size or modifier"),
        ("L0-1 fp16|L2-3:fp16", "bad layer range 'L0-1 fp16'"),
        ("Lx:fp16", "bad layer range"),
        ("L0-1:fp16|L1-3:fp16", "sets layer 1 twice (L0-1 and L1-3)"),
        ("L0-1:fp16|L3:fp16", "no policy for layer(s) 2"),
        ("L0-4:fp16", "goes past the model's layers L0-3"),
        ("L2-1:fp16|L0:fp16|L3:fp16", "runs backwards"),
        ("L0-3:ksem=q4_0,kgeo=q8_0,v=q4_0,x=1", "unknown KV policy key 'x'"),
        ("L0-3:", "bad layer range"),
    ],
)
def test_bad_policies_are_one_clear_error(text, match):
    with pytest.raises(UserError, match=re.escape(match)):
        parse_policy(text, DEC, 4)
