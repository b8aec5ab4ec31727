"""main.py --mode export: a checkpoint as model.safetensors + config.json, loadable wherever a checkpoint is."""

import json

import pytest
import torch

from conftest import TINY, assert_user_error, run_main
from production.train import checkpoint
from production.train.checkpoint import load_model

pytest.importorskip("safetensors", reason="exports are an optional install: pip install -r requirements-export.txt")


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, token_file):
    out = tmp_path_factory.mktemp("export") / "run"
    args = ["--mode", "train", *TINY, "--exp", "paper_decoupled_null", "--data", token_file, "--out-dir", out]
    proc = run_main(*args, *"--steps 3 --eval-every 3 --eval-iters 1".split())
    assert proc.returncode == 0, proc.stderr
    return out


def test_export_round_trip_gives_identical_logits_and_samples(tmp_path, run_dir):
    out = tmp_path / "export"
    proc = run_main("--mode", "export", "--ckpt", run_dir, "--out", out)
    assert proc.returncode == 0, proc.stderr
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors"]
    (tmp_path / "plain").write_text("")  # exports are as readable as any file the user writes
    assert (out / "model.safetensors").stat().st_mode == (tmp_path / "plain").stat().st_mode
    record = json.loads((out / "config.json").read_text())
    best = torch.load(run_dir / "best.pt", weights_only=True)
    assert record["format"] == "dba.export/1" and record["step"] == best["step"]
    assert record["config"]["model"] == best["config"]["model"] and "git_commit" in record
    original, _ = load_model(run_dir / "best.pt")
    exported, ckpt = load_model(out)
    x = torch.randint(0, 50257, (2, 32), generator=torch.Generator().manual_seed(0))
    assert torch.equal(original(x)[0], exported(x)[0]) and ckpt["step"] == best["step"]
    sample = ["--mode", "sample", "--prompt-tokens", "5 6 7", "--max-new-tokens", "6", "--greedy", "--json"]
    a = json.loads(run_main(*sample, "--ckpt", run_dir / "best.pt", "--kv-policy", "fp16").stdout)
    b = json.loads(run_main(*sample, "--ckpt", out, "--kv-policy", "fp16").stdout)
    assert a["generated_ids"] == b["generated_ids"] and b["ckpt"].endswith("model.safetensors")


def test_export_refuses_a_non_empty_directory_unless_forced(tmp_path, run_dir):
    out = tmp_path / "export"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    assert_user_error(run_main("--mode", "export", "--ckpt", run_dir, "--out", out), "not empty", "--force")
    assert [p.name for p in out.iterdir()] == ["notes.txt"]
    assert run_main("--mode", "export", "--ckpt", run_dir, "--out", out, "--force").returncode == 0
    assert (out / "notes.txt").read_text() == "mine" and (out / "model.safetensors").exists()


def test_bad_export_input_is_one_line(tmp_path, run_dir, monkeypatch):
    assert_user_error(run_main("--mode", "export", "--ckpt", run_dir), "needs --ckpt", "--out")
    assert_user_error(run_main("--mode", "export", "--ckpt", run_dir, "--out", tmp_path / "e", "--device", "cpu"))
    half = tmp_path / "half"
    assert run_main("--mode", "export", "--ckpt", run_dir, "--out", half).returncode == 0
    (half / "config.json").unlink()
    proc = run_main("--mode", "sample", "--ckpt", half, "--prompt", "a")
    assert_user_error(proc, "lacks config.json")
    monkeypatch.setattr(checkpoint, "safetensors_torch", None)
    proc = run_main("--mode", "export", "--ckpt", run_dir, "--out", tmp_path / "none")
    assert_user_error(proc, "pip install -r requirements-export.txt")
