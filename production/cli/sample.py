"""`main.py --mode sample`: load a checkpoint, encode the prompt, choose the cache policy, generate, print."""

from __future__ import annotations

import json
import sys

import torch

from production.cache import triton_decode
from production.cache.policy import parse_policy
from production.config.fields import with_defaults
from production.config.sampling import SamplingConfig
from production.core.errors import UserError
from production.core.layout import checkpoint_file
from production.core.runtime import device_signature, resolve_runtime
from production.data.tokenizer import get_tokenizer
from production.model.attention import cache_widths
from production.sample.generate import generate
from production.sample.prompt import prompt_ids
from production.train.checkpoint import load_model
from production.tune.auto import SUMMARY_KEYS, AutoRequest, auto_policy
from production.tune.decode import plan_decode
from production.tune.store import DecisionStore


def run(values: dict, argv: list[str]) -> int:
    v = with_defaults(values)
    options = ("max_new_tokens", "temperature", "top_k", "greedy", "seed")
    cfg = SamplingConfig(**{k: v[k] for k in options if v[k] is not None})
    runtime = resolve_runtime(v["device"], v["dtype"], compile=False)
    if v["cuda_graphs"] and (v["kv_policy"] == "none" or not triton_decode.available(runtime.device)):
        reason = "a KV cache" if v["kv_policy"] == "none" else triton_decode.why_unavailable(runtime.device)
        raise UserError(f"--cuda-graphs needs {reason}")
    ckpt_path = checkpoint_file(v["ckpt"])
    model, ckpt = load_model(ckpt_path, runtime.device)
    tokenizer = get_tokenizer()
    ids = prompt_ids(v["prompt"], v["prompt_tokens"], tokenizer, model.cfg.vocab_size)
    max_seq = model.cfg.block_size if v["max_seq"] is None else v["max_seq"]
    if len(ids) + cfg.max_new_tokens > max_seq:
        raise UserError(
            f"prompt ({len(ids)} tokens) + --max-new-tokens {cfg.max_new_tokens} exceeds max_seq "
            f"{max_seq}; shorten them or raise --max-seq"
        )
    store = DecisionStore(v["tuner_store"])
    policy_text, tuner = v["kv_policy"], None
    if policy_text == "auto":
        request = AutoRequest.from_options(v, max_seq)
        policy_text, tuner = auto_policy(model, ckpt_path, ckpt, ids, request, runtime, store)
        print(
            f"kv-policy auto: {policy_text} ({tuner['source']}, "
            f"{plural(tuner['candidates_tried'], 'candidate')} judged, "
            f"max|dlogit| {tuner['guard']['max_abs_logit']:.3f}, dNLL {tuner['guard']['delta_nll']:+.4f})",
            file=sys.stderr,
        )
    policy = (
        None if policy_text == "none" else parse_policy(policy_text, list(cache_widths(model.cfg)), model.cfg.n_layer)
    )

    def on_prefill(cache):
        sig = device_signature(runtime.device)
        return plan_decode(cache, model.cfg.n_head, model.cfg.kv_heads, runtime.device, sig, store)

    result = generate(
        model, torch.tensor([ids]), cfg, policy, max_seq, runtime.autocast, on_prefill, cuda_graphs=v["cuda_graphs"]
    )
    new_ids = result["ids"][0].tolist()
    text = tokenizer.decode(new_ids)
    if not v["json"]:
        print(tokenizer.decode(ids) + text)
        return 0
    report = {
        "prompt_ids": ids,
        "generated_ids": new_ids,
        "prompt_text": tokenizer.decode(ids),
        "text": text,
        "kv_policy": "none" if policy is None else str(policy),
        "cache_bytes": result["cache_bytes"],
        "ms_per_token": result["ms_per_token"],
        "prefill_ms": result["prefill_ms"],
        "max_seq": max_seq,
        "device": runtime.device,
        "dtype": runtime.dtype,
        "ckpt": str(ckpt_path),
        "ckpt_step": ckpt["step"],
        "decode_plan": result["decode_plan"],
        "cuda_graphs": v["cuda_graphs"],
    }
    if tuner is not None:
        report["tuner"] = {k: tuner[k] for k in SUMMARY_KEYS}
    print(json.dumps(report))
    return 0


def plural(n: int, noun: str) -> str:
    return f"{n} {noun}" + ("" if n == 1 else "s")
