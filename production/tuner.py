"""The tuner's decision store (DESIGN.md 5) and its CLI.

    python -m production.tuner show [--store runs/tuner.json]
    python -m production.tuner clear [--store runs/tuner.json]

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

import torch

from production.atomic import write_json

DEFAULT_STORE = Path("runs/tuner.json")
STORE_VERSION = 1


def device_signature(device: str) -> str:
    """e.g. cuda:NVIDIA H200:cc90, mps:arm64, cpu:Intel(R) Xeon(R) Processor:2."""
    from production.runtime import device_name

    kind = torch.device(device).type
    if kind == "cuda":
        major, minor = torch.cuda.get_device_capability(torch.device(device))
        return f"cuda:{torch.cuda.get_device_name(torch.device(device))}:cc{major}{minor}"
    if kind == "mps":
        return f"mps:{device_name(device)}"
    return f"cpu:{device_name(device)}:{torch.get_num_threads()}"


def config_hash(config: dict) -> str:
    return hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()[:16]


class DecisionStore:
    """get/put of JSON decisions by (kind, device, config hash, shapes)."""

    def __init__(self, path: Path = DEFAULT_STORE):
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
            print(f"warning: tuner store {self.path} is corrupt ({e}); moved to {aside}, starting empty",
                  file=sys.stderr)  # fmt: skip
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
            entries[self.key(kind, device, config, shapes)] = {
                "kind": kind, "device": device, "config": config, "shapes": shapes, "value": value, "updated": now,
            }  # fmt: skip
            write_json(self.path, {"version": STORE_VERSION, "entries": entries})

    def clear(self) -> int:
        with self._locked():
            n = len(self._read())
            self.path.unlink(missing_ok=True)
            return n


def summarize(value: dict) -> str:
    """One readable line per decision kind."""
    if "policy" in value:
        g = value.get("guard", {})
        return (f"policy {value['policy']} ({value.get('bytes', 0) / 2**20:.1f} MiB) max|dlogit| "
                f"{g.get('max_abs_logit', float('nan')):.3f} dNLL {g.get('delta_nll', float('nan')):+.4f}")  # fmt: skip
    if "impl" in value:
        return f"decode impl={value['impl']} chunk={value['chunk_tokens']} ({value.get('ms', 0):.2f} ms)"
    return ", ".join(f"{k}={v}" for k, v in value.items() if not isinstance(v, dict | list))


def main(argv: list[str] | None = None) -> int:
    from production.cli import Parser

    p = Parser(prog="python -m production.tuner", description="Show or clear the tuner's stored decisions.")
    p.add_argument("command", choices=["show", "clear"])
    p.add_argument("--store", type=Path, default=DEFAULT_STORE)
    args = p.parse_args(argv)
    store = DecisionStore(args.store)
    if args.command == "clear":
        print(f"cleared {store.clear()} decision(s) from {args.store}")
        return 0
    entries = store.entries()
    if not entries:
        print(f"{args.store}: no decisions stored")
        return 0
    print(f"{args.store}: {len(entries)} decision(s)")
    print(f"{'kind':<7} {'device':<36} {'config':<16} {'shapes':<40} decision")
    for e in sorted(entries.values(), key=lambda e: (e["kind"], e["device"], e["updated"])):
        shapes = ",".join(f"{k}={v}" for k, v in e["shapes"].items())
        print(f"{e['kind']:<7} {e['device'][:36]:<36} {e['config']:<16} {shapes[:40]:<40} {summarize(e['value'])}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
