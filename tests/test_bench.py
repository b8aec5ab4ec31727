import json
import subprocess
import sys

from conftest import REPO


def test_bench_train_json_reports_every_mode_with_ratios():
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "production.bench_train",
            "--size",
            "nano",
            "--n-layer",
            "1",
            "--d-model",
            "64",
            "--d-ff",
            "128",
            "--block",
            "32",
            "--batch-size",
            "2",
            "--steps",
            "2",
            "--warmup",
            "1",
            "--device",
            "cpu",
            "--json",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    assert set(report["modes"]) == {"standard", "bottleneck", "decoupled", "gqa"}
    for r in report["modes"].values():
        assert r["ms_per_step"] > 0 and r["tok_s"] == 2 * 32 / (r["ms_per_step"] / 1000)
    assert report["modes"]["standard"]["ratio_to_standard"] == 1.0
    assert report["device"]["device"] == "cpu" and report["config"]["block_size"] == 32


def test_bench_train_rejects_unknown_mode():
    proc = subprocess.run(
        [sys.executable, "-m", "production.bench_train", "--modes", "standard,flash"],
        cwd=REPO,
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 2 and proc.stderr.startswith("error: unknown mode") and "Traceback" not in proc.stderr
