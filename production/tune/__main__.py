"""`python -m production.tune show|clear [--store runs/tuner.json] [--all]`: the tuner's stored decisions, one line
each; under each cache-policy decision, the per-layer, per-stream sensitivities its search measured."""

import sys
from pathlib import Path

from production.cache.policy import parse_policy
from production.core.entry import Parser, command
from production.core.layout import DEFAULT_TUNER_STORE
from production.tune.store import DecisionStore

REFERENCE_SPECS = ("q2_1@64", "q3_1@64", "q4_0@32", "q8_0@32")  # the columns of the sensitivity table


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


def sensitivity_lines(decision: dict, every_probe: bool) -> list[str]:
    """The table of a policy decision's sensitivities: per layer and stream, the spec chosen and its measured
    delta NLL, KL and max |delta logit| (only that stream of that layer quantized), then delta NLL under a few
    reference specs; with every_probe, one line per probe instead."""
    sens = decision.get("sensitivity")
    if not sens:
        return []
    probes = sens["probes"]
    head = (
        f"    sensitivity: one stream of one layer quantized, the rest fp16; {len(probes)} probes over "
        f"{sens['decode']} positions after a {sens['prefill']}-token prefill, {sens['seconds']:.1f} s"
    )
    if every_probe:
        rows = [f"    L{p['layer']:<3}{p['stream']:<7}{p['spec']:<18}{fmt_probe(p)}" for p in probes]
        return [head, *rows]
    streams = list(dict.fromkeys(p["stream"] for p in probes))
    n_layer = 1 + max(p["layer"] for p in probes)
    chosen = parse_policy(decision["policy"], streams, n_layer)
    table = {(p["layer"], p["stream"], p["spec"]): p for p in probes}
    lines = [
        head,
        f"    {'unit':<10}{'chosen':<18}{'dNLL':>9}{'KL':>9}{'max|dl|':>9}   dNLL at "
        + " ".join(f"{s:>9}" for s in REFERENCE_SPECS),
    ]
    for layer in range(n_layer):
        for stream in streams:
            spec = str(chosen.layers[layer].streams[stream])
            probe = table.get((layer, stream, spec))
            own = fmt_probe(probe) if probe else f"{'(exact)':>27}"
            refs = " ".join(
                f"{table[(layer, stream, s)]['delta_nll']:>+9.4f}" if (layer, stream, s) in table else f"{'-':>9}"
                for s in REFERENCE_SPECS
            )
            lines.append(f"    {f'L{layer} {stream}':<10}{spec:<18}{own}           {refs}")
    return lines


def fmt_probe(p: dict) -> str:
    return f"{p['delta_nll']:>+9.4f}{p['kl']:>9.4f}{p['max_abs_logit']:>9.3f}"


@command()
def main(argv: list[str] | None = None) -> int:
    p = Parser(prog="python -m production.tune", description="Show or clear the tuner's stored decisions.")
    p.add_argument("command", choices=["show", "clear"])
    p.add_argument("--store", type=Path, default=DEFAULT_TUNER_STORE)
    p.add_argument("--all", action="store_true", help="show: every sensitivity probe, not the table by stream")
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
            (
                e["kind"],
                e["device"],
                e["config"],
                ",".join(f"{k}={v}" for k, v in e["shapes"].items()),
                summarize(e["value"]),
            ),
            e["value"],
        )
        for e in sorted(entries.values(), key=lambda e: (e["kind"], e["device"], e["updated"]))
    ]
    header = ("kind", "device", "config", "shapes", "decision")
    widths = [max(len(r[i]) for r in [header, *(row for row, _ in rows)]) for i in range(4)]  # never cut
    print("  ".join(f"{cell:<{w}}" for cell, w in zip(header[:4], widths, strict=True)) + f"  {header[4]}")
    for row, value in rows:
        print("  ".join(f"{cell:<{w}}" for cell, w in zip(row[:4], widths, strict=True)) + f"  {row[4]}")
        for line in sensitivity_lines(value, args.all):
            print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
