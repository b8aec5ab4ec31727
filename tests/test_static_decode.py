"""Static decode steps (what CUDA graphs capture): every offset in device counters, the fused kernel over the
bucket's splits. Run eagerly (on CPU through Triton's interpreter) they must equal ordinary decode steps: the
same logits at every step and the same cache bytes, through window writes and group flushes of every kind."""

import pytest
import torch

from production.cache import triton_decode
from production.cache.policy import PAPER_POLICY, parse_policy
from production.cache.static import StaticStep
from production.config.resolve import resolve
from production.config.sampling import SamplingConfig
from production.model.attention import cache_widths
from production.model.gpt import GPT
from production.sample.generate import generate
from production.sample.graphs import GraphedDecoder

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
pytestmark = pytest.mark.skipif(not triton_decode.available(DEVICE), reason="triton not usable here")

CASES = [  # exp, policy, decode steps after a 21-token prompt (past a +ch group of 32, many flushes)
    (
        "paper_decoupled_null",
        "L0:ksem=q4_0@32+rot,kgeo=fp16,v=q3_1@64,resid=5|L1:ksem=q2_1@32+ch,kgeo=q8_0@32,v=nf4@64,resid=0",
        12,
    ),
    ("paper_gqa", "k=q4_1@32+ch,v=q8_0@32,resid=3", 12),
    ("paper_baseline", "fp16", 6),
]


@pytest.mark.parametrize("exp,policy_text,n_steps", CASES)
def test_static_steps_equal_ordinary_steps(exp, policy_text, n_steps):
    torch.manual_seed(0)
    model = GPT(resolve("nano", exp, {"n_layer": 2}).model).to(DEVICE).eval()
    policy = parse_policy(policy_text, list(cache_widths(model.cfg)), 2)
    prompt = torch.randint(0, 50257, (2, 21), device=DEVICE)
    steps = torch.randint(0, 50257, (2, n_steps), device=DEVICE)
    ordinary, static = (model.new_cache(policy, 2, 100, impl="triton") for _ in range(2))
    with torch.no_grad():
        model(prompt, cache=ordinary)
        model(prompt, cache=static)
        decoder = GraphedDecoder(model, static, capture=False)
        for i in range(n_steps):
            want = model(steps[:, i : i + 1], cache=ordinary, last_only=True)[0]
            got = decoder(steps[:, i : i + 1])
            torch.testing.assert_close(got, want, atol=2e-4, rtol=1e-4)
    decoder.close()
    assert static.length == ordinary.length == 21 + n_steps and static.layers[0].step is None
    # on CPU every layer's bytes match; on a GPU compiled variants may round differently past layer 0's inputs
    layers = list(zip(static.layers, ordinary.layers, strict=True))[: None if DEVICE == "cpu" else 1]
    for a, b in layers:
        for name in a.streams:
            assert a.streams[name].length == b.streams[name].length
            assert getattr(a.streams[name], "n_q", 0) == getattr(b.streams[name], "n_q", 0)
            for x, y in zip(a.streams[name].tensors(), b.streams[name].tensors(), strict=True):
                assert torch.equal(x, y), name


def test_flush_pattern_and_counters_follow_the_host():
    model = GPT(resolve("nano", "paper_decoupled", {"n_layer": 1}).model).to(DEVICE).eval()
    policy = parse_policy("ksem=q4_0@32,kgeo=q8_0@32,v=q4_0@32,resid=4", list(cache_widths(model.cfg)), 1)
    cache = model.new_cache(policy, 1, 2000, impl="triton")
    with torch.no_grad():
        model(torch.zeros(1, 10, dtype=torch.long, device=DEVICE), cache=cache)
    step = StaticStep(cache)
    # widths 16, 32, 48 with qb 32: groups of 2, 1 and 2 tokens; 10 + 1 - 4 = 7 is odd: only kgeo flushes
    bucket, pattern = step.prepare()
    assert bucket == 1024 and pattern == (False, True, False)
    assert step.counters.tolist() == [10, 11, 6, 7, 6]  # pos, n, then n_q after the step per stream
    step.advance()
    assert step.prepare()[1] == (True, True, True) and step.counters.tolist()[:2] == [11, 12]
    step.detach()
    assert cache.layers[0].step is None


@pytest.mark.skipif(DEVICE == "cuda", reason="the kernel's tf32 products against the fp32 torch path may flip a token")
def test_generate_with_cuda_graphs_gives_the_same_tokens():
    torch.manual_seed(0)
    model = GPT(resolve("nano", "paper_decoupled", {"n_layer": 1}).model).to(DEVICE).eval()
    with torch.no_grad():  # sharper logits, so greedy choices are far apart
        for p in model.parameters():
            if p.dim() == 2:
                p.mul_(4)
    policy = parse_policy("ksem=q4_0@32,kgeo=q8_0@32,v=q4_0@32,resid=4", list(cache_widths(model.cfg)), 1)
    prompt = torch.randint(0, 50257, (1, 9))
    cfg = SamplingConfig(max_new_tokens=12, greedy=True)
    plain = generate(model, prompt, cfg, policy, max_seq=32)
    graphed = generate(model, prompt, cfg, policy, max_seq=32, cuda_graphs=True)
    assert torch.equal(plain["ids"], graphed["ids"])


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_captured_graphs_replay_ordinary_steps_on_cuda():
    """On CUDA the steps are captured and replayed: the same logits as ordinary steps, a bf16 autocast included."""
    torch.manual_seed(0)
    model = GPT(resolve("small", "paper_decoupled", {"n_layer": 2}).model).cuda().eval()
    policy = parse_policy(PAPER_POLICY, list(cache_widths(model.cfg)), 2)
    prompt = torch.randint(0, 50257, (2, 1500), device="cuda")
    steps = torch.randint(0, 50257, (2, 40), device="cuda")
    ordinary, graphed = (model.new_cache(policy, 2, 2100, impl="triton") for _ in range(2))
    autocast = lambda: torch.autocast("cuda", dtype=torch.bfloat16)  # noqa: E731
    with torch.no_grad(), autocast():
        model(prompt, cache=ordinary)
        model(prompt, cache=graphed)
    decoder = GraphedDecoder(model, graphed, autocast)
    with torch.no_grad():
        for i in range(steps.shape[1]):
            with autocast():
                want = model(steps[:, i : i + 1], cache=ordinary, last_only=True)[0]
            torch.testing.assert_close(decoder(steps[:, i : i + 1]).float(), want.float(), atol=5e-2, rtol=5e-2)
    assert len(decoder.graphs) >= 2  # flush and no-flush steps, one bucket
