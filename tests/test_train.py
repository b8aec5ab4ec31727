"""main.py --mode train end to end, as a user runs it (subprocesses), on tiny shapes."""

import hashlib
import json
import re

import numpy as np
import pytest
import torch

from conftest import TINY, assert_user_error, run_main, train_tiny

MODEL_FIELDS = {
    "attn_mode",
    "d_model",
    "n_layer",
    "n_head",
    "d_ff",
    "block_size",
    "attn_dim",
    "sem_dim",
    "geo_dim",
    "kv_heads",
    "null_attn",
    "tie_qk",
    "rope",
    "vocab_size",
    "n_params",
}
TRAIN_FIELDS = {"lr", "min_lr", "warmup_steps", "steps", "batch_size", "grad_accum", "eval_every", "eval_iters", "seed"}


def events(run_dir, type_=None):
    rows = [json.loads(line) for line in (run_dir / "train.jsonl").read_text().splitlines()]
    return [r for r in rows if type_ is None or r["type"] == type_]


def digest(run_dir):
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(run_dir.iterdir())}


def test_help():
    proc = run_main("--help")
    assert proc.returncode == 0 and "--exp" in proc.stdout and "--resume" in proc.stdout


def test_steps_zero_resolves_and_writes_config_only(tmp_path, token_file):
    out = tmp_path / "run"
    proc = run_main(
        *"--mode train --size small --exp paper_decoupled --data".split(),
        token_file,
        "--out-dir",
        out,
        *"--steps 0 --device cpu".split(),
    )
    assert proc.returncode == 0, proc.stderr
    assert [p.name for p in out.iterdir()] == ["resolved_config.json"]
    cfg = json.loads((out / "resolved_config.json").read_text())
    assert set(cfg["model"]) >= MODEL_FIELDS and set(cfg["train"]) >= TRAIN_FIELDS
    assert {"data", "runtime"} <= set(cfg)
    m = cfg["model"]
    assert (m["attn_mode"], m["sem_dim"], m["geo_dim"], m["attn_dim"], m["tie_qk"]) == ("decoupled", 48, 96, 144, True)
    assert cfg["data"]["n_tokens"] == 40_000 and cfg["train"]["steps"] == 0
    assert (
        m["n_params"]
        == 50257 * 768 + 12 * (768 * 48 + 2 * 768 * 96 + 2 * 768 * 144 + 2 * 768 * 3072 + 4 * 768) + 2 * 768
    )


def test_training_run_writes_events_and_safe_checkpoints(tmp_path, token_file):
    out = tmp_path / "run"
    proc = run_main(
        "--mode",
        "train",
        *TINY,
        "--exp",
        "paper_decoupled_null",
        "--data",
        token_file,
        "--out-dir",
        out,
        *"--steps 40 --eval-every 20 --eval-iters 2 --lr 3e-3".split(),
    )
    assert proc.returncode == 0, proc.stderr
    assert {p.name for p in out.iterdir()} == {"train.jsonl", "resolved_config.json", "last.pt", "best.pt"}
    types = [e["type"] for e in events(out)]
    assert types[0] == "meta" and types[-1] == "done" and "train" in types
    meta = events(out, "meta")[0]
    assert meta["env"]["torch"] == torch.__version__ and meta["n_params"] == meta["config"]["model"]["n_params"]
    assert "git_commit" in meta["env"] and meta["argv"][:2] == ["--mode", "train"]
    evals = events(out, "eval")
    assert [e["step"] for e in evals] == [0, 20, 40]
    assert evals[-1]["val_loss"] < evals[0]["val_loss"] - 2.0  # the synthetic language is learnable
    assert evals[-1]["best_val_loss"] == min(e["val_loss"] for e in evals)
    train = events(out, "train")[-1]
    assert {"loss", "lr", "tok_s", "ms_per_step", "grad_norm", "tokens_seen"} <= set(train)
    assert train["tokens_seen"] == 40 * 4 * 32
    last = torch.load(out / "last.pt", weights_only=True)
    best = torch.load(out / "best.pt", weights_only=True)
    assert last["step"] == 40 and "optimizer" in last and "optimizer" not in best
    assert best["config"]["model"]["null_attn"] is True


def test_resume_reproduces_the_uninterrupted_run_bit_for_bit(tmp_path, token_file):
    common = [
        "--mode",
        "train",
        *TINY,
        "--exp",
        "paper_decoupled",
        "--data",
        token_file,
        *"--steps 14 --eval-every 5 --eval-iters 2 --log-every 1 --grad-accum 2".split(),
    ]
    full, split = tmp_path / "full", tmp_path / "split"
    assert run_main(*common, "--out-dir", full).returncode == 0
    first = run_main(*common, "--out-dir", split, "--stop-at", "7")  # stops between evals: last.pt at step 7
    assert first.returncode == 0, first.stderr
    assert torch.load(split / "last.pt", weights_only=True)["step"] == 7 and not events(split, "done")
    second = run_main(*common, "--out-dir", split, "--resume")
    assert second.returncode == 0, second.stderr
    strip = [
        (e["type"], e["step"], e.get("loss"), e.get("val_loss"), e.get("grad_norm"))
        for e in events(full)
        if e["type"] in ("train", "eval", "done")
    ]
    got = [
        (e["type"], e["step"], e.get("loss"), e.get("val_loss"), e.get("grad_norm"))
        for e in events(split)
        if e["type"] in ("train", "eval", "done")
    ]
    assert got == strip  # exact float equality, every step
    assert [e["type"] for e in events(split)].count("resume_meta") == 1
    a, b = torch.load(full / "last.pt", weights_only=True), torch.load(split / "last.pt", weights_only=True)
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])


def test_resume_with_another_config_is_refused_and_changes_nothing(tmp_path, token_file):
    out = tmp_path / "run"
    base = [
        "--mode",
        "train",
        *TINY,
        "--exp",
        "paper_decoupled",
        "--data",
        token_file,
        "--out-dir",
        out,
        "--eval-iters",
        "1",
    ]
    assert run_main(*base, "--steps", "2").returncode == 0
    before = digest(out)
    assert_user_error(
        run_main(*base, "--steps", "4", "--resume", "--d-model", "128"), "another model config", "d_model"
    )
    assert_user_error(run_main(*base, "--steps", "4", "--resume", "--lr", "1e-2"), "different recipe", "lr")
    assert_user_error(run_main(*base, "--steps", "4"), "already holds a run", "--resume")
    assert digest(out) == before


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, token_file):
    """A finished one-step run whose files every bad invocation below must leave untouched."""
    return train_tiny(tmp_path_factory.mktemp("earlier") / "run", token_file, "--steps", "1", "--eval-iters", "1")


@pytest.mark.parametrize(
    "case",
    [
        "missing",
        "text",
        "objects",
        "float",
        "too_big_ids",
        "short",
        "size",
        "exp",
        "heads",
        "flag",
        "resume_nothing",
        "device",
    ],
)
def test_bad_input_is_one_line_exit_2_and_nothing_overwritten(tmp_path, token_file, finished_run, case):
    out = finished_run
    before = digest(out)
    bad = tmp_path / "bad.npy"
    data, extra, expect = token_file, [], ""
    if case == "missing":  # the hint is a command that works: --tokens given, the directory kept
        data, expect = tmp_path / "nope.npy", f"prepare_fineweb.py --tokens 100M --output {tmp_path / 'nope.npy'}"
    elif case == "text":
        bad.write_text("a text file named .npy")
        data, expect = bad, "is not a NumPy .npy file"
    elif case == "objects":
        np.save(bad, np.array([{"a": 1}], dtype=object), allow_pickle=True)
        data, expect = bad, "holds Python objects"
    elif case == "float":
        np.save(bad, np.zeros(40_000, dtype=np.float64))
        data, expect = bad, "float64"
    elif case == "too_big_ids":
        np.save(bad, np.full(40_000, 50257, dtype=np.uint16))
        data, expect = bad, "50257 >= vocab_size"
    elif case == "short":
        np.save(bad, np.zeros(60, dtype=np.uint16))
        data, expect = bad, "too short"
    elif case == "size":
        extra, expect = ["--size", "gigantic"], "valid sizes"
    elif case == "exp":
        extra, expect = ["--exp", "paper_nope"], "valid exps"
    elif case == "heads":
        extra, expect = ["--n-head", "5"], "does not divide d_model"
    elif case == "flag":
        extra, expect = ["--stepz", "3"], "unrecognized arguments"
    elif case == "resume_nothing":
        extra, expect = ["--resume", "--resume-path", tmp_path / "none.pt"], "--resume-path"
    elif case == "device":
        extra, expect = ["--device", "cuda:0"] if not torch.cuda.is_available() else ["--device", "tpu"], "--device"
    proc = run_main("--mode", "train", *TINY, "--data", data, "--out-dir", out, "--steps", "1", *extra)
    assert_user_error(proc, expect)
    assert digest(out) == before


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path, token_file):
    out = tmp_path / "run"
    proc = run_main(
        "--mode",
        "train",
        *TINY,
        "--data",
        token_file,
        "--out-dir",
        out,
        *"--steps 30 --eval-every 10 --eval-iters 1 --lr 1e30 --warmup-steps 0 --grad-clip 1e30".split(),
    )
    assert proc.returncode == 1, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert re.match(r"error: training loss is -?(nan|inf) at step \d+", lines[-1]), proc.stderr
    assert "last good state" in lines[-1]
    assert "Traceback" not in proc.stderr
    assert events(out, "error") and not events(out, "done")
    ckpt = torch.load(out / "last.pt", weights_only=True)
    assert all(torch.isfinite(t).all() for t in ckpt["model"].values())
