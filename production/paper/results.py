"""Run artifacts -> the numbers of the paper (`assets/paper_results.json`).

Reads only the runs a manifest names: `runs/<id>/train.jsonl` (meta, eval, train, done events),
`runs/<id>/mem128k.json` and, when present, `runs/<id>/eval.json`. A missing or malformed run is an error
naming its id and what is missing, unless `partial` is set, in which case the run is kept with `status`
"missing" or "incomplete" and a `missing` list.
"""

from __future__ import annotations

import json
import math
import re
import statistics
from pathlib import Path

from scipy import stats

from production.core.errors import UserError
from production.core.layout import RunDir, read_events
from production.eval.report import EVAL_FORMAT, log_bins

CORE_EXPS = ("paper_baseline", "paper_bottleneck", "paper_decoupled", "paper_gqa")


def variant_of(run_id: str) -> str:
    """Runs that differ only by seed share a variant: the id without its `_s<seed>` suffix."""
    return re.sub(r"_s\d+$", "", run_id)


def read_jsonl(path: Path, run_id: str) -> list[dict]:
    try:
        return read_events(path)
    except json.JSONDecodeError as e:
        raise UserError(f"run {run_id}: {path} is not valid JSON lines ({e})") from e


def collect_run(spec: dict, group: dict, runs_dir: Path, partial: bool) -> dict:
    """One run's numbers from its directory."""
    run_id, run = spec["id"], RunDir(runs_dir / spec["id"])
    row = {"id": run_id, "group": group["name"], "variant": variant_of(run_id), "exp": spec["exp"]}
    row.update(size=spec["size"], seed=spec["seed"], steps=spec["steps"], status="ok", missing=[])
    primary = run.same_as()
    if primary is not None:  # trained once under another id of the manifest: its files are this run's
        row["same_as"], run = primary, RunDir(runs_dir / primary)

    def absent(what: str, status: str = "incomplete") -> None:
        if not partial:
            raise UserError(f"run {run_id}: {what} (run it with run_paper_manifest.py, or pass --partial)")
        row["missing"].append(what)
        if row["status"] == "ok":
            row["status"] = status

    log = run.log
    if not log.exists():
        absent(f"no {log}", status="missing")
        return row
    events = read_jsonl(log, run_id)
    metas = [e for e in events if e["type"] in ("meta", "resume_meta")]
    evals = [e for e in events if e["type"] == "eval"]
    done = [e for e in events if e["type"] == "done"]
    trains = [e for e in events if e["type"] == "train"]
    if not metas or not evals:
        absent(f"{log} has no meta or eval events")
        return row
    if not done:
        absent(f"{log} has no done event (unfinished)")
    config = metas[-1]["config"]
    model, recipe, data = config["model"], config["train"], config.get("data", {})
    row.update(
        {
            "n_params": metas[-1]["n_params"],
            "attn_mode": model["attn_mode"],
            "d_model": model["d_model"],
            "n_layer": model["n_layer"],
            "n_head": model["n_head"],
            "attn_dim": model["attn_dim"],
            "sem_dim": model["sem_dim"],
            "geo_dim": model["geo_dim"],
            "kv_heads": model["kv_heads"],
            "null_attn": model["null_attn"],
            "tie_qk": model["tie_qk"],
            "rope": model["rope"],
            "block_size": model["block_size"],
            "batch_tokens": recipe["batch_size"] * recipe["grad_accum"] * model["block_size"],
            "data_source": data.get("source"),
            "data_tokens": data.get("n_tokens"),
            "best_val_loss": done[-1]["best_val_loss"] if done else min(e["val_loss"] for e in evals),
            "final_val_loss": evals[-1]["val_loss"],
            "final_step": evals[-1]["step"],
            "tokens_seen": trains[-1]["tokens_seen"] if trains else 0,
            "curve": [[e["step"], e["val_loss"]] for e in evals],
        }
    )
    row["best_val_ppl"] = math.exp(row["best_val_loss"])
    row["final_val_ppl"] = math.exp(row["final_val_loss"])
    if run.eval.exists():  # optional: run_paper_manifest.py --post-eval
        try:
            report = json.loads(run.eval.read_text())
            if report.get("format") != EVAL_FORMAT:
                raise ValueError(f"format {report.get('format')!r}, expected {EVAL_FORMAT}")
            row["eval"] = eval_numbers(report)
        except (json.JSONDecodeError, KeyError, TypeError, IndexError, ValueError, AttributeError) as e:
            absent(f"{run.eval} is malformed ({type(e).__name__}: {e})")
    mem_path = run.mem128k
    if not mem_path.exists():
        absent(f"no {mem_path} (run_paper_manifest.py --post-mem128k)")
        return row
    try:
        mem = json.loads(mem_path.read_text())
        row["kv"] = kv_numbers(mem)
    except (json.JSONDecodeError, KeyError) as e:
        absent(f"{mem_path} is malformed ({type(e).__name__}: {e})")
    return row


def eval_numbers(report: dict) -> dict:
    """A run's eval.json, condensed: mean NLL and passkey accuracy per RoPE extension, route and multiple of the
    block, and the loss-by-position curve of each route at the longest length (plain RoPE)."""
    block = report["settings"]["block_size"]
    nll, passkey, curves = {}, {}, {}
    for cell in report["loss"]:
        key = f"{cell['rope_scaling']}/{cell['path']}"
        nll.setdefault(key, {})[str(cell["length"] // block)] = cell["mean_nll"]
        if cell["length"] == report["settings"]["lengths"][-1] and cell["rope_scaling"] == "none":
            curves[cell["path"]] = [list(point) for point in log_bins(cell["buckets"])]
    for cell in report["passkey"]:
        key, multiple = f"{cell['rope_scaling']}/{cell['path']}", str(cell["length"] // block)
        passkey.setdefault(key, {}).setdefault(multiple, []).append(cell["accuracy"])
    passkey = {k: {m: statistics.fmean(v) for m, v in row.items()} for k, row in passkey.items()}
    routes = {r["path"]: r["policy"] for r in report["routes"]}
    chance = report["settings"]["passkey_chance"]
    return {
        "block_size": block,
        "nll": nll,
        "passkey": passkey,
        "passkey_chance": chance,
        "curves": curves,
        "routes": routes,
    }


def mean_eval(evals: list[dict]) -> dict | None:
    """The eval numbers of a variant's runs, averaged over its seeds (cells that every run has)."""
    if not evals:
        return None

    def mean_of(table: str) -> dict:
        keys = set.intersection(*(set(e[table]) for e in evals))
        out = {}
        for k in sorted(keys):
            multiples = set.intersection(*(set(e[table][k]) for e in evals))
            out[k] = {m: statistics.fmean(e[table][k][m] for e in evals) for m in sorted(multiples, key=int)}
        return out

    curves = {}
    for path in set.intersection(*(set(e["curves"]) for e in evals)):
        points = [e["curves"][path] for e in evals]
        n = min(len(p) for p in points)  # seeds evaluated to different lengths share their common prefix
        curves[path] = [
            [xs[0][0], statistics.fmean(p[1] for p in xs)] for xs in zip(*(p[:n] for p in points), strict=True)
        ]
    first = evals[0]
    return {
        "block_size": first["block_size"],
        "nll": mean_of("nll"),
        "passkey": mean_of("passkey"),
        "passkey_chance": first["passkey_chance"],
        "curves": curves,
        "routes": first["routes"],
        "n": len(evals),
    }


def kv_numbers(mem: dict) -> dict:
    """KV bytes at the measured context: the run's policy, its fp16 cache, and ratios where decomposed."""
    per_token = sum(s["width"] for s in mem["per_stream"].values()) * mem["model"]["n_layer"]
    values = mem["context_len"] * mem["batch_size"] * per_token  # cached values, every layer and stream
    out = {
        "context_len": mem["context_len"],
        "policy": mem["policy"],
        "bytes": mem["measured_bytes"],
        "fp16_bytes": mem["measured_bytes"] if mem["policy"] == "fp16" else None,
        "bits_per_value": 8 * mem["measured_bytes"] / values,
        "tuned": "tuner" in mem,
        "standard_fp16_bytes": None,
        "ratios": None,
    }
    d = mem.get("decomposition")
    if d is not None:
        out["fp16_bytes"] = d["decoupled_fp16"]["measured_bytes"]
        out["standard_fp16_bytes"] = d["standard_fp16"]["measured_bytes"]
        out["ratios"] = {k: v["measured"] for k, v in d["ratios"].items()}
    elif mem["model"]["attn_mode"] == "standard" and mem["policy"] == "fp16":
        out["standard_fp16_bytes"] = mem["measured_bytes"]
    return out


def mean_std(values: list[float]) -> dict:
    return {
        "n": len(values),
        "mean": statistics.fmean(values) if values else None,
        "std": statistics.stdev(values) if len(values) >= 2 else None,
    }


def aggregate(rows: list[dict]) -> list[dict]:
    """Per variant: n, mean and std of best and final val loss over the runs that have them."""
    variants: dict[str, list[dict]] = {}
    for r in rows:
        variants.setdefault(r["variant"], []).append(r)
    out = []
    for name, members in variants.items():
        have = [r for r in members if "best_val_loss" in r]
        first = members[0]
        agg = {
            "variant": name,
            "group": first["group"],
            "exp": first["exp"],
            "size": first["size"],
            "steps": first["steps"],
            "runs": [r["id"] for r in members],
            "runs_with_results": [r["id"] for r in have],
            "best_val_loss": mean_std([r["best_val_loss"] for r in have]),
            "final_val_loss": mean_std([r["final_val_loss"] for r in have]),
        }
        ref = next((r for r in have if "attn_mode" in r), None)
        if ref is not None:
            agg.update(
                {
                    k: ref[k]
                    for k in (
                        "attn_mode",
                        "n_params",
                        "d_model",
                        "n_layer",
                        "attn_dim",
                        "sem_dim",
                        "geo_dim",
                        "kv_heads",
                        "null_attn",
                        "tie_qk",
                        "rope",
                    )
                }
            )
        kv = next((r["kv"] for r in members if "kv" in r), None)
        agg["kv"] = kv
        agg["eval"] = mean_eval([r["eval"] for r in members if "eval" in r])
        out.append(agg)
    return out


def comparisons(aggs: list[dict], rows: list[dict]) -> list[dict]:
    """Each non-baseline variant against the paper_baseline variant of its group with the same steps: the
    difference of mean best val loss, and Welch's t-test p-value when both sides have n >= 2."""
    out = []
    for a in aggs:
        if a["exp"].startswith("paper_baseline") or a["best_val_loss"]["n"] == 0:
            continue
        base = next(
            (
                b
                for b in aggs
                if b["exp"] == "paper_baseline"
                and b["group"] == a["group"]
                and b["steps"] == a["steps"]
                and b["best_val_loss"]["n"] > 0
            ),
            None,
        )
        if base is None:
            continue
        x = [r["best_val_loss"] for r in rows if r["variant"] == a["variant"] and "best_val_loss" in r]
        y = [r["best_val_loss"] for r in rows if r["variant"] == base["variant"] and "best_val_loss" in r]
        p = float(stats.ttest_ind(x, y, equal_var=False).pvalue) if len(x) >= 2 and len(y) >= 2 else None
        out.append(
            {
                "variant": a["variant"],
                "baseline": base["variant"],
                "n": len(x),
                "n_baseline": len(y),
                "diff_best_val_loss": statistics.fmean(x) - statistics.fmean(y),
                "welch_p": p,
            }
        )
    return out


def collect(manifest: dict, groups: list[dict], runs_dir: Path, partial: bool) -> dict:
    rows = [collect_run(spec, g, runs_dir, partial) for g in groups for spec in g["runs"]]
    aggs = aggregate(rows)
    return {
        "groups": [
            {
                "name": g["name"],
                "description": g.get("description", ""),
                "table": g.get("table", "main"),
                "data": g.get("data"),
            }
            for g in groups
        ],
        "runs": rows,
        "variants": aggs,
        "comparisons": comparisons(aggs, rows),
        "partial": partial,
        "missing_runs": [r["id"] for r in rows if r["status"] != "ok"],
        "max_seeds": max((a["best_val_loss"]["n"] for a in aggs), default=0),
    }
