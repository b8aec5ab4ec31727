"""The tokenizer worker of the preparation pipeline: a batch of documents -> one uint16 token array; and the
pipeline's count and worker defaults. Its own module so worker processes (and `prepare_fineweb.py --help`)
import only numpy and the tokenizer, not `datasets`."""

import os
import re

import numpy as np

from production.core.errors import UserError
from production.core.vocab import UINT16_LIMIT
from production.data.tokenizer import get_tokenizer


def tokenize_batch(texts: list[str]) -> np.ndarray:
    """[EOT, doc 0..., EOT, doc 1..., ...] as uint16 (ids are checked to fit)."""
    tok = get_tokenizer()
    docs = [np.array([tok.eot_id, *doc], dtype=np.int64) for doc in tok.encode_batch(texts, num_threads=1)]
    arr = np.concatenate(docs) if docs else np.zeros(0, dtype=np.int64)
    if len(arr) and arr.max() >= UINT16_LIMIT:
        raise ValueError(f"token id {int(arr.max())} does not fit uint16")
    return arr.astype(np.uint16)


def parse_count(text: str) -> int:
    """'100M' -> 100_000_000; also K, B (and lowercase), decimals ('1.5B') and plain integers."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kKmMbB]?)\s*", str(text))
    if not m:
        raise UserError(f"--tokens must look like 250K, 100M, 1.5B or an integer, got {text!r}")
    value = float(m.group(1)) * {"": 1, "k": 1e3, "m": 1e6, "b": 1e9}[m.group(2).lower()]
    if value < 1 or value != int(value):
        raise UserError(f"--tokens must be a positive whole number of tokens, got {text!r}")
    return int(value)


def default_workers() -> int:
    """The CPU cores this process may use (sched_getaffinity exists on Linux only; macOS has cpu_count)."""
    if hasattr(os, "sched_getaffinity"):
        return max(1, len(os.sched_getaffinity(0)))
    return max(1, os.cpu_count() or 1)
