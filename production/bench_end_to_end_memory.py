"""KV-cache memory at long context: `mem128k.json` (DESIGN.md 8).

    python production/bench_end_to_end_memory.py --ckpt runs/<id>/best.pt --decompose
    python production/bench_end_to_end_memory.py --size small --exp paper_decoupled --decompose --out mem.json

Builds the real cache objects of the model's config for --context-len tokens (no weights needed) and measures
them (CUDA allocator deltas, MPS driver allocation, CPU storage bytes) beside the closed-form estimate. With
--decompose (decoupled models) it also measures standard fp16 at the same d_model/n_layer (or the real config
of --baseline-ckpt) and decoupled fp16, and reports the architecture / quantization / end-to-end ratios.
--decode-step also fills each cache with random values and times one real decode step at full context.
"""

from __future__ import annotations

import argparse
import gc
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script (python production/bench_end_to_end_memory.py): find the package
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch

from production.atomic import write_json
from production.attention import cache_widths
from production.cli import Parser
from production.config import EXPERIMENTS, SIZES, ModelConfig, resolve_model
from production.errors import UserError
from production.kvcache import PAPER_POLICY, parse_policy
from production.memory import measure_cache, standard_counterpart, time_decode_step
from production.model import GPT
from production.runtime import device_name, resolve_runtime

SCHEMA = "dba.mem128k/1"


def config_from_ckpt(path: Path) -> tuple[ModelConfig, dict]:
    """The model config stored in a checkpoint, read without loading the weights into memory (mmap)."""
    if not path.is_file():
        raise UserError(f"checkpoint {path} does not exist")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        fields = {k: v for k, v in ckpt["config"]["model"].items() if k != "n_params"}
        return ModelConfig(**fields), ckpt
    except (KeyError, TypeError, RuntimeError, OSError, EOFError) as e:
        raise UserError(f"{path} is not a readable checkpoint of this harness ({type(e).__name__}: {e})") from e


def measure(cfg: ModelConfig, policy_text: str, args, runtime, ckpt: dict | None) -> dict:
    """One configuration: allocation measurement, and optionally a timed decode step at full context."""
    policy = parse_policy(policy_text, list(cache_widths(cfg)))
    record, cache = measure_cache(cfg, policy, args.batch_size, args.context_len, runtime.device)
    if args.decode_step:
        torch.manual_seed(0)
        model = GPT(cfg)
        if ckpt is not None:
            model.load_state_dict(ckpt["model"])
        record["decode_step"] = time_decode_step(model.to(runtime.device).eval(), cache, runtime.device)
        del model
    del cache
    gc.collect()
    return record


def ratio(num: dict, den: dict) -> dict:
    return {"estimate": num["estimate_bytes"] / den["estimate_bytes"],
            "measured": num["measured_bytes"] / den["measured_bytes"]}  # fmt: skip


def run(args) -> dict:
    runtime = resolve_runtime(args.device, "fp32" if args.device == "cpu" else args.dtype, compile=False)
    if args.context_len < 2 or args.batch_size < 1:
        raise UserError("--context-len must be >= 2 and --batch-size >= 1")
    ckpt = None
    if args.ckpt is not None:
        cfg, ckpt = config_from_ckpt(args.ckpt)
        source = {"ckpt": str(args.ckpt), "size": ckpt["config"].get("size"), "exp": ckpt["config"].get("exp")}
    else:
        cfg = resolve_model(args.size, args.exp, {})
        source = {"ckpt": None, "size": args.size, "exp": args.exp}
    if args.decompose and cfg.attn_mode != "decoupled":
        raise UserError(
            f"--decompose needs a decoupled model; this one is {cfg.attn_mode} (measure it without "
            "--decompose, or pass it as --baseline-ckpt of a decoupled run)"
        )
    policy = args.policy or (PAPER_POLICY if cfg.attn_mode == "decoupled" else "fp16")
    parse_policy(policy, list(cache_widths(cfg)))  # fail on a bad policy before allocating anything
    baseline_cfg = baseline_ckpt = None
    if args.baseline_ckpt is not None:
        baseline_cfg, baseline_ckpt = config_from_ckpt(args.baseline_ckpt)
        if baseline_cfg.attn_mode != "standard":
            raise UserError(f"--baseline-ckpt must be a standard-attention run, got {baseline_cfg.attn_mode}")

    main = measure(cfg, policy, args, runtime, ckpt)
    report = {
        "schema": SCHEMA,
        "context_len": args.context_len,
        "batch_size": args.batch_size,
        "device": runtime.device,
        "device_name": device_name(runtime.device),
        "torch": torch.__version__,
        "source": source,
        "model": cfg.to_dict(),
        **main,
    }
    if args.decompose:
        std_cfg = baseline_cfg or standard_counterpart(cfg)
        standard = measure(std_cfg, "fp16", args, runtime, baseline_ckpt)
        decoupled = main if policy == "fp16" else measure(cfg, "fp16", args, runtime, ckpt)
        report["decomposition"] = {
            "baseline": {
                "source": str(args.baseline_ckpt) if baseline_cfg else "same d_model/n_layer",
                "model": std_cfg.to_dict(),
            },  # fmt: skip
            "standard_fp16": standard,
            "decoupled_fp16": decoupled,
            "candidate": main,
            "ratios": {
                "arch": ratio(standard, decoupled),
                "quant": ratio(decoupled, main),
                "e2e": ratio(standard, main),
            },  # fmt: skip
        }
    return report


def summary_line(report: dict) -> str:
    gib = report["measured_bytes"] / 2**30
    line = f"mem128k {report['model']['attn_mode']} {report['policy']} @ {report['context_len']} tokens: "
    line += f"{gib:.3f} GiB measured ({report['estimate_bytes'] / 2**30:.3f} GiB estimated)"
    if "decomposition" in report:
        r = report["decomposition"]["ratios"]
        line = (f"mem128k e2e={r['e2e']['measured']:.2f}x arch={r['arch']['measured']:.2f}x "
                f"quant={r['quant']['measured']:.2f}x | " + line)  # fmt: skip
    if "decode_step" in report:
        line += f" | decode {report['decode_step']['ms']:.1f} ms/token"
    return line


def default_out(args) -> Path:
    if args.out is not None:
        return args.out
    if args.ckpt is not None:
        return args.ckpt.parent / "mem128k.json"
    return Path("runs") / f"mem128k_{args.size}_{args.exp}.json"


def main(argv: list[str] | None = None) -> int:
    p = Parser(prog="python production/bench_end_to_end_memory.py", description=__doc__.split("\n")[0],
               formatter_class=argparse.ArgumentDefaultsHelpFormatter)  # fmt: skip
    p.add_argument("--ckpt", type=Path, help="run checkpoint whose config to measure (runs/<id>/best.pt)")
    p.add_argument("--size", help=f"size preset instead of --ckpt: {', '.join(SIZES)}")
    p.add_argument("--exp", help=f"experiment preset instead of --ckpt: {', '.join(EXPERIMENTS)}")
    p.add_argument("--context-len", type=int, default=131072)
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--policy", help=f"cache policy (default: {PAPER_POLICY} for decoupled, fp16 otherwise)")
    p.add_argument("--decompose", action="store_true", help="standard fp16 / decoupled fp16 / policy ratios")
    p.add_argument("--baseline-ckpt", type=Path, help="a trained standard run to compare against (with --decompose)")
    p.add_argument("--decode-step", action="store_true", help="also time one decode step at full context")
    p.add_argument("--out", type=Path, help="output JSON (default: mem128k.json next to --ckpt)")
    p.add_argument("--device", default="auto", help="auto (cuda > mps > cpu), cpu, cuda, mps")
    p.add_argument("--dtype", default="auto", help="compute precision of --decode-step on accelerators")
    args = p.parse_args(argv)
    try:
        if (args.ckpt is None) == (args.size is None or args.exp is None):
            raise UserError("give either --ckpt PATH or both --size and --exp")
        if args.baseline_ckpt is not None and not args.decompose:
            raise UserError("--baseline-ckpt is used by --decompose; add --decompose")
        report = run(args)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    out = default_out(args)
    out.parent.mkdir(parents=True, exist_ok=True)
    write_json(out, report)
    print(summary_line(report))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
