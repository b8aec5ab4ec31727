"""`main.py --mode eval`: a checkpoint's loss by position up to several times its training length, by full
forward passes and through KV caches, with RoPE context extensions, plus the passkey and induction probes ->
eval.json (dba.eval/1) and two figures beside it."""

from __future__ import annotations

import json
import sys
from datetime import datetime, timezone

from production.cache.policy import parse_policy
from production.config.evaluation import parse_multiples, parse_scalings, split_policies
from production.config.fields import with_defaults
from production.core.atomic import write_json
from production.core.errors import UserError
from production.core.layout import checkpoint_file
from production.core.runtime import RuntimeConfig, environment, resolve_runtime
from production.data.tokenizer import get_tokenizer
from production.eval.longctx import FULL, Route, eval_split, require_tokens
from production.eval.plots import plot_loss_by_position, plot_passkey
from production.eval.probes import shortest_length
from production.eval.report import EVAL_FORMAT, EvalSpec, evaluate, route_record, settings, summary_rows
from production.model.attention import cache_widths
from production.train.checkpoint import load_model
from production.tune.auto import AutoRequest, auto_policy
from production.tune.store import DecisionStore


def build_routes(v: dict, model, ckpt_path, ckpt, runtime: RuntimeConfig, max_seq: int) -> list[Route]:
    """Full forward passes, then one cache route per policy given (auto resolved by the tuner)."""
    routes = [Route(FULL)]
    streams = list(cache_widths(model.cfg))
    for text in split_policies(v["kv_policy"]):
        resolved = text
        if text == "auto":
            request = AutoRequest.from_options(v, max_seq)
            resolved, tuner = auto_policy(model, ckpt_path, ckpt, [], request, runtime, DecisionStore(v["tuner_store"]))
            print(f"kv-policy auto: {resolved} ({tuner['source']})", file=sys.stderr)
        policy = parse_policy(resolved, streams, model.cfg.n_layer)
        routes.append(Route(text, policy, str(policy)))
    return routes


def run(values: dict, argv: list[str]) -> int:
    v = with_defaults(values)
    runtime = resolve_runtime(v["device"], v["dtype"], compile=False)
    ckpt_path = checkpoint_file(v["ckpt"])
    model, ckpt = load_model(ckpt_path, runtime.device)
    model.eval()
    block = model.cfg.block_size
    lengths = tuple(m * block for m in parse_multiples(v["lengths"]))
    tok = get_tokenizer()
    val, data = eval_split(ckpt["config"].get("data", {}), v["data"], v["cache_dir"], block, model.cfg.vocab_size)
    require_tokens(val, lengths[-1])  # before the tuner's search, which takes a while
    if v["passkey_trials"] and lengths[0] < shortest_length(tok):
        raise UserError(
            f"the passkey probe needs contexts of at least {shortest_length(tok)} tokens, and the shortest length "
            f"here is {lengths[0]}; drop the short multiples from --lengths or pass --passkey-trials 0"
        )
    routes = build_routes(v, model, ckpt_path, ckpt, runtime, lengths[-1])
    seed = 1337 if v["seed"] is None else v["seed"]
    scalings = tuple(parse_scalings(v["rope_scaling"]))
    if not model.cfg.rope and scalings != ("none",):  # nothing to stretch: the extensions would repeat `none`
        print("this model has no RoPE; --rope-scaling is ignored", file=sys.stderr)
        scalings = ("none",)
    spec = EvalSpec(lengths, v["windows"], scalings, v["chunk"], v["passkey_trials"], seed)
    result = evaluate(model, val, tok, routes, spec, runtime.autocast)
    config = ckpt["config"]
    report = {
        "format": EVAL_FORMAT,
        "ckpt": str(ckpt_path),
        "step": ckpt["step"],
        "run": {"size": config.get("size"), "exp": config.get("exp"), "out_dir": config.get("out_dir")},
        "model": config["model"],
        "data": data,
        "settings": settings(spec, block),
        "routes": [route_record(r, model, lengths[-1]) for r in routes],
        **result,
        "device": runtime.device,
        "dtype": runtime.dtype,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "environment": environment(runtime.device),
    }
    out = v["out"] or ckpt_path.parent / "eval.json"
    write_json(out, report)
    plot_loss_by_position([report], out.with_name(f"{out.stem}_loss.png"))
    if report["passkey"]:
        plot_passkey(report, out.with_name(f"{out.stem}_passkey.png"))
    if v["json"]:
        print(json.dumps(report))
    else:
        print("\n".join(summary_rows(report)))
        print(f"wrote {out} and its figures ({result['seconds']:.0f} s)")
    return 0
