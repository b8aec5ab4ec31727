"""Attention of new queries over a KV cache, chunk by chunk with an online softmax (DESIGN.md 4).

The cache is never dequantized whole: each chunk of `chunk_tokens` tokens is read (dequantized) into a small
float32 buffer, scored, and folded into running max / sum / weighted-value accumulators. K/V heads are shared
by groups of query heads through broadcasting, never repeated in memory.
"""

from __future__ import annotations

import torch

from production.kvcache import LayerCache


def attend_cache(
    cache: LayerCache,
    q_parts: dict[str, torch.Tensor],
    v_name: str,
    null_k: dict[str, torch.Tensor] | None = None,
    null_v: torch.Tensor | None = None,
) -> torch.Tensor:
    """Queries for the newest Tq cached tokens attend over all cached tokens, causally.

    q_parts: key stream name -> (B, H, Tq, d) query part, already scaled; the score is the sum over parts of
    q_part . k_part, where stream `name` holds keys (B, n, Hkv * d). v_name: the value stream (B, n, Hkv * dv).
    null_k: stream name -> (Hkv, d) and null_v (Hkv, dv): the always-visible null column.
    Returns (B, H, Tq, dv) in the queries' dtype.
    """
    first = next(iter(q_parts.values()))
    B, H, Tq, _ = first.shape
    n = cache.length
    v_stream = cache.streams[v_name]
    Hkv = cache.streams[next(iter(q_parts))].width // first.shape[-1]
    g = H // Hkv  # query heads per K/V head
    dv = v_stream.width // Hkv
    # (B, H, Tq, d) -> (B, Hkv, g * Tq, d): a group's queries sit side by side against one K/V head
    qs = {name: q.float().reshape(B, Hkv, g * Tq, q.shape[-1]) for name, q in q_parts.items()}
    query_pos = torch.arange(n - Tq, n, device=first.device).repeat(g)  # (g * Tq,)

    if null_k is not None:
        m = sum((qs[name] * null_k[name].float()[None, :, None, :]).sum(-1, keepdim=True) for name in qs)
        l = torch.ones_like(m)
        acc = null_v.float()[None, :, None, :].expand(B, Hkv, g * Tq, dv).clone()
    else:
        m = torch.full((B, Hkv, g * Tq, 1), float("-inf"), device=first.device)
        l = torch.zeros_like(m)
        acc = torch.zeros(B, Hkv, g * Tq, dv, device=first.device)

    for t0 in range(0, n, cache.chunk_tokens):
        t1 = min(n, t0 + cache.chunk_tokens)
        C = t1 - t0
        scores = sum(
            qs[name] @ cache.streams[name].read(t0, t1, torch.float32).view(B, C, Hkv, -1).permute(0, 2, 3, 1)
            for name in qs
        )  # (B, Hkv, g * Tq, C)
        if t1 > n - Tq:  # the chunk holds some of the new tokens: mask keys after each query
            key_pos = torch.arange(t0, t1, device=first.device)
            scores = scores.masked_fill(key_pos[None, :] > query_pos[:, None], float("-inf"))
        v = v_stream.read(t0, t1, torch.float32).view(B, C, Hkv, dv).transpose(1, 2)  # (B, Hkv, C, dv)
        m_new = torch.maximum(m, scores.amax(dim=-1, keepdim=True))
        alpha = torch.exp(m - m_new)
        p = torch.exp(scores - m_new)
        l = l * alpha + p.sum(dim=-1, keepdim=True)
        acc = acc * alpha + p @ v
        m = m_new
    return (acc / l).reshape(B, H, Tq, dv).to(first.dtype)
