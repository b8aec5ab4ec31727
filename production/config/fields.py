"""The one vocabulary of options: every setting a user can give, its flag, type, help, the `--mode` that takes
it and the section it resolves into. The `main.py` parser, the train-only / sample-only checks, the manifest's
override names and the benchmarks' flags are all generated from FIELDS; nothing else spells a flag.

Sections: `model` -> ModelConfig, `train` -> TrainConfig, `runtime` -> RuntimeConfig (all three through
`production.config.resolve.resolve`), `run` (how the train command runs: data, run directory, resume, ...),
`sample` (the sample command), `common` (both modes). Torch-free, so `main.py --help` is fast.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path

from production.cache.policy import PAPER_POLICY
from production.config.presets import DEFAULT_EXP, DEFAULT_SIZE, EXPERIMENTS, SIZES
from production.config.sampling import MAX_CANDIDATES, GuardLimits, SamplingConfig, dataclass_default
from production.core.errors import UserError
from production.core.layout import CORPUS_CACHE_DIR, DEFAULT_TUNER_STORE

TRAIN, SAMPLE, BOTH, EXPORT, EVAL = ("train",), ("sample",), ("train", "sample"), ("export",), ("eval",)
UPCYCLE = ("upcycle",)
TRAINS = (*TRAIN, *UPCYCLE)  # the modes that train: the recipe's options
RUNS = (*BOTH, *EVAL, *UPCYCLE)  # the modes that run a model
ALL = (*BOTH, *EXPORT, *EVAL, *UPCYCLE)
SAMPLE_EVAL = (*SAMPLE, *EVAL)
SWITCH = "switch"  # a store_true flag; `bool` fields get --x / --no-x


@dataclass(frozen=True)
class Field:
    name: str  # the config / dict key
    type: type | str  # int, float, str, Path, bool or SWITCH
    help: str
    section: str  # model | train | runtime | run | sample | export | common
    modes: tuple[str, ...] = TRAIN
    default: object = None  # None: the preset / dataclass decides
    flag: str | None = None  # default --name-with-dashes
    choices: tuple | None = None

    @property
    def cli(self) -> str:
        return self.flag or "--" + self.name.replace("_", "-")


def _sample_default(name: str):
    return dataclass_default(SamplingConfig, name)


def _guard_default(name: str):
    return dataclass_default(GuardLimits, name)


PRESET = " (default: the preset's)"
# fmt: off
FIELDS: tuple[Field, ...] = (
    Field("mode", str, "what to do", "common", ALL, "train", choices=("train", "sample", "export", "eval", "upcycle")),
    Field("seed", int, "train: the run's seed (default 1337); sample: the sampling seed; eval: windows and probes "
          "(default 1337)", "train", RUNS),
    Field("device", str, "auto (cuda > mps > cpu), cpu, cuda, cuda:N, mps", "runtime", RUNS, "auto"),
    Field("dtype", str, "auto (bf16 autocast on accelerators, fp32 on CPU), fp32, bf16", "runtime", RUNS, "auto"),
    Field("tuner_store", Path, "the tuner's decision store", "common", RUNS, DEFAULT_TUNER_STORE),
    Field("cache_dir", Path, "where the tokenized embedded corpus is cached", "common", RUNS, CORPUS_CACHE_DIR),
    # train: what to train on and where
    Field("size", str, f"size preset: {', '.join(SIZES)}", "run", TRAIN, DEFAULT_SIZE),
    Field("exp", str, f"experiment preset: {', '.join(EXPERIMENTS)}", "run", TRAIN, DEFAULT_EXP),
    Field("data", Path, ".npy uint16 tokens, llm.c .bin shard, or a folder of shards (default: the embedded "
          "Shakespeare corpus; eval: the run's own data, else the embedded corpus; its validation split)", "run",
          (*TRAINS, *EVAL)),
    Field("out_dir", Path, "run directory (default: runs/<size>_<exp>_s<seed>; upcycle: runs/upcycle_<teacher>)",
          "run", TRAINS),
    # train: architecture overrides
    Field("n_layer", int, "transformer blocks" + PRESET, "model"),
    Field("d_model", int, "residual width" + PRESET, "model"),
    Field("n_head", int, "attention heads" + PRESET, "model"),
    Field("d_ff", int, "MLP hidden width" + PRESET, "model"),
    Field("block_size", int, "context length in tokens" + PRESET, "model", flag="--block"),
    Field("attn_dim", int, "total Q/K/V width of bottleneck and decoupled attention" + PRESET, "model"),
    Field("sem_dim", int, "decoupled: semantic (position-free) Q/K width" + PRESET, "model", TRAINS),
    Field("geo_dim", int, "decoupled: geometric (RoPE) Q/K width" + PRESET, "model", TRAINS),
    Field("kv_heads", int, "gqa: key/value heads" + PRESET, "model"),
    Field("dropout", float, "dropout probability (default 0)", "model"),
    Field("null_attn", bool, "a learned always-visible null key/value (default: the exp's)", "model"),
    Field("tie_qk", bool, "tie the (semantic) query and key projections (default: the exp's)", "model"),
    Field("rope", bool, "rotary position embedding (default: the exp's)", "model"),
    # train: recipe overrides
    Field("batch_size", int, "windows per micro-batch" + PRESET, "train", TRAINS),
    Field("grad_accum", int, "micro-batches per optimizer step" + PRESET, "train"),
    Field("warmup_steps", int, "linear warmup steps (default: min(200, steps / 10))", "train", TRAINS),
    Field("steps", int, "optimizer steps; 0 writes resolved_config.json and exits" + PRESET, "train", TRAINS),
    Field("eval_every", int, "steps between evaluations" + PRESET, "train", TRAINS),
    Field("eval_iters", int, "validation batches per evaluation" + PRESET, "train", TRAINS),
    Field("log_every", int, "steps between train events (default 10)", "train", TRAINS),
    Field("lr", float, "peak learning rate (default: the exp's)", "train", TRAINS),
    Field("min_lr", float, "final learning rate of the cosine (default 0.1 lr)", "train", TRAINS),
    Field("weight_decay", float, "AdamW weight decay on 2-D weights (default 0.1)", "train", TRAINS),
    Field("grad_clip", float, "gradient-norm clip (default 1.0)", "train", TRAINS),
    # train: how the run executes
    Field("stop_at", int, "train up to this step, save last.pt and exit (then --resume)", "run"),
    Field("tracker", str, "mirror the run's events to an experiment tracker (opt-in)", "run", default="none",
          choices=("none", "tensorboard", "wandb")),
    Field("tracker_group", str, "tracker: the group the run belongs to (the manifest runner passes its group)", "run"),
    Field("save_every_s", float, "also write last.pt between evaluations once this many seconds passed", "run",
          default=300.0),
    Field("resume", SWITCH, "continue the run in --out-dir from its last.pt", "run", TRAINS),
    Field("resume_path", Path, "continue from this checkpoint (implies --resume)", "run"),
    Field("compile", bool, "torch.compile the model (default: measured by the tuner on CUDA, off elsewhere)",
          "runtime"),
    Field("dist", str, "under torchrun: DDP (default) or FSDP2 fully_shard", "run", choices=("ddp", "fsdp")),
    # upcycle
    Field("teacher", Path, "upcycle: the model to convert: a run directory or checkpoint of a standard or GQA run, or "
          "a Hugging Face Llama directory (config.json + safetensors)", "upcycle", UPCYCLE),
    Field("target_kv_ratio", str, "upcycle: cache sizes to reach, as ratios to the teacher's fp16 K/V cache, "
          "comma-separated (or --sem-dim/--geo-dim)", "upcycle", UPCYCLE),
    Field("layer_steps", int, "upcycle: steps of layer-wise attention matching before the logit distillation",
          "upcycle", UPCYCLE, 50),
    # sample
    Field("ckpt", Path, "checkpoint: runs/<id>/best.pt, a run directory or an export directory", "sample",
          ALL[1:]),
    Field("out", Path, "export: the directory to write model.safetensors and config.json into; eval: the report's "
          "path (default: eval.json beside the checkpoint)", "export", (*EXPORT, *EVAL)),
    Field("force", SWITCH, "export: replace the files of a non-empty --out", "export", EXPORT),
    Field("prompt", str, "prompt text", "sample", SAMPLE),
    Field("prompt_tokens", str, 'prompt as GPT-2 token ids, e.g. "0 1 2"', "sample", SAMPLE),
    Field("max_new_tokens", int, "tokens to generate", "sample", SAMPLE, _sample_default("max_new_tokens")),
    Field("temperature", float, "sampling temperature", "sample", SAMPLE, _sample_default("temperature")),
    Field("top_k", int, "sample from the k most likely tokens", "sample", SAMPLE),
    Field("greedy", SWITCH, "always take the most likely token", "sample", SAMPLE),
    Field("kv_policy", str, "auto (the smallest policy passing the quality guard), fp16, none (no cache: full "
          f"recompute), or a policy such as {PAPER_POLICY}; eval: several separated by ';' (none: full forward "
          "passes only)", "sample", SAMPLE_EVAL, "auto"),
    Field("guard_max_logit", float, "auto: max |delta logit| vs fp16", "sample", SAMPLE_EVAL,
          _guard_default("max_abs_logit")),
    Field("guard_nll", float, "auto: max mean delta NLL in nats", "sample", SAMPLE_EVAL, _guard_default("delta_nll")),
    Field("guard_ppl", float, "auto: max perplexity ratio", "sample", SAMPLE_EVAL, _guard_default("ppl_ratio")),
    Field("max_cache_bytes", int, "auto: only policies whose cache fits in this many bytes", "sample", SAMPLE_EVAL),
    Field("tuner_max_candidates", int, "auto: policies judged at most", "sample", SAMPLE_EVAL, MAX_CANDIDATES),
    Field("max_seq", int, "cache capacity in tokens (default: the model's block size)", "sample", SAMPLE),
    Field("cuda_graphs", SWITCH, "decode steps replayed from CUDA graphs over the fused Triton kernel (CUDA with "
          "triton; not with --kv-policy none)", "sample", SAMPLE),
    Field("json", SWITCH, "print one JSON object instead of the text", "sample", SAMPLE_EVAL),
    # eval
    Field("lengths", str, "context lengths as multiples of the training block, comma-separated", "eval", EVAL,
          "1,2,4,8"),
    Field("windows", int, "validation windows per length (the same windows at every length)", "eval", EVAL, 4),
    Field("rope_scaling", str, "RoPE context extensions to compare, comma-separated: none, linear (position "
          "interpolation), ntk, yarn", "eval", EVAL, "none"),
    Field("chunk", int, "cache path: tokens fed per step after the first chunk's prefill (1: exactly decoding)",
          "eval", EVAL, 64),
    Field("passkey_trials", int, "passkey probe: trials per length and depth (0: no passkey probe)", "eval", EVAL, 4),
)
# fmt: on
BY_NAME = {f.name: f for f in FIELDS}
RESOLVED_SECTIONS = ("model", "train", "runtime")
# what a manifest run may override: the model and recipe fields (steps and seed are fields of the run itself)
OVERRIDE_FIELDS = tuple(f.name for f in FIELDS if f.section in ("model", "train") and f.name not in ("steps", "seed"))


def flag_of(name: str) -> str:
    return BY_NAME[name].cli


def add_arguments(parser: argparse.ArgumentParser, names: list[str] | None = None, group_by_mode: bool = False):
    """Add the named fields (all by default) to `parser`. Every argparse default is None (False for switches):
    `given(args)` then tells what the user typed, and `with_defaults` fills in the table's defaults."""
    groups = {}
    for f in FIELDS if names is None else [BY_NAME[n] for n in names]:
        target = parser
        if group_by_mode and f.modes not in (BOTH, RUNS, ALL):
            target = groups.setdefault(f.modes, parser.add_argument_group(" / ".join(f.modes)))
        shown = "" if f.default is None else f" (default: {f.default})"
        kwargs = {"help": f.help + shown, "default": None}
        if f.type is SWITCH:
            kwargs.update(action="store_true", default=False)
        elif f.type is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
        else:
            kwargs.update(type=f.type, choices=f.choices)
        target.add_argument(f.cli, dest=f.name, **kwargs)


def given(args: argparse.Namespace) -> dict:
    """The options the user gave: values that are not None, switches that are on."""
    switches = {f.name for f in FIELDS if f.type is SWITCH}
    return {k: v for k, v in vars(args).items() if v is not None and not (k in switches and v is False)}


def with_defaults(values: dict) -> dict:
    """Every field of the table, from `values` or its default."""
    return {f.name: values.get(f.name, f.default) for f in FIELDS}


def check_mode(values: dict, mode: str) -> None:
    """A flag of the other mode is a mistake, not something to ignore."""
    for name in values:
        if mode not in BY_NAME[name].modes:
            raise UserError(f"{flag_of(name)} does not apply to --mode {mode}")


def _has_type(value, want) -> bool:
    if want is bool or isinstance(value, bool):
        return want is bool and isinstance(value, bool)
    if want is int:
        return isinstance(value, int)
    if want is float:
        return isinstance(value, int | float)
    return isinstance(value, str) if want is str else True


def check_types(values: dict) -> None:
    """Values that did not come through argparse (a manifest's overrides) must have their field's type."""
    for name, value in values.items():
        want = BY_NAME[name].type
        if value is not None and not _has_type(value, want):
            raise UserError(f"{name} must be {getattr(want, '__name__', want)}, got {value!r}")


def section(values: dict, name: str) -> dict:
    """The given values of one section."""
    return {k: v for k, v in values.items() if k in BY_NAME and BY_NAME[k].section == name}


def to_argv(values: dict) -> list[str]:
    """Flags that give main.py these values (bools as --x / --no-x, switches only when on)."""
    argv = []
    for name, value in values.items():
        f = BY_NAME[name]
        if f.type is SWITCH:
            argv += [f.cli] if value else []
        elif f.type is bool:
            argv.append(f.cli if value else f.cli.replace("--", "--no-", 1))
        else:
            argv += [f.cli, str(value)]
    return argv
