"""`summary.md`: the selected groups' results as Markdown tables, for a README or a pull request: each variant's
best validation loss over its seeds, KV cache at 128k, and its long-context numbers."""

from __future__ import annotations

from production.paper.labels import common_steps, fmt_bytes, kv_label, label
from production.paper.tables import long_context_cells, long_context_rows


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
            cache = "–" if kv is None else f"{fmt_bytes(kv['bytes'])} {kv_label(kv)}"
            ratio = "–" if kv is None or reference is None else f"{reference / kv['bytes']:.1f}×"
            params = "–" if "n_params" not in a else f"{a['n_params'] / 1e6:.1f}M"
            rows.append(
                f"| {g['name']} | {label(a, steps)} | {params} | {fmt_loss(a['best_val_loss'])} | {cache} | {ratio} |"
            )
    return rows


def long_context_markdown(results: dict) -> list[str]:
    multiples, rows = long_context_rows(results)
    if not multiples:  # no reports, or none evaluated with plain RoPE and full forward passes
        return []
    chance = rows[0][0]["eval"]["passkey_chance"]
    lines = [
        f"Validation NLL by context length (multiples of the training length; full forward passes, plain RoPE); "
        f"at {multiples[-1]}×: the change through the tuner's cache and with YaRN, and passkey accuracy (chance "
        f"{chance:.2f}).",
        "",
        "| Variant | " + " | ".join(f"{m}×" for m in multiples) + " | Δ cache | Δ YaRN | Passkey |",
        "|---|" + "---:|" * (len(multiples) + 3),
    ]
    for _, name, cells in rows:
        lines.append(f"| {name} | " + " | ".join(long_context_cells(cells, len(multiples), 4, "–")) + " |")
    return lines


def markdown_summary(results: dict) -> str:
    groups = ", ".join(g["name"] for g in results["groups"])
    parts = [f"Results of {groups} ({len(results['runs'])} runs).", "", *main_rows(results)]
    long_rows = long_context_markdown(results)
    if long_rows:
        parts += ["", *long_rows]
    return "\n".join(parts) + "\n"
