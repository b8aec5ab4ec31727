import math

import pytest
import torch

from production.cache.attend import attend_cache
from production.cache.kvcache import KVCache, LayerCache, estimate_bytes
from production.cache.policy import parse_layer_policy, parse_policy
from production.cache.quant import dequantize_blocks, quantize_blocks
from production.config.build import resolve_model
from production.config.presets import EXPERIMENTS
from production.config.sampling import SamplingConfig
from production.core.errors import UserError
from production.model.attention import cache_widths
from production.model.gpt import GPT
from production.sample.generate import generate

DEC = ["k_sem", "k_geo", "v"]
PAPER = "ksem=q4_0@32,kgeo=q8_0@32,v=q4_0@32,resid=128"


def test_policy_parsing_is_strict_and_round_trips():
    p = parse_policy(PAPER, DEC, 3)
    assert len(p.layers) == 3 and p.layers[0] == p.layers[2]
    p0 = p.layers[0]
    assert (p0.streams["k_sem"].kind, p0.streams["k_geo"].kind, p0.streams["v"].qb, p0.resid) == (
        "q4_0",
        "q8_0",
        32,
        128,
    )
    assert str(p) == PAPER and str(parse_policy(str(p), DEC, 3)) == PAPER
    assert {s.kind for s in parse_policy("fp16", ["k", "v"], 2).layers[1].streams.values()} == {"fp16"}
    assert str(parse_policy("k=nf4@64,v=bf16", ["k", "v"], 1)) == "k=nf4@64,v=bf16,resid=0"
    bad = {
        "ksem=q4_0@32,kgeo=q8_0@32,v=q4_0@32,resid=128,x=1": "unknown KV policy key 'x'",
        "k=q8_0,v=q8_0": "unknown KV policy key 'k'",
        "ksem=q3_k,kgeo=q8_0,v=q4_0": "unknown KV cache kind 'q3_k'",
        "ksem=q4_0,kgeo=q8_0": "gives no kind for v",
        "ksem=q4_0,ksem=q8_0,kgeo=q8_0,v=q4_0": "sets ksem twice",
        "ksem=q4_0,kgeo=q8_0,v=q4_0,resid=-1": "non-negative integer",
        "ksem=q4_0@33,kgeo=q8_0,v=q4_0": "multiple of 2",
        "ksem=fp16@32,kgeo=q8_0,v=q4_0": "takes no block size",
        "ksem q4_0": "expected key=value",
        "": "expected key=value",
    }
    for text, match in bad.items():
        with pytest.raises(UserError, match=match):
            parse_policy(text, DEC, 2)


@pytest.mark.parametrize("width", [48, 96, 144, 40, 7, 64])
@pytest.mark.parametrize("spec", ["q8_0@32", "q4_0@32", "nf4@32", "q4_0@64", "q8_0@16", "fp16", "fp32"])
@pytest.mark.parametrize("resid", [0, 5, 128])
def test_nbytes_equals_closed_form(width, spec, resid):
    policy = parse_policy(f"k={spec},v={spec},resid={resid}", ["k", "v"], 2)
    widths = {"k": width, "v": width + 16}
    for max_seq in (1, 100, 1000):
        cache = KVCache(policy, widths, heads=1, batch=3, max_seq=max_seq)
        assert cache.nbytes() == estimate_bytes(policy, widths, 1, 3, max_seq)


def test_no_padding_bytes_are_values_times_bytes_per_value():
    """small's decoupled streams at the paper policy: 48*0.5625 + 96*1.0625 + 144*0.5625 = 210 B/token/layer."""
    policy = parse_policy("ksem=q4_0@32,kgeo=q8_0@32,v=q4_0@32,resid=0", DEC, 1)
    widths = {"k_sem": 48, "k_geo": 96, "v": 144}
    n = 4096  # a multiple of every group size (2, 1, 2 tokens)
    window = 2 * (48 + 144) * 1  # groups of 2 tokens: one token may wait in the window (fp16)
    assert estimate_bytes(policy, widths, 1, 1, n) == 210 * n + window
    fp16 = parse_policy("fp16", DEC, 12)
    assert (
        estimate_bytes(fp16, widths, 12, 1, 131072) * 1536
        == estimate_bytes(parse_policy("fp16", ["k", "v"], 12), {"k": 768, "v": 768}, 12, 1, 131072) * 288
    )


@pytest.mark.parametrize("width,qb,resid", [(48, 32, 0), (48, 32, 3), (144, 32, 7), (7, 32, 2), (96, 64, 0)])
@pytest.mark.parametrize("kind", ["q8_0", "q4_0"])
def test_stream_reads_llama_blocks_of_the_flat_sequence_and_an_exact_window(width, qb, resid, kind):
    torch.manual_seed(0)
    n, B = 37, 2
    x = torch.randn(B, n, width) * 3
    layer = LayerCache(
        parse_layer_policy(f"k={kind}@{qb},v=fp16,resid={resid}", ["k", "v"]),
        {"k": width, "v": width},
        1,
        B,
        64,
        None,
        chunk_tokens=8,
    )
    for t0, t1 in [(0, 5), (5, 6), (6, 20), (20, 37)]:  # a prefill, then tokens in uneven steps
        layer.append({"k": x[:, t0:t1], "v": x[:, t0:t1]})
    s = layer.streams["k"]
    assert s.length == n and s.length - s.n_q >= min(resid, n) and s.n_q % s.group == 0
    x16 = x.half().float()
    got = s.read(0, n, torch.float32)
    torch.testing.assert_close(got[:, s.n_q :], x16[:, s.n_q :], atol=0, rtol=0)  # the window is exact
    if qb == 32:  # the quantized prefix: llama.cpp blocks over the flat token-major values
        flat = x16[:, : s.n_q].reshape(B, -1)
        expect = dequantize_blocks(quantize_blocks(flat, kind), kind).view(B, s.n_q, width)
        torch.testing.assert_close(got[:, : s.n_q], expect, atol=0, rtol=0)
    for t0, t1 in [(0, n), (1, 2), (3, 30), (s.n_q - 1, n), (n - 1, n)]:  # any range, across the boundary
        if 0 <= t0 < t1:
            torch.testing.assert_close(s.read(t0, t1, torch.float32), got[:, t0:t1], atol=0, rtol=0)


def naive_cached(q, k, v, null_k=None, null_v=None):
    """q (B, H, Tq, d) scaled, k/v (B, n, Hkv, d): causal for the last Tq positions, repeat-interleaved heads."""
    B, H, Tq, _ = q.shape
    n, Hkv = k.shape[1], k.shape[2]
    k = k.permute(0, 2, 1, 3).repeat_interleave(H // Hkv, dim=1)
    v = v.permute(0, 2, 1, 3).repeat_interleave(H // Hkv, dim=1)
    s = q @ k.transpose(-1, -2)
    mask = torch.arange(n)[None, :] > torch.arange(n - Tq, n)[:, None]
    s = s.masked_fill(mask, float("-inf"))
    if null_k is not None:
        nk = null_k.repeat_interleave(H // Hkv, dim=0)
        s = torch.cat([(q * nk[None, :, None, :]).sum(-1, keepdim=True), s], dim=-1)
        v = torch.cat([null_v.repeat_interleave(H // Hkv, 0)[None, :, None, :].expand(B, -1, 1, -1), v], dim=2)
    return torch.softmax(s, dim=-1) @ v


@pytest.mark.parametrize("Hkv", [4, 2, 1])
@pytest.mark.parametrize("Tq", [1, 5])
@pytest.mark.parametrize("null", [False, True])
@pytest.mark.parametrize("impl", ["bmm", "blockdiag"])
def test_chunked_online_softmax_equals_full_softmax(Hkv, Tq, null, impl):
    torch.manual_seed(0)
    B, H, d, n = 2, 4, 8, 45
    layer = LayerCache(
        parse_layer_policy("k=q8_0@32,v=q4_0@32,resid=6", ["k", "v"]),
        {"k": Hkv * d, "v": Hkv * d},
        Hkv,
        B,
        64,
        None,
        chunk_tokens=7,
        impl=impl,
    )
    layer.append({"k": torch.randn(B, n, Hkv * d), "v": torch.randn(B, n, Hkv * d)})
    q = torch.randn(B, H, Tq, d)
    null_k, null_v = (torch.randn(Hkv, d), torch.randn(Hkv, d)) if null else (None, None)
    got = attend_cache(layer, {"k": q}, "v", None if null_k is None else {"k": null_k}, null_v)
    k = layer.streams["k"].read(0, n, torch.float32).view(B, n, Hkv, d)
    v = layer.streams["v"].read(0, n, torch.float32).view(B, n, Hkv, d)
    torch.testing.assert_close(got, naive_cached(q, k, v, null_k, null_v), atol=1e-5, rtol=1e-5)


def peaked_model(exp: str, **overrides) -> GPT:
    """A nano model with weights scaled up so its logits are far from ties (random init is nearly flat)."""
    cfg = resolve_model("nano", exp, {"n_layer": 2, "block_size": 64, **overrides})
    torch.manual_seed(0)
    model = GPT(cfg)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.mul_(5)
    return model.eval()


@pytest.mark.parametrize("exp", list(EXPERIMENTS))
def test_greedy_with_fp16_cache_equals_full_recompute(exp):
    model = peaked_model(exp)
    prompt = torch.randint(0, 50257, (2, 9), generator=torch.Generator().manual_seed(1))
    cfg = SamplingConfig(max_new_tokens=24, greedy=True)
    streams = list(cache_widths(model.cfg))
    recompute = generate(model, prompt, cfg, None, max_seq=64)
    cached = generate(model, prompt, cfg, parse_policy("fp16", streams, model.cfg.n_layer), max_seq=64)
    assert torch.equal(cached["ids"], recompute["ids"])


@torch.no_grad()
def teacher_forced_logits(model, tokens, policy, prefill):
    """Logits for tokens[prefill:] fed one at a time after a prefill of tokens[:prefill]."""
    cache = model.new_cache(policy, tokens.shape[0], tokens.shape[1], chunk_tokens=16)
    model(tokens[:, :prefill], cache=cache)
    return torch.cat([model(tokens[:, t : t + 1], cache=cache)[0] for t in range(prefill, tokens.shape[1])], dim=1)


@pytest.mark.parametrize(
    "exp,policy,bound",
    [
        ("paper_decoupled", "ksem=q8_0@32,kgeo=q8_0@32,v=q8_0@32,resid=0", 0.01),
        ("paper_decoupled", PAPER.replace("128", "8"), 0.1),
        ("paper_decoupled_null", "ksem=nf4@32,kgeo=q8_0@32,v=nf4@32,resid=8", 0.1),
        ("paper_baseline", "k=q8_0@32,v=q8_0@32,resid=0", 0.01),
        ("paper_gqa", "k=q4_0@32,v=q4_0@32,resid=4", 0.1),
    ],
)
def test_quantized_cache_logit_error_is_measured_and_bounded(exp, policy, bound):
    model = resolve_model("nano", exp, {"n_layer": 2, "block_size": 64})
    torch.manual_seed(0)
    model = GPT(model).eval()
    tokens = torch.randint(0, 50257, (1, 48), generator=torch.Generator().manual_seed(2))
    streams = list(cache_widths(model.cfg))
    ref = teacher_forced_logits(model, tokens, parse_policy("fp16", streams, model.cfg.n_layer), 16)
    full = model(tokens)[0][:, 16:]
    assert (ref - full).abs().max() < 1e-3  # the fp16 cache itself is close to exact
    got = teacher_forced_logits(model, tokens, parse_policy(policy, streams, model.cfg.n_layer), 16)
    err = (got - ref).abs().max().item()
    assert 0 < err < bound, err  # quantization is visible, and small


def test_cache_overflow_is_an_error():
    model = peaked_model("paper_decoupled")
    cache = model.new_cache(parse_policy("fp16", DEC, model.cfg.n_layer), 1, 8)
    model(torch.zeros(1, 6, dtype=torch.long), cache=cache)
    with pytest.raises(ValueError, match="KV cache full"):
        model(torch.zeros(1, 3, dtype=torch.long), cache=cache)


def test_prefill_then_chunked_continuation_equals_full_forward():
    """Feeding the sequence in pieces through an fp32 cache reproduces the uncached forward."""
    model = peaked_model("paper_decoupled_null")
    tokens = torch.randint(0, 50257, (2, 30), generator=torch.Generator().manual_seed(3))
    cache = model.new_cache(parse_policy("fp32", DEC, model.cfg.n_layer), 2, 30, chunk_tokens=4)
    pieces = [model(tokens[:, a:b], cache=cache)[0] for a, b in [(0, 11), (11, 12), (12, 25), (25, 30)]]
    torch.testing.assert_close(torch.cat(pieces, dim=1), model(tokens)[0], atol=1e-4, rtol=1e-4)
    assert math.isclose(cache.nbytes(), 2 * 30 * 2 * (16 + 32 + 48) * 4)
