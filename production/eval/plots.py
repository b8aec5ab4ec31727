"""Figures of eval reports: loss vs position (one line per variant, route and RoPE extension, the training
length marked) and the passkey heat map (depth x length)."""

from __future__ import annotations

from pathlib import Path

from matplotlib.figure import Figure  # the object API: no pyplot state, no GUI backend

from production.eval.report import log_bins

DPI = 150


def variant_name(report: dict) -> str:
    run = report.get("run") or {}
    return run.get("exp") or report["model"]["attn_mode"]


def longest_cells(report: dict) -> list[dict]:
    """For each (RoPE extension, route), the loss cell at the longest length: its buckets span every position."""
    top = report["settings"]["lengths"][-1]
    return [r for r in report["loss"] if r["length"] == top]


def plot_loss_by_position(reports: list[dict], path: Path, title: str | None = None) -> None:
    fig = Figure(figsize=(8.0, 5.0), dpi=DPI)
    ax = fig.subplots()
    blocks = set()
    for report in reports:
        blocks.add(report["settings"]["block_size"])
        for cell in longest_cells(report):
            x, y = zip(*log_bins(cell["buckets"]), strict=True)
            extension = "" if cell["rope_scaling"] == "none" else f", RoPE {cell['rope_scaling']}"
            style = "-" if cell["path"] == "full" else "--"
            ax.plot(x, y, style, marker="o", ms=3, lw=1.4, label=f"{variant_name(report)}: {cell['path']}{extension}")
    for block in sorted(blocks):
        ax.axvline(block, color="0.4", lw=1, ls=":")
        ax.text(block, 1.0, " trained length", transform=ax.get_xaxis_transform(), va="top", fontsize=8)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("position in the context (tokens, log scale; each point averages a doubling range)")
    ax.set_ylabel("mean NLL (nats), validation windows")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    ax.set_title(title or "Loss by position past the training length", fontsize=11)
    fig.tight_layout()
    fig.savefig(path)


def plot_passkey(report: dict, path: Path) -> None:
    """One heat map per (route, RoPE extension): accuracy by depth (rows) and length (columns)."""
    keys = list(dict.fromkeys((r["path"], r["rope_scaling"]) for r in report["passkey"]))
    lengths, depths = report["settings"]["lengths"], report["settings"]["passkey_depths"]
    fig = Figure(figsize=(3.2 * max(1, len(keys)) + 0.8, 3.4), dpi=DPI)
    axes = fig.subplots(1, max(1, len(keys)), squeeze=False)[0]
    image = None
    for ax, (route, kind) in zip(axes, keys, strict=False):
        acc = {
            (r["depth"], r["length"]): r["accuracy"]
            for r in report["passkey"]
            if (r["path"], r["rope_scaling"]) == (route, kind)
        }
        grid = [[acc[(d, n)] for n in lengths] for d in depths]
        image = ax.imshow(grid, vmin=0, vmax=1, cmap="viridis", aspect="auto")
        for i, row in enumerate(grid):
            for j, value in enumerate(row):
                ax.text(j, i, f"{value:.2f}", ha="center", va="center", fontsize=7, color="w" if value < 0.6 else "k")
        ax.set_xticks(range(len(lengths)), [str(n) for n in lengths], fontsize=7)
        ax.set_yticks(range(len(depths)), [f"{d:.0%}" for d in depths], fontsize=7)
        ax.set_xlabel("context length (tokens)", fontsize=8)
        ax.set_title(f"{route}" + ("" if kind == "none" else f", RoPE {kind}"), fontsize=9)
    axes[0].set_ylabel("needle depth", fontsize=8)
    if image is not None:
        fig.colorbar(image, ax=list(axes), fraction=0.05)
    chance = report["settings"]["passkey_chance"]
    fig.suptitle(f"Passkey accuracy, {variant_name(report)} (chance {chance:.2f})", fontsize=10)
    fig.savefig(path, bbox_inches="tight")
