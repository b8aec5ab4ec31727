"""Paper assets from run artifacts: assets/paper_results.json, the two figures, the two tables and the number
macros paper.tex uses. See README.md and `--help`.

    python generate_paper_figures.py                      # the manifest's paper groups
    python generate_paper_figures.py --group cpu_smoke    # any group, e.g. after the CPU smoke run
"""

import json
import sys
from pathlib import Path

from production.core.atomic import write_text
from production.core.entry import Parser, command
from production.core.errors import UserError
from production.paper.figures import plot_convergence, plot_long_context, plot_pareto
from production.paper.manifest import load_manifest
from production.paper.results import collect
from production.paper.summary import markdown_summary
from production.paper.tables import long_context_table, number_macros, table


def main_caption(results: dict) -> str:
    loss = "mean $\\pm$ std over seeds, n" if results["max_seeds"] >= 2 else "one seed"
    return (
        f"Attention variants: parameters, attention widths, best validation loss ({loss}), KV cache at 128k "
        "tokens and its compression against the standard fp16 cache."
    )


def build_parser() -> Parser:
    p = Parser(
        prog="generate_paper_figures.py",
        description="Tables, figures and numbers of the paper, from the runs the manifest names.",
    )
    p.add_argument("--manifest", type=Path, default=Path("paper_manifest.json"))
    p.add_argument("--group", nargs="+", help="groups to report (default: those marked paper in the manifest)")
    p.add_argument("--runs-dir", type=Path, default=Path("runs"))
    p.add_argument("--out", type=Path, default=Path("assets"))
    p.add_argument("--partial", action="store_true", help="render what exists; mark missing runs and cells")
    return p


@command()
def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    manifest, sha = load_manifest(args.manifest)
    names = [g["name"] for g in manifest["groups"]]
    wanted = args.group or [g["name"] for g in manifest["groups"] if g.get("paper")]
    unknown = [g for g in wanted if g not in names]
    if unknown:
        raise UserError(f"no group {unknown[0]!r} in {args.manifest}; groups: {', '.join(names)}")
    groups = [manifest["groups"][names.index(g)] for g in wanted]
    results = collect(manifest, groups, args.runs_dir, partial=True)
    missing = results["missing_runs"]
    if missing and not args.partial:
        why = "; ".join(f"run {r['id']}: {r['missing'][0]}" for r in results["runs"] if r["status"] != "ok")
        raise UserError(
            f"{len(missing)} run(s) missing or unfinished ({why}); run them with run_paper_manifest.py, "
            "or pass --partial"
        )
    results["partial"] = args.partial
    results["manifest"] = {"path": str(args.manifest), "sha256": sha}
    args.out.mkdir(parents=True, exist_ok=True)
    write_text(args.out / "paper_results.json", json.dumps(results, indent=2) + "\n")
    plot_convergence(results, args.out / "fig_convergence.png")
    plot_pareto(results, args.out / "fig_pareto_memory_vs_loss.png")
    plot_long_context(results, args.out / "fig_long_context.png")
    write_text(args.out / "table_long_context.tex", long_context_table(results))
    write_text(args.out / "table_main.tex", table(results, "main", main_caption(results), "tab:main"))
    write_text(args.out / "table_scale.tex", table(results, "scale", "Scale: the 1B-parameter runs.", "tab:scale"))
    write_text(args.out / "paper_numbers.tex", number_macros(results))
    write_text(args.out / "summary.md", markdown_summary(results))
    print(
        f"wrote {args.out}/: paper_results.json, fig_convergence.png, fig_pareto_memory_vs_loss.png, "
        f"fig_long_context.png, table_main.tex, table_scale.tex, table_long_context.tex, paper_numbers.tex, "
        f"summary.md "
        f"({len(results['runs'])} runs"
        + (f", {len(missing)} missing or unfinished: {', '.join(missing)})" if missing else ")")
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
