import json

from conftest import assert_user_error, call
from production.bench.decode import main as bench_decode
from production.bench.decode import split_policies


def test_policy_lists_split_on_semicolons_or_repeated_keys():
    assert split_policies("fp16;ksem=q4_0,kgeo=q8_0,v=q4_0,resid=128") == [
        "fp16",
        "ksem=q4_0,kgeo=q8_0,v=q4_0,resid=128",
    ]
    assert split_policies("fp16,k=q8_0@32,v=q8_0@32,resid=0,k=q4_0,v=q4_0") == [
        "fp16",
        "k=q8_0@32,v=q8_0@32,resid=0",
        "k=q4_0,v=q4_0",
    ]


def test_bench_decode_json_rows():
    args = "--size nano --n-layer 1 --exp paper_decoupled,paper_baseline --context 64,200 --steps 1 --rounds 2 "
    args += "--warmup 0 --chunk 50 --device cpu --json"
    policies = "fp16;ksem=q4_0@32,kgeo=q8_0@32,v=q4_0@32,resid=16"
    proc = call(bench_decode, *args.split(), "--policies", policies)
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    rows = {(r["exp"], r["context"], r["policy"]): r for r in report["results"]}
    # the decoupled policy does not apply to the standard model: 2 contexts x (2 + 1) policies
    assert len(rows) == 6 and ("paper_baseline", 64, "fp16") in rows
    for r in rows.values():
        assert r["ms_per_token"] > 0 and r["cache_bytes"] > 0 and r["gb_s"] > 0
    assert rows[("paper_decoupled", 200, "fp16")]["context_bytes"] == 200 * (16 + 32 + 48) * 2
    assert report["config"]["chunk_tokens"] == 50 and report["device"]["device"] == "cpu"


def test_bench_decode_rejects_bad_context():
    assert_user_error(call(bench_decode, "--context", "0"), "--context needs positive integers")
    assert_user_error(call(bench_decode, "--context", "1k"), "--context needs positive integers")
