import json

import pytest

from conftest import assert_user_error, call, train_tiny
from production.bench.compress import main as bench_compress
from production.bench.decode import main as bench_decode
from production.bench.decode import split_policies


def test_policy_lists_split_on_semicolons_or_repeated_keys():
    assert split_policies("fp16;ksem=q4_0,kgeo=q8_0,v=q4_0,resid=128") == [
        "fp16",
        "ksem=q4_0,kgeo=q8_0,v=q4_0,resid=128",
    ]
    assert split_policies("fp16,k=q8_0@32,v=q8_0@32,resid=0,k=q4_0,v=q4_0") == [
        "fp16",
        "k=q8_0@32,v=q8_0@32,resid=0",
        "k=q4_0,v=q4_0",
    ]
    per_layer = "L0:fp16|L1-3:k=q2_1@64+rot,v=q3_1@64,resid=0"
    assert split_policies(f"fp16;{per_layer};k=q4_0,v=q4_0") == ["fp16", per_layer, "k=q4_0,v=q4_0"]


def test_bench_decode_json_rows():
    args = "--size nano --n-layer 1 --exp paper_decoupled,paper_baseline --context 64,200 --steps 1 --rounds 2 "
    args += "--warmup 0 --chunk 50 --device cpu --json"
    policies = "fp16;ksem=q4_0@32,kgeo=q8_0@32,v=q4_0@32,resid=16"
    proc = call(bench_decode, *args.split(), "--policies", policies)
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    rows = {(r["exp"], r["context"], r["policy"]): r for r in report["results"]}
    # the decoupled policy does not apply to the standard model: 2 contexts x (2 + 1) policies
    assert len(rows) == 6 and ("paper_baseline", 64, "fp16") in rows
    for r in rows.values():
        assert r["ms_per_token"] > 0 and r["cache_bytes"] > 0 and r["gb_s"] > 0
    assert rows[("paper_decoupled", 200, "fp16")]["context_bytes"] == 200 * (16 + 32 + 48) * 2
    assert report["config"]["chunk_tokens"] == 50 and report["device"]["device"] == "cpu"


def test_bench_decode_rejects_bad_context():
    assert_user_error(call(bench_decode, "--context", "0"), "--context needs positive integers")
    assert_user_error(call(bench_decode, "--context", "1k"), "--context needs positive integers")


@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory, token_file):
    return train_tiny(tmp_path_factory.mktemp("compress") / "run", token_file, "--steps", "2", "--eval-iters", "1")


def test_bench_compress_reports_bytes_guard_and_speed_per_policy(tiny_ckpt, tmp_path):
    q2 = "ksem=q2_1@64+rot,kgeo=q2_1@64+ch,v=q2_1@64,resid=0"
    out = tmp_path / "c.json"
    args = [
        "--ckpt",
        tiny_ckpt,
        "--policies",
        f"fp16;{q2};auto;auto-resid0",
        "--context",
        "4096",
        "--decode-context",
        "96",
    ]
    proc = call(bench_compress, *args, "--steps", "1", "--rounds", "1", "--out", out)
    assert proc.returncode == 0, proc.stderr
    assert "| `fp16` | 192.0 | 16.00 | 1.3x |" in proc.stdout  # d_model 64: standard fp16 caches 2 x 64 values
    report = json.loads(out.read_text())
    rows = {r["name"]: r for r in report["rows"]}
    assert rows["fp16"]["decode_vs_fp16"] == 1 and rows["fp16"]["max_abs_logit"] == 0 and rows["fp16"]["passed"]
    r = rows[q2]
    assert r["policy"] == q2 and r["decode_ms_per_token"] > 0 and r["vs_standard_fp16"] > 4
    assert r["bits_per_value"] == pytest.approx(2.5, abs=0.2)  # 2 bits + 32 scale bits per 64, plus rotations
    auto = rows["auto"]
    assert auto["passed"] and auto["policy"] == report["auto"]["auto"]["policy"] and report["sensitivity"]["probes"]
    assert auto["bytes"] <= rows["fp16"]["bytes"] and report["calibration"]["source"].startswith("validation")
    no_window = rows["auto-resid0"]
    assert (
        no_window["passed"]
        and "resid=128" not in no_window["policy"]
        and set(report["auto"]) == {"auto", "auto-resid0"}
    )


def test_bench_compress_checks_policies_first(tiny_ckpt, tmp_path):
    proc = call(bench_compress, "--ckpt", tiny_ckpt, "--policies", "fp16;ksem=q9_0", "--out", tmp_path / "c.json")
    assert_user_error(proc, "unknown KV cache kind 'q9_0'")
    assert not (tmp_path / "c.json").exists()
