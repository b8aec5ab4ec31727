"""The model's configuration: one validated dataclass. Presets and CLI overrides resolve into it in
production.config; here only the architecture's own rules live (docs/ARCHITECTURE.md, "Attention variants")."""

from __future__ import annotations

import dataclasses
from dataclasses import asdict, dataclass

from production.core.errors import UserError
from production.core.vocab import GPT2_VOCAB_SIZE

ATTN_MODES = ("standard", "bottleneck", "decoupled", "gqa")
FAMILIES = ("gpt", "llama")
LLAMA3_ROPE_KEYS = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")


@dataclass(frozen=True)
class ModelConfig:
    """Architecture. Fields that do not apply to a mode are None (sem_dim/geo_dim outside decoupled)."""

    attn_mode: str
    d_model: int
    n_layer: int
    n_head: int
    d_ff: int
    block_size: int
    attn_dim: int  # total Q/K (and V) width across heads; d_model for standard and gqa
    sem_dim: int | None
    geo_dim: int | None
    kv_heads: int
    null_attn: bool
    tie_qk: bool
    rope: bool
    rope_base: float = 10000.0
    vocab_size: int = GPT2_VOCAB_SIZE
    dropout: float = 0.0
    # the block family: "gpt" (LayerNorm, GELU MLP, tied head) or "llama" (RMSNorm, SwiGLU MLP, head tied or not)
    family: str = "gpt"
    norm_eps: float = 1e-5  # RMSNorm's epsilon (llama)
    tie_embeddings: bool = True
    # Llama 3's RoPE frequency rescaling, as its config.json states it: factor, low_freq_factor,
    # high_freq_factor, original_max_position_embeddings (production.model.rope.llama3_frequencies)
    rope_llama3: dict | None = None
    # RoPE frequencies chosen per layer (an upcycled model keeps the teacher's most important pairs): layer l's
    # rotated dims turn at the frequencies of pairs rope_pairs[l] of a head of rope_source_dim dims
    rope_pairs: list | None = None
    rope_source_dim: int | None = None

    def __post_init__(self):
        if self.attn_mode not in ATTN_MODES:
            raise UserError(f"unknown attn_mode {self.attn_mode!r}; valid: {', '.join(ATTN_MODES)}")
        for name in ("d_model", "n_layer", "n_head", "d_ff", "block_size", "attn_dim", "kv_heads", "vocab_size"):
            if getattr(self, name) < 1:
                raise UserError(f"{name} must be a positive integer, got {getattr(self, name)}")
        if not 0.0 <= self.dropout < 1.0:
            raise UserError(f"dropout must be in [0, 1), got {self.dropout}")
        H = self.n_head
        if self.d_model % H:
            raise UserError(f"n_head={H} does not divide d_model={self.d_model}; pick a divisor of d_model")
        if self.attn_dim % H:
            raise UserError(f"n_head={H} does not divide attn_dim={self.attn_dim}")
        if self.attn_mode in ("standard", "gqa") and self.attn_dim != self.d_model:
            raise UserError(
                f"{self.attn_mode} attention has attn_dim = d_model = {self.d_model}, "
                f"got {self.attn_dim}; use --exp paper_bottleneck for a narrower attention"
            )
        if self.attn_mode == "decoupled":
            if self.sem_dim is None or self.geo_dim is None or self.sem_dim < 1 or self.geo_dim < 1:
                raise UserError("decoupled attention needs positive sem_dim and geo_dim")
            if self.sem_dim + self.geo_dim != self.attn_dim:
                raise UserError(
                    f"decoupled attention needs attn_dim = sem_dim + geo_dim, got "
                    f"{self.attn_dim} != {self.sem_dim} + {self.geo_dim}"
                )
            if self.sem_dim % H or self.geo_dim % H:
                raise UserError(f"n_head={H} must divide sem_dim={self.sem_dim} and geo_dim={self.geo_dim}")
        elif self.sem_dim is not None or self.geo_dim is not None:
            raise UserError(f"sem_dim/geo_dim apply to decoupled attention only, not {self.attn_mode}")
        if self.attn_mode in ("gqa", "decoupled"):  # decoupled is grouped when upcycled from a GQA model
            if H % self.kv_heads:
                raise UserError(f"kv_heads={self.kv_heads} must divide n_head={H}")
            if self.tie_qk and self.kv_heads != H:
                raise UserError(f"tie_qk needs K as wide as Q; {self.attn_mode} with kv_heads < n_head cannot tie")
        elif self.kv_heads != H:
            raise UserError(f"kv_heads applies to gqa and decoupled only; {self.attn_mode} uses n_head = {H}")
        if self.family not in FAMILIES:
            raise UserError(f"unknown block family {self.family!r}; valid: {', '.join(FAMILIES)}")
        if self.family == "gpt" and not self.tie_embeddings:
            raise UserError("the gpt block family ties the head to the token embedding")
        if self.rope_llama3 is not None and set(self.rope_llama3) != set(LLAMA3_ROPE_KEYS):
            raise UserError(f"rope_llama3 needs exactly {', '.join(LLAMA3_ROPE_KEYS)}, got {sorted(self.rope_llama3)}")
        if (self.rope_pairs is None) != (self.rope_source_dim is None):
            raise UserError("rope_pairs and rope_source_dim go together")
        if self.rope_pairs is not None:
            half = self.rope_source_dim // 2
            ok = len(self.rope_pairs) == self.n_layer and all(
                len(p) == self.rope_dim // 2 and len(set(p)) == len(p) and all(0 <= i < half for i in p)
                for p in self.rope_pairs
            )
            if not ok:
                raise UserError(f"rope_pairs needs, per layer, {self.rope_dim // 2} distinct pairs of {half}")
        if self.rope and self.rope_dim % 2:
            raise UserError(f"RoPE needs an even rotated head dim, got {self.rope_dim}")

    @property
    def head_dim(self) -> int:
        """Per-head width of Q, K and V (the concatenated sem+geo width in decoupled mode)."""
        return self.attn_dim // self.n_head

    @property
    def rope_dim(self) -> int:
        """Per-head width that RoPE rotates: the geometric part in decoupled mode, the full head elsewhere."""
        if self.attn_mode == "decoupled":
            return self.geo_dim // self.n_head
        return self.head_dim

    def to_dict(self) -> dict:
        return asdict(self)


def standard_counterpart(cfg: ModelConfig) -> ModelConfig:
    """Standard attention with the same d_model, depth, heads and MLP: the architecture-only baseline."""
    return dataclasses.replace(
        cfg,
        attn_mode="standard",
        attn_dim=cfg.d_model,
        sem_dim=None,
        geo_dim=None,
        kv_heads=cfg.n_head,
        null_attn=False,
        tie_qk=False,
        rope=True,
    )
