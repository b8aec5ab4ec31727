"""Checks that need a CUDA device; they skip cleanly without one (run them where a GPU is lent)."""

import pytest
import torch

from production.cache.policy import parse_policy
from production.cache.quant import quantize_blocks
from production.config.build import resolve_model
from production.config.presets import EXPERIMENTS
from production.config.sampling import SamplingConfig
from production.model.attention import cache_widths
from production.model.gpt import GPT
from production.sample.generate import generate

pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


def test_llama_blocks_are_the_same_bytes_on_cuda():
    x = torch.randn(64, 256) * torch.logspace(-3, 3, 64)[:, None]
    for kind in ("q8_0", "q4_0"):
        assert torch.equal(quantize_blocks(x.cuda(), kind).cpu(), quantize_blocks(x, kind))


@pytest.mark.parametrize("exp", list(EXPERIMENTS))
def test_fp16_cache_greedy_equals_recompute_on_cuda(exp):
    torch.manual_seed(0)
    model = GPT(resolve_model("nano", exp, {"n_layer": 2, "block_size": 64})).cuda().eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.mul_(5)
    prompt = torch.randint(0, 50257, (2, 9), generator=torch.Generator().manual_seed(1))
    cfg = SamplingConfig(max_new_tokens=16, greedy=True)
    streams = list(cache_widths(model.cfg))
    ref = generate(model, prompt, cfg, None, max_seq=64)
    assert torch.equal(
        generate(model, prompt, cfg, parse_policy("fp16", streams, model.cfg.n_layer), max_seq=64)["ids"], ref["ids"]
    )


def test_bf16_training_step_runs_and_learns():
    torch.manual_seed(0)
    model = GPT(resolve_model("nano", "paper_decoupled", {"n_layer": 2})).cuda()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, fused=True)
    x = torch.randint(0, 50257, (4, 65), device="cuda")
    losses = []
    for _ in range(20):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            _, loss = model(x[:, :-1], x[:, 1:])
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 1.0
