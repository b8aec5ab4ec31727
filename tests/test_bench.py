"""The training-step benchmark, run for real on tiny shapes (its timings are not asserted: they are the output)."""

import json

from conftest import assert_user_error, call
from production.bench.train import main as bench_train
from production.config.resolve import resolve
from production.model.gpt import param_count

TINY = "--size nano --n-layer 1 --d-model 64 --d-ff 128 --block 32 --batch-size 2".split()
TINY += "--steps 2 --warmup 1 --device cpu".split()


def test_bench_train_json_reports_every_mode_on_its_own_model():
    proc = call(bench_train, *TINY, "--json")
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    exps = {mode: f"paper_{'baseline' if mode == 'standard' else mode}" for mode in report["modes"]}
    assert list(report["modes"]) == ["standard", "bottleneck", "decoupled", "gqa"]
    dims = {"n_layer": 1, "d_model": 64, "d_ff": 128, "block_size": 32}
    for mode, r in report["modes"].items():
        cfg = resolve("nano", exps[mode], dims).model  # each mode times the model of its paper exp
        assert (r["n_params"], r["attn_dim"]) == (param_count(cfg), cfg.attn_dim), mode
        assert r["ms_per_step"] > 0 and r["mfu"] is None and r["peak_bytes"] is None  # no known peak on CPU
    assert {r["attn_dim"] for r in report["modes"].values()} == {64, 48}  # standard/gqa 64, bottleneck/decoupled 48
    assert report["device"]["device"] == "cpu" and report["config"]["block_size"] == 32
    assert report["peak_rss_bytes"] > 0  # on CPU the process's peak, every mode alive


def test_ratios_need_the_standard_mode():
    proc = call(bench_train, *TINY, "--modes", "decoupled", "--json")
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["modes"]["decoupled"]["ratio_to_standard"] is None
    table = call(bench_train, *TINY, "--modes", "standard,decoupled")
    assert table.returncode == 0 and "vs std" in table.stdout and "decoupled" in table.stdout


def test_bench_train_rejects_unknown_mode():
    assert_user_error(call(bench_train, "--modes", "standard,flash"), "unknown mode")
