"""A golden loss curve: a fixed-seed nano run's logged losses, pinned. It catches any change to the numbers a
run produces (model math, init, data order, optimizer, schedule) that the unit tests would let through.

When the math changes on purpose, regenerate the file and commit it with the change:
    python -m pytest -q tests/test_golden.py --update-golden
"""

import json
import re
from pathlib import Path

import pytest

from conftest import run_main

GOLDEN = Path(__file__).parent / "golden" / "nano_loss_curve.json"
# nano, narrowed to two layers of width 128, on the synthetic token file: 30 steps, every loss logged, 3 evals
ARGS = "--size nano --exp paper_decoupled --n-layer 2 --d-model 128 --d-ff 512 --block 64 --batch-size 4"
ARGS += " --steps 30 --eval-every 15"
ARGS += " --eval-iters 2 --log-every 1 --lr 2e-3 --seed 7 --device cpu --no-compile"
# float32 on CPU: BLAS builds differ in summation order, which moves losses by ~1e-6 at first and more as the
# run goes on; 2e-3 nats absorbs that while any real change (one init, one step of data) moves them far more.
ATOL = 2e-3


def test_nano_loss_curve_matches_the_golden_file(tmp_path, token_file, request):
    paths = ["--data", token_file, "--out-dir", tmp_path / "run", "--tuner-store", tmp_path / "tuner.json"]
    proc = run_main("--mode", "train", *ARGS.split(), *paths)
    assert proc.returncode == 0, proc.stderr
    events = [json.loads(line) for line in (tmp_path / "run" / "train.jsonl").read_text().splitlines()]
    curve = {
        "args": ARGS,
        "train": [[e["step"], e["loss"]] for e in events if e["type"] == "train"],
        "eval": [[e["step"], e["val_loss"]] for e in events if e["type"] == "eval"],
    }
    if request.config.getoption("--update-golden"):
        GOLDEN.parent.mkdir(exist_ok=True)
        text = re.sub(r"\[\s+(\S+),\s+(\S+)\s+\]", r"[\1, \2]", json.dumps(curve, indent=2))  # one [step, loss] a line
        GOLDEN.write_text(text + "\n")
        pytest.skip(f"wrote {GOLDEN}")
    golden = json.loads(GOLDEN.read_text())
    assert golden["args"] == ARGS, "the golden run's arguments changed: regenerate it (see the docstring)"
    for kind in ("train", "eval"):
        assert [s for s, _ in curve[kind]] == [s for s, _ in golden[kind]]
        got, want = [v for _, v in curve[kind]], [v for _, v in golden[kind]]
        assert got == pytest.approx(want, abs=ATOL), kind
    assert curve["eval"][-1][1] < curve["eval"][0][1] - 1.0  # and the run learns
