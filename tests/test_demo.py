"""The README's main job, exactly as a newcomer runs it: nano decoupled on the embedded corpus, CPU. Its speed is
reported (printed), not asserted: timing belongs to benchmarks, and CI machines differ."""

import json
import subprocess
import sys
import time

import pytest

from conftest import REPO


@pytest.mark.slow
def test_nano_demo_runs_on_the_embedded_corpus_and_learns(tmp_path):
    out = tmp_path / "demo"
    command = [sys.executable, str(REPO / "main.py"), *"--mode train --size nano --exp paper_decoupled".split()]
    command += ["--out-dir", str(out), "--tuner-store", str(tmp_path / "tuner.json")]
    start = time.time()
    proc = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=1800)
    wall = time.time() - start
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "embedded:shakespeare" in proc.stdout  # says which data it uses
    rows = [json.loads(line) for line in (out / "train.jsonl").read_text().splitlines()]
    evals = [r for r in rows if r["type"] == "eval"]
    first_step = next(r for r in rows if r["type"] == "train")["time"] - start
    losses = f"val {evals[0]['val_loss']:.3f} -> {evals[-1]['val_loss']:.3f}"
    print(f"first step logged after {first_step:.1f}s, finished in {wall:.0f}s, {losses}")
    assert [e["step"] for e in evals] == [0, 50, 100, 150]
    assert evals[-1]["val_loss"] <= evals[0]["val_loss"] - 3.0
