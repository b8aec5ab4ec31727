"""`main.py --mode sample`: load a checkpoint, encode the prompt, generate with a KV cache, print."""

from __future__ import annotations

import argparse
import json
import sys

import torch

from production.errors import UserError
from production.runtime import resolve_runtime

DEFAULT_MAX_NEW_TOKENS = 64
CALIBRATION_PREFILL, CALIBRATION_DECODE = 512, 64


def prompt_ids(args: argparse.Namespace, tokenizer, vocab_size: int) -> list[int]:
    if (args.prompt is None) == (args.prompt_tokens is None):
        raise UserError('give exactly one of --prompt TEXT or --prompt-tokens "ID ID ..."')
    if args.prompt is not None:
        ids = tokenizer.encode(args.prompt)
    else:
        try:
            ids = [int(t) for t in args.prompt_tokens.replace(",", " ").split()]
        except ValueError as e:
            raise UserError(f"--prompt-tokens must be integers separated by spaces, got {args.prompt_tokens!r}") from e
    if not ids:
        raise UserError("the prompt is empty")
    bad = [i for i in ids if not 0 <= i < vocab_size]
    if bad:
        raise UserError(f"prompt token id {bad[0]} is outside the vocabulary [0, {vocab_size})")
    return ids


def calibration_tokens(ckpt: dict, prompt: list[int], max_seq: int, cache_dir) -> tuple[torch.Tensor, int, str]:
    """Real tokens for the guard: the run's validation split if its data is here, else the prompt tiled, else
    the embedded corpus. Returns (1, prefill + decode + 1) ids, the prefill length and where they came from."""
    from pathlib import Path

    from production.corpus import embedded_tokens
    from production.data import open_tokens, split_tokens

    decode = min(CALIBRATION_DECODE, max(1, max_seq // 4))
    prefill = max(1, min(CALIBRATION_PREFILL, max_seq - decode))
    n = prefill + decode + 1
    data = ckpt["config"].get("data", {})
    stream, source = None, None
    if data.get("format") == "embedded":
        stream, source = open_tokens(embedded_tokens(Path(cache_dir).expanduser())[0])[0], "validation split (embedded)"
    elif data.get("source") and Path(data["source"]).exists():
        stream, source = open_tokens(data["source"])[0], f"validation split of {data['source']}"
    if stream is not None:
        try:
            val = split_tokens(stream, source, "", n - 1, 50257).val
            if len(val) >= n:
                return torch.from_numpy(val.window(0, n))[None], prefill, source
        except UserError:
            pass  # too short for this length: fall through to the prompt
    if prompt:
        return torch.tensor([(prompt * (n // len(prompt) + 1))[:n]]), prefill, "the prompt, tiled"
    stream = open_tokens(embedded_tokens(Path(cache_dir).expanduser())[0])[0]
    return torch.from_numpy(stream.window(len(stream) - n, n))[None], prefill, "the embedded corpus"


def auto_policy(args, model, ckpt: dict, prompt: list[int], max_seq: int, runtime, store) -> tuple[str, dict]:
    """The tuner's policy for this model and request: a store hit, or a guarded search (then stored)."""
    from production.policy_search import GuardLimits, search_policy
    from production.tuner import config_hash, device_signature

    limits = GuardLimits(
        max_abs_logit=0.5 if args.guard_max_logit is None else args.guard_max_logit,
        delta_nll=0.02 if args.guard_nll is None else args.guard_nll,
        ppl_ratio=1.02 if args.guard_ppl is None else args.guard_ppl,
    )
    max_candidates = 24 if args.tuner_max_candidates is None else args.tuner_max_candidates
    if max_candidates < 1:
        raise UserError("--tuner-max-candidates must be >= 1")
    tokens, prefill, source = calibration_tokens(ckpt, prompt, max_seq, args.cache_dir)
    stat = args.ckpt.stat()
    identity = {"model": ckpt["config"]["model"], "ckpt": [str(args.ckpt.resolve()), stat.st_size, stat.st_mtime_ns,
                                                            ckpt["step"]]}  # fmt: skip
    shapes = {"max_seq": max_seq, "prefill": prefill, "decode": tokens.shape[1] - prefill - 1,
              "calibration": source, "limits": vars(limits), "max_cache_bytes": args.max_cache_bytes,
              "max_candidates": max_candidates, "dtype": runtime.dtype}  # fmt: skip
    device = device_signature(runtime.device)
    decision = store.get("policy", device, config_hash(identity), shapes)
    if decision is not None:
        return decision["policy"], {**decision, "source": "store"}
    decision = search_policy(model, tokens.to(runtime.device), prefill, max_seq, limits, args.max_cache_bytes,
                             max_candidates, runtime.autocast)  # fmt: skip
    decision["calibration"] = {"source": source, "prefill": prefill, "decode": shapes["decode"]}
    store.put("policy", device, config_hash(identity), shapes, decision)
    return decision["policy"], {**decision, "source": "search"}


def run(args: argparse.Namespace) -> int:
    from production.attention import cache_widths
    from production.checkpoint import load_model
    from production.kvcache import parse_policy
    from production.sampling import SamplingConfig, generate
    from production.tokenizer import get_tokenizer

    if args.ckpt is None:
        raise UserError("--mode sample needs --ckpt runs/<id>/best.pt")
    try:
        cfg = SamplingConfig(
            max_new_tokens=DEFAULT_MAX_NEW_TOKENS if args.max_new_tokens is None else args.max_new_tokens,
            temperature=1.0 if args.temperature is None else args.temperature,
            top_k=args.top_k,
            greedy=args.greedy,
            seed=1337 if args.seed is None else args.seed,
        )
    except ValueError as e:
        raise UserError(str(e)) from e
    runtime = resolve_runtime(args.device, args.dtype, compile=False)
    model, ckpt = load_model(args.ckpt, runtime.device)
    tokenizer = get_tokenizer()
    ids = prompt_ids(args, tokenizer, model.cfg.vocab_size)
    max_seq = model.cfg.block_size if args.max_seq is None else args.max_seq
    if max_seq < 1:
        raise UserError(f"--max-seq must be positive, got {max_seq}")
    if len(ids) + cfg.max_new_tokens > max_seq:
        raise UserError(f"prompt ({len(ids)} tokens) + --max-new-tokens {cfg.max_new_tokens} exceeds max_seq "
                        f"{max_seq}; shorten them or raise --max-seq")  # fmt: skip
    from production.decode_plan import plan_decode
    from production.tuner import DecisionStore, device_signature

    store = DecisionStore(args.tuner_store)
    policy_text, tuner = args.kv_policy or "auto", None
    if policy_text == "auto":
        policy_text, tuner = auto_policy(args, model, ckpt, ids, max_seq, runtime, store)
        print(f"kv-policy auto: {policy_text} ({tuner['source']}, {tuner['candidates_tried']} candidates judged, "
              f"max|dlogit| {tuner['guard']['max_abs_logit']:.3f}, dNLL {tuner['guard']['delta_nll']:+.4f})",
              file=sys.stderr)  # fmt: skip
    policy = None if policy_text == "none" else parse_policy(policy_text, list(cache_widths(model.cfg)))

    def on_prefill(cache):
        return plan_decode(cache, model.cfg.n_head, model.cfg.kv_heads, runtime.device,
                           device_signature(runtime.device), store)  # fmt: skip

    result = generate(model, torch.tensor([ids]), cfg, policy, max_seq, runtime.autocast, on_prefill)
    new_ids = result["ids"][0].tolist()
    text = tokenizer.decode(new_ids)
    if args.json:
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
            "ckpt": str(args.ckpt),
            "ckpt_step": ckpt["step"],
            "decode_plan": result["decode_plan"],
        }
        if tuner is not None:
            keys = ("source", "policy", "bytes", "fp16_bytes", "guard", "limits", "candidates_tried", "seconds",
                    "counterfactuals", "calibration")  # fmt: skip
            report["tuner"] = {k: tuner[k] for k in keys}
        print(json.dumps(report))
    else:
        print(tokenizer.decode(ids) + text)
    return 0
