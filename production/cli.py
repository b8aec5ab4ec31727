"""`python main.py --mode train|sample ...`: the argument parser and the dispatch to each command.

User mistakes print one `error: ...` line and exit 2 before any file of an earlier run is touched.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from production.config import EXPERIMENTS, SIZES
from production.errors import UserError


class Parser(argparse.ArgumentParser):
    def error(self, message: str):
        print(f"error: {message} (see --help)", file=sys.stderr)
        sys.exit(2)


# options that belong to one mode only (dest names); giving them to the other mode is an error
TRAIN_ONLY = ["size", "exp", "data", "out_dir", "n_layer", "d_model", "n_head", "d_ff", "block", "attn_dim",
              "sem_dim", "geo_dim", "kv_heads", "dropout", "null_attn", "tie_qk", "rope", "batch_size", "grad_accum",
              "warmup_steps", "steps", "eval_every", "eval_iters", "log_every", "lr", "min_lr", "weight_decay",
              "grad_clip", "stop_at", "resume", "resume_path", "compile", "dist"]  # fmt: skip
SAMPLE_ONLY = ["ckpt", "prompt", "prompt_tokens", "max_new_tokens", "temperature", "top_k", "greedy", "kv_policy",
               "max_seq", "json", "guard_max_logit", "guard_nll", "guard_ppl", "max_cache_bytes",
               "tuner_max_candidates"]  # fmt: skip


def build_parser() -> Parser:
    p = Parser(
        prog="main.py",
        description="Decoupled Bottleneck Attention: train GPT-style models with four attention variants, and "
        "sample from them with quantized KV caches.",
    )
    p.add_argument("--mode", default="train", choices=["train", "sample"], help="what to do (default: train)")
    p.add_argument("--seed", type=int, help="train: the run's seed (default 1337); sample: the sampling seed")
    p.add_argument("--device", default="auto", help="auto (cuda > mps > cpu), cpu, cuda, cuda:N, mps")
    p.add_argument("--dtype", default="auto", help="auto (bf16 autocast on accelerators, fp32 on CPU), fp32, bf16")
    p.add_argument("--tuner-store", type=Path, default=Path("runs/tuner.json"),
                   help="the tuner's decision store (default runs/tuner.json)")  # fmt: skip

    g = p.add_argument_group("train")
    g.add_argument("--size", help=f"size preset (default nano): {', '.join(SIZES)}")
    g.add_argument("--exp", help=f"experiment preset (default paper_decoupled): {', '.join(EXPERIMENTS)}")
    g.add_argument("--data", type=Path, help=".npy uint16 tokens, llm.c .bin shard, or a folder of shards "
                   "(default: the embedded Shakespeare corpus)")  # fmt: skip
    g.add_argument("--out-dir", type=Path, help="run directory (default: runs/<size>_<exp>_s<seed>)")
    g.add_argument("--cache-dir", type=Path, default=Path("~/.cache/dba"),
                   help="where the tokenized embedded corpus is cached (default ~/.cache/dba)")  # fmt: skip
    for flag in ("n_layer", "d_model", "n_head", "d_ff", "block", "attn_dim", "sem_dim", "geo_dim", "kv_heads"):
        g.add_argument(f"--{flag.replace('_', '-')}", type=int, help="override the preset")
    g.add_argument("--dropout", type=float, help="override the preset (0)")
    for flag in ("null_attn", "tie_qk", "rope"):
        g.add_argument(f"--{flag.replace('_', '-')}", action=argparse.BooleanOptionalAction, default=None,
                       help="override the exp preset")  # fmt: skip
    for flag in ("batch_size", "grad_accum", "warmup_steps", "steps", "eval_every", "eval_iters", "log_every"):
        g.add_argument(f"--{flag.replace('_', '-')}", type=int, help="override the preset")
    for flag in ("lr", "min_lr", "weight_decay", "grad_clip"):
        g.add_argument(f"--{flag.replace('_', '-')}", type=float, help="override the preset")
    g.add_argument("--stop-at", type=int, help="train up to this step, save last.pt and exit (then --resume)")
    g.add_argument("--resume", action="store_true", help="continue the run in --out-dir from its last.pt")
    g.add_argument("--resume-path", type=Path, help="continue from this checkpoint (implies --resume)")
    g.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                   help="torch.compile the model (default: measured by the tuner on CUDA, off elsewhere)")  # fmt: skip
    g.add_argument("--dist", choices=["ddp", "fsdp"], help="under torchrun: DDP (default) or FSDP2 fully_shard")

    g = p.add_argument_group("sample")
    g.add_argument("--ckpt", type=Path, help="checkpoint to sample from, e.g. runs/<id>/best.pt")
    g.add_argument("--prompt", help="prompt text")
    g.add_argument("--prompt-tokens", help='prompt as GPT-2 token ids, e.g. "0 1 2"')
    g.add_argument("--max-new-tokens", type=int, help="tokens to generate (default 64)")
    g.add_argument("--temperature", type=float, help="sampling temperature (default 1.0)")
    g.add_argument("--top-k", type=int, help="sample from the k most likely tokens")
    g.add_argument("--greedy", action="store_true", help="always take the most likely token")
    g.add_argument(
        "--kv-policy",
        help="auto (default: the smallest policy passing the quality guard), fp16, none (no cache: full "
        "recompute), or a policy such as ksem=q4_0@32,kgeo=q8_0@32,v=q4_0@32,resid=128",
    )
    g.add_argument("--guard-max-logit", type=float, help="auto: max |delta logit| vs fp16 (default 0.5)")
    g.add_argument("--guard-nll", type=float, help="auto: max mean delta NLL in nats (default 0.02)")
    g.add_argument("--guard-ppl", type=float, help="auto: max perplexity ratio (default 1.02)")
    g.add_argument("--max-cache-bytes", type=int, help="auto: only policies whose cache fits in this many bytes")
    g.add_argument("--tuner-max-candidates", type=int, help="auto: policies judged at most (default 24)")
    g.add_argument("--max-seq", type=int, help="cache capacity in tokens (default: the model's block size)")
    g.add_argument("--json", action="store_true", help="print one JSON object instead of the text")
    return p


def check_mode_options(args: argparse.Namespace, parser: Parser) -> None:
    """A flag of the other mode is a mistake, not something to ignore."""
    other = SAMPLE_ONLY if args.mode == "train" else TRAIN_ONLY
    for dest in other:
        if getattr(args, dest) not in (None, False, parser.get_default(dest)):
            raise UserError(f"--{dest.replace('_', '-')} does not apply to --mode {args.mode}")


def main(argv: list[str] | None = None) -> int:
    from production.distributed import launch_rank
    from production.trainer import TrainingError

    argv = sys.argv[1:] if argv is None else argv
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        check_mode_options(args, parser)
        if args.mode == "sample":
            from production import sample_cmd

            return sample_cmd.run(args)
        from production import train_cmd

        return train_cmd.run(args, argv)
    except UserError as e:
        if launch_rank() == 0:
            print(f"error: {e}", file=sys.stderr)
        return 2
    except TrainingError as e:
        if launch_rank() == 0:
            print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("\ninterrupted; a training run continues with --resume (from its last.pt)", file=sys.stderr)
        return 130
