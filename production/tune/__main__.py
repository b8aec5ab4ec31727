"""`python -m production.tune show|clear [--store runs/tuner.json]`: the tuner's stored decisions, one line each."""

import sys
from pathlib import Path

from production.core.entry import Parser, command
from production.core.layout import DEFAULT_TUNER_STORE
from production.tune.store import DecisionStore


def summarize(value: dict) -> str:
    """One readable line per decision kind."""
    if "policy" in value:
        g = value.get("guard", {})
        size = f"({value.get('bytes', 0) / 2**20:.1f} MiB)"
        guard = f"max|dlogit| {g.get('max_abs_logit', float('nan')):.3f} dNLL {g.get('delta_nll', float('nan')):+.4f}"
        return f"policy {value['policy']} {size} {guard}"
    if "impl" in value:
        return f"decode impl={value['impl']} chunk={value['chunk_tokens']} ({value.get('ms', 0):.2f} ms)"
    return ", ".join(f"{k}={v}" for k, v in value.items() if not isinstance(v, dict | list))


@command()
def main(argv: list[str] | None = None) -> int:
    p = Parser(prog="python -m production.tune", description="Show or clear the tuner's stored decisions.")
    p.add_argument("command", choices=["show", "clear"])
    p.add_argument("--store", type=Path, default=DEFAULT_TUNER_STORE)
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
    rows = [
        (
            e["kind"],
            e["device"],
            e["config"],
            ",".join(f"{k}={v}" for k, v in e["shapes"].items()),
            summarize(e["value"]),
        )
        for e in sorted(entries.values(), key=lambda e: (e["kind"], e["device"], e["updated"]))
    ]
    header = ("kind", "device", "config", "shapes", "decision")
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(4)]  # whole values, never cut
    for row in [header, *rows]:
        print("  ".join(f"{cell:<{w}}" for cell, w in zip(row[:4], widths, strict=True)) + f"  {row[4]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
