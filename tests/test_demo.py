"""The README's main job, exactly as a newcomer runs it: nano decoupled on the embedded corpus, CPU."""

import json
import subprocess
import sys
import time

import pytest

from conftest import REPO


@pytest.mark.slow
def test_nano_demo_starts_fast_finishes_in_minutes_and_learns(tmp_path):
    out = tmp_path / "demo"
    start = time.time()
    proc = subprocess.Popen(
        [
            sys.executable,
            str(REPO / "main.py"),
            "--mode",
            "train",
            "--size",
            "nano",
            "--exp",
            "paper_decoupled",
            "--out-dir",
            str(out),
        ],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    first_step_at = None
    while proc.poll() is None and first_step_at is None:
        log = out / "train.jsonl"
        if log.exists() and '"type": "train"' in log.read_text():
            first_step_at = time.time() - start
        time.sleep(0.1)
    output, _ = proc.communicate(timeout=600)
    wall = time.time() - start
    assert proc.returncode == 0, output
    assert "embedded:shakespeare" in output  # says which data it uses
    rows = [json.loads(line) for line in (out / "train.jsonl").read_text().splitlines()]
    evals = [r for r in rows if r["type"] == "eval"]
    print(
        f"first step logged after {first_step_at:.1f}s, finished in {wall:.0f}s, "
        f"val {evals[0]['val_loss']:.3f} -> {evals[-1]['val_loss']:.3f}"
    )
    assert first_step_at is not None and first_step_at < 15
    assert wall < 300
    assert evals[-1]["val_loss"] <= evals[0]["val_loss"] - 3.0
