"""Executing manifest runs: provenance, skip / resume / fresh decisions, live training subprocesses, the
optional memory benchmark, and the final status table. The training process owns resolved_config.json (and
reads the data once); the runner writes only command.txt and resolved_run.json."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

from production.core.atomic import write_json, write_text
from production.core.errors import UserError
from production.core.layout import REPO_ROOT, RunDir
from production.core.runtime import environment, resolve_runtime
from production.paper.manifest import RunPlan

MEM128K_SCRIPT = REPO_ROOT / "production" / "bench_end_to_end_memory.py"
MAIN_SCRIPT = REPO_ROOT / "main.py"


@dataclass
class RunResult:
    id: str
    status: str  # done | skipped | resumed | failed | interrupted | same (as another run of the group)
    best_val_loss: float | None = None
    wall_s: float = 0.0
    reason: str = ""
    notes: list[str] = field(default_factory=list)


def now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def plan_record(plan: RunPlan, manifest_path: Path, manifest_sha: str) -> dict:
    """What every resolved_run.json says first: which manifest entry this directory belongs to."""
    return {
        "id": plan.id,
        "group": plan.group,
        "manifest": str(manifest_path),
        "manifest_sha256": manifest_sha,
        "spec": plan.spec,
    }


def write_provenance(
    plan: RunPlan, run: RunDir, command: str, manifest_path: Path, manifest_sha: str, device: str
) -> dict:
    """command.txt and resolved_run.json, before anything trains."""
    run.path.mkdir(parents=True, exist_ok=True)
    write_text(run.command, command + "\n")
    env = environment(resolve_runtime(device).device)
    record = {
        **plan_record(plan, manifest_path, manifest_sha),
        "git_commit": env["git_commit"],
        "git_dirty": env["git_dirty"],
        "python": env["python"],
        "torch": env["torch"],
        "device": env["device"],
        "device_name": env["device_name"],
        "command": command,
        "started": now(),
    }
    write_json(run.provenance, record)
    return record


class RunInterrupted(Exception):
    """Ctrl-C during a run: its child was stopped and its provenance says so; the group stops here."""

    def __init__(self, result: RunResult):
        super().__init__(result.id)
        self.result = result


def stream(command: list[str], prefix: str, log_path: Path) -> tuple[int, str, bool]:
    """Run a command in this directory (so relative paths mean what they mean to the caller: data, runs, the
    tuner store), echoing its output live (prefixed) and into log_path. On Ctrl-C the child is stopped the way
    a terminal stops it (SIGINT: a training run saves its step and exits) and its last words are kept.
    Returns the exit status, its last `error:` line (or last line), and whether it was interrupted."""
    seen = {"error": "", "last": ""}
    with open(log_path, "a") as log:
        proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1)
        try:
            for line in proc.stdout:
                echo(line, prefix, log, seen)
            proc.wait()
            interrupted = False
        except KeyboardInterrupt:
            stop(proc)
            for line in proc.stdout.read().splitlines(keepends=True):
                echo(line, prefix, log, seen)
            interrupted = True
    return proc.returncode, seen["error"] or seen["last"], interrupted


def echo(line: str, prefix: str, log, seen: dict) -> None:
    sys.stdout.write(f"[{prefix}] {line}")
    sys.stdout.flush()
    log.write(line)
    if line.strip():
        seen["last"] = line.strip()
        if line.startswith("error:"):
            seen["error"] = line.strip()


def stop(proc: subprocess.Popen) -> None:
    """A terminal's Ctrl-C reaches the child too; a `kill -INT` of the runner alone does not, so it is passed
    on. A second Ctrl-C while the child saves kills it (its checkpoints are written atomically)."""
    try:
        try:
            proc.wait(timeout=2)
        except subprocess.TimeoutExpired:
            proc.send_signal(signal.SIGINT)
            proc.wait(timeout=300)
    except (KeyboardInterrupt, subprocess.TimeoutExpired):
        proc.kill()
        proc.wait()


# `--post-eval`: the long-context report of each finished run: full forward passes and the tuner's cache (an fp16
# cache equals the full forward to 1e-5, so it is left out), plain RoPE and YaRN
POST_EVAL_ARGS = ["--kv-policy", "auto", "--rope-scaling", "none,yarn"]


def run_one(
    plan: RunPlan,
    runs_dir: Path,
    manifest_path: Path,
    manifest_sha: str,
    device: str,
    post: tuple[str, ...] = (),
    mem128k_policy: str = "default",
) -> RunResult:
    """Train the run (or resume it, or skip it when finished), then its `post` steps: "mem128k" (the 128k memory
    report, of `mem128k_policy`: default or auto) and "eval" (eval.json), each only when its file is missing."""
    run = RunDir(runs_dir / plan.id)
    t0 = time.time()
    state = run.state()
    result = RunResult(plan.id, {"finished": "skipped", "resumable": "resumed", "fresh": "done"}[state])
    if state != "finished":
        extra = ["--resume"] if state == "resumable" else []
        write_provenance(plan, run, plan.command_text(extra), manifest_path, manifest_sha, device)
        code, last, interrupted = stream(plan.command(extra), plan.id, run.stdout)
        if interrupted:
            raise RunInterrupted(finish(result, run, "interrupted", "interrupted by Ctrl-C", t0))
        if code != 0:
            result.status, result.reason = "failed", f"main.py exited {code}: {last}"
    done = [e for e in run.events() if e["type"] == "done"]
    if done:
        result.best_val_loss = done[-1]["best_val_loss"]
    elif result.status != "failed":
        result.status, result.reason = "failed", "training ended without a done event"
    steps = {
        "mem128k": (run.mem128k, mem128k_command(plan, run, device, mem128k_policy)),
        "eval": (run.eval, eval_command(run, device)),
    }
    for name in post:
        path, command = steps[name]
        if not done or path.exists():
            continue
        code, last, interrupted = stream(command, f"{plan.id} {name}", run.stdout)
        if interrupted:
            raise RunInterrupted(finish(result, run, "interrupted", f"interrupted in the {name} step", t0))
        if code != 0:
            result.status, result.reason = "failed", f"{name} exited {code}: {last}"
    return finish(result, run, result.status, result.reason, t0)


def mem128k_command(plan: RunPlan, run: RunDir, device: str, policy: str = "default") -> list[str]:
    command = [sys.executable, str(MEM128K_SCRIPT), "--ckpt", str(run.best), "--device", device]
    if policy == "auto":
        command += ["--policy", "auto"]
    if plan.resolved["model"]["attn_mode"] == "decoupled":
        command.append("--decompose")
    return command


def eval_command(run: RunDir, device: str) -> list[str]:
    return [sys.executable, str(MAIN_SCRIPT), "--mode", "eval", "--ckpt", str(run.best), "--device", device,
            *POST_EVAL_ARGS]  # fmt: skip


def finish(result: RunResult, run: RunDir, status: str, reason: str, t0: float) -> RunResult:
    """The run's outcome, also in its resolved_run.json (a skipped run keeps the record of the run it was)."""
    result.status, result.reason = status, reason
    if run.provenance.exists() and status != "skipped":
        record = json.loads(run.provenance.read_text())
        record.update(finished=now(), status=status, reason=reason or None)
        write_json(run.provenance, record)
    result.wall_s = time.time() - t0
    return result


def record_same(plan: RunPlan, primary: RunResult, runs_dir: Path, manifest_path: Path, manifest_sha: str) -> RunResult:
    """A run whose training is identical to `primary`'s: not trained again. Its directory holds only
    resolved_run.json, whose `same_as` points results, tables and figures at the primary's files."""
    run = RunDir(runs_dir / plan.id)
    run.path.mkdir(parents=True, exist_ok=True)
    if primary.status in ("failed", "interrupted"):
        status, reason = "failed", f"same training as {primary.id}, which did not finish"
    else:
        status, reason = "same", f"same training as {primary.id} (identical resolved config and data)"
    record = {
        **plan_record(plan, manifest_path, manifest_sha),
        "same_as": primary.id,
        "status": status,
        "reason": reason,
        "finished": now(),
    }
    write_json(run.provenance, record)
    return RunResult(plan.id, status, primary.best_val_loss, 0.0, reason)


def check_data(plans: list[RunPlan]) -> None:
    for plan in plans:
        if plan.data and not Path(plan.data).exists():
            raise UserError(
                f"group {plan.group} trains on {plan.data}, which does not exist; create it with "
                f"`python prepare_fineweb.py --output {plan.data} --tokens ...`"
            )


def table(results: list[RunResult]) -> str:
    width = max(len(r.id) for r in results)
    lines = [f"{'run':<{width}}  {'status':<8}  {'best val':>8}  {'wall':>7}  note"]
    for r in results:
        best = "-" if r.best_val_loss is None else f"{r.best_val_loss:.4f}"
        note = r.reason or "; ".join(r.notes)
        lines.append(f"{r.id:<{width}}  {r.status:<8}  {best:>8}  {r.wall_s:>6.0f}s  {note}")
    return "\n".join(lines)
