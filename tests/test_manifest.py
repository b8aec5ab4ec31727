"""paper_manifest.json against the config code, and run_paper_manifest.py end to end on a tiny manifest."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

import run_paper_manifest
from conftest import REPO, call, run_main
from production.core.errors import UserError
from production.paper.manifest import load_manifest, plan_runs, select_runs
from production.paper.results import collect_run

TINY = {"n_layer": 1, "d_model": 64, "d_ff": 128, "block_size": 32, "batch_size": 4, "eval_every": 4, "eval_iters": 1}


def run_manifest(*args):
    """run_paper_manifest.py, in this process (its training runs are main.py subprocesses, as for users)."""
    return call(run_paper_manifest.main, *args)


def test_shipped_manifest_resolves_and_every_expected_holds(tmp_path):
    manifest, sha = load_manifest(REPO / "paper_manifest.json")
    assert manifest["version"] == 2 and len(sha) == 64
    ids = {}
    for group in ("mac_fw100m", "a100_fw1b_1bscale", "cpu_smoke"):
        g, runs = select_runs(manifest, group, None)
        plans = plan_runs(manifest, g, runs, tmp_path, "cpu")
        ids[group] = [p.id for p in plans]
        for p in plans:
            assert p.resolved["train"]["steps"] == p.spec["steps"] and p.resolved["train"]["seed"] == p.spec["seed"]
    mac = set(ids["mac_fw100m"])
    expect = {
        f"mac_fw100m_l12_{v}_s{s}" for v in ("baseline", "bottleneck", "decoupled", "gqa") for s in (1337, 1338, 1339)
    }
    expect |= {f"mac_fw100m_l12_baseline_lr{lr}_s1337" for lr in ("2e4", "3e4", "4e4")}
    expect |= {"mac_fw100m_l12_baseline_12000_s1337", "mac_fw100m_l12_decoupled_12000_s1337"}
    expect |= {f"mac_fw100m_l12_decoupled_{a}_s1337" for a in ("null", "notieqk", "norope")}
    assert mac == expect and len(ids["mac_fw100m"]) == 20
    assert ids["a100_fw1b_1bscale"] == ["a100_fw1b_l22_baseline_s1337", "a100_fw1b_l22_decoupled_s1337"]
    assert len(ids["cpu_smoke"]) == 4
    g, runs = select_runs(manifest, "mac_fw100m", ["mac_fw100m_l12_decoupled_12000_s1337"])
    assert plan_runs(manifest, g, runs, tmp_path, "cpu")[0].resolved["train"]["steps"] == 12000
    g, runs = select_runs(manifest, "a100_fw1b_1bscale", None)
    assert all(p.resolved["model"]["n_layer"] == 22 for p in plan_runs(manifest, g, runs, tmp_path, "cpu"))


def write_manifest(path, runs, data=None, group="g"):
    groups = [{"name": group, "description": "test", "data": data, "runs": runs}]
    path.write_text(json.dumps({"version": 2, "defaults": {"overrides": TINY}, "groups": groups}))
    return path


def spec(id_, exp="paper_decoupled", **kw):
    return {"id": id_, "exp": exp, "size": "nano", "seed": 1, "steps": 8, "expected": {"attn_mode": "decoupled"}, **kw}


@pytest.mark.parametrize(
    "change,match",
    [
        ({"expected": {"attn_mode": "standard"}}, "expected attn_mode = 'standard', but it resolves to 'decoupled'"),
        ({"expected": {"flux": 3}}, "expected field 'flux' is not a resolved-config field"),
        ({"exp": "paper_turbo"}, "unknown exp 'paper_turbo'"),
        ({"overrides": {"warp": 9}}, "unknown override 'warp'"),
        ({"overrides": {"n_head": 3}}, "n_head=3 does not divide d_model"),
    ],
)
def test_bad_runs_are_clear_errors_before_anything_trains(tmp_path, change, match):
    m = write_manifest(tmp_path / "m.json", [spec("a"), {**spec("b"), **change}])
    manifest, _ = load_manifest(m)
    g, runs = select_runs(manifest, "g", None)
    with pytest.raises(UserError, match="run b: " + match.replace("(", r"\(").replace(")", r"\)")):
        plan_runs(manifest, g, runs, tmp_path / "runs", "cpu")
    proc = run_manifest("--manifest", m, "--group", "g", "--runs-dir", tmp_path / "runs")
    assert proc.returncode == 2 and "run b:" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "runs").exists()  # nothing trained, nothing written


def test_missing_group_run_and_manifest(tmp_path):
    m = write_manifest(tmp_path / "m.json", [spec("a")])
    assert "groups: g" in run_manifest("--manifest", m, "--group", "nope").stderr
    assert "not in group g" in run_manifest("--manifest", m, "--group", "g", "--only", "zz").stderr
    assert "does not exist" in run_manifest("--manifest", tmp_path / "no.json", "--group", "g").stderr
    (tmp_path / "bad.json").write_text("{not json")
    assert "not valid JSON" in run_manifest("--manifest", tmp_path / "bad.json", "--group", "g").stderr


def test_dry_run_trains_nothing_and_names_missing_data(tmp_path):
    m = write_manifest(tmp_path / "m.json", [spec("a")], data=str(tmp_path / "fineweb_100m.npy"))
    proc = run_manifest("--manifest", m, "--group", "g", "--dry-run", "--runs-dir", tmp_path / "runs")
    assert proc.returncode == 0, proc.stderr
    assert "MISSING" in proc.stdout and "main.py --mode train --size nano --exp paper_decoupled" in proc.stdout
    assert not (tmp_path / "runs").exists()
    real = run_manifest("--manifest", m, "--group", "g", "--runs-dir", tmp_path / "runs")
    assert real.returncode == 2 and "does not exist" in real.stderr


@pytest.mark.slow  # three trainings, their memory reports and an evaluation as subprocesses: about 30 s
def test_runs_with_provenance_then_skip_resume_and_survive_a_failure(tmp_path, token_file):
    runs_dir = tmp_path / "runs"
    m = write_manifest(
        tmp_path / "m.json",
        [
            spec("ok"),
            spec("partial", exp="paper_baseline", expected={"attn_mode": "standard"}),
            spec("boom", overrides={"lr": 1e30, "warmup_steps": 0, "grad_clip": 1e30}),
        ],
        data=str(token_file),
    )
    # an interrupted run: stopped at step 3 with a last.pt, as if killed mid-way
    partial = run_main(
        *"--mode train --size nano --exp paper_baseline --seed 1 --steps 8 --out-dir".split(),
        runs_dir / "partial",
        "--device",
        "cpu",
        "--data",
        token_file,
        *"--n-layer 1 --d-model 64 --d-ff 128 --block 32 --batch-size 4".split(),
        *"--eval-every 4 --eval-iters 1 --stop-at 3".split(),
    )
    assert partial.returncode == 0, partial.stderr
    proc = run_manifest("--manifest", m, "--group", "g", "--runs-dir", runs_dir, "--device", "cpu", "--post-mem128k")
    assert proc.returncode == 1, proc.stdout + proc.stderr  # one run failed
    table = proc.stdout[proc.stdout.index("\ngroup g: 3 run(s)") :].strip().split("\n", 1)[1]
    assert " done " in table.splitlines()[1] and " resumed " in table.splitlines()[2]
    assert " failed " in table.splitlines()[3] and "training loss is nan" in table.splitlines()[3]
    ok = runs_dir / "ok"
    cmd = (ok / "command.txt").read_text()
    assert "main.py --mode train --size nano --exp paper_decoupled --seed 1 --steps 8" in cmd
    prov = json.loads((ok / "resolved_run.json").read_text())
    assert {"git_commit", "git_dirty", "python", "torch", "device", "manifest_sha256", "started"} <= set(prov)
    assert prov["status"] == "done" and prov["manifest_sha256"] == load_manifest(m)[1]
    assert json.loads((ok / "resolved_config.json").read_text())["model"]["attn_mode"] == "decoupled"
    mem = json.loads((ok / "mem128k.json").read_text())
    assert "decomposition" in mem  # decoupled runs get --decompose
    assert "decomposition" not in json.loads((runs_dir / "partial" / "mem128k.json").read_text())

    types = [json.loads(line)["type"] for line in (runs_dir / "partial" / "train.jsonl").read_text().splitlines()]
    assert types.count("meta") == 1 and types.count("resume_meta") == 1 and types[-1] == "done"  # resumed
    assert "--resume" in (runs_dir / "partial" / "command.txt").read_text()
    assert json.loads((runs_dir / "boom" / "resolved_run.json").read_text())["status"] == "failed"
    again = run_manifest(
        "--manifest", m, "--group", "g", "--runs-dir", runs_dir, "--device", "cpu", "--only", "ok", "partial"
    )
    assert again.returncode == 0 and again.stdout.count(" skipped ") == 2
    # post steps run for finished runs whose file is missing, here --post-eval for one of them
    post = run_manifest(
        "--manifest", m, "--group", "g", "--runs-dir", runs_dir, "--device", "cpu", "--only", "ok", "--post-eval"
    )
    assert post.returncode == 0 and " skipped " in post.stdout
    report = json.loads((ok / "eval.json").read_text())
    assert report["settings"]["rope_scaling"] == ["none", "yarn"]
    assert [r["path"] for r in report["routes"]] == ["full", "auto"]
    assert not (runs_dir / "partial" / "eval.json").exists()


def test_ctrl_c_on_the_runner_stops_its_child_records_it_and_a_rerun_resumes(tmp_path, token_file):
    """A terminal's Ctrl-C goes to the runner and its training child alike (one process group)."""
    runs_dir = tmp_path / "runs"
    long_run = spec("a", steps=2000, overrides={"eval_every": 500, "warmup_steps": 10})
    m = write_manifest(tmp_path / "m.json", [long_run], data=str(token_file))
    args = ["--manifest", m, "--group", "g", "--runs-dir", runs_dir, "--device", "cpu"]
    command = [sys.executable, str(REPO / "run_paper_manifest.py"), *map(str, args)]
    proc = subprocess.Popen(  # SIGINT handled as in a shell's foreground job, even where pytest runs in the background
        command,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    deadline = time.time() + 120
    while not (runs_dir / "a" / "last.pt").exists() and time.time() < deadline:  # past the step-0 checkpoint
        time.sleep(0.2)
    time.sleep(1.0)
    os.killpg(proc.pid, signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, out + err
    assert "Traceback" not in out + err
    assert [ln for ln in err.splitlines() if ln.strip()] == [
        "interrupted during a; rerun the same command to continue: finished runs are skipped, interrupted ones resume"
    ]
    assert "[a] interrupted at step" in out
    record = json.loads((runs_dir / "a" / "resolved_run.json").read_text())
    assert record["status"] == "interrupted" and record["finished"]
    step = torch.load(runs_dir / "a" / "last.pt", weights_only=True)["step"]
    assert 0 < step < 2000

    write_manifest(tmp_path / "m.json", [{**long_run, "steps": step + 2}], data=str(token_file))  # a short finish
    again = run_manifest(*args)
    assert again.returncode == 0, again.stdout + again.stderr
    assert " resumed " in again.stdout.splitlines()[-1]
    assert json.loads((runs_dir / "a" / "resolved_run.json").read_text())["status"] == "resumed"


def test_identical_runs_train_once_and_both_ids_have_results(tmp_path, token_file):
    runs_dir = tmp_path / "runs"
    m = write_manifest(tmp_path / "m.json", [spec("a"), spec("a_again"), spec("other", seed=2)], data=str(token_file))
    dry = run_manifest("--manifest", m, "--group", "g", "--runs-dir", runs_dir, "--dry-run")
    assert "a_again: the same training as a (identical config and data): not run again" in dry.stdout
    proc = run_manifest("--manifest", m, "--group", "g", "--runs-dir", runs_dir, "--device", "cpu")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    rows = {line.split()[0]: line for line in proc.stdout.splitlines()[-3:]}
    assert " same " in rows["a_again"] and "same training as a" in rows["a_again"]
    assert [p.name for p in (runs_dir / "a_again").iterdir()] == ["resolved_run.json"]  # nothing trained
    assert (runs_dir / "other" / "best.pt").exists()
    manifest, _ = load_manifest(m)
    group = manifest["groups"][0]
    a, again = (collect_run(s, group, runs_dir, partial=True) for s in group["runs"][:2])
    assert again["same_as"] == "a" and again["best_val_loss"] == a["best_val_loss"] and again["id"] == "a_again"


def test_the_runner_passes_the_tracker_and_its_group(tmp_path):
    m = write_manifest(tmp_path / "m.json", [spec("a")])
    proc = run_manifest("--manifest", m, "--group", "g", "--dry-run", "--tracker", "tensorboard")
    assert proc.returncode == 0, proc.stderr
    assert "--tracker tensorboard --tracker-group g" in proc.stdout


def test_output_into_a_reader_that_stops_early_is_not_a_traceback(monkeypatch):
    """`run_paper_manifest.py --dry-run | head -1`: the reader has gone while the runner still prints."""
    read_end, write_end = os.pipe()
    os.close(read_end)  # every write now fails with EPIPE, as after `head` exits
    with os.fdopen(write_end, "w", buffering=1) as gone:
        monkeypatch.setattr(sys, "stdout", gone)
        code = run_paper_manifest.main(
            ["--manifest", str(REPO / "paper_manifest.json"), "--group", "cpu_smoke", "--dry-run"]
        )
        monkeypatch.undo()
    assert code == 1
