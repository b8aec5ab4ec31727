"""Token files: memory-mapped uint16 token sequences, and the llm.c shard format.

Accepted inputs:
- `.npy` of dtype uint16, one dimension, as written by prepare_fineweb.py;
- an llm.c `.bin` shard: 256 int32 header (magic 20240520, version 1, token count), then uint16 tokens;
- a directory of such files, read in sorted name order as one sequence.
Nothing is read into memory whole: files are memory-mapped and windows gathered on demand.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from tqdm import tqdm

from production.core.errors import UserError

LLMC_MAGIC, LLMC_VERSION, LLMC_HEADER_INTS = 20240520, 1, 256


def llmc_header(n_tokens: int) -> bytes:
    """The 256 x int32 header of an llm.c shard: magic 20240520, version 1, token count."""
    header = np.zeros(LLMC_HEADER_INTS, dtype=np.int32)
    header[:3] = LLMC_MAGIC, LLMC_VERSION, n_tokens
    return header.tobytes()


class TokenStream:
    """A read-only 1-D sequence of uint16 tokens spread over one or more memory-mapped arrays."""

    def __init__(self, parts: list[np.ndarray]):
        self.parts = [p for p in parts if len(p)]
        self.offsets = np.cumsum([0] + [len(p) for p in self.parts])  # start of each part

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def window(self, start: int, length: int) -> np.ndarray:
        """Tokens [start, start + length) as a new int64 array (may span parts)."""
        out, i = [], int(np.searchsorted(self.offsets, start, side="right")) - 1
        while length > 0:
            lo = start - int(self.offsets[i])
            chunk = self.parts[i][lo : lo + length]
            out.append(chunk)
            start, length, i = start + len(chunk), length - len(chunk), i + 1
        return np.concatenate(out).astype(np.int64)

    def slice(self, lo: int, hi: int) -> TokenStream:
        """The sub-sequence [lo, hi) as views of the same maps."""
        parts = []
        for p, start in zip(self.parts, self.offsets[:-1], strict=True):
            a, b = max(lo - start, 0), min(hi - start, len(p))
            if a < b:
                parts.append(p[a:b])
        return TokenStream(parts)

    def max_token(self, chunk: int = 1 << 24) -> int:
        """Largest id, scanning each map once in chunks (a bar for big files)."""
        steps = [(p, i) for p in self.parts for i in range(0, len(p), chunk)]
        bar = tqdm(steps, desc="checking token ids", unit="chunk", disable=len(self) < 1 << 28, leave=False)
        return max(int(p[i : i + chunk].max()) for p, i in bar)


NPY_MAGIC = b"\x93NUMPY"
PREPARE = "python prepare_fineweb.py"


def _open_npy(path: Path) -> np.ndarray:
    with open(path, "rb") as f:
        if f.read(len(NPY_MAGIC)) != NPY_MAGIC:
            raise UserError(f"{path} is not a NumPy .npy file (no .npy header); write token files with {PREPARE}")
    try:
        arr = np.load(path, mmap_mode="r", allow_pickle=False)
    except ValueError as e:  # numpy's advice here is to allow pickles: never pass it on
        raise UserError(f"{path} holds Python objects, not a uint16 token array; write it with {PREPARE}") from e
    if arr.dtype != np.uint16:
        raise UserError(
            f"{path} holds {arr.dtype} values; expected uint16 GPT-2 token ids "
            "(write it with prepare_fineweb.py, or convert with arr.astype(np.uint16))"
        )
    if arr.ndim != 1:
        raise UserError(f"{path} has shape {arr.shape}; expected a 1-D token array")
    return arr


def _open_llmc_bin(path: Path) -> np.ndarray:
    header = np.fromfile(path, dtype=np.int32, count=LLMC_HEADER_INTS)
    if len(header) < LLMC_HEADER_INTS or header[0] != LLMC_MAGIC:
        raise UserError(f"{path} is not an llm.c token shard (magic {LLMC_MAGIC} missing from its header)")
    if header[1] != LLMC_VERSION:
        raise UserError(f"{path} is llm.c shard version {header[1]}; only version {LLMC_VERSION} (uint16) is supported")
    n_tokens, expected = int(header[2]), LLMC_HEADER_INTS * 4 + 2 * int(header[2])
    if path.stat().st_size != expected:
        raise UserError(
            f"{path} header says {n_tokens} tokens ({expected} bytes) but the file has "
            f"{path.stat().st_size} bytes; the shard is truncated or corrupt"
        )
    return np.memmap(path, dtype=np.uint16, mode="r", offset=LLMC_HEADER_INTS * 4, shape=(n_tokens,))


def open_tokens(path: str | Path) -> tuple[TokenStream, str]:
    """Memory-map a token file or directory of shards. Returns the stream and its format name."""
    path = Path(path)
    if not path.exists():
        raise UserError(
            f"data path {path} does not exist; create it with `{PREPARE} --tokens 100M --output {path}` "
            "or omit --data to use the embedded corpus"
        )
    openers = {".npy": _open_npy, ".bin": _open_llmc_bin}
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.suffix in openers)
        if not files:
            raise UserError(f"directory {path} holds no .npy or .bin token files")
        return TokenStream([openers[p.suffix](p) for p in files]), f"shards({len(files)})"
    if path.suffix not in openers:
        raise UserError(f"data file {path} must end in .npy (uint16 tokens) or .bin (llm.c shard)")
    return TokenStream([openers[path.suffix](path)]), path.suffix[1:]
