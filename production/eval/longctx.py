"""Loss by position past the training length: fixed validation windows scored at each context length, by full
forward passes and through KV caches in each policy, with each RoPE context extension."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import torch

from production.cache.policy import KVPolicy
from production.core.errors import UserError
from production.data.files import TokenStream
from production.data.splits import load_splits
from production.eval.scoring import score_tokens
from production.model.gpt import GPT
from production.model.rope import RopeScaling

FULL = "full"  # the path label of full forward passes (no cache)


@dataclass(frozen=True)
class Route:
    """How a window is run: by full forward passes (policy None) or through a cache in `policy`."""

    label: str  # "full", or the policy as given ("fp16", "auto", a policy string)
    policy: KVPolicy | None = None
    resolved: str | None = None  # the policy string actually used (auto's choice)


def scaling_for(kind: str, length: int, block_size: int) -> RopeScaling | None:
    """The extension for evaluating at `length`: factor length / block (none below the block)."""
    if kind == "none" or length <= block_size:
        return None
    return RopeScaling(kind, length / block_size, block_size)


def require_tokens(val: TokenStream, length: int) -> None:
    if len(val) < length + 1:
        raise UserError(
            f"the validation split has {len(val)} tokens, fewer than the {length + 1} of one window at length "
            f"{length}; give shorter --lengths or more --data"
        )


def validation_windows(val: TokenStream, n_windows: int, length: int, seed: int) -> torch.Tensor:
    """n_windows windows of length + 1 tokens, evenly spread over the validation split with a seeded offset; the
    shorter lengths use the first tokens of the same windows."""
    require_tokens(val, length)
    need = length + 1
    span = len(val) - need
    offset = int(
        torch.randint(0, max(1, span // max(1, n_windows)), (1,), generator=torch.Generator().manual_seed(seed))
    )
    starts = [min(span, offset + i * span // max(1, n_windows)) for i in range(n_windows)]
    return torch.stack([torch.from_numpy(val.window(s, need)) for s in starts])


def buckets(nll: torch.Tensor, width: int) -> list[dict]:
    """nll (n_windows, T) -> mean NLL per run of `width` positions: [{"start", "end", "nll"}]."""
    out = []
    for t0 in range(0, nll.shape[1], width):
        t1 = min(t0 + width, nll.shape[1])
        out.append({"start": t0, "end": t1, "nll": float(nll[:, t0:t1].mean())})
    return out


def loss_by_position(
    model: GPT, windows: torch.Tensor, length: int, route: Route, chunk: int, bucket: int, autocast=None
) -> dict:
    """One (length, route) cell: the windows' first length + 1 tokens scored; the mean NLL overall, below and past
    the training block, and per bucket of positions."""
    block = model.cfg.block_size
    t0 = time.perf_counter()
    ids = windows[:, : length + 1]
    logp, _ = score_tokens(model, ids, route.policy, chunk, chunk, 0, autocast)
    nll = -logp.cpu()
    return {
        "length": length,
        "path": route.label,
        "policy": route.resolved,
        "mean_nll": float(nll.mean()),
        "trained_nll": float(nll[:, :block].mean()),
        "beyond_nll": float(nll[:, block:].mean()) if length > block else None,
        "buckets": buckets(nll, bucket),
        "seconds": time.perf_counter() - t0,
    }


def eval_split(data_record: dict, data: Path | None, cache_dir: Path, block_size: int, vocab: int):
    """The validation split to evaluate on: of `data` if given, else of the run's own data (`data_record`, its
    resolved-config entry) when that file is here, else of the embedded corpus. Returns (tokens, description)."""
    note = None
    if data is None and data_record.get("format") != "embedded" and data_record.get("source"):
        if Path(data_record["source"]).exists():
            data = Path(data_record["source"])
        else:
            note = f"the run's data {data_record['source']} is not here; the embedded corpus is used instead"
    splits = load_splits(data, cache_dir, block_size, vocab)
    info = {"source": splits.info["source"], "format": splits.info["format"], "split": "validation"}
    info |= {"val_tokens": splits.info["val_tokens"], "note": note}
    return splits.val, info
