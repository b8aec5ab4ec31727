"""The lm-evaluation-harness adapter (`dba`): its scores against a direct forward pass, the cache path against
the reference, and lm-eval's own CLI run offline on small local tasks (YAML over local JSON files)."""

import json

import pytest
import torch

from conftest import TINY, call, run_main
from production.core.errors import UserError
from production.data.tokenizer import get_tokenizer
from production.train.checkpoint import load_model

pytest.importorskip("lm_eval", reason="an optional install: pip install -r requirements-lm-eval.txt")

from lm_eval.api.instance import Instance  # noqa: E402

from production.eval import harness  # noqa: E402
from production.eval.lm_adapter import DBALM  # noqa: E402

CHOICES = [
    ("The cat sat on the", [" mat", " moon", " idea"], 0),
    ("One, two, three,", [" four", " blue"], 0),
    ("To be or not to", [" be", " see the light", " run"], 0),
    ("Hello", [" world", " there, friend"], 1),
]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory, token_file):
    out = tmp_path_factory.mktemp("lm_eval") / "run"
    args = ["--mode", "train", *TINY, "--data", token_file, "--out-dir", out]
    proc = run_main(*args, *"--steps 3 --eval-every 3 --eval-iters 1".split())
    assert proc.returncode == 0, proc.stderr
    return out / "best.pt"


def requests(kind: str, args: list[tuple]) -> list[Instance]:
    return [Instance(request_type=kind, doc={}, arguments=a, idx=i) for i, a in enumerate(args)]


def direct_loglikelihood(model, context: str, continuation: str, max_length: int) -> tuple[float, bool]:
    """The plain computation: one forward pass over context + continuation, log-softmax, the continuation's ids."""
    tok = get_tokenizer()
    whole, n_ctx = tok.encode(context + continuation), len(tok.encode(context))
    seq = whole[-(max_length + 1) :]
    n = len(whole) - n_ctx
    with torch.no_grad():
        logp = torch.log_softmax(model(torch.tensor([seq[:-1]]))[0][0], dim=-1)
    rows, targets = logp[-n:], torch.tensor(seq[-n:])
    return float(rows.gather(1, targets[:, None]).sum()), bool((rows.argmax(-1) == targets).all())


def test_loglikelihood_equals_a_direct_forward_pass_batched_truncated_and_through_the_cache(ckpt):
    model, _ = load_model(ckpt)
    long_context = ("the quick brown fox jumps over the lazy dog " * 8).strip()  # more than the 32-token block
    pairs = [(c, choice) for c, choices, _ in CHOICES for choice in choices] + [(long_context, " again and")]
    reference = [direct_loglikelihood(model, c, x, 32) for c, x in pairs]
    plain = DBALM(ckpt=ckpt, device="cpu", batch_size=4).loglikelihood(requests("loglikelihood", pairs))
    for (got, greedy), (want, want_greedy) in zip(plain, reference, strict=True):
        assert got == pytest.approx(want, abs=1e-4) and greedy == want_greedy
    exact = DBALM(ckpt=ckpt, device="cpu", kv_policy="fp32").loglikelihood(requests("loglikelihood", pairs))
    assert [x for x, _ in exact] == pytest.approx([x for x, _ in reference], abs=1e-4)
    chunked = DBALM(ckpt=ckpt, device="cpu", kv_policy="fp32", chunk=2).loglikelihood(requests("loglikelihood", pairs))
    assert [x for x, _ in chunked] == pytest.approx([x for x, _ in reference], abs=1e-4)
    quant = DBALM(ckpt=ckpt, device="cpu", kv_policy="ksem=q4_0@32;kgeo=q4_0@32;v=q4_0@32")
    assert str(quant.policy) == "ksem=q4_0@32,kgeo=q4_0@32,v=q4_0@32,resid=0"
    scored = quant.loglikelihood(requests("loglikelihood", pairs))
    multi = [i for i, (_, x) in enumerate(pairs) if len(get_tokenizer().encode(x)) > 1]
    assert any(scored[i][0] != exact[i][0] for i in multi)  # the 4-bit cache is read by later tokens
    single = [i for i in range(len(pairs)) if i not in multi]
    assert [scored[i][0] for i in single] == pytest.approx([exact[i][0] for i in single], abs=1e-5)


def test_rolling_loglikelihood_predicts_every_token_once(ckpt):
    model, _ = load_model(ckpt)
    lm = DBALM(ckpt=ckpt, device="cpu", batch_size=3)
    short, long = "A short line of verse.", "Shall I compare thee to a summer's day? " * 6
    ids = get_tokenizer().encode(short)
    with torch.no_grad():
        logp = torch.log_softmax(model(torch.tensor([[lm.eot_token_id, *ids[:-1]]]))[0][0], dim=-1)
    want = float(logp.gather(1, torch.tensor(ids)[:, None]).sum())
    got = lm.loglikelihood_rolling(requests("loglikelihood_rolling", [(short,), (long,)]))
    assert got[0] == pytest.approx(want, abs=1e-4)
    cached = DBALM(ckpt=ckpt, device="cpu", kv_policy="fp32")
    assert cached.loglikelihood_rolling(requests("loglikelihood_rolling", [(long,)]))[0] == pytest.approx(
        got[1], abs=1e-3
    )
    assert len(get_tokenizer().encode(long)) > 32 and got[1] < got[0] < 0


def test_generation_is_greedy_stops_at_the_stop_sequence_and_matches_across_policies(ckpt):
    model, _ = load_model(ckpt)
    tok = get_tokenizer()
    context = "To be or not to be"
    ids = tok.encode(context)
    with torch.no_grad():  # greedy by full recomputation, 6 tokens
        for _ in range(6):
            ids.append(int(model(torch.tensor([ids]))[0][0, -1].argmax()))
    full = tok.decode(ids[len(tok.encode(context)) :])
    stop = full[len(full) // 2 :][:2] or full
    args = [(context, {"until": [stop], "max_gen_toks": 6, "do_sample": False})]
    for policy in ("none", "fp16", "paper"):
        (text,) = DBALM(ckpt=ckpt, device="cpu", kv_policy=policy).generate_until(requests("generate_until", args))
        assert text == full.split(stop)[0], policy


def write_tasks(root) -> list[str]:
    """Three local tasks, one per request type, over JSON-lines files in `root`."""
    cache = root / "hf-datasets"

    def task(name: str, rows: list[dict], spec: str) -> None:
        (root / f"{name}.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
        head = f"task: {name}\ndataset_path: json\ndataset_kwargs:\n  cache_dir: {cache}\n  data_files:\n"
        (root / f"{name}.yaml").write_text(head + f"    test: {root / name}.jsonl\ntest_split: test\n" + spec)

    mc = [{"q": q, "choices": c, "gold": g} for q, c, g in CHOICES]
    task("dba_mc", mc, 'output_type: multiple_choice\ndoc_to_text: "{{q}}"\ndoc_to_choice: "{{choices}}"\n'
         'doc_to_target: "{{gold}}"\nmetric_list:\n  - metric: acc\n')  # fmt: skip
    text = [{"text": "Shall I compare thee to a summer's day? " * 4}, {"text": "A short line."}]
    task("dba_rolling", text, 'output_type: loglikelihood_rolling\ndoc_to_text: ""\ndoc_to_target: "{{text}}"\n'
         "metric_list:\n  - metric: word_perplexity\n")  # fmt: skip
    gen = [{"q": "Q: 2+2?\nA:", "a": " 4"}, {"q": "Q: the capital of France?\nA:", "a": " Paris"}]
    task("dba_gen", gen, 'output_type: generate_until\ndoc_to_text: "{{q}}"\ndoc_to_target: "{{a}}"\n'
         'generation_kwargs:\n  until: ["\\n"]\n  max_gen_toks: 8\n  do_sample: false\n'
         "metric_list:\n  - metric: exact_match\n")  # fmt: skip
    return ["dba_mc", "dba_rolling", "dba_gen"]


def test_lm_eval_cli_runs_the_dba_model_offline_on_local_tasks(tmp_path, ckpt):
    tasks = write_tasks(tmp_path)
    out = tmp_path / "results"
    args = ["--model", "dba", "--model_args", f"ckpt={ckpt},kv_policy=paper", "--device", "cpu", "--batch_size", 4]
    proc = call(harness.main, *args, "--tasks", ",".join(tasks), "--include_path", tmp_path, "--output_path", out)
    assert proc.returncode == 0, proc.stderr[-2000:]
    (results_file,) = out.rglob("results_*.json")
    results = json.loads(results_file.read_text())["results"]
    model, _ = load_model(ckpt)
    hits = [
        max(range(len(c)), key=lambda j: direct_loglikelihood(model, q, c[j], 32)[0]) == gold for q, c, gold in CHOICES
    ]
    assert results["dba_mc"]["acc,none"] == pytest.approx(sum(hits) / len(hits))
    assert results["dba_rolling"]["word_perplexity,none"] > 1 and "exact_match,none" in results["dba_gen"]


def test_arguments_as_lm_eval_parses_them_and_empty_continuations(ckpt):
    lm = DBALM.create_from_arg_string(f"ckpt={ckpt},kv_policy=none", {"batch_size": 2, "device": "cpu"})
    assert lm.policy is None and lm.batch_size == 2  # lm-eval turns `none` into None
    ids = get_tokenizer().encode("To be or not")
    for policy in ("none", "fp32"):
        lm = DBALM(ckpt=ckpt, device="cpu", kv_policy=policy)
        assert lm._loglikelihood_tokens([(None, ids, [])], disable_tqdm=True) == [(0.0, True)]


def test_bad_adapter_input_is_one_error_line(tmp_path, ckpt, monkeypatch):
    write_tasks(tmp_path)
    base = ["--model", "dba", "--device", "cpu", "--tasks", "dba_mc", "--include_path", tmp_path]
    proc = call(harness.main, *base, "--model_args", f"ckpt={tmp_path / 'nothing'}")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith("error: ") and "nothing" in proc.stderr
    for model_args, fragment in [
        ({}, "needs --model_args ckpt="),
        ({"ckpt": ckpt, "kv_policy": "k=q3_0"}, "KV policy"),
        ({"ckpt": ckpt, "max_gen_toks": 99}, "max_gen_toks"),
        ({"ckpt": ckpt, "chunk": 0}, "chunk"),
        ({"ckpt": ckpt, "kvpolicy": "fp16"}, "unknown dba model argument"),
    ]:
        with pytest.raises(UserError, match=fragment):
            DBALM(device="cpu", **model_args)
    monkeypatch.setattr(harness, "MISSING", "lm_eval")
    proc = call(harness.main, *base)
    assert proc.returncode == 2 and "requirements-lm-eval.txt" in proc.stderr
