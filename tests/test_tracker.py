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


def wandb_records(path):
    """The records of an offline W&B run file: a 7-byte header (":W&B", magic, version), then LevelDB-log records
    (crc 4 bytes, length 2, type 1: full, first, middle, last) in 32 KiB blocks, each a wandb Record protobuf."""
    from wandb.proto.wandb_internal_pb2 import Record

    data, block = path.read_bytes(), 32768
    assert data[:4] == b":W&B"
    pos, pending, records = 7, b"", []
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a header is padding
            pos += block - pos % block
            continue
        length, kind = int.from_bytes(data[pos + 4 : pos + 6], "little"), data[pos + 6]
        pending += data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # a full record, or the last part of one
            records.append(Record.FromString(pending))
            pending = b""
    return records


def test_wandb_offline_logs_the_same_events(tmp_path, token_file, monkeypatch):
    pytest.importorskip("wandb", reason="an optional install: pip install -r requirements-trackers.txt")
    for name in ("WANDB_DIR", "WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR"):
        monkeypatch.setenv(name, str(tmp_path / "wandb-home"))
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    out = tmp_path / "run"
    args = ["--mode", "train", *TINY, "--data", token_file, "--out-dir", out, "--tracker", "wandb"]
    proc = run_main(*args, *"--steps 4 --eval-every 2 --eval-iters 1 --log-every 1 --tracker-group g1".split())
    assert proc.returncode == 0, proc.stderr
    (run_file,) = (out / "wandb").glob("offline-run-*/run-*.wandb")
    records = wandb_records(run_file)
    (run,) = [r.run for r in records if r.WhichOneof("record_type") == "run"]
    assert run.run_group == "g1" and run.display_name == "run" and run.project == "dba"
    config = {item.key: json.loads(item.value_json) for item in run.config.update}
    assert config["model"]["attn_mode"] == "decoupled" and config["model"]["n_layer"] == 1
    key = lambda item: item.key or "/".join(item.nested_key)  # noqa: E731
    history = [{key(i): json.loads(i.value_json) for i in r.history.item} for r in records if r.HasField("history")]
    events = [json.loads(line) for line in (out / "train.jsonl").read_text().splitlines()]
    val = [(h["_step"], h["eval/val_loss"]) for h in history if "eval/val_loss" in h]
    assert val == [(e["step"], pytest.approx(e["val_loss"])) for e in events if e["type"] == "eval"]
    updates = [i for r in records if r.HasField("summary") for i in r.summary.update]
    summary = {key(i): json.loads(i.value_json) for i in updates}
    assert summary["final/best_val_loss"] == pytest.approx(events[-1]["best_val_loss"])
    assert any(k.startswith("tuner/") for k in summary)
