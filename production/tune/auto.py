"""`--kv-policy auto` for one checkpoint and request: calibration tokens, a store hit or a guarded search
(production.tune.policy), and the decision remembered in the store."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from production.config.sampling import GuardLimits
from production.core.errors import UserError
from production.core.runtime import RuntimeConfig, device_signature
from production.data.corpus import embedded_tokens
from production.data.files import TokenStream, open_tokens
from production.data.splits import val_size
from production.model.gpt import GPT
from production.tune.policy import search_policy
from production.tune.store import DecisionStore, config_hash

CALIBRATION_PREFILL, CALIBRATION_DECODE = 512, 64
SEARCH_VERSION = 2  # part of a stored decision's key: decisions of an earlier search are not reused
# what commands report of a policy decision (sample's --json, mem128k's `tuner`); the rest stays in the store
SUMMARY_KEYS = (
    "source",
    "policy",
    "bytes",
    "fp16_bytes",
    "guard",
    "limits",
    "candidates_tried",
    "seconds",
    "counterfactuals",
    "calibration",
)


@dataclass(frozen=True)
class AutoRequest:
    limits: GuardLimits
    max_cache_bytes: int | None
    max_candidates: int
    max_seq: int
    cache_dir: Path

    def __post_init__(self):
        if self.max_candidates < 1:
            raise UserError("--tuner-max-candidates must be >= 1")

    @classmethod
    def from_options(cls, v: dict, max_seq: int) -> AutoRequest:
        """From the command's options (production.config.fields names, with defaults filled in)."""
        limits = GuardLimits(v["guard_max_logit"], v["guard_nll"], v["guard_ppl"])
        return cls(limits, v["max_cache_bytes"], v["tuner_max_candidates"], max_seq, v["cache_dir"])


def _validation_window(stream: TokenStream, n: int) -> torch.Tensor | None:
    """The first n tokens of the stream's validation split (its last 10%), or None if the split is shorter."""
    n_val = val_size(len(stream))
    if n_val < n:
        return None
    return torch.from_numpy(stream.window(len(stream) - n_val, n))[None]


def calibration_tokens(
    data: dict, prompt: list[int], max_seq: int, block: int, cache_dir: Path
) -> tuple[torch.Tensor, int, str]:
    """Real tokens for the guard: the validation split of the run's data (`data`, its resolved-config record) if
    it is here, else the prompt tiled, else the embedded corpus. The prefill and decode steps stay within both
    the cache's max_seq and the model's trained `block`, so the guard judges the cache where the model itself is
    trustworthy. Returns (1, prefill + decode + 1) ids, the prefill length and where they came from."""
    length = min(max_seq, block)
    decode = min(CALIBRATION_DECODE, max(1, length // 4))
    prefill = max(1, min(CALIBRATION_PREFILL, length - decode))
    n = prefill + decode + 1
    window = None
    if data.get("format") == "embedded":
        window = _validation_window(open_tokens(embedded_tokens(cache_dir)[0])[0], n)
        source = "validation split (embedded)"
    elif data.get("source") and Path(data["source"]).exists():
        window = _validation_window(open_tokens(data["source"])[0], n)
        source = f"validation split of {data['source']}"
    if window is not None:
        return window, prefill, source
    if prompt:
        return torch.tensor([(prompt * (n // len(prompt) + 1))[:n]]), prefill, "the prompt, tiled"
    stream = open_tokens(embedded_tokens(cache_dir)[0])[0]
    return torch.from_numpy(stream.window(len(stream) - n, n))[None], prefill, "the embedded corpus"


def auto_policy(
    model: GPT,
    ckpt_path: Path,
    ckpt: dict,
    prompt: list[int],
    request: AutoRequest,
    runtime: RuntimeConfig,
    store: DecisionStore,
) -> tuple[str, dict]:
    """The tuner's policy for this model and request: a store hit, or a guarded search (then stored). Returns the
    policy string and the decision record with its `source` (store or search)."""
    data = ckpt["config"].get("data", {})
    tokens, prefill, source = calibration_tokens(data, prompt, request.max_seq, model.cfg.block_size, request.cache_dir)
    stat = ckpt_path.stat()
    identity = {
        "model": ckpt["config"]["model"],
        "ckpt": [str(ckpt_path.resolve()), stat.st_size, stat.st_mtime_ns, ckpt["step"]],
    }
    shapes = {
        "search": SEARCH_VERSION,
        "max_seq": request.max_seq,
        "prefill": prefill,
        "decode": tokens.shape[1] - prefill - 1,
        "calibration": source,
        "limits": request.limits.to_dict(),
        "max_cache_bytes": request.max_cache_bytes,
        "max_candidates": request.max_candidates,
        "dtype": runtime.dtype,
    }
    device, key = device_signature(runtime.device), config_hash(identity)
    decision = store.get("policy", device, key, shapes)
    if decision is not None:
        return decision["policy"], {**decision, "source": "store"}
    decision = search_policy(
        model,
        tokens.to(runtime.device),
        prefill,
        request.max_seq,
        request.limits,
        request.max_cache_bytes,
        request.max_candidates,
        runtime.autocast,
    )
    decision["calibration"] = {"source": source, "prefill": prefill, "decode": shapes["decode"]}
    store.put("policy", device, key, shapes, decision)
    return decision["policy"], {**decision, "source": "search"}
