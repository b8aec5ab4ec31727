"""KV-cache memory at long context: `mem128k.json` (schema dba.mem128k/1, docs/ARCHITECTURE.md).

    python production/bench_end_to_end_memory.py --ckpt runs/<id>/best.pt --decompose
    python production/bench_end_to_end_memory.py --size small --exp paper_decoupled --decompose --out mem.json

Builds the real cache objects of the model's config for --context-len tokens (no weights needed) and measures
them (CUDA allocator deltas, MPS driver allocation, CPU storage bytes) beside the closed-form estimate. With
--decompose (decoupled models) it also measures standard fp16 at the same d_model/n_layer (or the real config
of --baseline-ckpt) and decoupled fp16, and reports the architecture / quantization / end-to-end ratios.
--decode-step also fills each cache with random values and times one real decode step at full context.
"""

from __future__ import annotations

import gc
from dataclasses import dataclass
from pathlib import Path

import torch

from production.cache.memory import measure_cache, time_decode_step
from production.cache.policy import PAPER_POLICY, parse_policy
from production.config.build import resolve_model
from production.config.presets import EXPERIMENTS, SIZES
from production.config.sampling import MAX_CANDIDATES, GuardLimits
from production.core.atomic import write_json
from production.core.entry import Parser, command
from production.core.errors import UserError
from production.core.layout import DEFAULT_TUNER_STORE, RunDir, checkpoint_file, default_mem128k_path
from production.core.runtime import RuntimeConfig, device_name, resolve_runtime
from production.data.corpus import CORPUS_CACHE_DIR
from production.model.attention import cache_widths
from production.model.config import ModelConfig, standard_counterpart
from production.model.gpt import GPT
from production.train.checkpoint import load_checkpoint, load_model, model_config
from production.tune.auto import SUMMARY_KEYS, AutoRequest, auto_policy
from production.tune.store import DecisionStore

SCHEMA = "dba.mem128k/1"


@dataclass(frozen=True)
class Setting:
    """What is measured: a cache for `context_len` tokens of `batch_size` sequences, on `runtime`'s device."""

    context_len: int
    batch_size: int
    decode_step: bool  # also time one real decode step at full context
    runtime: RuntimeConfig

    def __post_init__(self):
        if self.context_len < 2 or self.batch_size < 1:
            raise UserError("--context-len must be >= 2 and --batch-size >= 1")


def config_from_ckpt(path: Path) -> tuple[ModelConfig, dict]:
    """The model config stored in a checkpoint, read without loading the weights into memory (mmap)."""
    ckpt = load_checkpoint(path, mmap=True)
    return model_config(ckpt, path), ckpt


def measure(cfg: ModelConfig, ckpt: dict | None, policy_text: str, setting: Setting) -> dict:
    """One configuration: allocation measurement, and optionally a timed decode step at full context (with the
    checkpoint's weights when there is one)."""
    policy = parse_policy(policy_text, list(cache_widths(cfg)), cfg.n_layer)
    device = setting.runtime.device
    # On CPU the measurement is the storage bytes of every buffer, which a cache on the meta device has too,
    # without allocating them: a 128k-token standard cache at `small` would otherwise fill 4.5 GiB of RAM.
    where = "meta" if torch.device(device).type == "cpu" and not setting.decode_step else device
    record, cache = measure_cache(
        cache_widths(cfg), cfg.kv_heads, policy, setting.batch_size, setting.context_len, where
    )
    if setting.decode_step:
        torch.manual_seed(0)
        model = GPT(cfg)
        if ckpt is not None:
            model.load_state_dict(ckpt["model"])
        record["decode_step"] = time_decode_step(model.to(device).eval(), cache, device)
        del model
    del cache
    gc.collect()
    return record


def ratio(num: dict, den: dict) -> dict:
    return {
        "estimate": num["estimate_bytes"] / den["estimate_bytes"],
        "measured": num["measured_bytes"] / den["measured_bytes"],
    }


def decomposition(cfg, ckpt, policy: str, candidate: dict, baseline: tuple | None, setting: Setting) -> dict:
    """Standard fp16 (same d_model/n_layer, or the --baseline-ckpt run's config) -> decoupled fp16 -> the policy:
    the architecture, quantization and end-to-end ratios."""
    std_cfg, std_ckpt, std_path = baseline or (standard_counterpart(cfg), None, None)
    standard = measure(std_cfg, std_ckpt, "fp16", setting)
    decoupled = candidate if policy == "fp16" else measure(cfg, ckpt, "fp16", setting)
    return {
        "baseline": {"source": str(std_path) if baseline else "same d_model/n_layer", "model": std_cfg.to_dict()},
        "standard_fp16": standard,
        "decoupled_fp16": decoupled,
        "candidate": candidate,
        "ratios": {
            "arch": ratio(standard, decoupled),
            "quant": ratio(decoupled, candidate),
            "e2e": ratio(standard, candidate),
        },
    }


def check_request(cfg: ModelConfig, decompose: bool, baseline: tuple | None) -> None:
    if decompose and cfg.attn_mode != "decoupled":
        raise UserError(
            f"--decompose needs a decoupled model; this one is {cfg.attn_mode} (measure it without "
            "--decompose, or pass it as --baseline-ckpt of a decoupled run)"
        )
    if baseline is not None and baseline[0].attn_mode != "standard":
        raise UserError(f"--baseline-ckpt must be a standard-attention run, got {baseline[0].attn_mode}")


def mem128k_report(
    cfg: ModelConfig,
    ckpt: dict | None,
    source: dict,
    policy: str | None,
    decompose: bool,
    baseline: tuple | None,
    setting: Setting,
) -> dict:
    """The dba.mem128k/1 record. `baseline`: (config, checkpoint, path) of a trained standard run, or None."""
    check_request(cfg, decompose, baseline)
    policy = policy or (PAPER_POLICY if cfg.attn_mode == "decoupled" else "fp16")
    parse_policy(policy, list(cache_widths(cfg)), cfg.n_layer)  # fail on a bad policy before allocating anything
    candidate = measure(cfg, ckpt, policy, setting)
    report = {
        "schema": SCHEMA,
        "context_len": setting.context_len,
        "batch_size": setting.batch_size,
        "device": setting.runtime.device,
        "device_name": device_name(setting.runtime.device),
        "torch": torch.__version__,
        "source": source,
        "model": cfg.to_dict(),
        **candidate,
    }
    if decompose:
        report["decomposition"] = decomposition(cfg, ckpt, policy, candidate, baseline, setting)
    return report


def tuned_policy(ckpt_path: Path, context: int, runtime: RuntimeConfig, store: Path) -> tuple[str, dict]:
    """The tuner's policy for the checkpoint's model at `context` tokens (default guard; stored decisions reused)."""
    model, ckpt = load_model(ckpt_path, runtime.device)
    request = AutoRequest(GuardLimits(), None, MAX_CANDIDATES, context, CORPUS_CACHE_DIR)
    policy, decision = auto_policy(model, ckpt_path, ckpt, [], request, runtime, DecisionStore(store))
    del model
    return policy, decision


def summary_line(report: dict) -> str:
    gib = report["measured_bytes"] / 2**30
    line = f"mem128k {report['model']['attn_mode']} {report['policy']} @ {report['context_len']} tokens: "
    line += f"{gib:.3f} GiB measured ({report['estimate_bytes'] / 2**30:.3f} GiB estimated)"
    if "decomposition" in report:
        r = report["decomposition"]["ratios"]
        ratios = (
            f"e2e={r['e2e']['measured']:.2f}x arch={r['arch']['measured']:.2f}x quant={r['quant']['measured']:.2f}x"
        )
        line = f"mem128k {ratios} | " + line
    if "decode_step" in report:
        line += f" | decode {report['decode_step']['ms']:.1f} ms/token"
    return line


def build_parser() -> Parser:
    p = Parser(prog="python production/bench_end_to_end_memory.py", description=__doc__.split("\n")[0])
    p.add_argument("--ckpt", type=Path, help="checkpoint (or run directory) whose config to measure (runs/<id>)")
    p.add_argument("--size", help=f"size preset instead of --ckpt: {', '.join(SIZES)}")
    p.add_argument("--exp", help=f"experiment preset instead of --ckpt: {', '.join(EXPERIMENTS)}")
    p.add_argument("--context-len", type=int, default=131072, help="tokens the cache holds")
    p.add_argument("--batch-size", type=int, default=1, help="sequences the cache holds")
    p.add_argument(
        "--policy",
        help=f"cache policy (default: {PAPER_POLICY} for decoupled, fp16 otherwise); auto: the tuner's guarded "
        "choice for --ckpt at --context-len tokens",
    )
    p.add_argument("--tuner-store", type=Path, default=DEFAULT_TUNER_STORE, help="decision store of --policy auto")
    p.add_argument("--decompose", action="store_true", help="standard fp16 / decoupled fp16 / policy ratios")
    p.add_argument("--baseline-ckpt", type=Path, help="a trained standard run to compare against (with --decompose)")
    p.add_argument("--decode-step", action="store_true", help="also time one decode step at full context")
    p.add_argument("--out", type=Path, help="output JSON (default: mem128k.json next to --ckpt)")
    p.add_argument("--device", default="auto", help="auto (cuda > mps > cpu), cpu, cuda, mps")
    p.add_argument("--dtype", default="auto", help="compute precision of --decode-step on accelerators")
    return p


@command()
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if (args.ckpt is None) == (args.size is None or args.exp is None):
        raise UserError("give either --ckpt PATH or both --size and --exp")
    if args.baseline_ckpt is not None and not args.decompose:
        raise UserError("--baseline-ckpt is used by --decompose; add --decompose")
    runtime = resolve_runtime(args.device, "fp32" if args.device == "cpu" else args.dtype, compile=False)
    setting = Setting(args.context_len, args.batch_size, args.decode_step, runtime)
    if args.ckpt is not None:
        args.ckpt = checkpoint_file(args.ckpt)  # a run directory names its best.pt
        cfg, ckpt = config_from_ckpt(args.ckpt)
        source = {"ckpt": str(args.ckpt), "size": ckpt["config"].get("size"), "exp": ckpt["config"].get("exp")}
        out = args.out or RunDir(args.ckpt.parent).mem128k
    else:
        cfg, ckpt = resolve_model(args.size, args.exp), None
        source = {"ckpt": None, "size": args.size, "exp": args.exp}
        out = args.out or default_mem128k_path(args.size, args.exp)
    baseline = None
    if args.baseline_ckpt is not None:
        baseline = (*config_from_ckpt(args.baseline_ckpt), args.baseline_ckpt)
    policy, tuner = args.policy, None
    if policy == "auto":
        if args.ckpt is None:
            raise UserError("--policy auto asks the tuner about a trained model: give --ckpt")
        check_request(cfg, args.decompose, baseline)  # before the search, which takes a while
        policy, tuner = tuned_policy(args.ckpt, args.context_len, runtime, args.tuner_store)
    report = mem128k_report(cfg, ckpt, source, policy, args.decompose, baseline, setting)
    if tuner is not None:
        report["tuner"] = {k: tuner[k] for k in SUMMARY_KEYS}
    out.parent.mkdir(parents=True, exist_ok=True)
    write_json(out, report)
    print(summary_line(report))
    print(f"wrote {out}")
    return 0
