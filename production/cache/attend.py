"""Attention of new queries over a KV cache, chunk by chunk with an online softmax.

The cache is never dequantized whole: each chunk of tokens is read (dequantized) into a float32 buffer,
scored, and folded into running max / sum / weighted-value accumulators. K/V heads are shared by groups of
query heads through broadcasting or block structure, never repeated in memory. Rotated streams (`+rot`) are
read as stored: the queries of a rotated key stream are rotated alike, and the output over rotated values is
rotated back.

Two ways to do a chunk's products, each faster in its own regime (measured on CPU at 16k context):
- "bmm": per-head batched matmuls on strided views; best for wide heads (64+).
- "blockdiag": one dense matmul of the contiguous (C, Hkv*d) chunk with a block-diagonal query matrix (and its
  transpose for values, keeping the diagonal blocks); best for the narrow heads of the decoupled and
  bottleneck paths (4-16 dims), where per-head matmuls are tiny and strided.
"auto" picks blockdiag when the part's head dim is at most 16.
"triton" (one query token per sequence, on CUDA) reads the whole cache in one fused kernel instead
(production.cache.triton_decode); the other cases keep the chunked torch path.
"""

from __future__ import annotations

import torch

from production.cache import triton_decode
from production.cache.kvcache import ChannelQuantStream, LayerCache
from production.cache.rotation import rotate_heads

IMPLS = ("auto", "bmm", "blockdiag", "triton")


def _scores(q: torch.Tensor, k: torch.Tensor, impl: str) -> torch.Tensor:
    """q (B, Hkv, R, d) (R = query rows per K/V head), k chunk (B, C, Hkv * d) -> (B, Hkv, R, C)."""
    B, Hkv, R, d = q.shape
    C = k.shape[1]
    if impl == "bmm":
        return q @ k.view(B, C, Hkv, d).permute(0, 2, 3, 1)
    eye = torch.eye(Hkv, device=q.device, dtype=q.dtype)
    q_bd = torch.einsum("bkrd,kl->bkrld", q, eye).reshape(B, Hkv * R, Hkv * d)  # block-diagonal queries
    return (q_bd @ k.transpose(1, 2)).view(B, Hkv, R, C)  # k read transposed in place, output contiguous


def _channel_scores(q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """q (B, Hkv, R, d), k as a per-channel stream stores whole groups, (B, groups, Hkv * d, G) -> (B, Hkv, R,
    groups * G). Each group's (d, G) block per head is already k^T: one batched matmul, no reordering of keys."""
    B, Hkv, R, d = q.shape
    n_groups, G = k.shape[1], k.shape[-1]
    s = q[:, None] @ k.view(B, n_groups, Hkv, d, G)  # (B, groups, Hkv, R, G)
    return s.permute(0, 2, 3, 1, 4).reshape(B, Hkv, R, n_groups * G)


def _stream_scores(q: torch.Tensor, stream, t0: int, t1: int, impl: str) -> torch.Tensor:
    """Scores of q (B, Hkv, R, d) against the keys of tokens [t0, t1) of one stream."""
    if isinstance(stream, ChannelQuantStream) and stream.whole_groups(t0, t1):
        return _channel_scores(q, stream.read_groups(t0, t1, torch.float32))
    return _scores(q, stream.read(t0, t1, torch.float32), impl)


def _weighted_values(p: torch.Tensor, v: torch.Tensor, impl: str) -> torch.Tensor:
    """p (B, Hkv, R, C) weights, v chunk (B, C, Hkv * dv) -> (B, Hkv, R, dv)."""
    B, Hkv, R, C = p.shape
    dv = v.shape[-1] // Hkv
    if impl == "bmm":
        return p @ v.view(B, C, Hkv, dv).transpose(1, 2)
    full = p.reshape(B, Hkv * R, C) @ v  # (B, Hkv * R, Hkv * dv): keep the blocks where the heads match
    return full.view(B, Hkv, R, Hkv, dv).diagonal(dim1=1, dim2=3).permute(0, 3, 1, 2)


def _pick(impl: str, head_dim: int) -> str:
    if impl in ("auto", "triton"):  # triton falls back to the torch path for several query tokens
        return "blockdiag" if head_dim <= 16 else "bmm"
    return impl


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
    impls = {name: _pick(cache.impl, q.shape[-1]) for name, q in qs.items()}
    v_impl = _pick(cache.impl, dv)
    Rv = cache.rotations.get(v_name)  # values are stored rotated: accumulate in the rotated basis

    if null_k is not None:
        m = sum((qs[name] * null_k[name].float()[None, :, None, :]).sum(-1, keepdim=True) for name in qs)
        l = torch.ones_like(m)
        nv = null_v.float()[None, :, None, :]
        nv = nv if Rv is None else rotate_heads(nv, Rv)
        acc = nv.expand(B, Hkv, g * Tq, dv).clone()
    else:
        m = torch.full((B, Hkv, g * Tq, 1), float("-inf"), device=first.device)
        l = torch.zeros_like(m)
        acc = torch.zeros(B, Hkv, g * Tq, dv, device=first.device)
    for name, q in qs.items():  # keys stored rotated: rotate the queries alike, so q R . k R = q . k
        if name in cache.rotations:
            qs[name] = rotate_heads(q, cache.rotations[name])

    if (cache.impl == "triton" or cache.step is not None) and Tq == 1:  # a static step needs the kernel
        if not triton_decode.available(first.device):
            raise ValueError(triton_decode.why_unavailable(first.device))
        m2, l2, acc2 = triton_decode.decode_partials(cache, qs, v_name, split_tokens=cache.split_tokens)
        m_new = torch.maximum(m, m2)  # m2 is finite: the cache holds at least the new token
        a, a2 = torch.exp(m - m_new), torch.exp(m2 - m_new)
        l, acc = l * a + l2 * a2, acc * a + acc2 * a2
        chunks = []
    else:
        chunks = cache.chunks()
    query_pos = torch.arange(n - Tq, n, device=first.device).repeat(g) if chunks else None  # (g * Tq,)
    for t0, t1 in chunks:
        scores = sum(
            _stream_scores(qs[name], cache.streams[name], t0, t1, impls[name]) for name in qs
        )  # (B, Hkv, g * Tq, C)
        if t1 > n - Tq:  # the chunk holds some of the new tokens: mask keys after each query
            key_pos = torch.arange(t0, t1, device=first.device)
            scores = scores.masked_fill(key_pos[None, :] > query_pos[:, None], float("-inf"))
        m_new = torch.maximum(m, scores.amax(dim=-1, keepdim=True))
        alpha = torch.exp(m - m_new)
        p = torch.exp(scores - m_new)
        l = l * alpha + p.sum(dim=-1, keepdim=True)
        acc = acc * alpha + _weighted_values(p, v_stream.read(t0, t1, torch.float32), v_impl)
        m = m_new
    out = acc / l
    out = out if Rv is None else rotate_heads(out, Rv, inverse=True)
    return out.reshape(B, H, Tq, dv).to(first.dtype)
