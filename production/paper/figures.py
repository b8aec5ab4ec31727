"""Paper figures from `results.collect(...)`: validation loss vs step (convergence) and KV bytes vs loss."""

from __future__ import annotations

from pathlib import Path

import matplotlib
import matplotlib.ticker
from matplotlib.figure import Figure  # the object API: no pyplot state, no GUI backend

from production.paper.labels import COLORS, common_steps, fmt_bytes, kv_label, label, short_policy
from production.paper.results import CORE_EXPS

DPI = 150
CONVERGENCE_PANEL = (6.5, 4.2)  # inches per panel: one row per group, a second column when a group has sweeps
PARETO_SIZE = (8.0, 5.5)


def variant_curves(results: dict, agg: dict) -> tuple[list[int], list[float], list[float], list[float]]:
    """Steps and mean/min/max val loss over the variant's runs at the steps every run evaluated."""
    curves = [dict(map(tuple, r["curve"])) for r in results["runs"] if r["variant"] == agg["variant"] and "curve" in r]
    steps = sorted(set.intersection(*(set(c) for c in curves))) if curves else []
    vals = [[c[s] for c in curves] for s in steps]
    return steps, [sum(v) / len(v) for v in vals], [min(v) for v in vals], [max(v) for v in vals]


def split_variants(results: dict, group: str) -> tuple[list[dict], list[dict], int]:
    """A group's core variants (the four attention variants at its usual length) and the rest (sweeps,
    longer runs, ablations)."""
    aggs = [a for a in results["variants"] if a["group"] == group]
    steps = common_steps(aggs)
    core = [a for a in aggs if a["exp"] in CORE_EXPS and a["steps"] == steps]
    return core, [a for a in aggs if a not in core], steps


def convergence_layout(results: dict) -> tuple[list[str], int]:
    """Groups with runs (one row each) and the number of panel columns (2 when any group has sweeps)."""
    groups = [g["name"] for g in results["groups"] if any(a["group"] == g["name"] for a in results["variants"])]
    ncols = 2 if any(split_variants(results, g)[1] for g in groups) else 1
    return groups, ncols


def plot_convergence(results: dict, path: Path) -> None:
    groups, ncols = convergence_layout(results)
    width, height = CONVERGENCE_PANEL
    rows = max(1, len(groups))
    fig = Figure(figsize=(width * ncols, height * rows), dpi=DPI)
    axes = fig.subplots(rows, ncols, squeeze=False)
    for row, g in zip(axes, groups, strict=False):
        core, rest, steps = split_variants(results, g)
        panels = [(core, "attention variants"), (rest, "sweeps, longer runs and ablations")][:ncols]
        for ax, (members, title) in zip(row, panels, strict=True):
            draw_curves(ax, results, members, steps, members is core)
            ax.set_title(f"{g}: {title}", fontsize=11)
    if not groups:
        axes[0][0].text(0.5, 0.5, "no runs", ha="center", va="center", transform=axes[0][0].transAxes)
    spread = ": mean over seeds, band = min-max" if results["max_seeds"] >= 2 else " (one seed per variant)"
    fig.suptitle(f"Validation loss on fixed held-out windows{spread}", fontsize=12)
    fig.tight_layout()
    fig.savefig(path)


def draw_curves(ax, results: dict, members: list[dict], steps: int, core: bool) -> None:
    cmap = matplotlib.colormaps["tab10"]
    zoom = True
    for i, a in enumerate(members):
        xs, mean, lo, hi = variant_curves(results, a)
        if not xs:
            continue
        zoom = zoom and len(xs) >= 5
        color = COLORS.get(a.get("attn_mode")) if core else cmap(i % 10)
        n = a["best_val_loss"]["n"]
        ax.plot(xs, mean, color=color, lw=1.8, label=f"{label(a, steps)} (n={n})")
        if n > 1:
            ax.fill_between(xs, lo, hi, color=color, alpha=0.18, lw=0)
    ax.set_xlabel("step")
    ax.set_ylabel("validation loss (nats)")
    ax.grid(alpha=0.3)
    if not ax.lines:
        ax.text(0.5, 0.5, "no runs", ha="center", va="center", transform=ax.transAxes, color="gray")
        return
    if zoom:  # long curves: start the y range after the first evals so the differences stay visible
        ys = [
            y
            for line in ax.lines
            for x, y in zip(line.get_xdata(), line.get_ydata(), strict=True)
            if x >= 0.1 * max(line.get_xdata())
        ]
        pad = 0.05 * (max(ys) - min(ys)) + 1e-3
        ax.set_ylim(min(ys) - pad, max(ys) + pad)
    ax.legend(fontsize=8, frameon=False)


def plot_pareto(results: dict, path: Path) -> None:
    fig = Figure(figsize=PARETO_SIZE, dpi=DPI)
    ax = fig.subplots()
    shown = 0
    for a in results["variants"]:
        kv, best = a.get("kv"), a["best_val_loss"]
        if kv is None or best["n"] == 0:
            continue
        steps = common_steps([b for b in results["variants"] if b["group"] == a["group"]])
        color = COLORS.get(a.get("attn_mode"), "gray")
        y, err = best["mean"], best["std"] or 0.0
        points = [(kv["fp16_bytes"], "o", "fp16")] if kv["fp16_bytes"] else []
        if kv["policy"] != "fp16":
            points.append((kv["bytes"], "D", kv_label(kv)))
        for x, marker, _ in points:
            ax.errorbar(
                x,
                y,
                yerr=err,
                fmt=marker,
                color=color,
                mfc=color if marker == "o" else "white",
                ms=8,
                mew=1.8,
                capsize=3,
            )
        if len(points) == 2:
            ax.plot([points[0][0], points[1][0]], [y, y], color=color, lw=1, ls=":")
        name = label(a, steps) + (f" ({points[-1][2]})" if points[-1][1] == "D" else "")
        ax.annotate(name, (points[-1][0], y), textcoords="offset points", xytext=(6, 4), fontsize=8)
        shown += 1
    ax.set_xscale("log")
    ax.xaxis.set_major_locator(matplotlib.ticker.LogLocator(base=2))  # 32 MiB, 64 MiB, ...
    ax.xaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda x, _: fmt_bytes(int(x))))
    ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    context = next((a["kv"]["context_len"] for a in results["variants"] if a.get("kv")), 131072)
    ax.set_xlabel(f"KV-cache bytes at {context:,} tokens (log scale)")
    over_seeds = ", mean ± std over seeds" if results["max_seeds"] >= 2 else ""
    ax.set_ylabel(f"best validation loss (nats){over_seeds}")
    ax.set_title("Memory vs quality: filled = fp16 cache, hollow = quantized (its policy in brackets)")
    ax.grid(alpha=0.3, which="both")
    if not shown:
        ax.text(0.5, 0.5, "no runs with mem128k.json", ha="center", va="center", transform=ax.transAxes)
    fig.tight_layout()
    fig.savefig(path)


def plot_long_context(results: dict, path: Path) -> None:
    """Loss by position to the longest evaluated length, one line per variant (mean over its seeds): solid for
    full forward passes, dashed through the tuner's quantized cache; the training length dotted."""
    fig = Figure(figsize=PARETO_SIZE, dpi=DPI)
    ax = fig.subplots()
    blocks = set()
    for a in results["variants"]:
        ev = a.get("eval")
        if not ev:
            continue
        blocks.add(ev["block_size"])
        steps = common_steps([b for b in results["variants"] if b["group"] == a["group"]])
        color = COLORS.get(a.get("attn_mode"), "gray")
        for route, style in (("full", "-"), ("auto", "--")):
            if route in ev["curves"]:
                x, y = zip(*ev["curves"][route], strict=True)
                name = label(a, steps) + ("" if route == "full" else f", cache {short_policy(ev['routes'][route])}")
                ax.plot(x, y, style, color=color, marker="o", ms=3, lw=1.5 if route == "full" else 1.1, label=name)
    for block in sorted(blocks):
        ax.axvline(block, color="0.4", lw=1, ls=":")
        ax.text(block, 1.0, " trained length", transform=ax.get_xaxis_transform(), va="top", fontsize=8)
    if blocks:
        ax.set_xscale("log", base=2)
        ax.legend(fontsize=7, frameon=False)
    else:
        ax.text(0.5, 0.5, "no runs with eval.json", ha="center", va="center", transform=ax.transAxes)
    over_seeds = ", mean over seeds" if results["max_seeds"] >= 2 else ""
    ax.set_xlabel("position in the context (tokens, log scale; each point averages a doubling range)")
    ax.set_ylabel(f"validation NLL (nats){over_seeds}")
    ax.set_title("Loss by position past the training length")
    ax.grid(alpha=0.3, which="both")
    fig.tight_layout()
    fig.savefig(path)
