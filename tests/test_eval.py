"""main.py --mode eval: loss by position past the training length, through caches and RoPE extensions, and the
passkey and induction probes; eval.json against its schema; bad input."""

import json
import math

import jsonschema
import numpy as np
import pytest
import torch

from conftest import REPO, TINY, assert_user_error, run_main
from production.cache.policy import parse_policy
from production.config.evaluation import ROPE_SCALINGS, parse_multiples
from production.core.errors import UserError
from production.data.files import open_tokens
from production.data.tokenizer import get_tokenizer
from production.eval.probes import NEEDLE, QUESTION, key_pool, passkey_batch, shortest_length
from production.eval.report import log_bins
from production.eval.scoring import last_logits, score_tokens
from production.model.attention import cache_widths
from production.model.rope import RopeScaling, Rotary, scaled_frequencies
from production.train.checkpoint import load_model

SCHEMA = json.loads((REPO / "production" / "schemas" / "eval.schema.json").read_text())
Q4 = "ksem=q4_0@32,kgeo=q4_0@32,v=q4_0@32,resid=0"


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, token_file):
    out = tmp_path_factory.mktemp("eval") / "run"
    args = ["--mode", "train", *TINY, "--data", token_file, "--out-dir", out]
    assert run_main(*args, *"--steps 3 --eval-every 3 --eval-iters 1".split()).returncode == 0
    return out


def test_cached_scoring_equals_the_full_forward_pass_token_by_token(run_dir):
    model, _ = load_model(run_dir)
    ids = torch.randint(0, 50257, (2, 71), generator=torch.Generator().manual_seed(0))  # past the 32-token block
    full, hits = score_tokens(model, ids)
    with torch.no_grad():
        want = torch.log_softmax(model(ids[:, :-1])[0], -1).gather(-1, ids[:, 1:, None])[..., 0]
    assert full.shape == (2, 70) and torch.allclose(full, want, atol=1e-5)
    fp32 = parse_policy("fp32", list(cache_widths(model.cfg)), model.cfg.n_layer)
    for prefill, chunk in [(1, 1), (8, 8), (5, 16), (70, 3)]:
        cached, cached_hits = score_tokens(model, ids, fp32, prefill, chunk)
        assert torch.allclose(cached, full, atol=1e-5), (prefill, chunk)
        assert torch.equal(cached_hits, hits)
    tail, _ = score_tokens(model, ids, fp32, 9, 4, first=60)
    assert torch.allclose(tail, full[:, 60:], atol=1e-5)
    assert torch.allclose(last_logits(model, ids, fp32, 8), model(ids)[0][:, -1], atol=1e-4)
    q4, _ = score_tokens(model, ids, parse_policy(Q4, list(cache_widths(model.cfg)), model.cfg.n_layer), 8, 8)
    assert not torch.allclose(q4, full, atol=1e-6) and torch.allclose(q4, full, atol=0.5)


def test_rope_extensions_follow_their_papers():
    dim, base, s = 8, 10000.0, 4.0
    plain, one = scaled_frequencies(dim, base, None)
    assert one == 1.0 and torch.allclose(plain, base ** -(torch.arange(0, dim, 2, dtype=torch.float64) / dim))
    for kind in ROPE_SCALINGS:  # no stretch at or below the trained length
        assert torch.equal(scaled_frequencies(dim, base, RopeScaling(kind, 1.0, 32))[0], plain)
    linear, _ = scaled_frequencies(dim, base, RopeScaling("linear", s, 32))
    assert torch.allclose(linear, plain / s)
    ntk, _ = scaled_frequencies(dim, base, RopeScaling("ntk", s, 32))
    assert torch.allclose(ntk, (base * s ** (dim / (dim - 2))) ** -(torch.arange(0, dim, 2, dtype=torch.float64) / dim))
    assert ntk[0] == plain[0] and torch.all(ntk[1:] < plain[1:])  # the highest frequency stays
    yarn, mscale = scaled_frequencies(dim, base, RopeScaling("yarn", s, 1024))
    turns = 1024 * plain / (2 * math.pi)
    assert torch.equal(yarn[turns > 32], plain[turns > 32]) and torch.allclose(yarn[turns < 1], plain[turns < 1] / s)
    assert mscale == pytest.approx(0.1 * math.log(s) + 1)
    rot = Rotary(dim, base, 16, RopeScaling("yarn", s, 1024))
    assert torch.allclose(rot.cos[3] ** 2 + rot.sin[3] ** 2, torch.full((dim,), mscale**2, dtype=torch.float32))


def test_passkey_sequences_hide_the_key_at_the_depth_and_rank_it_among_single_token_candidates(token_file):
    tok = get_tokenizer()
    filler = open_tokens(token_file)[0]
    ids, cands = passkey_batch(filler, tok, 120, 0.5, 3, torch.Generator().manual_seed(0))
    assert ids.shape == (3, 120) and cands.shape == (3, 10)
    pool = dict((t, n) for n, t in key_pool(tok))
    question = tok.encode(QUESTION)
    for row, cand in zip(ids.tolist(), cands.tolist(), strict=True):
        assert len(set(cand)) == 10 and all(c in pool for c in cand)
        needle = tok.encode(NEEDLE.format(key=pool[cand[0]]))
        at = next(i for i in range(len(row)) if row[i : i + len(needle)] == needle)
        n_fill = 120 - len(needle) - len(question)
        assert at == round(0.5 * n_fill) and row[-len(question) :] == question
    shortest = shortest_length(tok)
    assert passkey_batch(filler, tok, shortest, 0.9, 4, torch.Generator().manual_seed(1))[0].shape == (4, shortest)
    with pytest.raises(ValueError, match="too short"):
        passkey_batch(filler, tok, shortest - 1, 0.9, 64, torch.Generator().manual_seed(1))


def test_eval_report_is_valid_and_its_paths_agree(run_dir, tmp_path):
    out = tmp_path / "report.json"
    args = ["--mode", "eval", "--ckpt", run_dir, "--device", "cpu", "--lengths", "1,2", "--windows", "2"]
    policies = f"fp16;fp32;{Q4}"
    extra = ["--kv-policy", policies, "--rope-scaling", "none,yarn", "--chunk", "8", "--passkey-trials", "2"]
    proc = run_main(*args, *extra, "--out", out)
    assert proc.returncode == 0, proc.stderr
    report = json.loads(out.read_text())
    jsonschema.validate(report, SCHEMA)
    assert (tmp_path / "report_loss.png").stat().st_size > 0 and (tmp_path / "report_passkey.png").stat().st_size > 0
    assert report["settings"]["lengths"] == [32, 64] and report["data"]["format"] == "npy"
    cell = {(r["rope_scaling"], r["length"], r["path"]): r for r in report["loss"]}
    assert len(cell) == 2 * 2 * 4
    for kind in ("none", "yarn"):
        for n in (32, 64):
            full = cell[kind, n, "full"]
            assert cell[kind, n, "fp16"]["mean_nll"] == pytest.approx(full["mean_nll"], abs=1e-5)
            exact = [b["nll"] for b in cell[kind, n, "fp32"]["buckets"]]
            assert exact == pytest.approx([b["nll"] for b in full["buckets"]], abs=1e-5)
            assert cell[kind, n, Q4]["mean_nll"] != full["mean_nll"]
    assert cell["yarn", 32, "full"]["mean_nll"] == cell["none", 32, "full"]["mean_nll"]  # no stretch at 1x
    assert cell["yarn", 64, "full"]["beyond_nll"] != cell["none", 64, "full"]["beyond_nll"]
    assert {r["path"]: r["cache_bytes_per_token"] for r in report["routes"]}["fp16"] == 2 * sum(
        cache_widths(load_model(run_dir)[0].cfg).values()
    )
    assert len(report["passkey"]) == 2 * 2 * 4 * 3 and len(report["induction"]) == 2 * 2 * 4
    assert "mean NLL" in proc.stdout and "passkey accuracy" in proc.stdout


def test_eval_defaults_to_the_run_directory_and_json_output(run_dir):
    proc = run_main("--mode", "eval", "--ckpt", run_dir, "--device", "cpu", "--lengths", "1", "--windows", "1",
                    "--kv-policy", "none", "--passkey-trials", "0", "--json")  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    assert [r["path"] for r in report["routes"]] == ["full"] and report["passkey"] == []
    assert json.loads((run_dir / "eval.json").read_text())["loss"] == report["loss"]


def test_bad_eval_input_is_one_line_and_keeps_the_earlier_report(run_dir, tmp_path):
    out = tmp_path / "eval.json"
    out.write_text('{"earlier": true}')
    base = ["--mode", "eval", "--device", "cpu", "--out", out]
    bad_ids = tmp_path / "bad.npy"
    np.save(bad_ids, np.full(5000, 60000, dtype=np.uint16))
    cases = [
        (["--ckpt", tmp_path / "missing"], "does not exist"),
        (["--ckpt", run_dir, "--lengths", "0,2"], "--lengths"),
        (["--ckpt", run_dir, "--lengths", "two"], "--lengths"),
        (["--ckpt", run_dir, "--rope-scaling", "dynamic"], "--rope-scaling"),
        (["--ckpt", run_dir, "--windows", "0"], "--windows"),
        (["--ckpt", run_dir, "--kv-policy", "k=q8_0@32,v=q8_0@32"], "unknown KV policy key"),
        (["--ckpt", run_dir, "--data", bad_ids], "token id 60000"),
        (["--ckpt", run_dir, "--lengths", "1000"], "validation split"),
        (["--ckpt", run_dir, "--prompt", "x"], "does not apply to --mode eval"),
        ([], "needs --ckpt"),
    ]
    for args, fragment in cases:
        assert_user_error(run_main(*base, *args), fragment)
    assert out.read_text() == '{"earlier": true}'
    with pytest.raises(UserError):
        parse_multiples("1,-2")


def test_a_model_without_rope_is_evaluated_once_not_per_extension(tmp_path, token_file):
    out = tmp_path / "norope"
    train = ["--mode", "train", *TINY, "--data", token_file, "--out-dir", out, "--no-rope"]
    assert run_main(*train, *"--steps 1 --eval-every 1 --eval-iters 1".split()).returncode == 0
    args = "--lengths 1,2 --windows 1 --passkey-trials 0 --kv-policy none --rope-scaling none,yarn".split()
    proc = run_main("--mode", "eval", "--ckpt", out, "--device", "cpu", *args)
    assert proc.returncode == 0 and "no RoPE" in proc.stderr, proc.stderr
    report = json.loads((out / "eval.json").read_text())
    assert report["settings"]["rope_scaling"] == ["none"] and len(report["loss"]) == 2


def test_log_bins_average_doubling_ranges_weighted_by_tokens():
    buckets = [{"start": t, "end": t + 8, "nll": float(t // 8)} for t in range(0, 40, 8)]  # 5 buckets, 40 tokens
    x, nll = zip(*log_bins(buckets), strict=True)  # ranges [0, 8), [8, 16), [16, 32), [32, 40)
    assert nll == (0.0, 1.0, 2.5, 4.0)
    assert x == pytest.approx([8**0.5, (8 * 16) ** 0.5, (16 * 32) ** 0.5, (32 * 40) ** 0.5])
