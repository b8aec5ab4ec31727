"""Paper assets from `results.collect(...)`: the convergence and memory/loss figures, booktabs tables, and the
number macros paper.tex cites (so the text never carries a hand-copied result)."""

from __future__ import annotations

import collections
from pathlib import Path

import matplotlib
import matplotlib.ticker

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from production.kvcache import PAPER_POLICY  # noqa: E402
from production.results import CORE_EXPS  # noqa: E402

DPI = 150
CONVERGENCE_PANEL = (6.5, 4.2)  # inches per panel: one row per group, a second column when a group has sweeps
PARETO_SIZE = (8.0, 5.5)
NAMES = {"paper_baseline": "Standard", "paper_bottleneck": "Bottleneck", "paper_decoupled": "Decoupled",
         "paper_gqa": "GQA", "paper_decoupled_null": "Decoupled + null token",
         "paper_decoupled_notieqk": "Decoupled, untied Q/K", "paper_decoupled_norope": "Decoupled, no RoPE",
         "paper_baseline_lr2e4": "Standard, lr 2e-4", "paper_baseline_lr3e4": "Standard, lr 3e-4",
         "paper_baseline_lr4e4": "Standard, lr 4e-4"}  # fmt: skip
COLORS = {"standard": "#4c72b0", "bottleneck": "#dd8452", "decoupled": "#55a868", "gqa": "#c44e52"}


def common_steps(aggs: list[dict]) -> int:
    return collections.Counter(a["steps"] for a in aggs).most_common(1)[0][0]


def label(agg: dict, group_steps: int) -> str:
    name = NAMES.get(agg["exp"], agg["exp"])
    return name if agg["steps"] == group_steps else f"{name} ({agg['steps'] // 1000}k steps)"


def short_policy(policy: str) -> str:
    return "fp16" if policy == "fp16" else "Q4/Q8/Q4" if policy == PAPER_POLICY else policy


def fmt_bytes(n: int | None) -> str:
    if n is None:
        return "--"
    if n >= 2**30:
        return f"{n / 2**30:.2f} GiB"
    return f"{n / 2**20:.0f} MiB" if n >= 2**20 else f"{n / 2**10:.0f} KiB"


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
    fig, axes = plt.subplots(max(1, len(groups)), ncols, figsize=(width * ncols, height * max(1, len(groups))),
                             squeeze=False, dpi=DPI)  # fmt: skip
    for row, g in zip(axes, groups, strict=False):
        core, rest, steps = split_variants(results, g)
        panels = [(core, "attention variants"), (rest, "sweeps, longer runs and ablations")][:ncols]
        for ax, (members, title) in zip(row, panels, strict=True):
            draw_curves(ax, results, members, steps, members is core)
            ax.set_title(f"{g}: {title}", fontsize=11)
    if not groups:
        axes[0][0].text(0.5, 0.5, "no runs", ha="center", va="center", transform=axes[0][0].transAxes)
    fig.suptitle("Validation loss on fixed held-out windows: mean over seeds, band = min-max", fontsize=12)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def draw_curves(ax, results: dict, members: list[dict], steps: int, core: bool) -> None:
    cmap = plt.get_cmap("tab10")
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
        ys = [y for line in ax.lines for x, y in zip(line.get_xdata(), line.get_ydata(), strict=True)
              if x >= 0.1 * max(line.get_xdata())]  # fmt: skip
        pad = 0.05 * (max(ys) - min(ys)) + 1e-3
        ax.set_ylim(min(ys) - pad, max(ys) + pad)
    ax.legend(fontsize=8, frameon=False)


def plot_pareto(results: dict, path: Path) -> None:
    fig, ax = plt.subplots(figsize=PARETO_SIZE, dpi=DPI)
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
            points.append((kv["bytes"], "D", short_policy(kv["policy"])))
        for x, marker, _ in points:
            ax.errorbar(x, y, yerr=err, fmt=marker, color=color, mfc=color if marker == "o" else "white",
                        ms=8, mew=1.8, capsize=3)  # fmt: skip
        if len(points) == 2:
            ax.plot([points[0][0], points[1][0]], [y, y], color=color, lw=1, ls=":")
        ax.annotate(label(a, steps), (points[-1][0], y), textcoords="offset points", xytext=(6, 4), fontsize=8)
        shown += 1
    ax.set_xscale("log")
    ax.xaxis.set_major_locator(matplotlib.ticker.LogLocator(base=2))  # 32 MiB, 64 MiB, ...
    ax.xaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda x, _: fmt_bytes(int(x))))
    ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    context = next((a["kv"]["context_len"] for a in results["variants"] if a.get("kv")), 131072)
    ax.set_xlabel(f"KV-cache bytes at {context:,} tokens (log scale)")
    ax.set_ylabel("best validation loss (nats), mean ± std over seeds")
    ax.set_title("Memory vs quality: filled = fp16 cache, hollow = quantized (Q4/Q8/Q4)")
    ax.grid(alpha=0.3, which="both")
    if not shown:
        ax.text(0.5, 0.5, "no runs with mem128k.json", ha="center", va="center", transform=ax.transAxes)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def tex_escape(text: str) -> str:
    return text.replace("_", r"\_").replace("%", r"\%").replace("&", r"\&").replace("#", r"\#")


def attention_dims(a: dict) -> str:
    mode = a.get("attn_mode")
    if mode == "decoupled":
        return f"{a['sem_dim']}+{a['geo_dim']}"
    if mode == "gqa":
        return f"{a['attn_dim']} ({a['kv_heads']} KV heads)"
    return str(a["attn_dim"]) if mode else "--"


def table(results: dict, which: str, caption: str, tex_label: str) -> str:
    """booktabs table of the variants of the groups shown in table `which`."""
    groups = [g["name"] for g in results["groups"] if g["table"] == which]
    aggs = [a for a in results["variants"] if a["group"] in groups]
    lines = [r"\begin{table}[t]", r"\centering", r"\small", rf"\caption{{{caption}}}", rf"\label{{{tex_label}}}",
             r"\begin{tabular}{llrlrll}", r"\toprule",
             r"Group & Variant & Params & Attention dims & Best val loss & KV @128k & Compression \\",
             r"\midrule"]  # fmt: skip
    if not aggs:
        lines.append(r"\multicolumn{7}{c}{\emph{no runs of this table in the selected groups}} \\")
    for g in groups:
        members = [a for a in aggs if a["group"] == g]
        if not members:
            continue
        steps = common_steps(members)
        reference = next((a["kv"]["standard_fp16_bytes"] for a in members if a.get("kv") and
                          a["kv"]["standard_fp16_bytes"]), None)  # fmt: skip
        for a in members:
            best = a["best_val_loss"]
            if best["n"] == 0:
                loss = r"\emph{not run}"
            elif best["std"] is None:
                loss = f"{best['mean']:.3f} ({best['n']})"
            else:
                loss = f"{best['mean']:.3f} $\\pm$ {best['std']:.3f} ({best['n']})"
            kv = a.get("kv")
            kv_cell = "--" if kv is None else f"{fmt_bytes(kv['bytes'])} {short_policy(kv['policy'])}"
            comp = "--" if kv is None or reference is None else f"{reference / kv['bytes']:.1f}$\\times$"
            params = "--" if "n_params" not in a else f"{a['n_params'] / 1e6:.1f}M"
            incomplete = len(a["runs_with_results"]) < len(a["runs"])
            name = tex_escape(label(a, steps)) + (r"$^\dagger$" if incomplete else "")
            lines.append(
                f"{tex_escape(g)} & {name} & {params} & {attention_dims(a)} & {loss} & {kv_cell} & {comp} \\\\"
            )
    lines += [r"\bottomrule", r"\end{tabular}"]
    if any(len(a["runs_with_results"]) < len(a["runs"]) for a in aggs):
        lines.append(r"\\[2pt]{\footnotesize $^\dagger$ some runs of this variant are missing or unfinished.}")
    lines.append(r"\end{table}")
    return "\n".join(lines) + "\n"


def number_macros(results: dict) -> str:
    """\\newcommand definitions for the numbers paper.tex quotes; `n/a` where the selection lacks them."""

    def fmt(value, spec):
        return "n/a" if value is None else format(value, spec)

    dec = next((a for a in results["variants"] if a.get("kv") and a["kv"]["ratios"]), None)
    ratios = dec["kv"]["ratios"] if dec else {}
    main = next((g["name"] for g in results["groups"] if g["table"] == "main"), None)
    core = {a["exp"]: a for a in results["variants"]
            if a["group"] == main and a["exp"] in CORE_EXPS and a["best_val_loss"]["n"]}  # fmt: skip
    best = {k: core[k]["best_val_loss"]["mean"] if k in core else None for k in CORE_EXPS}
    macros = {
        "DBAarch": fmt(ratios.get("arch"), ".2f"), "DBAquant": fmt(ratios.get("quant"), ".2f"),
        "DBAetoe": fmt(ratios.get("e2e"), ".1f"),
        "DBAratioSize": dec["size"] if dec else "n/a",
        "DBAcontext": f"{(dec['kv']['context_len'] if dec else 131072):,}".replace(",", "{,}"),
        "DBAnumRuns": str(len(results["runs"])),
        "DBAnumMissing": str(len(results["missing_runs"])),
        "DBAgroups": tex_escape(", ".join(g["name"] for g in results["groups"])),
        "DBAbestStandard": fmt(best["paper_baseline"], ".3f"),
        "DBAbestBottleneck": fmt(best["paper_bottleneck"], ".3f"),
        "DBAbestDecoupled": fmt(best["paper_decoupled"], ".3f"),
        "DBAbestGQA": fmt(best["paper_gqa"], ".3f"),
    }  # fmt: skip
    return "".join(f"\\newcommand{{\\{k}}}{{{v}}}\n" for k, v in macros.items())
