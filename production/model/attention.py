"""The attention variants behind one registry (docs/ARCHITECTURE.md, "Attention variants").

Every variant has the same contract: forward(x (B, T, d_model), rope (cos, sin) or None, cache) -> (B, T, d_model),
causal. Without a cache, or when the cache is empty (prefill), attention runs on the fresh K/V through torch's
fused `scaled_dot_product_attention`, and the K/V (keys after rotation) are written to the cache. With cached
tokens, the new tokens are appended and attend over the cache chunk by chunk (`attend_cache`).
`cache_widths(cfg)` names each variant's cached streams and their widths.

- `MultiHeadAttention` covers standard (width d_model), bottleneck (width attn_dim) and gqa (kv_heads < n_head):
  they differ only in widths, which the config resolves.
- `DecoupledAttention` splits Q/K into a semantic path (no RoPE) and a geometric path (RoPE). Its score
  q_sem.k_sem/sqrt(s) + rope(q_geo).rope(k_geo)/sqrt(g) is one attention call on pre-scaled concatenated heads
  q_cat = [q_sem/sqrt(s), q_geo/sqrt(g)], k_cat = [k_sem, k_geo] with scale 1.

The null token is one extra key/value column that every query always sees (zero-initialised, never rotated).
Putting it first and using a lower-right-aligned causal mask over T x (T+1) keeps the fused kernels exact:
query i sees the null column and keys 0..i. On CUDA, head dims are zero-padded to a multiple of 8 (exact), so
the preset head dims (12 at most sizes, 18 at `large`) run on a fused kernel too (`causal_attention`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention.bias import causal_lower_right

from production.cache.attend import attend_cache
from production.cache.kvcache import LayerCache
from production.model.config import ModelConfig
from production.model.rope import apply_rope

Rope = tuple[torch.Tensor, torch.Tensor] | None


FUSED_ALIGN = 8  # CUDA's memory-efficient kernel takes 16-bit head dims that are multiples of 8


def pad_heads(t: torch.Tensor, multiple: int = FUSED_ALIGN) -> torch.Tensor:
    """Zero-pad the head dim (last) up to a multiple: exact for attention, since zero channels add nothing to
    q . k and give zero output columns, which are sliced off."""
    extra = -t.shape[-1] % multiple
    return F.pad(t, (0, extra)) if extra else t


def causal_attention(q, k, v, null_k=None, null_v=None, scale=None, pad: bool | None = None) -> torch.Tensor:
    """q (B, H, T, D), k/v (B, Hkv, T, D) with Hkv dividing H; null_k/null_v (Hkv, D) or None.
    Returns (B, H, T, Dv). K/V heads are shared by groups of H/Hkv query heads without being repeated.

    pad (default: on CUDA) zero-pads head dims to a multiple of 8 so that every variant runs on a fused kernel
    (flash or memory-efficient, the null column's lower-right mask included) instead of the math kernel, which
    materialises T x T scores; the scale stays that of the true head dim."""
    B, H, T, D = q.shape
    Dv = v.shape[-1]
    scale = D**-0.5 if scale is None else scale
    gqa = k.shape[1] != H
    if null_k is not None:
        k = torch.cat([null_k.to(k.dtype)[None, :, None, :].expand(B, -1, 1, -1), k], dim=2)  # (B, Hkv, T+1, D)
        v = torch.cat([null_v.to(v.dtype)[None, :, None, :].expand(B, -1, 1, -1), v], dim=2)
    if q.is_cuda if pad is None else pad:
        q, k, v = pad_heads(q), pad_heads(k), pad_heads(v)
    if gqa and q.device.type == "mps":  # MPS's kernel may not take enable_gqa: share K/V heads by repeating them
        k, v = k.repeat_interleave(H // k.shape[1], dim=1), v.repeat_interleave(H // v.shape[1], dim=1)
        gqa = False
    if null_k is None:
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, enable_gqa=gqa)
    else:
        mask = causal_lower_right(T, T + 1)  # query i sees the null column and keys 0..i
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, enable_gqa=gqa)
    return y[..., :Dv]


def fused_linear(x: torch.Tensor, layers: list[nn.Linear]) -> list[torch.Tensor]:
    """One matmul for several bias-free projections of the same input; returns their outputs in order."""
    weight = torch.cat([layer.weight for layer in layers])
    return list(F.linear(x, weight).split([layer.out_features for layer in layers], dim=-1))


def split_heads(t: torch.Tensor, n_heads: int) -> torch.Tensor:
    """(B, T, n_heads * D) -> (B, n_heads, T, D)."""
    B, T, _ = t.shape
    return t.view(B, T, n_heads, -1).transpose(1, 2)


def merge_heads(t: torch.Tensor) -> torch.Tensor:
    """(B, H, T, D) -> (B, T, H * D)."""
    B, H, T, D = t.shape
    return t.transpose(1, 2).reshape(B, T, H * D)


class MultiHeadAttention(nn.Module):
    """standard / bottleneck / gqa: Q has n_head heads of head_dim, K and V have kv_heads heads of head_dim.
    tie_qk makes K the same projection as Q."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_head, self.kv_heads, hd = cfg.n_head, cfg.kv_heads, cfg.head_dim
        self.q = nn.Linear(cfg.d_model, self.n_head * hd, bias=False)
        self.k = self.q if cfg.tie_qk else nn.Linear(cfg.d_model, self.kv_heads * hd, bias=False)
        self.v = nn.Linear(cfg.d_model, self.kv_heads * hd, bias=False)
        self.o = nn.Linear(self.n_head * hd, cfg.d_model, bias=False)
        self.null_k = nn.Parameter(torch.zeros(self.kv_heads, hd)) if cfg.null_attn else None
        self.null_v = nn.Parameter(torch.zeros(self.kv_heads, hd)) if cfg.null_attn else None

    @staticmethod
    def cache_widths(cfg: ModelConfig) -> dict[str, int]:
        return {"k": cfg.kv_heads * cfg.head_dim, "v": cfg.kv_heads * cfg.head_dim}

    def forward(self, x: torch.Tensor, rope: Rope, cache: LayerCache | None = None) -> torch.Tensor:
        if self.k is self.q:
            q, v = fused_linear(x, [self.q, self.v])
            k = q
        else:
            q, k, v = fused_linear(x, [self.q, self.k, self.v])
        q, k, v = split_heads(q, self.n_head), split_heads(k, self.kv_heads), split_heads(v, self.kv_heads)
        if rope is not None:
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        if cache is None or cache.length == 0:
            y = causal_attention(q, k, v, self.null_k, self.null_v)  # scale 1/sqrt(head_dim)
            if cache is not None:
                cache.append({"k": merge_heads(k), "v": merge_heads(v)})
        else:
            cache.append({"k": merge_heads(k), "v": merge_heads(v)})
            null_k = None if self.null_k is None else {"k": self.null_k}
            y = attend_cache(cache, {"k": q * q.shape[-1] ** -0.5}, "v", null_k, self.null_v)
        return self.o(merge_heads(y))


class DecoupledAttention(nn.Module):
    """Semantic path (sem_dim, no RoPE; Q and K tied when tie_qk) + geometric path (geo_dim, RoPE).
    V has attn_dim = sem_dim + geo_dim, so q_cat, k_cat and v share one head dim. With kv_heads < n_head
    (grouped, as an upcycled GQA model has) K and V have kv_heads heads, each shared by a group of query heads."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        d, H, Hkv = cfg.d_model, cfg.n_head, cfg.kv_heads
        self.n_head, self.kv_heads = H, Hkv
        self.sem_head, self.geo_head = cfg.sem_dim // H, cfg.geo_dim // H
        self.q_sem = nn.Linear(d, cfg.sem_dim, bias=False)
        self.k_sem = self.q_sem if cfg.tie_qk else nn.Linear(d, Hkv * self.sem_head, bias=False)
        self.q_geo = nn.Linear(d, cfg.geo_dim, bias=False)
        self.k_geo = nn.Linear(d, Hkv * self.geo_head, bias=False)
        self.v = nn.Linear(d, Hkv * cfg.head_dim, bias=False)
        self.o = nn.Linear(cfg.attn_dim, d, bias=False)
        # null key laid out like k_cat: [sem | geo] per head, geometric part not rotated
        self.null_k = nn.Parameter(torch.zeros(Hkv, cfg.head_dim)) if cfg.null_attn else None
        self.null_v = nn.Parameter(torch.zeros(Hkv, cfg.head_dim)) if cfg.null_attn else None

    @staticmethod
    def cache_widths(cfg: ModelConfig) -> dict[str, int]:
        Hkv, H = cfg.kv_heads, cfg.n_head
        return {"k_sem": Hkv * cfg.sem_dim // H, "k_geo": Hkv * cfg.geo_dim // H, "v": Hkv * cfg.head_dim}

    def forward(self, x: torch.Tensor, rope: Rope, cache: LayerCache | None = None) -> torch.Tensor:
        H, Hkv = self.n_head, self.kv_heads
        if self.k_sem is self.q_sem:
            q_sem, q_geo, k_geo, v = fused_linear(x, [self.q_sem, self.q_geo, self.k_geo, self.v])
            k_sem = q_sem
        else:
            q_sem, k_sem, q_geo, k_geo, v = fused_linear(x, [self.q_sem, self.k_sem, self.q_geo, self.k_geo, self.v])
        q_sem, k_sem = split_heads(q_sem, H), split_heads(k_sem, Hkv)  # (B, H or Hkv, T, s)
        q_geo, k_geo = split_heads(q_geo, H), split_heads(k_geo, Hkv)  # (B, H or Hkv, T, g)
        if rope is not None:
            q_geo, k_geo = apply_rope(q_geo, *rope), apply_rope(k_geo, *rope)
        v = split_heads(v, Hkv)
        q_sem, q_geo = q_sem * self.sem_head**-0.5, q_geo * self.geo_head**-0.5
        if cache is not None and cache.length > 0:
            cache.append({"k_sem": merge_heads(k_sem), "k_geo": merge_heads(k_geo), "v": merge_heads(v)})
            null_k = None
            if self.null_k is not None:
                null_k = {"k_sem": self.null_k[:, : self.sem_head], "k_geo": self.null_k[:, self.sem_head :]}
            y = attend_cache(cache, {"k_sem": q_sem, "k_geo": q_geo}, "v", null_k, self.null_v)
            return self.o(merge_heads(y))
        q = torch.cat([q_sem, q_geo], dim=-1)  # (B, H, T, s+g), pre-scaled
        k = torch.cat([k_sem, k_geo], dim=-1)
        y = causal_attention(q, k, v, self.null_k, self.null_v, scale=1.0)
        if cache is not None:
            cache.append({"k_sem": merge_heads(k_sem), "k_geo": merge_heads(k_geo), "v": merge_heads(v)})
        return self.o(merge_heads(y))


ATTENTION: dict[str, type[nn.Module]] = {
    "standard": MultiHeadAttention,
    "bottleneck": MultiHeadAttention,
    "gqa": MultiHeadAttention,
    "decoupled": DecoupledAttention,
}


def cache_widths(cfg: ModelConfig) -> dict[str, int]:
    """Cached stream name -> values per token per layer (k, v or k_sem, k_geo, v)."""
    return ATTENTION[cfg.attn_mode].cache_widths(cfg)


def build_attention(cfg: ModelConfig) -> nn.Module:
    if cfg.attn_mode not in ATTENTION:
        raise ValueError(f"no attention module for attn_mode {cfg.attn_mode!r}; registered: {', '.join(ATTENTION)}")
    return ATTENTION[cfg.attn_mode](cfg)
