"""The fused Triton decode kernel equals the torch cached-attention path (fp32 tolerance) for every stored
format, run on CPU tensors through Triton's interpreter (conftest sets TRITON_INTERPRET=1 without a GPU)."""

import json

import pytest
import torch

from conftest import assert_user_error, call
from production.bench.decode import main as bench_decode
from production.cache import triton_decode
from production.cache.attend import attend_cache
from production.cache.kvcache import LayerCache
from production.cache.policy import parse_layer_policy, parse_policy
from production.config.resolve import resolve
from production.model.attention import cache_widths
from production.model.gpt import GPT

pytestmark = pytest.mark.skipif(
    not triton_decode.available("cuda" if torch.cuda.is_available() else "cpu"), reason="triton not usable here"
)
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
ATOL = 1e-4 if DEVICE == "cpu" else 2e-2  # tf32 dots on the GPU


def build(policy: str, widths: dict[str, int], heads: int, batch: int, lengths: list[int], seed: int = 0):
    """A layer cache filled by appends of the given lengths (a prefill, then decode steps)."""
    torch.manual_seed(seed)
    layer = parse_layer_policy(policy, list(widths))
    cache = LayerCache(layer, widths, heads, batch, sum(lengths) + 8, DEVICE)
    for T in lengths:
        cache.append({s: torch.randn(batch, T, w, device=DEVICE) * 2 for s, w in widths.items()})
    return cache


def queries(widths: dict[str, int], heads: int, n_head: int, batch: int) -> dict[str, torch.Tensor]:
    return {s: torch.randn(batch, n_head, 1, w // heads, device=DEVICE) * 0.5 for s, w in widths.items() if s != "v"}


def compare(cache: LayerCache, q: dict, null_k=None, null_v=None):
    cache.impl = "bmm"
    want = attend_cache(cache, q, "v", null_k, null_v)
    cache.impl = "triton"
    got = attend_cache(cache, q, "v", null_k, null_v)
    torch.testing.assert_close(got, want, atol=ATOL, rtol=ATOL)


DECOUPLED = {"k_sem": 16, "k_geo": 32, "v": 48}  # nano: 4 heads of 4 + 8 dims
KINDS = ["fp16", "bf16", "fp32", "q8_0@32", "q4_0@32", "q4_1@32", "nf4@64", "q3_1@64", "q2_1@64", "q2_1@128"]


@pytest.mark.parametrize("kind", KINDS)
def test_every_kind_decoupled(kind):
    """Each format in every stream; 150 tokens with a 16-token window: quantized part, window, and blocks of 64
    values spanning tokens of 16 (ksem) / 48 (v) values."""
    cache = build(f"ksem={kind},kgeo={kind},v={kind},resid=16", DECOUPLED, 4, 1, [149, 1])
    compare(cache, queries(DECOUPLED, 4, 4, 1))


MIXED = ["ksem=q2_1@64+ch,kgeo=q4_1@32+ch,v=q3_1@64", "ksem=q4_0@32+ch,kgeo=q8_0@32,v=nf4@64+ch"]


@pytest.mark.parametrize("policy", MIXED)
def test_channel_major_and_mixed(policy):
    """Per-channel (+ch) streams beside token-major ones, with a partial group in the window."""
    cache = build(policy + ",resid=5", DECOUPLED, 4, 2, [200, 1, 1])
    compare(cache, queries(DECOUPLED, 4, 4, 2))


def test_rotated_streams_and_null():
    """Rotations (applied outside the kernel) and the null column (merged outside it) on top of the kernel."""
    cache = build("ksem=q4_0@32+rot,kgeo=q8_0@32,v=q2_1@64+rot,resid=0", DECOUPLED, 4, 1, [97])
    null_k = {"k_sem": torch.randn(4, 4, device=DEVICE), "k_geo": torch.randn(4, 8, device=DEVICE)}
    compare(cache, queries(DECOUPLED, 4, 4, 1), null_k, torch.randn(4, 12, device=DEVICE))


@pytest.mark.parametrize("resid", [0, 300])
def test_empty_and_full_window(resid):
    """resid 0: everything quantized but the partial group; resid 300 > length: nothing quantized."""
    cache = build(f"ksem=q4_0@32,kgeo=q4_0@32,v=q4_0@32,resid={resid}", DECOUPLED, 4, 1, [257])
    compare(cache, queries(DECOUPLED, 4, 4, 1))


@pytest.mark.parametrize("widths,heads,n_head", [({"k": 36, "v": 36}, 3, 12), ({"k": 20, "v": 20}, 1, 5)])
def test_gqa_groups_and_odd_widths(widths, heads, n_head):
    """One key stream; K/V heads shared by groups of query heads (3 of 12 dims for 12 heads; 1 of 20 for 5)."""
    cache = build("k=q4_1@32,v=q8_0@32,resid=3", widths, heads, 2, [130, 1])
    compare(cache, queries(widths, heads, n_head, 2))


def test_splits_merge_with_empty_ones():
    """Lengths not a multiple of the split, and more splits than tokens need: the empty ones weigh nothing."""
    cache = build("ksem=q8_0@32,kgeo=fp16,v=q4_0@32,resid=7", DECOUPLED, 4, 1, [171])
    q = queries(DECOUPLED, 4, 4, 1)
    cache.impl = "bmm"
    want = attend_cache(cache, q, "v")
    qs = {s: x.float().reshape(1, 4, 1, x.shape[-1]) for s, x in q.items()}
    for split, n_splits in [(32, None), (64, 5), (160, 4), (1024, 3)]:
        m, l, acc = triton_decode.decode_partials(cache, qs, "v", split_tokens=split, n_splits=n_splits)
        assert torch.isfinite(m).all() and torch.isfinite(acc).all()
        torch.testing.assert_close((acc / l).reshape(want.shape), want, atol=ATOL, rtol=ATOL)


def test_several_query_tokens_use_the_torch_path():
    """A chunk of several new tokens (a prompt after a prefill) is causal within itself: the torch path serves it."""
    cache = build("ksem=q4_0@32,kgeo=q8_0@32,v=q4_0@32,resid=16", DECOUPLED, 4, 1, [100, 4])
    q = {s: torch.randn(1, 4, 4, w // 4, device=DEVICE) for s, w in DECOUPLED.items() if s != "v"}
    compare(cache, q)


def test_unavailable_device_is_a_clear_error(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    assert not triton_decode.available("cpu")
    assert "CUDA" in triton_decode.why_unavailable("cpu")


@pytest.mark.parametrize("exp", ["paper_decoupled_null", "paper_gqa", "paper_bottleneck"])
def test_model_decode_steps_match(exp):
    """Whole-model decode: a prompt, then steps through the kernel, give the torch path's logits."""
    torch.manual_seed(0)
    model = GPT(resolve("nano", exp, {"n_layer": 2}).model).to(DEVICE).eval()
    streams = list(cache_widths(model.cfg))
    text = "ksem=q4_0@32+rot,kgeo=q8_0@32,v=q3_1@64,resid=8" if "decoupled" in exp else "k=q4_1@32+ch,v=nf4@64,resid=8"
    policy = parse_policy(text, streams, 2)
    prompt = torch.randint(0, 50257, (2, 70), device=DEVICE)
    logits = {}
    for impl in ("auto", "triton"):
        cache = model.new_cache(policy, 2, 80, impl=impl)
        with torch.no_grad():
            model(prompt, cache=cache, last_only=True)
            logits[impl] = torch.cat([model(prompt[:, i : i + 1], cache=cache, last_only=True)[0] for i in range(3)])
    torch.testing.assert_close(logits["triton"], logits["auto"], atol=ATOL * 10, rtol=ATOL)


def test_bench_decode_runs_the_kernel(monkeypatch):
    args = "--size nano --n-layer 1 --context 40 --steps 1 --rounds 1 --warmup 0 --device cpu --json --impl triton"
    proc = call(bench_decode, *args.split())
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["config"]["impl"] == "triton"
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    assert_user_error(call(bench_decode, *args.split()), "impl=triton runs on CUDA")
