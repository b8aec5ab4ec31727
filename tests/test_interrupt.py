"""Ctrl-C at any moment of `main.py --mode train`: the run stops at a step boundary, saves that step, prints the
command that continues it, and the continued run equals the uninterrupted one; a start interrupted before its
first checkpoint simply starts over. KeyboardInterrupt is raised in-process where a terminal's SIGINT would land."""

import json
import signal

import pytest
import torch

from conftest import TINY, assert_user_error, run_main
from production.cli.train import resume_argv
from production.data.splits import WindowSampler
from production.train import loop

RECIPE = "--steps 14 --eval-every 5 --eval-iters 2 --log-every 1 --grad-accum 2".split()


def events(run_dir):
    return [json.loads(line) for line in (run_dir / "train.jsonl").read_text().splitlines()]


def trace(run_dir):
    """What a run computed, step by step (times and provenance left out)."""
    keep = ("loss", "val_loss", "train_loss", "grad_norm", "best_val_loss")
    return [
        (e["type"], e["step"], *(e.get(k) for k in keep))
        for e in events(run_dir)
        if e["type"] in ("train", "eval", "done")
    ]


def train_args(token_file, out, recipe=RECIPE):
    return ["--mode", "train", *TINY, "--exp", "paper_decoupled", "--data", token_file, "--out-dir", out, *recipe]


def raise_on_call(monkeypatch, owner, name, n):
    """Make owner.name raise KeyboardInterrupt on its n-th call (1-based), as Ctrl-C would at that moment."""
    original, calls = getattr(owner, name), []

    def interrupted(*args, **kwargs):
        calls.append(1)
        if len(calls) == n:
            raise KeyboardInterrupt
        return original(*args, **kwargs)

    monkeypatch.setattr(owner, name, interrupted)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, token_file):
    out = tmp_path_factory.mktemp("full") / "run"
    assert run_main(*train_args(token_file, out)).returncode == 0
    return out


@pytest.mark.parametrize(
    "moment, saved",
    [
        ("mid-step", 7),  # the second micro-batch of step 8: step 7 is saved, step 8 redone from its first window
        ("during-eval", 5),  # the evaluation at step 5: step 5 is saved, its evaluation runs first on resume
    ],
)
def test_ctrl_c_saves_the_step_and_the_continued_run_equals_the_uninterrupted_one(
    tmp_path, token_file, uninterrupted, monkeypatch, moment, saved
):
    out = tmp_path / "run"
    with monkeypatch.context() as mp:
        if moment == "mid-step":
            raise_on_call(mp, WindowSampler, "next_batch", 2 * 7 + 2)
        else:
            raise_on_call(mp, loop, "evaluate", 2)
        proc = run_main(*train_args(token_file, out))
    assert proc.returncode == 130, proc.stderr
    assert "Traceback" not in proc.stderr
    assert f"interrupted at step {saved}/14; {out / 'last.pt'} holds step {saved}" in proc.stderr
    command = proc.stderr.strip().splitlines()[-1].strip()
    assert command.startswith("python main.py --mode train") and command.endswith("--resume")
    assert torch.load(out / "last.pt", weights_only=True)["step"] == saved
    assert events(out)[-1]["type"] == "interrupted"

    again = run_main(*command.split()[2:])  # the printed command, as the user pastes it
    assert again.returncode == 0, again.stderr
    assert trace(out) == trace(uninterrupted)  # exact floats: the same windows, weights and evaluations
    a, b = torch.load(out / "last.pt", weights_only=True), torch.load(uninterrupted / "last.pt", weights_only=True)
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])


def test_ctrl_c_inside_the_optimizer_step_is_held_until_the_step_is_whole(tmp_path, token_file, monkeypatch):
    """SIGINT arriving while AdamW updates the weights waits for the update: the saved step 1 equals a run
    stopped at step 1 on purpose."""
    original = torch.optim.AdamW.step

    def step_with_signal(self, *args, **kwargs):
        if self.param_groups[0]["lr"] > 0:  # not torch's zero-lr step that creates the state to checkpoint
            signal.raise_signal(signal.SIGINT)
        return original(self, *args, **kwargs)

    held, stopped = tmp_path / "held", tmp_path / "stopped"
    with monkeypatch.context() as mp:
        mp.setattr(torch.optim.AdamW, "step", step_with_signal)
        proc = run_main(*train_args(token_file, held))
    assert proc.returncode == 130 and "interrupted at step 1/14" in proc.stderr, proc.stderr
    assert run_main(*train_args(token_file, stopped), "--stop-at", "1").returncode == 0
    a, b = torch.load(held / "last.pt", weights_only=True), torch.load(stopped / "last.pt", weights_only=True)
    assert a["step"] == b["step"] == 1
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])


@pytest.mark.parametrize("rerun", ["same command", "with --resume"])
def test_ctrl_c_before_the_first_checkpoint_starts_over(tmp_path, token_file, monkeypatch, rerun):
    out = tmp_path / "run"
    args = train_args(token_file, out)
    with monkeypatch.context() as mp:
        raise_on_call(mp, loop, "tune_training", 1)  # while the model is being set up, before the step-0 eval
        proc = run_main(*args)
    assert proc.returncode == 130, proc.stderr
    assert "interrupted before the first checkpoint" in proc.stderr and "starts over" in proc.stderr
    assert not (out / "last.pt").exists() and (out / "train.jsonl").exists()

    again = run_main(*args, *(["--resume"] if rerun == "with --resume" else []))
    assert again.returncode == 0, again.stderr
    assert "starting over" in again.stdout
    assert [p.name for p in out.glob("train.jsonl.interrupted-*")]  # the partial log is kept aside
    assert [e["type"] for e in events(out)].count("meta") == 1
    assert_user_error(run_main(*args), "already holds a run", "--resume")


def test_last_pt_is_also_written_on_a_time_cadence(tmp_path, token_file, monkeypatch):
    saved = []
    original = loop.save

    def recording(state, job, path, with_optimizer):
        saved.append((path.name, state.step))
        return original(state, job, path, with_optimizer)

    monkeypatch.setattr(loop, "save", recording)
    recipe = "--steps 4 --eval-every 10 --eval-iters 1 --log-every 1".split()
    proc = run_main(*train_args(token_file, tmp_path / "run", recipe), "--save-every-s", 1e-9)
    assert proc.returncode == 0, proc.stderr
    assert [step for name, step in saved if name == "last.pt"] == [0, 1, 2, 3, 4]
    bad = run_main(*train_args(token_file, tmp_path / "other", recipe), "--save-every-s", "0")
    assert_user_error(bad, "--save-every-s")


def test_the_continue_command_resumes_the_run_s_own_last_pt():
    assert resume_argv(["--steps", "9", "--resume-path", "old/last.pt"]) == ["--steps", "9", "--resume"]
    assert resume_argv(["--resume-path=old/last.pt", "--resume"]) == ["--resume"]
    assert resume_argv(["--steps", "9"]) == ["--steps", "9", "--resume"]
