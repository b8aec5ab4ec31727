import json
import math
import re
import subprocess
import sys

import torch

from conftest import REPO, TINY, call, checkout_runs, run_main
from production.cache.kvcache import estimate_bytes, fill_random
from production.cache.policy import parse_policy
from production.config.build import resolve_model
from production.config.sampling import GuardLimits
from production.model.attention import cache_widths
from production.model.gpt import GPT
from production.tune.__main__ import main as tune_main
from production.tune.decode import plan_decode
from production.tune.guard import guard_metrics
from production.tune.policy import bisect_path, search_policy
from production.tune.sensitivity import lower_hull, menu, quality_path
from production.tune.store import DecisionStore

DEC = ["k_sem", "k_geo", "v"]


def test_guard_metrics_match_hand_computation():
    ref = torch.tensor([[2.0, 0.0, 0.0], [0.0, 1.0, 0.0]])
    cand = torch.tensor([[1.5, 0.0, 0.0], [0.0, 1.0, 0.25]])
    targets = torch.tensor([0, 1])
    nll = lambda logits, t: -logits[t] + math.log(sum(math.exp(v) for v in logits))  # noqa: E731
    d0 = nll([1.5, 0, 0], 0) - nll([2.0, 0, 0], 0)
    d1 = nll([0, 1, 0.25], 1) - nll([0, 1, 0], 1)
    m = guard_metrics(ref, cand, targets)
    assert m["max_abs_logit"] == 0.5
    assert math.isclose(m["delta_nll"], (d0 + d1) / 2, rel_tol=1e-6)
    assert math.isclose(m["ppl_ratio"], math.exp((d0 + d1) / 2), rel_tol=1e-6)


def test_lower_hull_keeps_the_convex_frontier_from_cheapest_to_least_damage():
    pts = [(10, 9.0, "a"), (20, 3.0, "b"), (30, 2.5, "c"), (40, 0.5, "d"), (50, 0.6, "e"), (60, 0.0, "f")]
    pts += [(20, 4.0, "b'")]  # same bytes, more damage: dropped
    hull = lower_hull(pts)
    assert [p[2] for p in hull] == ["a", "b", "d", "f"]  # c lies above the segment b-d; e above d-f


def synthetic_sensitivity(model) -> dict:
    """Probes with a known order: layer 0's streams are sensitive, layer 1's are not."""
    probes = []
    for layer in range(model.cfg.n_layer):
        for stream in cache_widths(model.cfg):
            for spec in menu(stream):
                if spec.kind == "fp16":
                    continue
                bits = {"q2_1": 2, "q3_1": 3, "q4_0": 4, "nf4": 4, "q4_1": 4, "q8_0": 8}[spec.kind]
                err = 2.0**-bits * (8.0 if layer == 0 else 0.5) * (0.7 if spec.rot is not None else 1.0)
                probes.append({"layer": layer, "stream": stream, "spec": str(spec), "kl": err, "max_abs_logit": err})
    return {"probes": probes}


def test_quality_path_grows_in_bytes_falls_in_damage_and_ends_at_fp16():
    model = GPT(resolve_model("nano", "paper_decoupled", {"n_layer": 2}))
    path = quality_path(synthetic_sensitivity(model), model, 4096, 0, GuardLimits())
    sizes, damages = [p[0] for p in path], [p[1] for p in path]
    assert sizes == sorted(sizes) and len(set(sizes)) == len(sizes)
    assert all(a >= b - 1e-12 for a, b in zip(damages, damages[1:], strict=False))
    assert str(path[-1][2]) == "fp16" and damages[-1] == 0
    first = path[0][2]
    assert all(s.kind == "q2_1" and s.qb == 128 for layer in first.layers for s in layer.streams.values())
    assert str(path[1][2]).startswith("L0:")  # the sensitive layer is upgraded first
    assert all(p[0] == estimate_bytes(p[2], cache_widths(model.cfg), 4, 1, 4096) for p in path)


def test_bisection_finds_the_first_passing_point_within_budget_and_cap():
    """40 distinct policies (told apart by their window) of growing bytes; a judge passing from index t on."""
    path = [(100 * i, 1 / (i + 1), parse_policy(f"k=q4_0,v=q4_0,resid={i}", ["k", "v"], 1)) for i in range(40)]

    def judge(threshold):
        return lambda policy: {"policy": str(policy), "passed": policy.layers[0].resid >= threshold}

    index, tried = bisect_path(path, judge(17), 24, None)
    assert index == 17 and len(tried) <= 2 + math.ceil(math.log2(40))
    assert [t["path_index"] for t in tried[:2]] == [0, 39]  # the cheapest, then the last within the cap
    assert bisect_path(path, judge(0), 24, None) == (0, bisect_path(path, judge(0), 24, None)[1])
    assert len(bisect_path(path, judge(0), 24, None)[1]) == 1  # the cheapest passes: one judgment
    assert bisect_path(path, judge(30), 24, 2500)[0] is None  # nothing within 2500 bytes passes
    assert bisect_path(path, judge(17), 3, None)[0] == 19  # judged 0, 39, 19: out of judgments, the best found
    assert bisect_path(path, judge(17), 0, None) == (None, [])
    exact_end = [*path[:-1], (4000, 0.0, parse_policy("fp16", ["k", "v"], 1))]
    index, tried = bisect_path(exact_end, judge(99), 24, None)
    assert index is None and all(t["policy"] != "fp16" for t in tried)  # the exact end is never judged


def sharp_keys_model() -> GPT:
    """A nano model whose key projections are scaled up: low-bit key rounding then moves logits a lot."""
    torch.manual_seed(0)
    model = GPT(resolve_model("nano", "paper_decoupled", {"n_layer": 2, "block_size": 128})).eval()
    with torch.no_grad():
        for block in model.blocks:
            block.attn.q_sem.weight.mul_(12)
            block.attn.k_geo.weight.mul_(12)
            block.attn.q_geo.weight.mul_(12)
    return model


def test_search_rejects_a_failing_policy_and_chooses_a_passing_one():
    import contextlib

    model = sharp_keys_model()
    tokens = torch.randint(0, 50257, (1, 120), generator=torch.Generator().manual_seed(0))
    result = search_policy(model, tokens, 80, 128, GuardLimits(), None, 24, contextlib.nullcontext)
    probes = result["sensitivity"]["probes"]
    assert len(probes) == 2 * sum(len(menu(s)) - 1 for s in DEC)  # every unit under every searched spec
    assert {"delta_nll", "kl", "max_abs_logit"} <= set(probes[0])
    cheapest = result["tried"][0]  # the cheapest point of the first path is judged first, and rejected
    assert cheapest["path_index"] == 0 and not cheapest["passed"] and cheapest["guard"]["max_abs_logit"] > 0.5
    assert result["guard"]["max_abs_logit"] <= 0.5 and result["guard"]["delta_nll"] <= 0.02
    assert result["bytes"] < result["fp16_bytes"] and result["candidates_tried"] == len(result["tried"]) <= 24
    winner = next(t for t in result["tried"] if t["policy"] == result["policy"])
    assert winner["passed"] and winner["bytes"] == min(t["bytes"] for t in result["tried"] if t["passed"])
    policy = parse_policy(result["policy"], DEC, 2)  # a valid policy string, per layer where layers differ
    assert estimate_bytes(policy, cache_widths(model.cfg), 4, 1, 128) == result["bytes"]


def test_concurrent_writers_keep_every_entry(tmp_path):
    store = tmp_path / "tuner.json"
    script = (
        "import sys; from production.tune.store import DecisionStore; s = DecisionStore(sys.argv[1]); "
        "[s.put('train', 'dev', sys.argv[2], {'i': i}, {'v': i}) for i in range(40)]"
    )
    procs = [subprocess.Popen([sys.executable, "-c", script, str(store), f"writer{w}"], cwd=REPO) for w in range(3)]
    assert all(p.wait(timeout=120) == 0 for p in procs)
    entries = DecisionStore(store).entries()
    assert len(entries) == 120 and {e["config"] for e in entries.values()} == {"writer0", "writer1", "writer2"}


def test_corrupt_store_is_set_aside_not_reused(tmp_path, capsys):
    store = tmp_path / "tuner.json"
    store.write_text("{ not json")
    s = DecisionStore(store)
    assert s.get("train", "d", "c", {}) is None
    assert "corrupt" in capsys.readouterr().err
    assert [p.name for p in tmp_path.iterdir() if "corrupt" in p.name]
    s.put("train", "d", "c", {}, {"x": 1})
    assert s.get("train", "d", "c", {}) == {"x": 1}


def test_decode_plan_is_measured_then_remembered(tmp_path):
    model = GPT(resolve_model("nano", "paper_decoupled", {"n_layer": 3})).eval()
    policy = "L0:fp16|L1-2:ksem=q4_0@32,kgeo=q8_0@32,v=q4_0@32,resid=16"  # timed once per distinct layer policy
    cache = model.new_cache(parse_policy(policy, list(cache_widths(model.cfg)), 3), 1, 3000)
    fill_random(cache, 2500)
    store = DecisionStore(tmp_path / "t.json")
    first = plan_decode(cache, 4, 4, "cpu", "cpu:test", store)
    assert first["source"] == "measured" and first["bucket"] == 4096 and len(first["timings"]) == 7
    assert first["impl"] in ("auto", "bmm", "blockdiag") and cache.layers[0].chunk_tokens == first["chunk_tokens"]
    second = plan_decode(cache, 4, 4, "cpu", "cpu:test", store)
    assert second["source"] == "store" and second["impl"] == first["impl"]
    short = model.new_cache(cache.policy, 1, 100)
    fill_random(short, 50)
    assert plan_decode(short, 4, 4, "cpu", "cpu:test", store)["source"] == "default"


def test_sample_auto_searches_then_hits_the_store_and_show_lists_it(tmp_path, token_file):
    out, store = tmp_path / "run", tmp_path / "tuner.json"
    proc = run_main(
        "--mode",
        "train",
        *TINY,
        "--data",
        token_file,
        "--out-dir",
        out,
        *"--steps 2 --eval-iters 1 --tuner-store".split(),
        store,
    )
    assert proc.returncode == 0, proc.stderr
    args = [
        "--mode",
        "sample",
        "--ckpt",
        out / "best.pt",
        "--prompt-tokens",
        "5 6 7 8",
        *"--max-new-tokens 4 --json --tuner-store".split(),
        store,
        "--device",
        "cpu",
    ]
    first = run_main(*args)
    assert first.returncode == 0, first.stderr
    a = json.loads(first.stdout)
    assert a["tuner"]["source"] == "search" and a["kv_policy"] == a["tuner"]["policy"]
    assert set(a["tuner"]["guard"]) == {"max_abs_logit", "delta_nll", "ppl_ratio"}
    assert a["tuner"]["candidates_tried"] >= 1 and a["tuner"]["seconds"] > 0
    assert a["tuner"]["calibration"]["source"].startswith("validation split of")  # the run's data is here
    b = json.loads(run_main(*args).stdout)
    assert b["tuner"]["source"] == "store" and b["tuner"]["policy"] == a["tuner"]["policy"]
    keys = [k for k in DecisionStore(store).entries() if k.startswith("policy")]
    assert keys and all('"search": 2' in k for k in keys)  # decisions of an earlier search are never reused
    strict = json.loads(run_main(*args, "--guard-max-logit", "0.0001").stdout)  # other limits: another decision
    assert strict["tuner"]["source"] == "search"
    show = call(tune_main, "show", "--store", store)
    assert show.returncode == 0 and "policy" in show.stdout and "train" in show.stdout
    assert "sensitivity: one stream of one layer quantized" in show.stdout  # the probes behind the choice
    assert re.search(r"L0 k_sem +\S+ +[-+]\d\.\d{4}", show.stdout) and "L0 v" in show.stdout
    every = call(tune_main, "show", "--store", store, "--all")
    assert every.stdout.count("q2_1@64+rot") >= 3  # every probe: each stream under each spec
    clear = call(tune_main, "clear", "--store", store)
    assert clear.returncode == 0 and re.search(r"cleared \d+ decision", clear.stdout)
    assert DecisionStore(store).entries() == {}


def test_training_logs_tuner_decisions_and_reuses_them(tmp_path, token_file):
    store = tmp_path / "tuner.json"
    events = []
    for i in range(2):
        out = tmp_path / f"run{i}"
        proc = run_main(
            "--mode",
            "train",
            *TINY,
            "--data",
            token_file,
            "--out-dir",
            out,
            *"--steps 1 --eval-iters 1 --tuner-store".split(),
            store,
        )
        assert proc.returncode == 0, proc.stderr
        rows = [json.loads(line) for line in (out / "train.jsonl").read_text().splitlines()]
        events.append({e["decision"]: e for e in rows if e["type"] == "tuner"})
    first, second = events
    assert {"device", "precision", "micro_batch", "compile", "tuning_time"} <= set(first)
    assert first["micro_batch"]["value"] == [4, 1] and first["compile"]["value"] is False
    assert first["micro_batch"]["source"] == "rule" and second["micro_batch"]["source"] == "store"
    assert second["compile"]["source"] == "store"


def test_no_environment_variable_changes_behaviour():
    # production/core/launch.py reads torchrun's launch contract (RANK, WORLD_SIZE, LOCAL_RANK) and nothing else
    launch = REPO / "production" / "core" / "launch.py"
    found = re.findall(r'os\.environ(?:\.get)?\(?\[?"(\w+)"', launch.read_text())
    assert set(found) == {"RANK", "WORLD_SIZE", "LOCAL_RANK"}
    code = "\n".join(p.read_text() for p in (REPO / "production").rglob("*.py") if p != launch)
    code += "\n".join(
        (REPO / f).read_text()
        for f in ("main.py", "prepare_fineweb.py", "run_paper_manifest.py", "generate_paper_figures.py")
    )
    assert not re.search(r"os\.environ|getenv\(", code)


def test_the_default_store_is_the_working_directory_s_never_the_checkout_s(tmp_path, token_file):
    """A tuner decision with no --tuner-store lands in ./runs/tuner.json of where the command runs (the tests
    run in a temporary directory), and the checkout's own runs/ is byte-for-byte untouched."""
    before = checkout_runs()
    proc = run_main("--mode", "train", *TINY, "--data", token_file, "--out-dir", tmp_path / "run", "--steps", "1")
    assert proc.returncode == 0, proc.stderr
    assert DecisionStore(tmp_path / "runs" / "tuner.json").entries()  # the decision is where the command ran
    assert checkout_runs() == before
