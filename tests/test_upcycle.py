"""Upcycling: the surgery's exact start at full rank (this harness's standard and GQA models, a Hugging Face
Llama), and the compressed student's shapes and cache."""

import json

import pytest
import torch

from conftest import assert_user_error, call, run_main, train_tiny
from production.bench.memory import main as bench_memory
from production.config.build import resolve_model
from production.core.errors import UserError
from production.model.attention import cache_widths
from production.model.gpt import GPT
from production.upcycle.run import parse_targets
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


@pytest.fixture(scope="module")
def tiny_teacher(tmp_path_factory, token_file):
    out = tmp_path_factory.mktemp("upcycle") / "teacher"
    return train_tiny(out, token_file, "--exp", "paper_baseline", "--steps", "3", "--eval-iters", "1",
                      "--tuner-store", out.parent / "t.json")  # fmt: skip


@pytest.mark.slow
def test_upcycle_mode_writes_runs_report_and_figure(tiny_teacher, token_file, tmp_path):
    out = tmp_path / "up"
    args = ["--mode", "upcycle", "--teacher", tiny_teacher, "--data", token_file, "--out-dir", out, "--device", "cpu",
            "--sem-dim", "8", "--geo-dim", "16", "--steps", "4", "--layer-steps", "2",
            "--eval-every", "2", "--eval-iters", "1", "--batch-size", "2",
            "--tuner-store", tmp_path / "t.json"]  # fmt: skip
    proc = run_main(*args)
    assert proc.returncode == 0, proc.stderr
    report = json.loads((out / "upcycle.json").read_text())
    assert report["schema"] == "dba.upcycle/1" and report["teacher"]["attn_mode"] == "standard"
    assert [r["target"] for r in report["targets"]] == ["sem8_geo16"]
    for row in report["targets"]:
        assert row["kv_bytes_per_token"]["teacher_fp16"] == 2 * 64 * 2  # k + v, 1 layer of 64, fp16
        assert row["ppl_ratio"]["after_surgery"] > 0 and row["ppl_ratio"]["after_distill"] > 0
        assert row["steps"] == {"layer": 2, "total": 4} and row["kv_ratio_vs_teacher_fp16"]["student_policy"] > 2
        assert (
            row["logit_error"]["after_surgery"]["kl"] >= 0 and row["logit_error"]["after_distill"]["max_abs_logit"] > 0
        )
    assert report["targets"][0]["kv_ratio_vs_teacher_fp16"]["student_fp16"] == 16 / 6  # per head: 2 + 4 of 16
    events = [json.loads(line)["type"] for line in (out / "sem8_geo16" / "train.jsonl").read_text().splitlines()]
    assert events[0] == "meta" and "eval" in events and events[-1] == "done"
    assert (out / "upcycle.png").read_bytes()[:4] == b"\x89PNG"
    # an upcycled checkpoint evaluates like any other
    run = out / "sem8_geo16"
    proc = run_main("--mode", "eval", "--ckpt", run, "--device", "cpu", "--lengths", "1", "--windows", "1",
                    "--kv-policy", "fp16", "--passkey-trials", "0", "--json")  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    # and its 128k memory record, against the teacher as the trained baseline
    mem = out / "mem128k.json"
    args_mem = ["--ckpt", run, "--baseline-ckpt", tiny_teacher, "--decompose", "--device", "cpu", "--out", mem]
    proc = call(bench_memory, *args_mem, "--context-len", "4096")
    assert proc.returncode == 0, proc.stderr
    assert json.loads(mem.read_text())["decomposition"]["ratios"]["arch"]["estimate"] == 16 / 6
    # the same command again is refused, nothing overwritten; --resume picks the finished runs up
    before = (out / "upcycle.json").read_bytes()
    assert_user_error(run_main(*args), "already holds a run; pass --resume")
    assert (out / "upcycle.json").read_bytes() == before
    assert run_main(*args, "--resume").returncode == 0


def test_bad_upcycle_requests(tiny_teacher, tmp_path):
    base = ["--mode", "upcycle", "--device", "cpu", "--out-dir", tmp_path / "x"]
    assert_user_error(run_main(*base, "--target-kv-ratio", "2"), "needs --teacher")
    assert_user_error(run_main(*base, "--teacher", tmp_path / "nope", "--target-kv-ratio", "2"), "does not exist")
    assert_user_error(run_main(*base, "--teacher", tiny_teacher), "needs --target-kv-ratio")
    assert_user_error(run_main(*base, "--teacher", tiny_teacher, "--target-kv-ratio", "0.5"), "cache more than")
    assert_user_error(run_main(*base, "--teacher", tiny_teacher, "--target-kv-ratio", "x"), "needs numbers")
    empty = tmp_path / "empty"
    empty.mkdir()
    assert_user_error(run_main(*base, "--teacher", empty, "--target-kv-ratio", "2"), "best.pt")
    assert not (tmp_path / "x").exists()


def test_targets_from_ratios_and_dims():
    cfg = resolve_model("nano", "paper_baseline", {})  # 4 heads of 64
    targets = parse_targets(cfg, "2,5.33", 16, 32)
    assert [(t.label, t.sem, t.geo) for t in targets] == [("2x", 10, 22), ("5.33x", 4, 8), ("sem16_geo32", 4, 8)]
    with pytest.raises(UserError, match="multiples of it"):
        parse_targets(cfg, None, 6, 32)
