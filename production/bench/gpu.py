"""One GPU check: everything this project measures on CUDA, in one run of at most a few minutes.

    python -m production.bench_gpu --out runs/bench_gpu          (make bench-gpu)
    python -m production.bench_gpu --out /tmp/smoke --quick --device cpu   (a CPU smoke run of every section)

Sections, each recorded even when another fails:
- tests:    the CUDA tests (tests/test_cuda.py, fused attention, fused decode, CUDA graphs) through pytest;
- train:    tokens/s, MFU and peak memory per exp at `small`, block 1024, bf16, eager and compiled, with the SDPA
            backends each exp's attention runs on (forward and backward with one backend allowed at a time);
- decode:   ms/token and effective GB/s of cache bytes read, standard fp16, decoupled fp16 and the paper's
            heterogeneous policy, torch path and fused Triton kernel, at 4k-128k tokens, batch 1 and 8, 12 layers
            (12 distinct layer caches, so the L2 cache cannot serve repeats);
- mem128k:  the 128k-token memory record (dba.mem128k/1) measured on the CUDA allocator;
- torchrun: one-GPU DDP and FSDP2 training smoke runs at `small`.
Writes bench_gpu.json and bench_gpu.txt (a summary with the targets: decoupled/standard train step time <= 1.0;
the fused quantized decode at 128k faster than decoupled fp16 and reading its bytes at >= 60% of the device's
bandwidth).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from production.bench.decode import Timing, time_rows
from production.bench.memory import Setting, mem128k_report
from production.bench.train import DIM_FIELDS, time_exps
from production.cache import triton_decode
from production.cache.policy import PAPER_POLICY, parse_policy
from production.config.resolve import resolve
from production.core.atomic import write_json, write_text
from production.core.entry import Parser, command
from production.core.errors import UserError
from production.core.layout import REPO_ROOT
from production.core.runtime import RuntimeConfig, environment, peak_bandwidth
from production.model.attention import build_attention, cache_widths
from production.model.gpt import GPT
from production.model.rope import Rotary

SECTIONS = ("tests", "train", "decode", "mem128k", "torchrun")
TRAIN_EXPS = ("paper_baseline", "paper_bottleneck", "paper_decoupled", "paper_decoupled_null", "paper_gqa")
BACKENDS = (SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.CUDNN_ATTENTION, SDPBackend.MATH)
CUDA_TESTS = (
    "tests/test_cuda.py",
    "tests/test_fused_attention.py",
    "tests/test_triton_decode.py",
    "tests/test_static_decode.py",
)


@dataclass(frozen=True)
class Plan:
    """What each section runs: the full GPU check, or a small CPU smoke of the same code (--quick)."""

    size: str
    dims: dict
    train_steps: int
    compile_modes: tuple[bool, ...]
    contexts: tuple[int, ...]
    batches: tuple[int, ...]
    mem_context: int


FULL = Plan("small", {"block_size": 1024}, 5, (False, True), (4096, 16384, 65536, 131072), (1, 8), 131072)
QUICK = Plan("nano", {"block_size": 32, "n_layer": 1, "d_model": 64, "d_ff": 128}, 1, (False,), (100,), (1, 2), 4096)


def sdpa_backends(exp: str, plan: Plan, runtime: RuntimeConfig) -> list[str]:
    """The SDPA backends on which one attention layer of `exp` runs forward and backward, in torch's order of
    preference (the first is what the model uses)."""
    cfg = resolve(plan.size, exp, plan.dims).model
    attn = build_attention(cfg).to(runtime.device)
    T = cfg.block_size
    rope = Rotary(cfg.rope_dim, cfg.rope_base, T).to(runtime.device)(0, T) if cfg.rope else None
    working = []
    for backend in BACKENDS:
        x = torch.randn(2, T, cfg.d_model, device=runtime.device, requires_grad=True)
        try:
            with sdpa_kernel([backend]), runtime.autocast():
                attn(x, rope).float().square().mean().backward()
            working.append(backend.name.lower())
        except RuntimeError:  # this backend does not take these shapes
            continue
    return working


def train_section(plan: Plan, runtime: RuntimeConfig) -> dict:
    """Per exp and compile mode: training step time, tokens/s, MFU, peak memory; the exps of one compile mode are
    timed round-robin. Adds decoupled/standard step-time ratios."""
    out: dict = {"backends": {exp: sdpa_backends(exp, plan, runtime) for exp in TRAIN_EXPS}}
    for compiled in plan.compile_modes:
        dims = {**dict.fromkeys(DIM_FIELDS), **plan.dims}
        # compiled: the first step compiles, so one more untimed step
        args = argparse.Namespace(size=plan.size, batch_size=None, warmup=1 + compiled, rounds=2,
                                  steps=plan.train_steps, **dims)  # fmt: skip
        rt = RuntimeConfig(runtime.device, runtime.dtype, compiled)
        results = time_exps({exp: exp for exp in TRAIN_EXPS}, args, rt)
        base = results["paper_baseline"]["ms_per_step"]
        for r in results.values():
            r["ratio_to_standard"] = r["ms_per_step"] / base
        out["compiled" if compiled else "eager"] = results
        empty_cache(runtime.device)
    return out


def decode_rows(plan: Plan, runtime: RuntimeConfig, context: int) -> list[dict]:
    """standard fp16 (torch), decoupled fp16 and the paper policy (torch, and where it runs the fused kernel,
    with and without CUDA graphs) at one context."""
    rows = []
    dims = {k: v for k, v in plan.dims.items() if k != "block_size"}
    for exp, policies in (("paper_baseline", ["fp16"]), ("paper_decoupled", ["fp16", PAPER_POLICY])):
        torch.manual_seed(0)
        model = GPT(resolve(plan.size, exp, dims).model).to(runtime.device).eval()
        for text in policies:
            policy = parse_policy(text, list(cache_widths(model.cfg)), model.cfg.n_layer)
            fused = exp != "paper_baseline" and triton_decode.available(runtime.device)
            impls = [("auto", False), ("triton", False), ("triton", True)] if fused else [("auto", False)]
            rows += [
                {"exp": exp, "model": model, "context": context, "policy": policy, "impl": impl, "graphs": graphs}
                for impl, graphs in impls
            ]
    return rows


def decode_section(plan: Plan, runtime: RuntimeConfig) -> dict:
    """Rows of one (batch, context) are timed round-robin and their caches freed before the next."""
    bandwidth = peak_bandwidth(runtime.device)
    results = []
    for batch in plan.batches:
        for context in plan.contexts:
            rows = decode_rows(plan, runtime, context)
            time_rows(rows, Timing(steps=3, rounds=2, warmup=2, batch=batch), runtime)
            for r in rows:
                results.append(
                    {
                        "exp": r["exp"],
                        "policy": str(r["policy"]),
                        "impl": r["impl"] + ("+graphs" if r["graphs"] else ""),
                        "context": context,
                        "batch": batch,
                        "ms_per_token": r["ms_per_token"],
                        "context_bytes": r["context_bytes"],
                        "gb_s": r["gb_s"],
                        "bandwidth_fraction": None if bandwidth is None else r["gb_s"] * 1e9 / bandwidth,
                    }
                )
            del rows
            empty_cache(runtime.device)
    return {"rows": results, "peak_bandwidth_bytes_s": bandwidth}


def mem128k_section(plan: Plan, runtime: RuntimeConfig, out: Path) -> dict:
    cfg = resolve(plan.size, "paper_decoupled", {}).model
    source = {"ckpt": None, "size": plan.size, "exp": "paper_decoupled"}
    report = mem128k_report(cfg, None, source, None, True, None, Setting(plan.mem_context, 1, True, runtime))
    write_json(out / "mem128k.json", report)
    return report


def torchrun_section(plan: Plan, runtime: RuntimeConfig, out: Path) -> dict:
    """One-process torchrun training runs with DDP and with FSDP2, a few steps each."""
    results = {}
    for strategy in ("ddp", "fsdp"):
        run_dir = out / f"torchrun_{strategy}"
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "1"]
        cmd += [str(REPO_ROOT / "main.py"), "--mode", "train", "--size", plan.size, "--dist", strategy]
        cmd += [f"--{k.replace('_', '-')}={v}" for k, v in plan.dims.items() if k != "block_size"]
        cmd += ["--block", str(min(plan.dims.get("block_size", 256), 256)), "--steps", "3", "--eval-every", "3"]
        cmd += ["--eval-iters", "1", "--no-compile", "--device", runtime.device, "--out-dir", str(run_dir)]
        cmd += ["--tuner-store", str(out / "tuner.json")]
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, cwd=REPO_ROOT, capture_output=True, text=True, timeout=600)
        results[strategy] = {
            "returncode": proc.returncode,
            "seconds": time.perf_counter() - t0,
            "stderr_tail": proc.stderr[-2000:],
        }
    return results


def tests_section() -> dict:
    t0 = time.perf_counter()
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *CUDA_TESTS]
    proc = subprocess.run(cmd, cwd=REPO_ROOT, capture_output=True, text=True, timeout=600)
    lines = proc.stdout.strip().splitlines()
    return {"returncode": proc.returncode, "summary": lines[-1] if lines else "", "seconds": time.perf_counter() - t0}


def empty_cache(device: str) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.empty_cache()


def targets(report: dict) -> dict:
    """The issue's targets, each true/false, or None where its section did not run or has no figure."""
    train = report["sections"].get("train", {})
    ratios = {m: train[m]["paper_decoupled"]["ratio_to_standard"] for m in ("eager", "compiled") if m in train}
    rows = report["sections"].get("decode", {}).get("rows", [])
    longest = max((r["context"] for r in rows), default=None)

    def at_longest(paper: bool, impls: tuple[str, ...]) -> list[dict]:
        """Batch-1 decoupled rows at the longest context: the paper policy's or fp16's, with these impls."""
        return [
            r for r in rows
            if r["context"] == longest and r["batch"] == 1 and r["exp"] == "paper_decoupled"
            and (r["policy"] != "fp16") == paper and r["impl"] in impls
        ]  # fmt: skip

    fused_rows = at_longest(True, ("triton", "triton+graphs"))
    fp16_rows = at_longest(False, ("auto", "triton", "triton+graphs"))
    fused = min((r["ms_per_token"] for r in fused_rows), default=None)
    fp16 = min((r["ms_per_token"] for r in fp16_rows), default=None)
    fractions = [r["bandwidth_fraction"] for r in fused_rows if r["bandwidth_fraction"] is not None]
    fraction = max(fractions, default=None)
    return {
        "train_decoupled_over_standard_le_1": {m: r <= 1.0 for m, r in ratios.items()} or None,
        "fused_quant_decode_faster_than_decoupled_fp16": None if fused is None or fp16 is None else fused < fp16,
        "fused_quant_decode_bandwidth_ge_60pct": None if fraction is None else fraction >= 0.6,
    }


def _train_lines(section: dict) -> list[str]:
    lines = []
    for mode in ("eager", "compiled"):
        for exp, r in section.get(mode, {}).items():
            mfu = "-" if r["mfu"] is None else f"{100 * r['mfu']:.1f}%"
            lines.append(
                f"  {mode:<8} {exp:<22} {r['tok_s']:>10,.0f} tok/s  MFU {mfu:>6}  "
                f"vs standard {r['ratio_to_standard']:.3f}  SDPA {','.join(section['backends'][exp])}"
            )
    return lines


def _decode_lines(section: dict) -> list[str]:
    lines = []
    for r in section["rows"]:
        frac = "" if r["bandwidth_fraction"] is None else f" ({100 * r['bandwidth_fraction']:.0f}% of peak)"
        lines.append(
            f"  b{r['batch']} {r['context']:>6} {r['exp']:<16} {r['impl']:<13} {r['policy'][:40]:<40} "
            f"{r['ms_per_token']:8.2f} ms/token {r['gb_s']:8.1f} GB/s{frac}"
        )
    return lines


SECTION_LINES = {
    "tests": lambda s: [f"  pytest: {s['summary']} (exit {s['returncode']})"],
    "train": _train_lines,
    "decode": _decode_lines,
    "mem128k": lambda s: [
        f"  measured {s['measured_bytes'] / 2**30:.3f} GiB, e2e {s['decomposition']['ratios']['e2e']['measured']:.2f}x"
    ],
    "torchrun": lambda s: [
        f"  {k}: exit {v['returncode']} in {v['seconds']:.0f} s" for k, v in s.items() if k != "seconds"
    ],
}


def summary(report: dict) -> str:
    lines = [f"bench_gpu on {report['device']['device_name']} ({report['device']['device']}), {report['plan']} plan"]
    for name, section in report["sections"].items():
        if "error" in section:
            lines.append(f"{name}: FAILED after {section['seconds']:.0f} s: {section['error']}")
        else:
            lines += [f"{name}: ok in {section['seconds']:.0f} s", *SECTION_LINES[name](section)]
    lines.append("targets: " + ", ".join(f"{k}={v}" for k, v in report["targets"].items()))
    return "\n".join(lines) + "\n"


def run_sections(names: list[str], plan: Plan, runtime: RuntimeConfig, out: Path) -> dict:
    """Each section's result with its seconds, or its error: one failing section does not stop the others."""
    jobs = {
        "tests": tests_section,
        "train": lambda: train_section(plan, runtime),
        "decode": lambda: decode_section(plan, runtime),
        "mem128k": lambda: mem128k_section(plan, runtime, out),
        "torchrun": lambda: torchrun_section(plan, runtime, out),
    }
    sections = {}
    for name in names:
        print(f"[bench_gpu] {name} ...", file=sys.stderr, flush=True)
        t0 = time.perf_counter()
        try:
            sections[name] = jobs[name]()
        except Exception as e:  # recorded, and the run goes on
            sections[name] = {"error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()[-4000:]}
        sections[name]["seconds"] = time.perf_counter() - t0
        empty_cache(runtime.device)
    return sections


def build_parser() -> Parser:
    p = Parser(prog="python -m production.bench_gpu", description=__doc__.split("\n")[0])
    p.add_argument("--out", required=True, type=Path, help="folder for bench_gpu.json, bench_gpu.txt, mem128k.json")
    p.add_argument("--sections", default=",".join(SECTIONS), help=f"comma-separated subset of {', '.join(SECTIONS)}")
    p.add_argument("--device", default="cuda", help="cuda (default) or cuda:N; cpu only with --quick")
    p.add_argument("--quick", action="store_true", help="tiny shapes: a smoke run of every section's code")
    return p


@command()
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    names = [s.strip() for s in args.sections.split(",") if s.strip()]
    unknown = [s for s in names if s not in SECTIONS]
    if unknown or not names:
        raise UserError(f"unknown section(s) {unknown}; valid: {', '.join(SECTIONS)}")
    kind = torch.device(args.device).type
    if kind == "cuda" and not torch.cuda.is_available():
        raise UserError("no CUDA device here; bench_gpu measures a GPU (try --quick --device cpu for a smoke run)")
    if kind != "cuda" and not args.quick:
        raise UserError(f"--device {args.device} needs --quick: the full check is sized for a GPU")
    if args.out.exists() and not args.out.is_dir():
        raise UserError(f"--out {args.out} exists and is not a folder")
    plan = QUICK if args.quick else FULL
    runtime = RuntimeConfig(args.device, "bf16" if kind == "cuda" else "fp32", False)
    args.out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    sections = run_sections(names, plan, runtime, args.out)
    report = {
        "schema": "dba.bench_gpu/1",
        "plan": "quick" if args.quick else "full",
        "device": environment(args.device),
        "seconds": time.perf_counter() - t0,
        "sections": sections,
    }
    report["targets"] = targets(report)
    write_json(args.out / "bench_gpu.json", report)
    text = summary(report)
    write_text(args.out / "bench_gpu.txt", text)
    print(text, end="")
    return 0 if all("error" not in s for s in sections.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
