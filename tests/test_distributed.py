"""torchrun on CPU with gloo, 2 processes, tiny shapes: DDP and FSDP2 against the single-process run."""

import json
import socket
import subprocess
import sys

import pytest
import torch

from conftest import REPO, run_main
from production.tune.training import distributed_split

TINY_DIST = (
    "--size nano --n-layer 1 --d-model 64 --d-ff 128 --block 32 --batch-size 4 --grad-accum 2 "
    "--device cpu --steps 6 --eval-every 3 --eval-iters 2 --log-every 1"
).split()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(*args, nproc=2):
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        str(nproc),
        "--master_addr",
        "127.0.0.1",
        "--master_port",
        str(free_port()),
        str(REPO / "main.py"),
        *map(str, args),
    ]
    return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)


def trajectory(run_dir):
    rows = [json.loads(line) for line in (run_dir / "train.jsonl").read_text().splitlines()]
    return (
        [r["loss"] for r in rows if r["type"] == "train"],
        [r["val_loss"] for r in rows if r["type"] == "eval"],
        rows,
    )


@pytest.fixture(scope="module")
def single(tmp_path_factory, token_file):
    out = tmp_path_factory.mktemp("single") / "run"
    proc = run_main(
        "--mode", "train", *TINY_DIST, "--data", token_file, "--out-dir", out, "--tuner-store", out.parent / "t.json"
    )
    assert proc.returncode == 0, proc.stderr
    return out


@pytest.mark.parametrize("strategy", ["ddp", pytest.param("fsdp", marks=pytest.mark.slow)])
def test_two_ranks_match_the_single_process_run_and_only_rank0_writes(tmp_path, token_file, single, strategy):
    out = tmp_path / "run"
    proc = torchrun(
        "--mode",
        "train",
        *TINY_DIST,
        "--data",
        token_file,
        "--out-dir",
        out,
        "--dist",
        strategy,
        "--tuner-store",
        tmp_path / "t.json",
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    losses, vals, rows = trajectory(out)
    ref_losses, ref_vals, _ = trajectory(single)
    torch.testing.assert_close(losses, ref_losses, rtol=1e-5, atol=1e-5)  # same global batch, fp32
    torch.testing.assert_close(vals, ref_vals, rtol=1e-5, atol=1e-5)
    assert sorted(p.name for p in out.iterdir()) == ["best.pt", "last.pt", "resolved_config.json", "train.jsonl"]
    steps = [r["step"] for r in rows if r["type"] == "train"]
    assert steps == sorted(set(steps))  # one writer: no duplicated events
    meta = rows[0]
    assert meta["env"]["world_size"] == 2 and meta["env"]["dist"] == strategy
    assert proc.stdout.count("done: step 6") == 1  # only rank 0 prints
    # the checkpoint is a full state dict that a single process loads and samples from
    sample = run_main(
        "--mode",
        "sample",
        "--ckpt",
        out / "best.pt",
        "--prompt-tokens",
        "1 2 3",
        *"--max-new-tokens 3 --kv-policy fp16 --device cpu".split(),
    )
    assert sample.returncode == 0, sample.stderr
    ckpt = torch.load(out / "last.pt", weights_only=True)
    assert set(ckpt["model"]) == set(torch.load(single / "last.pt", weights_only=True)["model"])


@pytest.mark.slow
def test_resume_across_world_sizes(tmp_path, token_file, single):
    ref_losses, ref_vals, _ = trajectory(single)
    a = tmp_path / "two_then_one"
    assert (
        torchrun(
            "--mode",
            "train",
            *TINY_DIST,
            "--data",
            token_file,
            "--out-dir",
            a,
            "--stop-at",
            "4",
            "--tuner-store",
            tmp_path / "t.json",
        ).returncode
        == 0
    )
    proc = run_main(
        "--mode",
        "train",
        *TINY_DIST,
        "--data",
        token_file,
        "--out-dir",
        a,
        "--resume",
        "--tuner-store",
        tmp_path / "t.json",
    )
    assert proc.returncode == 0, proc.stderr
    b = tmp_path / "one_then_two"
    assert (
        run_main(
            "--mode",
            "train",
            *TINY_DIST,
            "--data",
            token_file,
            "--out-dir",
            b,
            "--stop-at",
            "2",
            "--tuner-store",
            tmp_path / "t.json",
        ).returncode
        == 0
    )
    proc = torchrun(
        "--mode",
        "train",
        *TINY_DIST,
        "--data",
        token_file,
        "--out-dir",
        b,
        *"--resume --dist fsdp --tuner-store".split(),
        tmp_path / "t.json",
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    for run in (a, b):
        losses, vals, rows = trajectory(run)
        torch.testing.assert_close(losses, ref_losses, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(vals, ref_vals, rtol=1e-5, atol=1e-5)
        assert [r["type"] for r in rows].count("resume_meta") == 1


def test_micro_batch_split_keeps_the_global_batch():

    assert distributed_split(8, 1, 2) == (4, 2)  # small's recipe on 2 GPUs: 2 micro-batches of 4
    assert distributed_split(2, 8, 8) == (2, 8) and distributed_split(2, 8, 16) == (1, 16)
    with pytest.raises(ValueError):
        distributed_split(3, 1, 2)


def test_distributed_input_errors(tmp_path, token_file):
    proc = torchrun(
        "--mode",
        "train",
        *TINY_DIST,
        *"--batch-size 3 --grad-accum 1 --data".split(),
        token_file,
        "--out-dir",
        tmp_path,
    )
    assert proc.returncode != 0 and "does not divide over 2 ranks" in proc.stderr
    assert proc.stderr.count("error: the global batch") == 1  # reported once, by rank 0
    single = run_main("--mode", "train", *TINY_DIST, "--data", token_file, "--out-dir", tmp_path / "x", "--dist", "ddp")
    assert single.returncode == 2 and "needs a torchrun launch" in single.stderr


@pytest.mark.slow
def test_manifest_runner_launches_torchrun(tmp_path, token_file):
    overrides = {
        "n_layer": 1,
        "d_model": 64,
        "d_ff": 128,
        "block_size": 32,
        "batch_size": 4,
        "eval_every": 3,
        "eval_iters": 1,
    }
    run = {
        "id": "dist",
        "exp": "paper_decoupled",
        "size": "nano",
        "seed": 1,
        "steps": 3,
        "expected": {"attn_mode": "decoupled"},
    }
    groups = [{"name": "g", "description": "t", "data": str(token_file), "overrides": overrides, "runs": [run]}]
    (tmp_path / "m.json").write_text(json.dumps({"version": 2, "groups": groups}))
    proc = subprocess.run(
        [
            sys.executable,
            str(REPO / "run_paper_manifest.py"),
            "--manifest",
            str(tmp_path / "m.json"),
            "--group",
            "g",
            "--runs-dir",
            str(tmp_path / "runs"),
            *"--device cpu --nproc-per-node 2 --dist fsdp --master-port".split(),
            str(free_port()),
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    command = (tmp_path / "runs" / "dist" / "command.txt").read_text()
    assert "-m torch.distributed.run --nproc_per_node 2" in command and "--dist fsdp" in command
    meta = json.loads((tmp_path / "runs" / "dist" / "train.jsonl").read_text().splitlines()[0])
    assert meta["env"]["world_size"] == 2 and meta["env"]["dist"] == "fsdp"
