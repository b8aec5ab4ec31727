"""Attention surgery: a trained standard or GQA model becomes a (grouped) decoupled one, initialised from the
teacher's weights and activations (docs/ARCHITECTURE.md, "Upcycling").

Per layer, with hd the teacher's head dim (hd/2 RoPE pairs, pair i = dims i and i + hd/2), the student keeps g
geometric and s semantic dims per head and caches s + g values per K/V head for each of K and V:

- **Geometric path**: the g/2 pairs that matter most keep their RoPE, with the teacher's own frequencies (the
  layer's `rope_pairs`). A pair's score is the product of the RMS norms of its query and key 2-vectors on
  calibration tokens, averaged over heads (rotation leaves the norms unchanged), as MHA2MLA's 2-norm partial-RoPE
  selection does (Ji et al. 2025, "Towards Economical Inference: Enabling DeepSeek's Multi-Head Latent Attention
  in Any Transformer-based LLMs").
- **Semantic path**: what the dropped pairs contributed becomes a position-free low-rank product: the top-s right
  singular vectors V of the keys' dropped dims on calibration tokens (per K/V head) project both keys and the
  queries of its group, so q_sem . k_sem = q_d V V^T k_d ~ q_d . k_d (unrotated), MHA2MLA's key-side SVD.
- **Values**: the top-(s + g) right singular vectors U of each K/V head's values on calibration tokens; the
  student's values are v U and the output projection o U, so o U U^T v ~ o v.
- Scales: the student scales its semantic and geometric scores by 1/sqrt(s) and 1/sqrt(g); the teacher scaled
  by 1/sqrt(hd), so the student's queries carry sqrt(s / hd) and sqrt(g / hd).

At full rank (g = hd, every pair kept, s + g >= hd) every step is exact and the student's logits equal the
teacher's: U is orthogonal, and the semantic path, with no dropped dims, starts at zero.
"""

from __future__ import annotations

import dataclasses
import math

import torch

from production.core.errors import UserError
from production.model.config import ModelConfig
from production.model.gpt import GPT

TEACHER_MODES = ("standard", "gqa")


def check_teacher(cfg: ModelConfig) -> None:
    if cfg.attn_mode not in TEACHER_MODES or not cfg.rope or cfg.null_attn or cfg.rope_pairs is not None:
        what = f"{cfg.attn_mode} attention" + (" without RoPE" if not cfg.rope else "")
        what += " with a null token" if cfg.null_attn else ""
        raise UserError(f"a teacher needs standard or GQA attention with RoPE and no null token; this one has {what}")


def dims_for_ratio(cfg: ModelConfig, ratio: float) -> tuple[int, int]:
    """Per-head (sem, geo) whose cache is `ratio` times smaller than the teacher's fp16 K+V (same K/V heads):
    s + g = floor(hd / ratio), about a third semantic, g even."""
    hd = cfg.head_dim
    if not ratio >= 1.0:
        raise UserError(f"--target-kv-ratio {ratio} would cache more than the teacher; use a ratio >= 1")
    total = int(hd / ratio)
    if total < 3:
        raise UserError(f"--target-kv-ratio {ratio} leaves {total} dims per head of {hd}; at most {hd / 3:.1f}")
    geo = min(hd, 2 * round(total * 2 / 3 / 2))
    return total - geo, geo


def student_config(teacher: ModelConfig, sem: int, geo: int, pairs: list[list[int]] | None = None) -> ModelConfig:
    """The teacher's architecture with decoupled attention of `sem` + `geo` dims per head and the same K/V heads."""
    check_teacher(teacher)
    hd, H = teacher.head_dim, teacher.n_head
    if sem < 1 or geo < 2 or geo % 2 or geo > hd:
        raise UserError(
            f"per head, sem_dim must be >= 1 and geo_dim even in 2..{hd} (the teacher's head), got {sem}, {geo}"
        )
    if sem + geo > 2 * hd:
        raise UserError(f"sem + geo = {sem + geo} per head would cache more than the teacher's {hd}")
    return dataclasses.replace(
        teacher,
        attn_mode="decoupled",
        sem_dim=H * sem,
        geo_dim=H * geo,
        attn_dim=H * (sem + geo),
        tie_qk=False,
        null_attn=False,
        rope_pairs=pairs if pairs is not None else [list(range(geo // 2))] * teacher.n_layer,
        rope_source_dim=hd,
    )


@torch.no_grad()
def attention_inputs(model: GPT, ids: torch.Tensor) -> list[torch.Tensor]:
    """Each layer's attention input (the first norm's output) on `ids`, as (tokens, d_model) float32."""
    inputs: list[torch.Tensor] = []
    hooks = [
        b.ln1.register_forward_hook(lambda m, a, out: inputs.append(out.float().flatten(0, 1))) for b in model.blocks
    ]
    try:
        model(ids)
    finally:
        for h in hooks:
            h.remove()
    return inputs


def _heads(weight: torch.Tensor, heads: int) -> torch.Tensor:
    """A projection's weight (heads * hd, d) -> (heads, hd, d)."""
    return weight.view(heads, -1, weight.shape[-1])


def pair_scores(attn, x: torch.Tensor) -> torch.Tensor:
    """(hd/2,) importance of each RoPE pair of one layer: RMS norm of the query pair times that of the key pair
    of the head it reads, averaged over query heads."""
    H, Hkv = attn.n_head, attn.kv_heads
    q = torch.einsum("nd,hed->hne", x, _heads(attn.q.weight.float(), H))  # (H, N, hd)
    k = torch.einsum("nd,hed->hne", x, _heads(attn.k.weight.float(), Hkv))
    half = q.shape[-1] // 2

    def pair_rms(t):  # (heads, N, hd) -> (heads, hd/2)
        return (t[..., :half].square() + t[..., half:].square()).mean(dim=1).sqrt()

    return (pair_rms(q) * pair_rms(k).repeat_interleave(H // Hkv, dim=0)).mean(dim=0)


def top_directions(acts: torch.Tensor, rank: int) -> torch.Tensor:
    """(N, m) activations -> (m, rank) orthonormal top right singular vectors (zero columns past m)."""
    m = acts.shape[1]
    out = torch.zeros(m, rank, dtype=acts.dtype, device=acts.device)
    if m:
        _, _, vh = torch.linalg.svd(acts.double(), full_matrices=False)
        r = min(rank, vh.shape[0])
        out[:, :r] = vh[:r].T.to(acts.dtype)
    return out


@torch.no_grad()
def convert_layer(teacher_attn, student_attn, x: torch.Tensor, pairs: list[int]) -> None:
    """Fill one student attention from the teacher's weights and its input activations x (N, d_model)."""
    H, Hkv = teacher_attn.n_head, teacher_attn.kv_heads
    group = H // Hkv
    Wq, Wk = _heads(teacher_attn.q.weight.float(), H), _heads(teacher_attn.k.weight.float(), Hkv)
    Wv, Wo = _heads(teacher_attn.v.weight.float(), Hkv), teacher_attn.o.weight.float()  # Wo (d, H * hd)
    hd, d = Wq.shape[1], Wq.shape[2]
    s, g = student_attn.sem_head, student_attn.geo_head
    half = hd // 2
    kept = [*pairs, *(i + half for i in pairs)]
    dropped = [i for i in range(hd) if i not in kept]
    q_geo, k_geo = Wq[:, kept] * math.sqrt(g / hd), Wk[:, kept]
    zeros = dict(device=x.device)
    q_sem, k_sem = torch.zeros(H, s, d, **zeros), torch.zeros(Hkv, s, d, **zeros)
    v, o = torch.zeros(Hkv, s + g, d, **zeros), torch.zeros(d, H, s + g, **zeros)
    for j in range(Hkv):
        heads = range(j * group, (j + 1) * group)
        V = top_directions(x @ Wk[j, dropped].T, s)  # (m, s): the keys' dropped dims' main directions
        k_sem[j] = V.T @ Wk[j, dropped]
        for h in heads:
            q_sem[h] = V.T @ Wq[h, dropped] * math.sqrt(s / hd)
        U = top_directions(x @ Wv[j].T, s + g)  # (hd, s + g)
        v[j] = U.T @ Wv[j]
        for h in heads:
            o[:, h] = Wo[:, h * hd : (h + 1) * hd] @ U
    for module, weight in [
        (student_attn.q_sem, q_sem), (student_attn.k_sem, k_sem), (student_attn.q_geo, q_geo),
        (student_attn.k_geo, k_geo), (student_attn.v, v), (student_attn.o, o),
    ]:  # fmt: skip
        module.weight.copy_(weight.reshape(module.weight.shape))


@torch.no_grad()
def upcycle(teacher: GPT, calib_ids: torch.Tensor, sem: int, geo: int) -> tuple[GPT, list[list[int]]]:
    """The student of `teacher` with sem + geo dims per head, every non-attention weight copied; returns it and
    each layer's kept RoPE pairs."""
    check_teacher(teacher.cfg)
    inputs = attention_inputs(teacher.eval(), calib_ids)
    pairs = []
    for block, x in zip(teacher.blocks, inputs, strict=True):
        top = pair_scores(block.attn, x).topk(geo // 2).indices
        pairs.append(sorted(top.tolist()))
    student = GPT(student_config(teacher.cfg, sem, geo, pairs)).to(teacher.head_weight.device)
    shared = {k: v for k, v in teacher.state_dict().items() if ".attn." not in k}
    missing, _ = student.load_state_dict(shared, strict=False)
    assert all(".attn." in k for k in missing), missing
    for t_block, s_block, x, p in zip(teacher.blocks, student.blocks, inputs, pairs, strict=True):
        convert_layer(t_block.attn, s_block.attn, x, p)
    return student.eval(), pairs
