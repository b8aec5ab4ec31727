"""A prompt given as text or as token ids -> checked GPT-2 ids."""

from __future__ import annotations

from production.core.errors import UserError
from production.data.tokenizer import GPT2Tokenizer


def prompt_ids(text: str | None, token_text: str | None, tokenizer: GPT2Tokenizer, vocab_size: int) -> list[int]:
    """Exactly one of `text` (encoded) or `token_text` ("464 3290 318", commas allowed) -> ids in the vocabulary."""
    if (text is None) == (token_text is None):
        raise UserError('give exactly one of --prompt TEXT or --prompt-tokens "ID ID ..."')
    if text is not None:
        ids = tokenizer.encode(text)
    else:
        try:
            ids = [int(t) for t in token_text.replace(",", " ").split()]
        except ValueError as e:
            raise UserError(f"--prompt-tokens must be integers separated by spaces, got {token_text!r}") from e
    if not ids:
        raise UserError("the prompt is empty")
    bad = [i for i in ids if not 0 <= i < vocab_size]
    if bad:
        raise UserError(f"prompt token id {bad[0]} is outside the vocabulary [0, {vocab_size})")
    return ids
