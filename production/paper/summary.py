"""`summary.md`: the selected groups' results as Markdown tables, for a README or a pull request: each variant's
best validation loss over its seeds, KV cache at 128k, and its long-context numbers."""

from __future__ import annotations

from production.paper.labels import common_steps, fmt_bytes, label, short_policy


def fmt_loss(stat: dict) -> str:
    if stat["n"] == 0:
        return "not run"
    spread = "" if stat["std"] is None else f" ± {stat['std']:.3f}"
    return f"{stat['mean']:.3f}{spread} ({stat['n']})"


def main_rows(results: dict) -> list[str]:
    rows = [
        "| Group | Variant | Params | Best val loss (seeds) | KV @128k | vs standard fp16 |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for g in results["groups"]:
        members = [a for a in results["variants"] if a["group"] == g["name"]]
        if not members:
            continue
        steps = common_steps(members)
        standard = [a["kv"]["standard_fp16_bytes"] for a in members if a.get("kv") and a["kv"]["standard_fp16_bytes"]]
        reference = standard[0] if standard else None
        for a in members:
            kv = a.get("kv")
            cache = "–" if kv is None else f"{fmt_bytes(kv['bytes'])} {short_policy(kv['policy'])}"
            ratio = "–" if kv is None or reference is None else f"{reference / kv['bytes']:.1f}×"
            params = "–" if "n_params" not in a else f"{a['n_params'] / 1e6:.1f}M"
            rows.append(
                f"| {g['name']} | {label(a, steps)} | {params} | {fmt_loss(a['best_val_loss'])} | {cache} | {ratio} |"
            )
    return rows


def long_context_rows(results: dict) -> list[str]:
    aggs = [a for a in results["variants"] if a.get("eval")]
    if not aggs:
        return []
    multiples = sorted({m for a in aggs for m in a["eval"]["nll"].get("none/full", {})}, key=int)
    if not multiples:  # evaluated without plain RoPE or full forward passes
        return []
    top = multiples[-1]
    rows = [
        f"Validation NLL by context length (multiples of the training length; full forward passes, plain RoPE); "
        f"at {top}×: the change through the tuner's cache and with YaRN, and passkey accuracy (chance "
        f"{aggs[0]['eval']['passkey_chance']:.2f}).",
        "",
        "| Variant | " + " | ".join(f"{m}×" for m in multiples) + " | Δ cache | Δ YaRN | Passkey |",
        "|---|" + "---:|" * (len(multiples) + 3),
    ]
    for a in aggs:
        ev = a["eval"]
        steps = common_steps([b for b in results["variants"] if b["group"] == a["group"]])
        full = ev["nll"].get("none/full", {})
        cells = [f"{full[m]:.3f}" if m in full else "–" for m in multiples]
        for key in ("none/auto", "yarn/full"):
            other = ev["nll"].get(key, {}).get(top)
            cells.append("–" if other is None or top not in full else f"{other - full[top]:+.4f}")
        acc = ev["passkey"].get("none/full", {}).get(top)
        cells.append("–" if acc is None else f"{acc:.2f}")
        rows.append(f"| {label(a, steps)} | " + " | ".join(cells) + " |")
    return rows


def markdown_summary(results: dict) -> str:
    groups = ", ".join(g["name"] for g in results["groups"])
    parts = [f"Results of {groups} ({len(results['runs'])} runs).", "", *main_rows(results)]
    long_rows = long_context_rows(results)
    if long_rows:
        parts += ["", *long_rows]
    return "\n".join(parts) + "\n"
