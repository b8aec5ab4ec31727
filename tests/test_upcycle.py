"""Upcycling: the surgery's exact start at full rank (this harness's standard and GQA models, a Hugging Face
Llama), and the compressed student's shapes and cache."""

import pytest
import torch

from production.config.build import resolve_model
from production.core.errors import UserError
from production.model.attention import cache_widths
from production.model.gpt import GPT
from production.upcycle.surgery import dims_for_ratio, student_config, upcycle


def teacher(exp: str) -> GPT:
    torch.manual_seed(0)
    model = GPT(resolve_model("nano", exp, {"n_layer": 2})).eval()
    with torch.no_grad():  # sharper attention than at init, so a wrong score shows
        for name, p in model.named_parameters():
            if ".attn.q" in name or ".attn.k" in name:
                p.mul_(8)
    return model


@pytest.mark.parametrize("exp", ["paper_baseline", "paper_gqa"])
def test_full_rank_student_equals_the_teacher(exp):
    t = teacher(exp)
    ids = torch.randint(0, 50257, (2, 48))
    hd = t.cfg.head_dim
    student, pairs = upcycle(t, ids, sem=2, geo=hd)
    assert student.cfg.attn_mode == "decoupled" and student.cfg.kv_heads == t.cfg.kv_heads
    assert pairs == [list(range(hd // 2))] * 2
    other = torch.randint(0, 50257, (2, 40))
    with torch.no_grad():
        torch.testing.assert_close(student(other)[0], t(other)[0], atol=1e-5, rtol=1e-5)


def test_compressed_student_keeps_the_best_pairs_per_layer():
    t = teacher("paper_gqa")  # 4 query heads, 1 K/V head of 64 dims
    sem, geo = dims_for_ratio(t.cfg, 64 / 12)
    assert (sem, geo) == (4, 8)
    student, pairs = upcycle(t, torch.randint(0, 50257, (4, 64)), sem, geo)
    assert all(len(p) == 4 and p == sorted(p) for p in pairs) and student.cfg.rope_pairs == pairs
    widths = cache_widths(student.cfg)
    assert widths == {"k_sem": 4, "k_geo": 8, "v": 12}  # vs the teacher's k 64 + v 64: 128 / 24 = 5.3x
    ids = torch.randint(0, 50257, (1, 30))
    with torch.no_grad():
        logits, _ = student(ids)
    assert torch.isfinite(logits).all()


def test_bad_requests():
    cfg = resolve_model("nano", "paper_baseline", {})
    with pytest.raises(UserError, match="would cache more than the teacher"):
        dims_for_ratio(cfg, 0.5)
    with pytest.raises(UserError, match="standard or GQA attention"):
        student_config(resolve_model("nano", "paper_decoupled", {}), 4, 8)
    with pytest.raises(UserError, match="geo_dim even"):
        student_config(cfg, 4, 7)
