"""FineWeb-Edu (or local text) -> GPT-2 token file, for `prepare_fineweb.py`.

Pipeline: documents stream through `datasets` (the hub's HuggingFaceFW/fineweb-edu, or local parquet / jsonl /
txt files read by the same streaming loader) -> batches tokenized in worker processes, results consumed in
order with a bounded number in flight -> written incrementally into a temp file, cut at exactly the requested
count -> renamed into place -> a sidecar `<output>.json` written last (an output without its sidecar is
incomplete). Memory stays bounded whatever the target.
"""

from __future__ import annotations

import collections
import hashlib
import json
import multiprocessing as mp
import os
import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import datasets
import numpy as np
from tqdm import tqdm

from production.core.atomic import write_json
from production.core.errors import UserError
from production.core.vocab import EOT_ID, GPT2_VOCAB_SIZE
from production.data.files import LLMC_HEADER_INTS, llmc_header
from production.data.tokenize import tokenize_batch

HF_DATASET = "HuggingFaceFW/fineweb-edu"
SAMPLE_10BT_TOKENS = 10_000_000_000
BUILDERS = {".parquet": "parquet", ".jsonl": "json", ".json": "json", ".txt": "text"}
DOCS_PER_BATCH = 1024


def default_config(n_tokens: int) -> str:
    """sample-10BT holds about 10B GPT-2 tokens; larger targets need sample-100BT."""
    return "sample-10BT" if n_tokens <= 0.95 * SAMPLE_10BT_TOKENS else "sample-100BT"


def local_files(paths: list[str]) -> list[Path]:
    files = []
    for p in map(Path, paths):
        if not p.exists():
            raise UserError(f"source {p} does not exist")
        found = sorted(f for f in p.rglob("*") if f.suffix in BUILDERS) if p.is_dir() else [p]
        for f in found:
            if f.suffix not in BUILDERS:
                raise UserError(f"source {f} is not a .parquet, .jsonl, .json or .txt file")
        if not found:
            raise UserError(f"source folder {p} holds no .parquet, .jsonl, .json or .txt files")
        files += found
    return files


def iter_batches(source: list[str] | None, config: str) -> Iterator[list[str]]:
    """Batches of texts, in order. source None streams the hub; otherwise local files, grouped by format, in
    order. Rows come from the streaming loader a batch at a time (per-row dicts would cost the main process
    more than the tokenizer workers)."""
    if source is None:
        try:
            streams = [(HF_DATASET, datasets.load_dataset(HF_DATASET, name=config, split="train", streaming=True))]
        except Exception as e:  # no network, no such config, hub errors: all end the same way for the user
            raise UserError(
                f"cannot stream {HF_DATASET} ({config}) from the Hugging Face hub: {type(e).__name__}: "
                f"{str(e).splitlines()[0][:200]}. Without network, pass local files: --source PATH [PATH ...] "
                "(parquet, jsonl or txt with a `text` field)"
            ) from e
    else:
        streams, files = [], local_files(source)
        groups = [[files[0]]]
        for f in files[1:]:
            (groups[-1].append(f) if BUILDERS[f.suffix] == BUILDERS[groups[-1][0].suffix] else groups.append([f]))
        for group in groups:
            builder = BUILDERS[group[0].suffix]
            extra = {"sample_by": "document"} if builder == "text" else {}
            files = [str(f) for f in group]
            ds = datasets.load_dataset(builder, data_files=files, split="train", streaming=True, **extra)
            streams.append((", ".join(str(f) for f in group), ds))
    for name, ds in streams:
        for batch in ds.iter(batch_size=DOCS_PER_BATCH):
            if "text" not in batch:
                raise UserError(f"source {name} has no `text` field (its fields: {', '.join(batch)})")
            yield batch["text"]


def ordered_results(work: Iterator[list[str]], workers: int) -> Iterator[np.ndarray]:
    """Results of tokenize_batch in input order, at most 2 x workers batches in flight (bounded memory)."""
    if workers == 1:
        yield from map(tokenize_batch, work)
        return
    with mp.get_context("spawn").Pool(workers) as pool:  # spawn: no threads of the parent are inherited
        pending = collections.deque()
        for batch in work:
            pending.append(pool.apply_async(tokenize_batch, (batch,)))
            if len(pending) >= 2 * workers:
                yield pending.popleft().get()
        while pending:
            yield pending.popleft().get()


def npy_header(n: int, length: int) -> bytes:
    """A version 1.0 .npy header for n uint16 values, padded to exactly `length` bytes."""
    text = f"{{'descr': '<u2', 'fortran_order': False, 'shape': ({n},), }}"
    pad = length - 10 - len(text) - 1
    assert pad >= 0, (n, length)
    return b"\x93NUMPY\x01\x00" + (length - 10).to_bytes(2, "little") + (text + " " * pad + "\n").encode()


class NpyWriter:
    """A .npy of uint16 preallocated for the target, filled in order; shrunk in place if the source ends early."""

    def __init__(self, path: Path, capacity: int):
        self.path, self.n = path, 0
        self.array = np.lib.format.open_memmap(path, mode="w+", dtype=np.uint16, shape=(capacity,))

    def write(self, tokens: np.ndarray) -> None:
        self.array[self.n : self.n + len(tokens)] = tokens
        self.n += len(tokens)

    def close(self) -> list[Path]:
        capacity, offset = len(self.array), self.array.offset
        self.array.flush()
        del self.array
        if self.n < capacity:  # same-length header with the real shape, then drop the unused tail
            with open(self.path, "r+b") as f:
                f.write(npy_header(self.n, offset))
                f.truncate(offset + 2 * self.n)
        return [self.path]


class BinWriter:
    """llm.c shards: 256 int32 header (magic 20240520, version 1, token count), then uint16 tokens. One file when
    the output ends in .bin, else a folder of `<name>_NNNNNN.bin` shards of up to shard_tokens tokens."""

    def __init__(self, path: Path, shard_tokens: int, single: bool, name: str):
        self.path, self.shard_tokens, self.single, self.name = path, shard_tokens, single, name
        self.files: list[Path] = []
        self.file, self.in_shard = None, 0
        if not single:
            path.mkdir()

    def _open(self) -> None:
        self.close_shard()
        name = self.path if self.single else self.path / f"{self.name}_{len(self.files):06d}.bin"
        self.files.append(name)
        self.file, self.in_shard = open(name, "wb"), 0  # noqa: SIM115 (closed in close_shard)
        self.file.write(np.zeros(LLMC_HEADER_INTS, dtype=np.int32).tobytes())

    def close_shard(self) -> None:
        if self.file is not None:
            self.file.seek(0)
            self.file.write(llmc_header(self.in_shard))
            self.file.close()
            self.file = None

    def write(self, tokens: np.ndarray) -> None:
        while len(tokens):
            if self.file is None or (not self.single and self.in_shard == self.shard_tokens):
                self._open()
            room = len(tokens) if self.single else self.shard_tokens - self.in_shard
            self.file.write(tokens[:room].tobytes())
            self.in_shard += len(tokens[:room])
            tokens = tokens[room:]

    def close(self) -> list[Path]:
        if not self.files:
            self._open()
        self.close_shard()
        return self.files


@dataclass
class PrepareArgs:
    n_tokens: int
    output: Path
    source: list[str] | None  # None: the hub
    config: str
    workers: int
    fmt: str  # npy | bin
    shard_tokens: int
    force: bool


def sidecar_path(output: Path) -> Path:
    return output.with_name(output.name + ".json")


def check_output(a: PrepareArgs) -> bool:
    """True when the output already holds the target (skip). Errors when it exists otherwise, unless --force."""
    side = sidecar_path(a.output)
    if not a.output.exists():
        return False
    if a.force:
        shutil.rmtree(a.output) if a.output.is_dir() else a.output.unlink()
        side.unlink(missing_ok=True)
        return False
    if side.exists() and json.loads(side.read_text()).get("tokens") == a.n_tokens:
        return True
    what = f"holds {json.loads(side.read_text()).get('tokens')} tokens" if side.exists() else "has no sidecar"
    raise UserError(f"{a.output} already exists and {what}; pass --force to replace it")


def prepare(a: PrepareArgs) -> dict:
    """Write the token file and its sidecar; returns the sidecar record."""
    if check_output(a):
        record = json.loads(sidecar_path(a.output).read_text())
        print(f"{a.output} already holds {a.n_tokens:,} tokens ({record['sha256'][:12]}...); nothing to do")
        return record
    tmp = a.output.with_name(f".{a.output.name}.partial-{os.getpid()}")
    if a.fmt == "npy":
        writer = NpyWriter(tmp, a.n_tokens)
    else:
        writer = BinWriter(tmp, a.shard_tokens, single=a.output.suffix == ".bin", name=a.output.name)
    digest, n, docs, t0 = hashlib.sha256(), 0, 0, time.time()
    # disable=None: no bar when stderr is not a terminal (a log file would fill with carriage returns)
    bar = tqdm(total=a.n_tokens, unit="tok", unit_scale=True, desc=a.output.name, smoothing=0.05, disable=None)
    try:
        for tokens in ordered_results(iter_batches(a.source, a.config), a.workers):
            tokens = tokens[: a.n_tokens - n]
            writer.write(tokens)
            digest.update(tokens.tobytes())
            docs += int((tokens == EOT_ID).sum())
            n += len(tokens)
            bar.update(len(tokens))
            if n == a.n_tokens:
                break
        files = writer.close()
    except ValueError as e:  # a worker's id check
        bar.close()
        shutil.rmtree(tmp, ignore_errors=True) if tmp.is_dir() else tmp.unlink(missing_ok=True)
        raise UserError(str(e)) from e
    except BaseException:
        bar.close()
        shutil.rmtree(tmp, ignore_errors=True) if tmp.is_dir() else tmp.unlink(missing_ok=True)
        raise
    bar.close()
    if n < a.n_tokens:
        print(f"note: the source ended after {n:,} of {a.n_tokens:,} tokens; the output holds {n:,}")
    os.replace(tmp, a.output)
    files = [a.output] if tmp in files else [a.output / f.name for f in files]
    elapsed = time.time() - t0
    record = {
        "tokens": n,
        "requested_tokens": a.n_tokens,
        "documents": docs,
        "source": f"hf:{HF_DATASET}" if a.source is None else [str(s) for s in a.source],
        "config": a.config if a.source is None else None,
        "tokenizer": f"gpt2 (tiktoken BPE from GPT-2's vocab.bpe/encoder.json), EOT {EOT_ID} before every document",
        "vocab_size": GPT2_VOCAB_SIZE,
        "format": a.fmt,
        "dtype": "uint16",
        "files": [str(f) for f in files],
        "sha256": digest.hexdigest(),  # of the uint16 token bytes in order (headers excluded)
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "elapsed_s": round(elapsed, 3),
        "tokens_per_s": round(n / elapsed, 1) if elapsed > 0 else None,
        "workers": a.workers,
    }
    write_json(sidecar_path(a.output), record)
    print(
        f"wrote {n:,} tokens ({docs:,} documents) to {a.output} in {elapsed:.1f}s ({n / max(elapsed, 1e-9):,.0f} tok/s)"
    )
    return record
