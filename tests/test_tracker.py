"""--tracker tensorboard: the run's events read back with TensorBoard's own reader."""

import json

import pytest

from conftest import TINY, assert_user_error, run_main
from production.train import tracker

pytest.importorskip("tensorboard", reason="trackers are an optional install: pip install -r requirements-trackers.txt")
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator  # noqa: E402


def test_tensorboard_mirrors_the_event_log(tmp_path, token_file):
    out = tmp_path / "run"
    args = ["--mode", "train", *TINY, "--data", token_file, "--out-dir", out, "--tracker", "tensorboard"]
    proc = run_main(*args, *"--steps 4 --eval-every 2 --eval-iters 1 --log-every 1 --tracker-group g1".split())
    assert proc.returncode == 0, proc.stderr
    events = [json.loads(line) for line in (out / "train.jsonl").read_text().splitlines()]
    acc = EventAccumulator(str(out / "tensorboard"))
    acc.Reload()
    val = acc.Scalars("eval/val_loss")
    evals = [e for e in events if e["type"] == "eval"]
    assert [s.step for s in val] == [e["step"] for e in evals] == [0, 2, 4]
    assert [s.value for s in val] == pytest.approx([e["val_loss"] for e in evals], rel=1e-6)  # stored as float32
    trains = [e for e in events if e["type"] == "train"]
    assert [s.step for s in acc.Scalars("train/loss")] == [e["step"] for e in trains]
    assert [s.value for s in acc.Scalars("train/loss")] == pytest.approx([e["loss"] for e in trains], rel=1e-6)
    assert acc.Scalars("final/best_val_loss")[0].value == pytest.approx(events[-1]["best_val_loss"], rel=1e-6)
    tags = acc.Tags()["tensors"]  # text summaries are stored as tensors
    assert "config/text_summary" in tags and "group/text_summary" in tags
    assert any(t.startswith("tuner/") for t in tags)


def test_a_missing_tracker_package_is_one_line(tmp_path, token_file, monkeypatch):
    monkeypatch.setattr(tracker, "wandb", None)
    with pytest.raises(Exception, match="pip install wandb"):
        tracker.check_tracker("wandb")
    proc = run_main("--mode", "train", *TINY, "--data", token_file, "--out-dir", tmp_path / "r", "--tracker", "nope")
    assert_user_error(proc, "--tracker")
