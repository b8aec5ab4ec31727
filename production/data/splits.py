"""Training data from a token stream: the 90/10 train/validation split, random training windows and the fixed
validation windows."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from production.core.errors import UserError
from production.data.corpus import embedded_tokens
from production.data.files import TokenStream, open_tokens

VAL_FRACTION = 0.1


def val_size(n_tokens: int) -> int:
    """Tokens in the validation split (the last VAL_FRACTION of the stream)."""
    return int(n_tokens * VAL_FRACTION)


def load_splits(data: Path | None, cache_dir: Path, block_size: int, vocab_size: int) -> TokenSplits:
    """The token file `data`, or the embedded corpus (tokenized once into `cache_dir`) when it is None, split
    and checked."""
    if data is not None:
        stream, fmt = open_tokens(data)
        return split_tokens(stream, str(data), fmt, block_size, vocab_size)
    path, source = embedded_tokens(Path(cache_dir).expanduser())
    return split_tokens(open_tokens(path)[0], source, "embedded", block_size, vocab_size)


@dataclass
class TokenSplits:
    train: TokenStream
    val: TokenStream
    info: dict  # recorded as resolved_config["data"]


def split_tokens(stream: TokenStream, source: str, fmt: str, block_size: int, vocab_size: int) -> TokenSplits:
    """First 90% train, last 10% validation, after checking the ids and that both splits hold a window."""
    n = len(stream)
    n_val = val_size(n)
    need = block_size + 1
    if n - n_val < need or n_val < need:
        raise UserError(
            f"data {source} has {n} tokens: too short for block_size {block_size} "
            f"(each of the 90/10 train/val splits needs at least {need} tokens, so >= {10 * need} in all)"
        )
    top = stream.max_token()
    if top >= vocab_size:
        raise UserError(
            f"data {source} contains token id {top} >= vocab_size {vocab_size}; "
            "it was not tokenized with the GPT-2 tokenizer"
        )
    info = dict(
        source=source, format=fmt, n_tokens=n, train_tokens=n - n_val, val_tokens=n_val, val_fraction=VAL_FRACTION
    )
    return TokenSplits(stream.slice(0, n - n_val), stream.slice(n - n_val, n), info)


class WindowSampler:
    """Random (block+1)-token training windows from one seeded generator; its state is checkpointed so a
    resumed run draws exactly the windows the uninterrupted run would have drawn."""

    def __init__(self, tokens: TokenStream, block_size: int, batch_size: int, seed: int):
        self.tokens, self.block_size, self.batch_size = tokens, block_size, batch_size
        self.generator = torch.Generator().manual_seed(seed)

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        """-> inputs, targets (batch_size, block_size) int64."""
        high = len(self.tokens) - self.block_size  # last start that leaves block+1 tokens
        starts = torch.randint(0, high, (self.batch_size,), generator=self.generator).tolist()
        return stack_windows(self.tokens, starts, self.block_size)

    def skip_batch(self) -> None:
        """Advance the stream past one batch without reading it (another rank trains on it)."""
        torch.randint(0, len(self.tokens) - self.block_size, (self.batch_size,), generator=self.generator)

    def state_dict(self) -> dict:
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state: dict) -> None:
        self.generator.set_state(state["generator"])


def stack_windows(tokens: TokenStream, starts: list[int], block_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    xy = torch.from_numpy(np.stack([tokens.window(s, block_size + 1) for s in starts]))
    return xy[:, :-1], xy[:, 1:]


def fixed_batches(tokens: TokenStream, block_size: int, batch_size: int, n_batches: int) -> list[list[int]]:
    """Evenly spaced window starts, the same for every run and seed, grouped into batches: evaluation on
    them is comparable across runs."""
    starts = np.linspace(0, len(tokens) - block_size - 1, n_batches * batch_size).round().astype(np.int64).tolist()
    return [starts[i : i + batch_size] for i in range(0, len(starts), batch_size)]
