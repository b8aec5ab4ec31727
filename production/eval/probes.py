"""Long-context probes scored by likelihood, so that small models give a reading too.

- passkey: a three-digit number is hidden at a chosen depth in filler text from the corpus, and asked for at
  the end; the model ranks K candidate numbers (each one GPT-2 token, the answer among them) by the logit it
  gives each as the next token. Chance is 1/K.
- induction (copy): a random token sequence followed by its exact repeat; a model that uses its context
  predicts the repeat far better than the first copy.
"""

from __future__ import annotations

import functools

import torch

from production.data.files import TokenStream
from production.data.tokenizer import GPT2Tokenizer
from production.eval.longctx import Route
from production.eval.scoring import last_logits, score_tokens
from production.model.gpt import GPT

NEEDLE = " The pass key is {key}. Remember it. {key} is the pass key."
QUESTION = " What is the pass key? The pass key is"
CANDIDATES = 10


@functools.cache
def key_pool(tok: GPT2Tokenizer) -> tuple[tuple[int, int], ...]:
    """(number, token id) for the numbers 100..999 whose " N" is a single GPT-2 token."""
    pool = []
    for n in range(100, 1000):
        ids = tok.encode(f" {n}")
        if len(ids) == 1:
            pool.append((n, ids[0]))
    return tuple(pool)


def shortest_length(tok: GPT2Tokenizer) -> int:
    """The fewest tokens a passkey sequence can have: the longest needle and the question, no filler."""
    needle = max(len(tok.encode(NEEDLE.format(key=n))) for n, _ in key_pool(tok))
    return needle + len(tok.encode(QUESTION))


def passkey_batch(
    filler: TokenStream, tok: GPT2Tokenizer, length: int, depth: float, trials: int, gen: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """`trials` sequences of exactly `length` tokens (filler with the needle at `depth`, then the question) and
    their candidate token ids (trials, K), the answer first."""
    pool = key_pool(tok)
    rows, cands = [], []
    for _ in range(trials):
        picks = torch.randperm(len(pool), generator=gen)[:CANDIDATES].tolist()
        key, key_id = pool[picks[0]]
        needle, question = tok.encode(NEEDLE.format(key=key)), tok.encode(QUESTION)
        n_fill = length - len(needle) - len(question)
        if n_fill < 0:
            raise ValueError(f"length {length} is too short for the passkey probe")
        start = int(torch.randint(0, len(filler) - n_fill, (1,), generator=gen))
        fill = filler.window(start, n_fill).tolist() if n_fill else []
        at = round(depth * n_fill)
        rows.append(fill[:at] + needle + fill[at:] + question)
        cands.append([key_id] + [pool[i][1] for i in picks[1:]])
    return torch.tensor(rows), torch.tensor(cands)


def passkey(
    model: GPT,
    filler: TokenStream,
    tok: GPT2Tokenizer,
    length: int,
    depth: float,
    trials: int,
    route: Route,
    chunk: int,
    seed: int,
    autocast=None,
) -> dict:
    """Accuracy of ranking the true key first among K candidates, over `trials` sequences (the same sequences
    for every route: they depend on the seed, length and depth only)."""
    gen = torch.Generator().manual_seed(seed + length * 1000 + round(depth * 100))
    ids, cands = passkey_batch(filler, tok, length, depth, trials, gen)
    logits = last_logits(model, ids, route.policy, chunk, autocast).cpu()
    hits = logits.gather(1, cands).argmax(dim=1) == 0
    return {"length": length, "depth": depth, "path": route.label, "accuracy": float(hits.float().mean())}


def induction(
    model: GPT, vocab: int, length: int, trials: int, route: Route, chunk: int, seed: int, autocast=None
) -> dict:
    """Mean NLL of the first copy of a random sequence vs its repeat (the repeat's first token excluded: nothing
    announces where the repeat starts), at total length `length`."""
    half = length // 2
    gen = torch.Generator().manual_seed(seed + length)
    first = torch.randint(0, vocab, (trials, half), generator=gen)
    ids = torch.cat([first, first], dim=1)
    logp, _ = score_tokens(model, ids, route.policy, chunk, chunk, 0, autocast)
    nll = -logp.cpu()  # targets are positions 1 .. 2 half - 1
    return {
        "length": 2 * half,
        "path": route.label,
        "first_nll": float(nll[:, : half - 1].mean()),
        "repeat_nll": float(nll[:, half:].mean()),
    }
