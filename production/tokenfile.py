"""llm.c token shard format: a 256 x int32 header (magic 20240520, version 1, token count), then uint16 tokens.
Kept free of torch so tokenizer worker processes start fast."""

import numpy as np

LLMC_MAGIC, LLMC_VERSION, LLMC_HEADER_INTS = 20240520, 1, 256


def llmc_header(n_tokens: int) -> bytes:
    header = np.zeros(LLMC_HEADER_INTS, dtype=np.int32)
    header[:3] = LLMC_MAGIC, LLMC_VERSION, n_tokens
    return header.tobytes()
