"""main.py --mode sample end to end on a checkpoint made by a real (tiny) training run."""

import argparse
import json

import pytest
import torch

from conftest import TINY, assert_user_error, run_main


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory, token_file):
    out = tmp_path_factory.mktemp("sample") / "run"
    proc = run_main(
        "--mode",
        "train",
        *TINY,
        "--exp",
        "paper_decoupled_null",
        "--data",
        token_file,
        "--out-dir",
        out,
        *"--steps 3 --eval-iters 1".split(),
    )
    assert proc.returncode == 0, proc.stderr
    return out / "best.pt"


def sample_json(ckpt, *args):
    proc = run_main("--mode", "sample", "--ckpt", ckpt, "--json", "--device", "cpu", *args)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def test_text_and_json_output(ckpt):
    proc = run_main("--mode", "sample", "--ckpt", ckpt, "--prompt", "To be, or not", "--max-new-tokens", "5")
    assert proc.returncode == 0 and proc.stdout.startswith("To be, or not"), proc.stderr
    r = sample_json(
        ckpt,
        "--prompt-tokens",
        "464 3290 318",
        *"--max-new-tokens 6 --kv-policy ksem=q4_0@32,kgeo=q8_0@32,v=q4_0@32,resid=2 --seed 3 --top-k 20".split(),
    )
    assert r["prompt_ids"] == [464, 3290, 318] and len(r["generated_ids"]) == 6
    assert r["kv_policy"] == "ksem=q4_0@32,kgeo=q8_0@32,v=q4_0@32,resid=2"
    assert r["cache_bytes"] > 0 and r["ms_per_token"] > 0 and isinstance(r["text"], str)
    again = sample_json(
        ckpt,
        "--prompt-tokens",
        "464 3290 318",
        *"--max-new-tokens 6 --kv-policy ksem=q4_0@32,kgeo=q8_0@32,v=q4_0@32,resid=2 --seed 3 --top-k 20".split(),
    )
    assert again["generated_ids"] == r["generated_ids"]  # seeded
    compressed = "L0:ksem=q2_1@32+rot,kgeo=q4_1@8+ch,v=q3_1@32+rot5,resid=2"  # new kinds, rotations, a range
    c = sample_json(ckpt, "--prompt-tokens", "464 3290 318", "--max-new-tokens", "20", "--kv-policy", compressed)
    assert c["kv_policy"] == "ksem=q2_1@32+rot,kgeo=q4_1@8+ch,v=q3_1@32+rot5,resid=2"  # one layer: no range
    assert len(c["generated_ids"]) == 20 and 0 < c["cache_bytes"] < 32 * (16 + 32 + 48) * 2  # below fp16's


def test_fp16_cache_and_recompute_agree_through_the_cli(ckpt):
    args = ["--prompt-tokens", "11 22 33 44", "--max-new-tokens", "12", "--greedy"]
    fp16, none = sample_json(ckpt, *args, "--kv-policy", "fp16"), sample_json(ckpt, *args, "--kv-policy", "none")
    assert fp16["generated_ids"] == none["generated_ids"]
    graphed = sample_json(ckpt, *args, "--kv-policy", "ksem=q4_0@32,kgeo=q8_0@32,v=q4_0@32,resid=2", "--cuda-graphs")
    quant = sample_json(ckpt, *args, "--kv-policy", "ksem=q4_0@32,kgeo=q8_0@32,v=q4_0@32,resid=2")
    assert graphed["cuda_graphs"] and graphed["generated_ids"] == quant["generated_ids"]  # static steps (eager on CPU)
    assert none["kv_policy"] == "none" and none["cache_bytes"] == 0
    assert fp16["cache_bytes"] == 32 * 2 * (16 + 32 + 48) * 1  # max_seq = block 32, 1 layer, fp16


@pytest.mark.parametrize(
    "args,match",
    [
        (["--prompt-tokens", "1 50257"], "outside the vocabulary"),
        (["--prompt-tokens", "1 two"], "must be integers"),
        (["--prompt", "hi", "--prompt-tokens", "1"], "exactly one of"),
        (["--prompt-tokens", " ".join(["5"] * 30), "--max-new-tokens", "5"], "exceeds max_seq 32"),
        (["--prompt", "hi", "--max-new-tokens", "4", "--kv-policy", "k=q8_0,v=q8_0"], "unknown KV policy key 'k'"),
        (
            ["--prompt", "hi", "--max-new-tokens", "4", "--kv-policy", "ksem=q2_0,kgeo=q8_0,v=q8_0"],
            "unknown KV cache kind",
        ),
        (["--prompt", "hi", "--max-new-tokens", "4", "--kv-policy", "L0-1:fp16"], "goes past the model's layers L0-0"),
        (["--prompt", "hi", "--max-new-tokens", "4", "--kv-policy", "L0:fp16|L0:fp16"], "sets layer 0 twice"),
        (["--prompt", "hi", "--max-new-tokens", "4", "--kv-policy", "L0 fp16|L1:fp16"], "bad layer range"),
        (["--prompt", "hi", "--max-new-tokens", "4", "--kv-policy", "ksem=q2_1@6,kgeo=q8_0,v=q8_0"], "multiple of 4"),
        (
            ["--prompt", "hi", "--max-new-tokens", "4", "--kv-policy", "ksem=q4_0+ch+ch,kgeo=q8_0,v=q8_0"],
            "bad modifier +ch",
        ),
        (["--prompt", "hi", "--max-new-tokens", "4", "--guard-ppl", "1"], "--guard-ppl > 1"),
        (["--prompt", "hi", "--max-new-tokens", "4", "--guard-max-logit", "0"], "--guard-max-logit > 0"),
        (["--prompt", "hi", "--steps", "4"], "--steps does not apply to --mode sample"),
        (["--prompt", "hi", "--temperature", "0"], "temperature must be > 0"),
        (["--prompt", "hi", "--kv-policy", "none", "--cuda-graphs"], "--cuda-graphs needs a KV cache"),
    ],
)
def test_bad_sampling_input(ckpt, args, match):
    assert_user_error(run_main("--mode", "sample", "--ckpt", ckpt, *args), match)


def test_bad_checkpoints(tmp_path):
    assert_user_error(run_main("--mode", "sample", "--ckpt", tmp_path / "no.pt", "--prompt", "a"), "does not exist")
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a checkpoint at all")
    assert_user_error(run_main("--mode", "sample", "--ckpt", junk, "--prompt", "a"), "not a readable checkpoint")
    objects = tmp_path / "objects.pt"
    torch.save({"model": argparse.Namespace(a=1), "config": {}}, objects)  # needs code to unpickle
    proc = run_main("--mode", "sample", "--ckpt", objects, "--prompt", "a")
    assert_user_error(proc, "holds Python objects", "unsafe load")
    assert "weights_only" not in proc.stderr  # torch's advice to load it unsafely is not passed on
    assert_user_error(run_main("--mode", "sample", "--ckpt", tmp_path, "--prompt", "a"), "without best.pt or last.pt")
