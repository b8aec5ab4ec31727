"""GPT-2-style decoder with pluggable attention (docs/ARCHITECTURE.md, "Model").

Pre-LayerNorm blocks, no learned positional embedding (position comes only from RoPE), bias-free linears,
GELU MLP, token embedding tied to the output head, init N(0, 0.02) with residual output projections scaled
by 1/sqrt(2 n_layer). The `llama` block family (ModelConfig.family) swaps in RMSNorm and the SwiGLU MLP and may
untie the head, so Llama-family checkpoints load into the same model (production.model.hf).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from production.cache.kvcache import DEFAULT_CHUNK_TOKENS, KVCache
from production.cache.policy import KVPolicy
from production.core.errors import UserError
from production.model.attention import build_attention, cache_widths
from production.model.config import ModelConfig
from production.model.loss import head_cross_entropy
from production.model.rope import RopeScaling, Rotary


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.fc = nn.Linear(cfg.d_model, cfg.d_ff, bias=False)
        self.proj = nn.Linear(cfg.d_ff, cfg.d_model, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(F.gelu(self.fc(x)))


class SwiGLU(nn.Module):
    """Llama's MLP: down(silu(gate(x)) * up(x))."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.gate = nn.Linear(cfg.d_model, cfg.d_ff, bias=False)
        self.up = nn.Linear(cfg.d_model, cfg.d_ff, bias=False)
        self.down = nn.Linear(cfg.d_ff, cfg.d_model, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(F.silu(self.gate(x)) * self.up(x))


def norm(cfg: ModelConfig) -> nn.Module:
    return nn.RMSNorm(cfg.d_model, eps=cfg.norm_eps) if cfg.family == "llama" else nn.LayerNorm(cfg.d_model)


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.ln1 = norm(cfg)
        self.attn = build_attention(cfg)
        self.ln2 = norm(cfg)
        self.mlp = SwiGLU(cfg) if cfg.family == "llama" else MLP(cfg)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor, rope, cache=None) -> torch.Tensor:
        x = x + self.drop(self.attn(self.ln1(x), rope, cache))
        return x + self.drop(self.mlp(self.ln2(x)))


class GPT(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        # sparse lookup gradient: it is added into the head's dense gradient of the same (tied) weight, which
        # skips zero-filling and adding a second vocab x d_model buffer every step (~8% of a CPU step at small)
        self.wte = nn.Embedding(cfg.vocab_size, cfg.d_model, sparse=cfg.tie_embeddings)
        self.rotary = self._rotary(None)
        if cfg.rope_pairs is not None:  # per layer: the table columns of its pairs (i and i + D/2 share a frequency)
            half = cfg.rope_source_dim // 2
            cols = torch.tensor([[*p, *(i + half for i in p)] for p in cfg.rope_pairs], dtype=torch.long)
            self.register_buffer("rope_columns", cols, persistent=False)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer))
        self.ln_f = norm(cfg)
        self.lm_head = None if cfg.tie_embeddings else nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        self.drop = nn.Dropout(cfg.dropout)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        residual_std = 0.02 / math.sqrt(2 * self.cfg.n_layer)
        for name, module in self.named_modules():
            if isinstance(module, nn.Linear):
                is_residual_out = name.endswith(("attn.o", "mlp.proj", "mlp.down"))
                nn.init.normal_(module.weight, 0.0, residual_std if is_residual_out else 0.02)
            elif isinstance(module, nn.Embedding):
                nn.init.normal_(module.weight, 0.0, 0.02)
            elif isinstance(module, nn.LayerNorm):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)
            elif isinstance(module, nn.RMSNorm):
                nn.init.ones_(module.weight)
        for name, p in self.named_parameters():
            if name.endswith(("null_k", "null_v")):
                nn.init.zeros_(p)

    def forward(
        self,
        idx: torch.Tensor,
        targets: torch.Tensor | None = None,
        cache: KVCache | None = None,
        last_only: bool = False,
    ):
        """idx (B, T) token ids; targets (B, T) or None. With a cache, idx continues the cached sequence (its
        positions start at cache.length) and its K/V are appended. last_only: logits for the last position only.
        Returns (logits (B, T or 1, vocab), None) without targets; with targets (None, the mean cross-entropy),
        computed through the head a chunk of tokens at a time, so the full logits never exist
        (production.model.loss)."""
        x = self.features(idx, cache)
        if targets is not None:
            return None, head_cross_entropy(self.ln_f(x), self.head_weight, targets)
        if last_only:
            x = x[:, -1:]
        return self.head(x), None

    def features(self, idx: torch.Tensor, cache: KVCache | None = None) -> torch.Tensor:
        """idx (B, T) -> the final hidden states (B, T, d_model), before the last LayerNorm and the head; with a
        cache as in forward()."""
        T = idx.shape[1]
        start = 0 if cache is None else cache.length
        if self.rotary is None:
            rope = None
        elif cache is not None and cache.layers[0].step is not None:  # a static step: the position is on the device
            rope = self.rotary.at(cache.layers[0].step.pos)
        else:
            rope = self.rotary(start, T)
        x = self.drop(self.wte(idx))
        for i, block in enumerate(self.blocks):
            x = block(x, self.layer_rope(rope, i), None if cache is None else cache.layers[i])
        return x

    def layer_rope(self, rope, layer: int):
        """Layer `layer`'s cos/sin tables: the model's, or the columns of its chosen pairs (cfg.rope_pairs)."""
        if rope is None or self.cfg.rope_pairs is None:
            return rope
        cols = self.rope_columns[layer]
        return rope[0].index_select(-1, cols), rope[1].index_select(-1, cols)

    @property
    def head_weight(self) -> torch.Tensor:
        """(vocab, d_model): the token embedding when tied, else the head's own weight."""
        return self.wte.weight if self.lm_head is None else self.lm_head.weight

    def head(self, x: torch.Tensor) -> torch.Tensor:
        """Hidden states (..., d_model) -> logits (..., vocab): the final norm and the head."""
        return F.linear(self.ln_f(x), self.head_weight)

    def _rotary(self, scaling: RopeScaling | None) -> Rotary | None:
        """The RoPE tables: for rope_dim, or for rope_source_dim when layers pick their pairs from it."""
        cfg = self.cfg
        if not cfg.rope:
            return None
        dim = cfg.rope_dim if cfg.rope_pairs is None else cfg.rope_source_dim
        return Rotary(dim, cfg.rope_base, cfg.block_size, scaling, cfg.rope_llama3)

    def set_rope_scaling(self, scaling: RopeScaling | None) -> None:
        """Evaluate past the trained length with a context extension of the RoPE dims (production.model.rope);
        None restores plain RoPE. Models without RoPE are unaffected; Llama 3's own rescaling takes none on top."""
        stretched = scaling is not None and scaling.kind != "none" and scaling.factor > 1.0
        if stretched and self.cfg.rope_llama3 is not None:
            raise UserError(f"RoPE extension {scaling.kind} does not stack on this model's Llama 3 RoPE rescaling")
        if self.rotary is not None:
            self.rotary = self._rotary(scaling).to(self.wte.weight.device)

    def new_cache(
        self, policy: KVPolicy, batch: int, max_seq: int, chunk_tokens: int = DEFAULT_CHUNK_TOKENS, impl: str = "auto"
    ) -> KVCache:
        """An empty cache for `batch` sequences of up to max_seq tokens, on the model's device; decode reads it
        `chunk_tokens` at a time with matmul strategy `impl` (production.cache.attend)."""
        device = self.wte.weight.device
        widths = cache_widths(self.cfg)
        return KVCache(policy, widths, self.cfg.kv_heads, batch, max_seq, device, chunk_tokens, impl)

    def num_params(self) -> int:
        """Unique parameters (the tied head and tied Q/K count once)."""
        return sum(p.numel() for p in self.parameters())

    def flops_per_token(self, seq_len: int) -> int:
        """Training FLOPs per token (forward + backward = 3x forward): 2 per weight of every matmul that
        touches the token, plus attention scores and weighted sum at an average causal length seq_len/2."""
        cfg = self.cfg
        matmul_weights = sum(p.numel() for n, p in self.named_parameters() if p.dim() == 2 and "null" not in n)
        attn = cfg.n_layer * 2 * (cfg.attn_dim + cfg.attn_dim) * (seq_len / 2)  # QK^T and PV, per token
        return int(3 * (2 * matmul_weights + attn))


def param_count(cfg: ModelConfig) -> int:
    """Parameter count without allocating weights (built on the meta device)."""
    with torch.device("meta"):
        return GPT(cfg).num_params()
