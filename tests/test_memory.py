import json

import jsonschema
import pytest

from conftest import REPO, TINY, assert_user_error, call, run_main, run_script
from production.bench.memory import main as bench_memory
from production.cache.memory import measure_cache
from production.cache.policy import parse_policy
from production.config.build import resolve_model
from production.model.attention import cache_widths

SCHEMA = json.loads((REPO / "production" / "schemas" / "mem128k.schema.json").read_text())


def run_mem(*args):
    """production/bench_end_to_end_memory.py, in this process."""
    return call(bench_memory, *args)


@pytest.mark.parametrize(
    "kind",
    ["fp16", "bf16", "fp32", "q8_0@32", "q4_0@32", "nf4@32", "q4_0@64", "q8_0@16"]
    + ["q4_1@32", "q3_1@64", "q2_1@32", "q4_0@32+rot", "q2_1@32+ch", "q3_1@16+rot5+ch"],
)
@pytest.mark.parametrize("resid", [0, 3, 128])
def test_estimate_equals_measured_storage_on_cpu(kind, resid):
    # odd widths: k_sem 7, k_geo 10, v 17 (one head); blocks span tokens, nothing padded
    cfg = resolve_model("nano", "paper_decoupled", {"n_head": 1, "sem_dim": 7, "geo_dim": 10, "n_layer": 2})
    policy = parse_policy(f"ksem={kind},kgeo={kind},v={kind},resid={resid}", ["k_sem", "k_geo", "v"], cfg.n_layer)
    for context in (2, 333, 4096):
        record, cache = measure_cache(cache_widths(cfg), cfg.kv_heads, policy, 2, context, "cpu")
        assert record["measured_bytes"] == record["estimate_bytes"] == cache.nbytes()
        assert sum(s["measured_bytes"] for s in record["per_stream"].values()) == record["measured_bytes"]
        assert all(s["measured_bytes"] == s["estimate_bytes"] for s in record["per_stream"].values())
        # the benchmark measures CPU caches on the meta device (no pages touched): the same record
        on_meta, _ = measure_cache(cache_widths(cfg), cfg.kv_heads, policy, 2, context, "meta")
        assert on_meta == record


def test_small_decomposition_at_128k(tmp_path):
    out = tmp_path / "mem.json"
    # as a script, the way the original README runs it (and its 4.5 GiB of buffers leave with the process)
    args = "--size small --exp paper_decoupled --decompose --device cpu".split()
    proc = run_script("production/bench_end_to_end_memory.py", *args, "--out", out)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("mem128k e2e=14.59x arch=5.33x quant=2.74x")
    report = json.loads(out.read_text())
    jsonschema.validate(report, SCHEMA)
    d = report["decomposition"]
    assert d["standard_fp16"]["measured_bytes"] == 12 * 131072 * 2 * 768 * 2  # 4.5 GiB
    for name, expect in {"arch": 1536 / 288, "quant": 2.736, "e2e": 14.59}.items():
        assert d["ratios"][name]["estimate"] == d["ratios"][name]["measured"]
        assert d["ratios"][name]["measured"] == pytest.approx(expect, rel=1e-3)
    # 210 B per token per layer, plus the exact windows
    windows = 12 * 2 * ((128 + 1) * 48 + 128 * 96 + (128 + 1) * 144)
    assert report["measured_bytes"] == 12 * 131072 * 210 + windows


def test_non_decoupled_decompose_is_a_clear_error(tmp_path):
    proc = run_mem("--size", "nano", "--exp", "paper_gqa", "--decompose", "--out", tmp_path / "m.json")
    assert_user_error(proc, "--decompose needs a decoupled model")
    assert not (tmp_path / "m.json").exists()
    assert_user_error(run_mem("--size", "nano"), "either --ckpt")
    assert_user_error(run_mem("--size", "nano", "--exp", "paper_decoupled", "--policy", "k=q8_0"), "unknown KV")


def test_checkpoints_baseline_and_decode_step(tmp_path, token_file):
    runs = {}
    for exp in ("paper_decoupled", "paper_baseline"):
        runs[exp] = tmp_path / exp
        proc = run_main(
            "--mode",
            "train",
            *TINY,
            "--exp",
            exp,
            "--data",
            token_file,
            "--out-dir",
            runs[exp],
            *"--steps 1 --eval-iters 1".split(),
        )
        assert proc.returncode == 0, proc.stderr
    baseline = runs["paper_baseline"] / "best.pt"
    proc = run_mem(
        "--ckpt",
        runs["paper_decoupled"] / "best.pt",
        "--decompose",
        "--baseline-ckpt",
        baseline,
        *"--context-len 512 --decode-step --device cpu".split(),
    )
    assert proc.returncode == 0, proc.stderr
    report = json.loads((runs["paper_decoupled"] / "mem128k.json").read_text())  # written next to the checkpoint
    jsonschema.validate(report, SCHEMA)
    d = report["decomposition"]
    assert d["baseline"]["source"].endswith("best.pt") and d["baseline"]["model"]["d_model"] == 64
    assert d["standard_fp16"]["measured_bytes"] == 1 * 512 * 2 * 64 * 2
    for config in ("standard_fp16", "decoupled_fp16", "candidate"):
        assert d[config]["decode_step"]["ms"] > 0 and d[config]["decode_step"]["context"] == 511
    assert report["source"]["exp"] == "paper_decoupled" and report["context_len"] == 512
    # --policy auto: the tuner's guarded choice for this checkpoint at the measured context
    out, store = tmp_path / "auto.json", tmp_path / "tuner.json"
    args = ["--ckpt", runs["paper_decoupled"] / "best.pt", "--policy", "auto", "--context-len", "4096"]
    proc = run_mem(*args, "--device", "cpu", "--out", out, "--tuner-store", store)
    assert proc.returncode == 0, proc.stderr
    auto = json.loads(out.read_text())
    jsonschema.validate(auto, SCHEMA)
    assert auto["tuner"]["policy"] == auto["policy"] and auto["tuner"]["source"] == "search"
    assert auto["measured_bytes"] == auto["estimate_bytes"] == auto["tuner"]["bytes"]
    assert auto["tuner"]["guard"]["max_abs_logit"] <= 0.5 and auto["measured_bytes"] < 4096 * 96 * 2
    again = run_mem(*args, "--device", "cpu", "--out", tmp_path / "again.json", "--tuner-store", store)
    assert json.loads((tmp_path / "again.json").read_text())["tuner"]["source"] == "store", again.stderr
    proc = run_mem("--size", "nano", "--exp", "paper_decoupled", "--policy", "auto", "--out", tmp_path / "x.json")
    assert_user_error(proc, "--policy auto asks the tuner about a trained model: give --ckpt")
