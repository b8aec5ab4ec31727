"""The memory-lean loss head against the plain one: full logits, then F.cross_entropy."""

import pytest
import torch
import torch.nn.functional as F

from production.config.build import resolve_model
from production.model import loss as loss_module
from production.model.gpt import GPT
from production.model.loss import head_cross_entropy


def plain(h, w, targets):
    return F.cross_entropy((h @ w.t()).float(), targets)


@pytest.mark.parametrize("n", [1, 255, 256, 600])  # within one chunk, at its edge, across uneven chunks
def test_loss_and_gradients_equal_the_full_logits_path(n):
    gen = torch.Generator().manual_seed(n)
    h0, w0 = torch.randn(n, 32, generator=gen), torch.randn(1000, 32, generator=gen) * 0.3
    targets = torch.randint(0, 1000, (n,), generator=gen)
    got_h, got_w = h0.clone().requires_grad_(), w0.clone().requires_grad_()
    ref_h, ref_w = h0.clone().requires_grad_(), w0.clone().requires_grad_()
    got, ref = head_cross_entropy(got_h, got_w, targets), plain(ref_h, ref_w, targets)
    torch.testing.assert_close(got, ref, atol=1e-6, rtol=1e-6)
    (2.5 * got).backward()  # an upstream gradient other than 1 scales both
    (2.5 * ref).backward()
    torch.testing.assert_close(got_h.grad, ref_h.grad, atol=1e-7, rtol=1e-5)
    torch.testing.assert_close(got_w.grad, ref_w.grad, atol=1e-7, rtol=1e-5)


def test_only_the_gradients_asked_for_and_none_without_grad():
    h, w = torch.randn(300, 16), torch.randn(50, 16, requires_grad=True)
    targets = torch.randint(0, 50, (300,))
    head_cross_entropy(h, w, targets).backward()
    torch.testing.assert_close(w.grad, torch.autograd.grad(plain(h, w, targets), w)[0], atol=1e-7, rtol=1e-5)
    with torch.no_grad():
        torch.testing.assert_close(head_cross_entropy(h, w, targets), plain(h, w, targets), atol=1e-6, rtol=1e-6)


def test_gpt_training_loss_and_every_gradient_equal_the_plain_head(monkeypatch):
    monkeypatch.setattr(loss_module, "CHUNK_TOKENS", 40)  # several chunks for 2 x 64 tokens
    torch.manual_seed(0)
    model = GPT(resolve_model("nano", "paper_decoupled_null", {"n_layer": 2, "block_size": 64}))
    x, y = torch.randint(0, 50257, (2, 2, 64)).unbind(0)
    _, loss = model(x, y)
    loss.backward()
    got = {n: p.grad.to_dense().clone() for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    ref = F.cross_entropy(model.head(model.features(x)).flatten(0, 1), y.flatten())
    ref.backward()
    torch.testing.assert_close(loss, ref, atol=1e-6, rtol=1e-6)
    for name, p in model.named_parameters():
        torch.testing.assert_close(got[name], p.grad.to_dense(), atol=1e-7, rtol=1e-4, msg=name)
    logits, none = model(x)
    assert none is None and logits.shape == (2, 64, 50257)


def test_bf16_autocast_matches_the_plain_path_in_bf16():
    torch.manual_seed(0)
    h, w = torch.randn(300, 64, requires_grad=True), torch.randn(500, 64, requires_grad=True)
    targets = torch.randint(0, 500, (300,))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = head_cross_entropy(h, w, targets)
        ref = F.cross_entropy(F.linear(h, w).float(), targets)
    assert got.dtype == torch.float32 and abs(got.item() - ref.item()) < 1e-2
    (gh,) = torch.autograd.grad(got, h)
    (rh,) = torch.autograd.grad(ref, h)
    assert gh.dtype == torch.float32 and (gh - rh).abs().max() < 2e-2 * rh.abs().max()
