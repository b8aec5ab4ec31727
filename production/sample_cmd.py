"""`main.py --mode sample`: load a checkpoint, encode the prompt, generate with a KV cache, print."""

from __future__ import annotations

import argparse
import json

import torch

from production.errors import UserError
from production.runtime import resolve_runtime

DEFAULT_MAX_NEW_TOKENS = 64


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
    policy_text = args.kv_policy or "fp16"
    policy = None if policy_text == "none" else parse_policy(policy_text, list(cache_widths(model.cfg)))

    result = generate(model, torch.tensor([ids]), cfg, policy, max_seq, runtime.autocast)
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
        }
        print(json.dumps(report))
    else:
        print(tokenizer.decode(ids) + text)
    return 0
