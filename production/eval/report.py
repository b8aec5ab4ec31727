"""`eval.json` (format dba.eval/1, schema production/schemas/eval.schema.json): every (RoPE extension, length,
route) cell of loss by position, the passkey and induction probes, and what was evaluated on what."""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
from tqdm import tqdm

from production.cache.kvcache import estimate_bytes
from production.data.files import TokenStream
from production.data.tokenizer import GPT2Tokenizer
from production.eval.longctx import Route, loss_by_position, scaling_for, validation_windows
from production.eval.probes import CANDIDATES, induction, passkey
from production.model.attention import cache_widths
from production.model.gpt import GPT

EVAL_FORMAT = "dba.eval/1"
PASSKEY_DEPTHS = (0.1, 0.5, 0.9)
INDUCTION_TRIALS = 4


@dataclass(frozen=True)
class EvalSpec:
    lengths: tuple[int, ...]  # tokens, ascending
    windows: int
    scalings: tuple[str, ...]
    chunk: int
    passkey_trials: int
    seed: int

    @property
    def cells(self) -> int:
        return len(self.scalings) * len(self.lengths)


def route_record(route: Route, model: GPT, length: int) -> dict:
    """A route as reported: its label, the policy used and the cache bytes per token at `length`."""
    record = {"path": route.label, "policy": route.resolved, "cache_bytes_per_token": None}
    if route.policy is not None:
        cfg = model.cfg
        total = estimate_bytes(route.policy, cache_widths(cfg), cfg.kv_heads, 1, length)
        record["cache_bytes_per_token"] = total / length
    return record


def evaluate(
    model: GPT, val: TokenStream, tok: GPT2Tokenizer, routes: list[Route], spec: EvalSpec, autocast=None
) -> dict:
    """Every cell, with a progress bar; the model's RoPE is plain again afterwards. An extension at or below the
    trained length is plain RoPE, so such cells are computed once and reported under each extension."""
    block = model.cfg.block_size
    windows = validation_windows(val, spec.windows, spec.lengths[-1], spec.seed)
    out = {"loss": [], "passkey": [], "induction": []}
    done: dict[tuple, dict] = {}  # (effective extension, length, route) -> its cells
    t0 = time.perf_counter()
    bar = tqdm(total=spec.cells * len(routes), desc="eval", unit="cell", disable=None)
    try:
        for kind in spec.scalings:
            for length in spec.lengths:
                scaling = scaling_for(kind, length, block)
                model.set_rope_scaling(scaling)
                for route in routes:
                    bar.set_postfix_str(f"{kind} {length} {route.label}", refresh=False)
                    key = ("none" if scaling is None else kind, length, route.label)
                    if key not in done:
                        done[key] = run_cell(model, val, tok, windows, length, route, spec, autocast)
                    for name, rows in done[key].items():
                        out[name] += [{"rope_scaling": kind} | row for row in rows]
                    bar.update()
    finally:
        model.set_rope_scaling(None)
        bar.close()
    out["seconds"] = time.perf_counter() - t0
    return out


def run_cell(model, val, tok, windows, length: int, route: Route, spec: EvalSpec, autocast) -> dict[str, list]:
    """One (length, route) cell under the model's current RoPE: its loss, induction and passkey rows."""
    block = model.cfg.block_size
    loss = loss_by_position(model, windows, length, route, spec.chunk, block // 4, autocast)
    copy = induction(model, tok.vocab_size, length, INDUCTION_TRIALS, route, spec.chunk, spec.seed, autocast)
    keys = []
    for depth in PASSKEY_DEPTHS if spec.passkey_trials else ():
        args = (length, depth, spec.passkey_trials, route, spec.chunk, spec.seed, autocast)
        keys.append(passkey(model, val, tok, *args))
    return {"loss": [loss], "induction": [copy], "passkey": keys}


def settings(spec: EvalSpec, block: int) -> dict:
    return {
        "block_size": block,
        "lengths": list(spec.lengths),
        "multiples": [length // block for length in spec.lengths],
        "windows": spec.windows,
        "bucket": block // 4,
        "chunk": spec.chunk,
        "rope_scaling": list(spec.scalings),
        "passkey_trials": spec.passkey_trials,
        "passkey_depths": list(PASSKEY_DEPTHS) if spec.passkey_trials else [],
        "passkey_candidates": CANDIDATES,
        "passkey_chance": 1 / CANDIDATES,
        "induction_trials": INDUCTION_TRIALS,
        "seed": spec.seed,
    }


def log_bins(buckets: list[dict]) -> list[tuple[float, float]]:
    """Buckets of equal width -> (geometric-mean position, mean NLL) over the position ranges [0, w), [w, 2w),
    [2w, 4w), ..., so that a log-scale plot gets evenly spaced points that average more tokens further out."""
    width = buckets[0]["end"] - buckets[0]["start"]
    out, lo = [], 0
    while lo < buckets[-1]["end"]:
        hi = max(width, 2 * lo)
        inside = [b for b in buckets if lo <= b["start"] < hi]
        tokens = sum(b["end"] - b["start"] for b in inside)
        nll = sum(b["nll"] * (b["end"] - b["start"]) for b in inside) / tokens
        out.append((max(1.0, (max(lo, 1) * min(hi, buckets[-1]["end"])) ** 0.5), nll))
        lo = hi
    return out


def summary_rows(report: dict) -> list[str]:
    """The report as a few readable lines: mean NLL per length for each route and extension, then the probes."""
    lengths = report["settings"]["lengths"]
    head = f"{'rope':<7} {'route':<10} " + " ".join(f"{f'{n}':>8}" for n in lengths)
    rows = [f"mean NLL (nats) by context length; trained at {report['settings']['block_size']}", head]
    keys = dict.fromkeys((r["rope_scaling"], r["path"]) for r in report["loss"])
    for kind, path in keys:
        cells = {r["length"]: r["mean_nll"] for r in report["loss"] if (r["rope_scaling"], r["path"]) == (kind, path)}
        rows.append(f"{kind:<7} {path:<10} " + " ".join(f"{cells[n]:>8.4f}" for n in lengths))
    if report["passkey"]:
        chance = report["settings"]["passkey_chance"]
        rows.append(f"passkey accuracy (mean over depths; chance {chance:.2f})")
        for kind, path in keys:
            cells = [r for r in report["passkey"] if (r["rope_scaling"], r["path"]) == (kind, path)]
            acc = {n: torch.tensor([r["accuracy"] for r in cells if r["length"] == n]).mean() for n in lengths}
            rows.append(f"{kind:<7} {path:<10} " + " ".join(f"{float(acc[n]):>8.2f}" for n in lengths))
    rows.append("induction: NLL of the repeat / of the first copy")
    for kind, path in keys:
        cells = {r["length"]: r for r in report["induction"] if (r["rope_scaling"], r["path"]) == (kind, path)}
        ratio = {n: cells[n]["repeat_nll"] / cells[n]["first_nll"] for n in cells}
        rows.append(f"{kind:<7} {path:<10} " + " ".join(f"{ratio[n]:>8.3f}" for n in sorted(ratio)))
    return rows
