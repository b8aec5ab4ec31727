"""Executing manifest runs: provenance, skip / resume / fresh decisions, live training subprocesses, the
optional memory benchmark, and the final status table."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

from production.atomic import write_json
from production.errors import UserError
from production.manifest import RunPlan
from production.runtime import REPO_ROOT, environment, resolve_runtime


@dataclass
class RunResult:
    id: str
    status: str  # done | skipped | resumed | failed
    best_val_loss: float | None = None
    wall_s: float = 0.0
    reason: str = ""
    notes: list[str] = field(default_factory=list)


def read_events(run_dir: Path) -> list[dict]:
    log = run_dir / "train.jsonl"
    if not log.exists():
        return []
    return [json.loads(line) for line in log.read_text().splitlines() if line.strip()]


def run_state(run_dir: Path) -> str:
    """finished (a `done` event), resumable (a last.pt), or fresh."""
    if any(e["type"] == "done" for e in read_events(run_dir)):
        return "finished"
    if (run_dir / "last.pt").exists():
        return "resumable"
    return "fresh"


def write_provenance(plan: RunPlan, run_dir: Path, command: str, manifest_path: Path, manifest_sha: str,
                     device: str) -> dict:  # fmt: skip
    """command.txt, resolved_config.json and resolved_run.json, before anything trains."""
    from production.cli import build_parser
    from production.train_cmd import load_data, resolve

    args = build_parser().parse_args(plan.argv)
    resolved, (model_cfg, _, _) = resolve(args)
    resolved["data"] = load_data(args, model_cfg.block_size, model_cfg.vocab_size).info
    resolved["out_dir"] = str(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "command.txt").write_text(command + "\n")
    write_json(run_dir / "resolved_config.json", resolved)
    env = environment(resolve_runtime(device).device)
    record = {
        "id": plan.id,
        "group": plan.group,
        "manifest": str(manifest_path),
        "manifest_sha256": manifest_sha,
        "spec": plan.spec,
        "git_commit": env["git_commit"],
        "git_dirty": env["git_dirty"],
        "python": env["python"],
        "torch": env["torch"],
        "device": env["device"],
        "device_name": env["device_name"],
        "command": command,
        "started": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    write_json(run_dir / "resolved_run.json", record)
    return record


def stream(command: list[str], prefix: str, log_path: Path) -> tuple[int, str]:
    """Run a command from the repo root, echoing its output live (prefixed) and into log_path.
    Returns the exit status and its last `error:` line (or last line)."""
    last_error, last = "", ""
    with open(log_path, "a") as log:
        proc = subprocess.Popen(command, cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                bufsize=1)  # fmt: skip
        for line in proc.stdout:
            sys.stdout.write(f"[{prefix}] {line}")
            sys.stdout.flush()
            log.write(line)
            if line.strip():
                last = line.strip()
                if line.startswith("error:"):
                    last_error = line.strip()
        proc.wait()
    return proc.returncode, last_error or last


def run_one(plan: RunPlan, runs_dir: Path, manifest_path: Path, manifest_sha: str, device: str,
            post_mem128k: bool) -> RunResult:  # fmt: skip
    run_dir = runs_dir / plan.id
    t0 = time.time()
    state = run_state(run_dir)
    result = RunResult(plan.id, "skipped" if state == "finished" else "resumed" if state == "resumable" else "done")
    if state != "finished":
        if state == "fresh" and (run_dir / "train.jsonl").exists():
            # an attempt died before its first checkpoint: keep its log aside, start over
            stale = run_dir / f"train.jsonl.failed-{int(time.time())}"
            (run_dir / "train.jsonl").rename(stale)
            result.notes.append(f"moved a log without checkpoint to {stale.name}")
        extra = ["--resume"] if state == "resumable" else []
        command = plan.command(extra)
        write_provenance(plan, run_dir, plan.command_text(extra), manifest_path, manifest_sha, device)
        code, last = stream(command, plan.id, run_dir / "stdout.log")
        if code != 0:
            result.status, result.reason = "failed", f"main.py exited {code}: {last}"
    events = read_events(run_dir)
    done = [e for e in events if e["type"] == "done"]
    if done:
        result.best_val_loss = done[-1]["best_val_loss"]
    elif result.status != "failed":
        result.status, result.reason = "failed", "training ended without a done event"
    if post_mem128k and done and not (run_dir / "mem128k.json").exists():
        command = [sys.executable, "production/bench_end_to_end_memory.py", "--ckpt", str(run_dir / "best.pt"),
                   "--device", device]  # fmt: skip
        if plan.resolved["model"]["attn_mode"] == "decoupled":
            command.append("--decompose")
        code, last = stream(command, f"{plan.id} mem128k", run_dir / "stdout.log")
        if code != 0:
            result.status, result.reason = "failed", f"mem128k exited {code}: {last}"
    provenance = run_dir / "resolved_run.json"
    if provenance.exists() and result.status != "skipped":
        record = json.loads(provenance.read_text())
        record.update(finished=datetime.now(timezone.utc).isoformat(timespec="seconds"), status=result.status,
                      reason=result.reason or None)  # fmt: skip
        write_json(provenance, record)
    result.wall_s = time.time() - t0
    return result


def check_data(plans: list[RunPlan]) -> None:
    for plan in plans:
        if plan.data and not Path(plan.data).exists():
            raise UserError(f"group {plan.group} trains on {plan.data}, which does not exist; create it with "
                            f"`python prepare_fineweb.py --output {plan.data} --tokens ...`")  # fmt: skip


def table(results: list[RunResult]) -> str:
    width = max(len(r.id) for r in results)
    lines = [f"{'run':<{width}}  {'status':<8}  {'best val':>8}  {'wall':>7}  note"]
    for r in results:
        best = "-" if r.best_val_loss is None else f"{r.best_val_loss:.4f}"
        note = r.reason or "; ".join(r.notes)
        lines.append(f"{r.id:<{width}}  {r.status:<8}  {best:>8}  {r.wall_s:>6.0f}s  {note}")
    return "\n".join(lines)
