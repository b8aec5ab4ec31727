"""Cross-entropy of the output head without the full logits: `head_cross_entropy(h, weight, targets)`.

Training needs only the loss and its gradients, yet the plain path materialises the (N, vocab) logits and then
their gradient (411 MB each in fp32 for the nano demo's 8 x 256 tokens). Here the rows go through the head
`CHUNK_TOKENS` at a time: for each chunk the logits are computed, reduced to the chunk's loss, and, when
gradients are needed, turned at once into the gradients of the hidden states and of the head weight
(softmax - onehot, times h or W), so only one chunk of logits ever exists. The matmuls are the same three the
plain path runs (forward, and the two of its backward), none is recomputed; backward only scales the stored
gradients by the incoming one. This is the fused linear-cross-entropy of Liger-Kernel (Hsu et al. 2024) in
plain torch ops.

Under autocast the matmuls run in the autocast dtype and the softmax in fp32, as the plain path does.
"""

from __future__ import annotations

import torch

# rows of logits alive at once: 1024 x 50257 fp32 = 206 MB. Forward + backward of the head and loss on CPU at
# nano (2048 rows, d 256): 1407 ms in chunks of 1024 rows, 1447 in 512, 1612 in 128, 1641 with full logits.
CHUNK_TOKENS = 1024


def _compute_dtype(h: torch.Tensor) -> torch.dtype:
    kind = h.device.type
    return torch.get_autocast_dtype(kind) if torch.is_autocast_enabled(kind) else h.dtype


class _HeadCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """h (N, d), weight (V, d), targets (N,) -> the mean cross-entropy (a 0-d fp32 tensor)."""
        dtype = _compute_dtype(h)
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        N = h.shape[0]
        w = weight.to(dtype)
        loss = torch.zeros((), dtype=torch.float32, device=h.device)
        grad_h = torch.empty(h.shape, dtype=dtype, device=h.device) if need_h else None
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=h.device) if need_w else None
        with torch.autocast(h.device.type, enabled=False):
            for i in range(0, N, CHUNK_TOKENS):
                hc, tc = h[i : i + CHUNK_TOKENS].to(dtype), targets[i : i + CHUNK_TOKENS]
                logits = (hc @ w.t()).float()  # (C, V): the only logits alive
                target_logit = logits.gather(1, tc[:, None]).squeeze(1)
                top = logits.amax(dim=-1, keepdim=True)
                e = logits.sub_(top).exp_()  # in place of the logits: the one exp pass serves loss and gradient
                total = e.sum(dim=-1, keepdim=True)
                loss += (top + total.log() - target_logit[:, None]).sum()  # logsumexp - the target's logit
                if need_h or need_w:
                    g = e.div_(total * N)  # softmax / N ...
                    g[torch.arange(len(tc), device=h.device), tc] -= 1 / N  # ... - onehot / N: d(mean loss)/d(logits)
                    g = g.to(dtype)
                    if need_h:
                        torch.mm(g, w, out=grad_h[i : i + CHUNK_TOKENS])
                    if need_w and dtype == torch.float32:
                        grad_w.addmm_(g.t(), hc)  # accumulated in place: no (V, d) temporary per chunk
                    elif need_w:
                        grad_w += (g.t() @ hc).float()
        ctx.save_for_backward(None if grad_h is None else grad_h.to(h.dtype), grad_w)
        ctx.weight_dtype = weight.dtype
        return loss / N

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        grad_h, grad_w = ctx.saved_tensors  # scaled in place: they serve this one backward
        gh = None if grad_h is None else grad_h.mul_(grad_out.to(grad_h.dtype))
        gw = None if grad_w is None else grad_w.mul_(grad_out).to(ctx.weight_dtype)
        return gh, gw, None


def head_cross_entropy(h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy of the logits h @ weight^T against targets, never holding more than CHUNK_TOKENS rows
    of logits. h (..., d) hidden states after the final norm, weight (V, d), targets (...) ids -> 0-d fp32."""
    return _HeadCrossEntropy.apply(h.reshape(-1, h.shape[-1]), weight, targets.reshape(-1))
