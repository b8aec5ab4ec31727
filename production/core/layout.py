"""Where the harness keeps its files: the run-directory layout, the event log, the default tuner store and the
tokenized-corpus cache. Trainer, manifest runner, results and benchmarks all name run files through here.

A run directory `runs/<id>/` holds:
    resolved_config.json  every effective setting (written by the training process)
    train.jsonl           the event log, one JSON object per line with `type`, `step`, `time`
    last.pt / best.pt     the latest full training state / the lowest-validation-loss weights
    command.txt, resolved_run.json, stdout.log   provenance written by the manifest runner
    mem128k.json          the KV-cache memory report
    eval.json             the long-context report (main.py --mode eval), with eval_loss.png, eval_passkey.png
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

from production.core.atomic import write_text
from production.core.errors import UserError

REPO_ROOT = Path(__file__).resolve().parents[2]  # where main.py is
RUNS_ROOT = Path("runs")
DEFAULT_TUNER_STORE = RUNS_ROOT / "tuner.json"
CORPUS_CACHE_DIR = Path("~/.cache/dba")


def default_run_dir(size: str, exp: str, seed: int) -> Path:
    return RUNS_ROOT / f"{size}_{exp}_s{seed}"


def default_mem128k_path(size: str, exp: str) -> Path:
    """Where a preset's memory report goes when it names no checkpoint and no --out."""
    return RUNS_ROOT / f"mem128k_{size}_{exp}.json"


EXPORT_WEIGHTS, EXPORT_CONFIG = "model.safetensors", "config.json"  # `main.py --mode export` writes these


def checkpoint_file(path: str | Path) -> Path:
    """A checkpoint named by its file, by its run directory (its best.pt, else its last.pt) or by an export
    directory (its model.safetensors, read with the config.json beside it)."""
    path = Path(path)
    if path.is_dir():
        weights, config = path / EXPORT_WEIGHTS, path / EXPORT_CONFIG
        if weights.exists() or config.exists():
            if not (weights.is_file() and config.is_file()):
                missing = EXPORT_WEIGHTS if not weights.is_file() else EXPORT_CONFIG
                raise UserError(f"export directory {path} lacks {missing}; export it again with --mode export")
            return weights
        run = RunDir(path)
        found = next((p for p in (run.best, run.last) if p.is_file()), None)
        if found is None:
            raise UserError(f"{path} is a directory without best.pt or last.pt; give a run directory or a .pt file")
        return found
    if not path.is_file():
        raise UserError(f"checkpoint {path} does not exist (give a run directory, or its best.pt / last.pt)")
    return path


@dataclass(frozen=True)
class RunDir:
    path: Path

    @property
    def log(self) -> Path:
        return self.path / "train.jsonl"

    @property
    def resolved_config(self) -> Path:
        return self.path / "resolved_config.json"

    @property
    def last(self) -> Path:
        return self.path / "last.pt"

    @property
    def best(self) -> Path:
        return self.path / "best.pt"

    @property
    def command(self) -> Path:
        return self.path / "command.txt"

    @property
    def provenance(self) -> Path:
        return self.path / "resolved_run.json"

    @property
    def stdout(self) -> Path:
        return self.path / "stdout.log"

    @property
    def mem128k(self) -> Path:
        return self.path / "mem128k.json"

    @property
    def eval(self) -> Path:
        return self.path / "eval.json"

    def events(self) -> list[dict]:
        return read_events(self.log)

    def same_as(self) -> str | None:
        """The id of the run whose files stand for this one: the manifest runner trains identical runs once."""
        if not self.provenance.exists():
            return None
        return json.loads(self.provenance.read_text()).get("same_as")

    def state(self) -> str:
        """finished (a `done` event), resumable (a last.pt), or fresh."""
        if any(e["type"] == "done" for e in self.events()):
            return "finished"
        return "resumable" if self.last.exists() else "fresh"


def read_events(log: Path) -> list[dict]:
    """The events of a train.jsonl ([] when there is none). Raises json.JSONDecodeError on a corrupt line."""
    if not log.exists():
        return []
    return [json.loads(line) for line in log.read_text().splitlines() if line.strip()]


def truncate_log(log: Path, step: int) -> None:
    """Drop events logged after `step`: they belong to the part of a run that a resume replays."""
    if log.exists():
        kept = [e for e in read_events(log) if e["step"] <= step]
        write_text(log, "".join(json.dumps(e) + "\n" for e in kept))


class EventLog:
    """Appends one JSON object per line: {"type", "step", "time", ...}. Without a path (ranks other than 0 of a
    distributed run) it writes nothing. `mirror` (an experiment tracker: `event(type, step, fields)` and
    `close()`) sees every event written. A context manager, so every exit path closes the file and the mirror."""

    def __init__(self, path: Path | None, mirror=None):
        self.file = None if path is None else open(path, "a", buffering=1)  # noqa: SIM115 (closed by close())
        self.mirror = mirror if path is not None else None

    def write(self, type: str, step: int, **fields) -> None:
        if self.file is not None:
            self.file.write(json.dumps({"type": type, "step": step, "time": round(time.time(), 3), **fields}) + "\n")
            if self.mirror is not None:
                self.mirror.event(type, step, fields)

    def close(self) -> None:
        if self.file is not None:
            self.file.close()
            self.file = None
        if self.mirror is not None:
            self.mirror.close()
            self.mirror = None

    def __enter__(self) -> EventLog:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
