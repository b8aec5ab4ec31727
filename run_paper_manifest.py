"""Reproduce the paper's runs from paper_manifest.json with provenance. See README.md and `--help`.

python run_paper_manifest.py --group mac_fw100m --dry-run
python run_paper_manifest.py --group cpu_smoke --post-mem128k --post-eval
"""

import sys
import time
from pathlib import Path

from production.core.entry import Parser, command
from production.core.errors import UserError
from production.paper.manifest import (
    RunPlan,
    load_manifest,
    plan_runs,
    same_training,
    select_runs,
    torchrun_launcher,
)
from production.paper.runner import RunInterrupted, check_data, record_same, run_one, table


def build_parser() -> Parser:
    p = Parser(
        prog="run_paper_manifest.py",
        description="Validate, then run a group of the paper manifest: "
        "provenance first, training as main.py subprocesses, finished runs skipped, interrupted ones "
        "resumed, a status table at the end.",
    )
    p.add_argument(
        "--group", required=True, help="manifest group to run (e.g. mac_fw100m, a100_fw1b_1bscale, cpu_smoke)"
    )
    p.add_argument("--manifest", type=Path, default=Path("paper_manifest.json"))
    p.add_argument("--only", nargs="+", metavar="ID", help="run only these run ids of the group")
    p.add_argument("--dry-run", action="store_true", help="resolve, check and print the commands; train nothing")
    p.add_argument("--post-mem128k", action="store_true", help="write mem128k.json for each finished run")
    p.add_argument(
        "--mem128k-policy",
        choices=["default", "auto"],
        default="default",
        help="the cache policy mem128k.json measures: the benchmark's default (the paper's for decoupled runs, fp16 "
        "otherwise) or auto, the tuner's guarded choice for each run at 131072 tokens",
    )
    p.add_argument(
        "--post-eval",
        action="store_true",
        help="write eval.json (main.py --mode eval: full forward and the tuner's cache, plain RoPE and YaRN) for each "
        "finished run",
    )
    p.add_argument("--runs-dir", type=Path, default=Path("runs"), help="where run directories go")
    p.add_argument("--device", default="auto", help="device for training and the memory benchmark")
    p.add_argument(
        "--tracker",
        choices=["none", "tensorboard", "wandb"],
        default="none",
        help="mirror each run to an experiment tracker, grouped by the manifest group",
    )
    d = p.add_argument_group("distributed (each training runs under torchrun)")
    d.add_argument("--nproc-per-node", type=int, help="processes (GPUs) per node")
    d.add_argument("--dist", choices=["ddp", "fsdp"], help="strategy (default ddp)")
    d.add_argument("--nnodes", type=int, help="torchrun --nnodes, for multi-node runs")
    d.add_argument("--node-rank", type=int, help="torchrun --node_rank")
    d.add_argument("--master-addr", help="torchrun --master_addr (the rank-0 node)")
    d.add_argument("--master-port", type=int, help="torchrun --master_port")
    return p


def print_plans(group: dict, plans: list[RunPlan]) -> None:
    """--dry-run: the data, and per run its resolved dims and exact command."""
    data = group.get("data")
    if data:
        print(f"data: {data}" + ("" if Path(data).exists() else " (MISSING: create it with prepare_fineweb.py)"))
    else:
        print("data: the embedded corpus")
    same = same_training(plans)
    for plan in plans:
        if plan.id in same:
            print(f"\n{plan.id}: the same training as {same[plan.id]} (identical config and data): not run again")
            continue
        m, t = plan.resolved["model"], plan.resolved["train"]
        dims = " ".join(
            [
                f"{m['attn_mode']} d_model={m['d_model']} n_layer={m['n_layer']} n_head={m['n_head']}",
                f"attn_dim={m['attn_dim']} sem/geo={m['sem_dim']}/{m['geo_dim']} kv_heads={m['kv_heads']}",
                f"null={m['null_attn']} tie_qk={m['tie_qk']} rope={m['rope']} params={m['n_params'] / 1e6:.1f}M",
                f"steps={t['steps']} lr={t['lr']} batch={t['batch_size']}x{t['grad_accum']}x{m['block_size']}",
            ]
        )
        print(f"\n{plan.id}: {dims}\n  {plan.command_text()}")


RERUN = "rerun the same command to continue: finished runs are skipped, interrupted ones resume"


@command(interrupted=f"interrupted; {RERUN}")
def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    manifest, sha = load_manifest(args.manifest)
    group, runs = select_runs(manifest, args.group, args.only)
    launcher = torchrun_launcher(args.nproc_per_node, args.nnodes, args.node_rank, args.master_addr, args.master_port)
    if args.dist and not launcher:
        raise UserError("--dist needs --nproc-per-node")
    plans = plan_runs(manifest, group, runs, args.runs_dir, args.device, launcher, args.dist)
    if args.tracker != "none":
        for plan in plans:
            plan.values.update(tracker=args.tracker, tracker_group=plan.group)
    print(f"{args.manifest} (sha256 {sha[:12]}), group {args.group}: {len(plans)} run(s), every `expected` holds")
    if args.dry_run:
        print_plans(group, plans)
        return 0
    check_data(plans)
    t0, results, same = time.time(), {}, same_training(plans)
    post = tuple(name for name, on in (("mem128k", args.post_mem128k), ("eval", args.post_eval)) if on)
    try:
        for plan in plans:
            if plan.id in same:
                primary = results[same[plan.id]]
                results[plan.id] = record_same(plan, primary, args.runs_dir, args.manifest, sha)
            else:
                results[plan.id] = run_one(
                    plan, args.runs_dir, args.manifest, sha, args.device, post, args.mem128k_policy
                )
    except RunInterrupted as stopped:
        results[stopped.result.id] = stopped.result
        print(f"\ngroup {args.group}: stopped after {time.time() - t0:.0f}s\n{table(list(results.values()))}")
        print(f"\ninterrupted during {stopped.result.id}; {RERUN}", file=sys.stderr)
        return 130
    print(f"\ngroup {args.group}: {len(results)} run(s) in {time.time() - t0:.0f}s")
    print(table(list(results.values())))
    return 1 if any(r.status == "failed" for r in results.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
