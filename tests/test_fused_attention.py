"""Training attention on fused kernels: the zero-padding of head dims (what CUDA runs) equals naive attention,
values and gradients, for every variant's shapes, the null column and GQA included. On CUDA, every exp's
attention runs forward and backward with the math kernel disabled."""

import math

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from production.config.build import resolve_model
from production.config.presets import EXPERIMENTS, SIZES
from production.model.attention import build_attention, causal_attention
from production.model.rope import Rotary


def naive(q, k, v, null_k, null_v, scale):
    """Explicit scores, lower-right causal mask over the null column and the keys, softmax, weighted values."""
    B, H, T, _ = q.shape
    g = H // k.shape[1]
    k, v = k.repeat_interleave(g, dim=1), v.repeat_interleave(g, dim=1)
    if null_k is not None:
        nk = null_k.repeat_interleave(g, dim=0)[None, :, None].expand(B, -1, 1, -1)
        nv = null_v.repeat_interleave(g, dim=0)[None, :, None].expand(B, -1, 1, -1)
        k, v = torch.cat([nk, k], dim=2), torch.cat([nv, v], dim=2)
    scores = (q @ k.transpose(-1, -2)) * scale
    n = k.shape[2]
    visible = torch.arange(n)[None, :] <= torch.arange(T)[:, None] + (n - T)
    return torch.softmax(scores.masked_fill(~visible, float("-inf")), dim=-1) @ v


# (H, Hkv, head dim, null): decoupled and bottleneck at nano/small (12), large (18), gqa, standard
SHAPES = [(4, 4, 12, False), (4, 4, 12, True), (16, 16, 18, True), (12, 3, 64, False), (6, 2, 20, True)]
SHAPES.append((4, 4, 64, True))


@pytest.mark.parametrize("H,Hkv,D,null", SHAPES)
@pytest.mark.parametrize("pad", [False, True])
def test_padded_fused_attention_equals_naive(H, Hkv, D, null, pad):
    torch.manual_seed(0)
    B, T = 2, 19
    q, k, v = (torch.randn(B, h, T, D, requires_grad=True) for h in (H, Hkv, Hkv))
    null_k = torch.randn(Hkv, D, requires_grad=True) if null else None
    null_v = torch.randn(Hkv, D, requires_grad=True) if null else None
    leaves = [t for t in (q, k, v, null_k, null_v) if t is not None]
    got = causal_attention(q, k, v, null_k, null_v, scale=0.3, pad=pad)
    want = naive(q, k, v, null_k, null_v, 0.3)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    grad = torch.randn_like(want)
    grads_got = torch.autograd.grad(got, leaves, grad)
    grads_want = torch.autograd.grad(want, leaves, grad)
    for a, b in zip(grads_got, grads_want, strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_default_scale_is_the_true_head_dim():
    q, k, v = (torch.randn(1, 2, 5, 12) for _ in range(3))
    torch.testing.assert_close(causal_attention(q, k, v, pad=True), naive(q, k, v, None, None, 1 / math.sqrt(12)))


FUSED = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.CUDNN_ATTENTION]


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("exp", list(EXPERIMENTS))
def test_every_exp_runs_on_fused_kernels_on_cuda(exp):
    """Forward and backward of one attention layer of each size in bf16, with the math kernel unavailable."""
    for size in SIZES:
        cfg = resolve_model(size, exp, {"block_size": 256})
        attn = build_attention(cfg).cuda()
        rope = Rotary(cfg.rope_dim, cfg.rope_base, cfg.block_size).cuda()(0, 256) if cfg.rope else None
        x = torch.randn(2, 256, cfg.d_model, device="cuda", requires_grad=True)
        with sdpa_kernel(FUSED), torch.autocast("cuda", dtype=torch.bfloat16):
            attn(x, rope).float().square().mean().backward()
        assert torch.isfinite(x.grad).all(), size
