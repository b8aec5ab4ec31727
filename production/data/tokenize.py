"""The tokenizer worker of the preparation pipeline: a batch of documents -> one uint16 token array. Its own
module so worker processes import only numpy and the tokenizer."""

import numpy as np

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
