"""The one GPU check script, as a CPU smoke run of its sections (--quick --device cpu) and its input errors."""

import json

import pytest

from conftest import assert_user_error, call
from production.bench.gpu import main as bench_gpu


@pytest.mark.slow
def test_quick_run_writes_json_summary_and_targets(tmp_path):
    out = tmp_path / "gpu"
    proc = call(bench_gpu, "--out", out, "--quick", "--device", "cpu", "--sections", "train,decode,mem128k")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    report = json.loads((out / "bench_gpu.json").read_text())
    assert report["schema"] == "dba.bench_gpu/1" and report["plan"] == "quick"
    train = report["sections"]["train"]
    assert set(train["eager"]) == set(train["backends"]) and "compiled" not in train
    assert train["eager"]["paper_baseline"]["ratio_to_standard"] == 1.0
    assert all("math" in b for b in train["backends"].values())  # CPU: the math kernel takes every shape
    rows = report["sections"]["decode"]["rows"]
    # 2 batches x 1 context x (standard fp16 + decoupled fp16 and paper, each torch, fused, fused with graphs)
    assert len(rows) == 2 * 7 and {r["impl"] for r in rows} == {"auto", "triton", "triton+graphs"}
    assert all(r["ms_per_token"] > 0 and r["bandwidth_fraction"] is None for r in rows)
    b2 = next(r for r in rows if r["batch"] == 2 and r["context"] == 100 and r["exp"] == "paper_baseline")
    assert b2["context_bytes"] == 2 * 100 * 64 * 2 * 2  # batch x tokens x (k + v) x 1 layer x fp16
    assert (out / "mem128k.json").exists() and report["sections"]["mem128k"]["context_len"] == 4096
    assert report["targets"]["train_decoupled_over_standard_le_1"].keys() == {"eager"}
    assert report["targets"]["fused_quant_decode_bandwidth_ge_60pct"] is None  # no known bandwidth on CPU
    text = (out / "bench_gpu.txt").read_text()
    assert "decode: ok" in text and "targets:" in text and text == proc.stdout


@pytest.mark.slow
def test_quick_torchrun_section_trains_with_ddp_and_fsdp(tmp_path):
    proc = call(bench_gpu, "--out", tmp_path, "--quick", "--device", "cpu", "--sections", "torchrun")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    section = json.loads((tmp_path / "bench_gpu.json").read_text())["sections"]["torchrun"]
    assert section["ddp"]["returncode"] == 0 and section["fsdp"]["returncode"] == 0
    assert (tmp_path / "torchrun_ddp" / "last.pt").exists() or (tmp_path / "torchrun_ddp" / "best.pt").exists()


def test_bad_requests_are_one_line_errors(tmp_path):
    assert_user_error(call(bench_gpu, "--out", tmp_path, "--sections", "train,nope", "--quick"), "unknown section")
    assert_user_error(call(bench_gpu, "--out", tmp_path, "--device", "cpu"), "needs --quick")
    (tmp_path / "file").write_text("x")
    assert_user_error(call(bench_gpu, "--out", tmp_path / "file", "--quick", "--device", "cpu"), "not a folder")
