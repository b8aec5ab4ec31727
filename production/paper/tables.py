"""Paper tables (booktabs) and the number macros paper.tex cites, so the text never carries a hand-copied
result."""

from __future__ import annotations

from production.paper.labels import common_steps, fmt_bytes, kv_label, label
from production.paper.results import CORE_EXPS


def tex_escape(text: str) -> str:
    return text.replace("_", r"\_").replace("%", r"\%").replace("&", r"\&").replace("#", r"\#")


def attention_dims(a: dict) -> str:
    mode = a.get("attn_mode")
    if mode == "decoupled":
        return f"{a['sem_dim']}+{a['geo_dim']}"
    if mode == "gqa":
        return f"{a['attn_dim']} ({a['kv_heads']} KV head{'' if a['kv_heads'] == 1 else 's'})"
    return str(a["attn_dim"]) if mode else "--"


def table(results: dict, which: str, caption: str, tex_label: str) -> str:
    """booktabs table of the variants of the groups shown in table `which`."""
    groups = [g["name"] for g in results["groups"] if g["table"] == which]
    aggs = [a for a in results["variants"] if a["group"] in groups]
    lines = [
        r"\begin{table}[t]",
        r"\centering",
        r"\small",
        rf"\caption{{{caption}}}",
        rf"\label{{{tex_label}}}",
        r"\resizebox{\ifdim\width>\linewidth\linewidth\else\width\fi}{!}{%",  # shrink only if too wide
        r"\begin{tabular}{llrlrll}",
        r"\toprule",
        r"Group & Variant & Params & Attention dims & Best val loss & KV @128k & Compression \\",
        r"\midrule",
    ]
    if not aggs:
        lines.append(r"\multicolumn{7}{c}{\emph{no runs of this table in the selected groups}} \\")
    for g in groups:
        members = [a for a in aggs if a["group"] == g]
        if not members:
            continue
        steps = common_steps(members)
        reference = next(
            (a["kv"]["standard_fp16_bytes"] for a in members if a.get("kv") and a["kv"]["standard_fp16_bytes"]), None
        )
        for a in members:
            best = a["best_val_loss"]
            if best["n"] == 0:
                loss = r"\emph{not run}"
            elif best["std"] is None:
                loss = f"{best['mean']:.3f} ({best['n']})"
            else:
                loss = f"{best['mean']:.3f} $\\pm$ {best['std']:.3f} ({best['n']})"
            kv = a.get("kv")
            kv_cell = "--" if kv is None else f"{fmt_bytes(kv['bytes'])} {kv_label(kv)}"
            comp = "--" if kv is None or reference is None else f"{reference / kv['bytes']:.1f}$\\times$"
            params = "--" if "n_params" not in a else f"{a['n_params'] / 1e6:.1f}M"
            incomplete = len(a["runs_with_results"]) < len(a["runs"])
            name = tex_escape(label(a, steps)) + (r"$^\dagger$" if incomplete else "")
            lines.append(
                f"{tex_escape(g)} & {name} & {params} & {attention_dims(a)} & {loss} & {kv_cell} & {comp} \\\\"
            )
    lines += [r"\bottomrule", r"\end{tabular}}"]
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
    core = {
        a["exp"]: a
        for a in results["variants"]
        if a["group"] == main and a["exp"] in CORE_EXPS and a["best_val_loss"]["n"]
    }
    best = {k: core[k]["best_val_loss"]["mean"] if k in core else None for k in CORE_EXPS}
    macros = {
        "DBAarch": fmt(ratios.get("arch"), ".2f"),
        "DBAquant": fmt(ratios.get("quant"), ".2f"),
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
        "DBAsetup": setup_text(results),
        "DBAconvergenceCaption": "Validation loss against training step"
        + (", mean over seeds with the min--max band." if results["max_seeds"] >= 2 else ", one seed per variant."),
    }
    return "".join(f"\\newcommand{{\\{k}}}{{{v}}}\n" for k, v in macros.items())


def either(values: list) -> str:
    """Distinct values in order of appearance: "6000", "6000 or 12000"."""
    distinct = list(dict.fromkeys(values))
    return ", ".join(map(str, distinct[:-1])) + (" or " if len(distinct) > 1 else "") + str(distinct[-1])


def fmt_tokens(n: int) -> str:
    return f"{n / 1e9:.3g}B" if n >= 1e9 else f"{n / 1e6:.3g}M" if n >= 1e6 else f"{n / 1e3:.3g}K"


def describe_data(source: str | None, n_tokens: int | None) -> str:
    """The data a run recorded in its resolved config, as the setup section names it."""
    count = "" if n_tokens is None else f", {fmt_tokens(n_tokens)} tokens"
    if source is None:
        return "data its log does not name"
    if source.startswith("embedded:"):
        return f"the embedded corpus, {tex_escape(source.removeprefix('embedded:'))}{count}"
    name = tex_escape(source.replace("\\", "/").rstrip("/").rsplit("/", 1)[-1])
    if "fineweb" in source.lower():
        return rf"FineWeb-Edu~\citep{{penedo2024fineweb}} tokens from \texttt{{{name}}}{count}"
    return rf"the token file \texttt{{{name}}}{count}"


def setup_text(results: dict) -> str:
    """One sentence per reported group, from what its runs actually resolved to and trained on."""
    sentences = []
    for g in results["groups"]:
        rows = [r for r in results["runs"] if r["group"] == g["name"] and "n_params" in r]
        name = tex_escape(g["name"])
        if not rows:
            sentences.append(rf"Group \texttt{{{name}}} has no runs with results yet.")
            continue
        shape = either([f"{r['n_layer']} layers, $d={r['d_model']}$" for r in rows])
        sizes = either([rf"\texttt{{{r['size']}}}" for r in rows])
        steps = either([r["steps"] for r in rows])
        batch = either([f"{r['batch_tokens']:,}".replace(",", "{,}") for r in rows])
        data = either([describe_data(r.get("data_source"), r.get("data_tokens")) for r in rows])
        seeds = len({r["seed"] for r in rows})
        seed_text = f"{seeds} seeds" if seeds > 1 else "one seed"
        sentences.append(
            rf"The {len(rows)} runs of group \texttt{{{name}}} use the {sizes} preset ({shape}) and train "
            f"for {steps} steps of {batch} tokens each on {data}, with {seed_text}."
        )
    return " ".join(sentences)


def long_context_rows(results: dict) -> tuple[list[str], list[tuple[dict, str, list]]]:
    """The numbers of the long-context tables (LaTeX and Markdown): the multiples of the training length every
    table column names, and per variant with an eval report its label and cells: mean NLL at each multiple
    (full forward passes, plain RoPE), then at the longest the change through the tuner's cache and with YaRN,
    and passkey accuracy there (None where the report lacks the cell)."""
    aggs = [a for a in results["variants"] if a.get("eval")]
    multiples = sorted({m for a in aggs for m in a["eval"]["nll"].get("none/full", {})}, key=int)
    top = multiples[-1] if multiples else "1"
    rows = []
    for a in aggs:
        ev, steps = a["eval"], common_steps([b for b in results["variants"] if b["group"] == a["group"]])
        full = ev["nll"].get("none/full", {})
        cells = [full.get(m) for m in multiples]
        for key in ("none/auto", "yarn/full"):
            other = ev["nll"].get(key, {}).get(top)
            cells.append(None if other is None or top not in full else other - full[top])
        cells.append(ev["passkey"].get("none/full", {}).get(top))
        rows.append((a, label(a, steps), cells))
    return multiples, rows


def long_context_cells(cells: list, n_multiples: int, delta_digits: int, missing: str) -> list[str]:
    """long_context_rows' cells as text: NLL to 3 decimals, the two changes signed, passkey to 2."""
    specs = [".3f"] * n_multiples + [f"+.{delta_digits}f"] * 2 + [".2f"]
    return [missing if c is None else format(c, spec) for c, spec in zip(cells, specs, strict=True)]


def long_context_table(results: dict) -> str:
    """Mean NLL at each evaluated multiple of the training length (full forward passes, plain RoPE), the gap of
    the tuner's quantized cache and of YaRN at the longest length, and passkey accuracy there."""
    multiples, rows = long_context_rows(results)
    top = multiples[-1] if multiples else "1"
    head = " & ".join(f"{m}$\\times$" for m in multiples)
    lines = [
        r"\begin{table}[H]",
        r"\centering",
        r"\small",
        r"\caption{Validation NLL (nats) by context length, as multiples of the training length (full forward "
        rf"passes, plain RoPE); at {top}$\times$: the change through the tuner's quantized cache ($\Delta$ cache) and "
        r"with YaRN ($\Delta$ YaRN), and passkey accuracy.}",
        r"\label{tab:long}",
        r"\resizebox{\ifdim\width>\linewidth\linewidth\else\width\fi}{!}{%",
        rf"\begin{{tabular}}{{l{'r' * len(multiples)}rrr}}",
        r"\toprule",
        rf"Variant & {head} & $\Delta$ cache & $\Delta$ YaRN & Passkey \\" if multiples else r"Variant & \\",
        r"\midrule",
    ]
    if not rows:
        lines.append(r"\multicolumn{1}{c}{\emph{no runs with eval.json (run\_paper\_manifest.py --post-eval)}} \\")
    for _, name, cells in rows:
        lines.append(f"{tex_escape(name)} & " + " & ".join(long_context_cells(cells, len(multiples), 3, "--")) + r" \\")
    lines += [r"\bottomrule", r"\end{tabular}}"]
    if rows:
        chance = rows[0][0]["eval"]["passkey_chance"]
        lines.append(rf"\\[2pt]{{\footnotesize Passkey: {round(1 / chance)} candidates, chance {chance:.2f}.}}")
    lines.append(r"\end{table}")
    return "\n".join(lines) + "\n"
