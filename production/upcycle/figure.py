"""upcycle.png: perplexity ratio to the teacher against KV-cache bytes per token, per target, right after
surgery and after distillation, with the teacher's fp16 cache as the reference point. The tuned cache's point
carries the fp16 student's ratio: the tuner's guard bounds what its quantization adds (dNLL <= 0.02)."""

from __future__ import annotations

from pathlib import Path

from matplotlib.figure import Figure  # the object API: no pyplot state, no GUI backend

from production.core.atomic import atomic_path


def plot_upcycle(report: dict, path: Path) -> None:
    fig = Figure(figsize=(6.0, 4.0))
    ax = fig.subplots()
    teacher = report["teacher"]["kv_bytes_per_token_fp16"]
    ax.scatter([teacher], [1.0], marker="*", s=160, color="black", label="teacher (fp16 cache)", zorder=3)
    for i, row in enumerate(report["targets"]):
        color = f"C{i}"
        b, r, k = row["kv_bytes_per_token"], row["ppl_ratio"], row["kv_ratio_vs_teacher_fp16"]
        ax.annotate("", xy=(b["student_fp16"], r["after_distill"]), xytext=(b["student_fp16"], r["after_surgery"]),
                    arrowprops={"arrowstyle": "->", "color": color})  # fmt: skip
        ax.scatter([b["student_fp16"]], [r["after_surgery"]], color=color, marker="o", facecolors="none")
        ax.scatter([b["student_fp16"]], [r["after_distill"]], color=color, marker="o",
                   label=f"{row['target']} (fp16; {k['student_fp16']:.1f}x)")  # fmt: skip
        ax.scatter([b["student_policy"]], [r["after_distill"]], color=color, marker="s",
                   label=f"{row['target']} + tuned cache ({k['student_policy']:.1f}x; guard-bounded)")  # fmt: skip
    ax.set_xscale("log")
    ax.set_xlabel("KV-cache bytes per token (all layers, 128k context)")
    ax.set_ylabel("held-out perplexity / teacher's")
    ax.set_title("Upcycled to DBA (hollow: after surgery; filled: distilled)", fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=120)
