"""The tuner's decision store (shown and cleared by `python -m production.tune show|clear`).

One JSON file holds every decision, keyed by what it depends on: kind (train / decode / policy), device
signature, model-config hash and shapes. Writes take an exclusive lock on `<store>.lock`, re-read the file,
update one entry and replace the file atomically, so concurrent processes never lose each other's entries. A
store that does not parse is moved aside (`<store>.corrupt-<time>`) with a message, never silently reused.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

from production.core.atomic import write_json
from production.core.layout import DEFAULT_TUNER_STORE

STORE_VERSION = 1


def config_hash(config: dict) -> str:
    return hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()[:16]


class DecisionStore:
    """get/put of JSON decisions by (kind, device, config hash, shapes)."""

    def __init__(self, path: Path = DEFAULT_TUNER_STORE):
        self.path = Path(path)

    @staticmethod
    def key(kind: str, device: str, config: str, shapes: dict) -> str:
        return f"{kind}|{device}|{config}|{json.dumps(shapes, sort_keys=True)}"

    @contextlib.contextmanager
    def _locked(self):
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path.with_name(self.path.name + ".lock"), "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    def _read(self) -> dict:
        """The entries; a corrupt file is moved aside and reported (call with the lock held)."""
        if not self.path.exists():
            return {}
        try:
            data = json.loads(self.path.read_text())
            if not isinstance(data, dict) or data.get("version") != STORE_VERSION:
                raise ValueError(f"not a version-{STORE_VERSION} tuner store")
            return data["entries"]
        except (ValueError, KeyError) as e:
            aside = self.path.with_name(f"{self.path.name}.corrupt-{int(time.time())}")
            os.replace(self.path, aside)
            warning = f"warning: tuner store {self.path} is corrupt ({e}); moved to {aside}, starting empty"
            print(warning, file=sys.stderr)
            return {}

    def entries(self) -> dict:
        with self._locked():
            return self._read()

    def get(self, kind: str, device: str, config: str, shapes: dict) -> dict | None:
        entry = self.entries().get(self.key(kind, device, config, shapes))
        return None if entry is None else entry["value"]

    def put(self, kind: str, device: str, config: str, shapes: dict, value: dict) -> None:
        now = datetime.now(timezone.utc).isoformat(timespec="seconds")
        with self._locked():
            entries = self._read()
            entry = {"kind": kind, "device": device, "config": config, "shapes": shapes, "value": value}
            entries[self.key(kind, device, config, shapes)] = {**entry, "updated": now}
            write_json(self.path, {"version": STORE_VERSION, "entries": entries})

    def clear(self) -> int:
        with self._locked():
            n = len(self._read())
            self.path.unlink(missing_ok=True)
            return n
