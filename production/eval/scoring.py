"""Teacher-forced log-likelihoods of token sequences, two ways: full forward passes (the reference), or through a
KV cache the way generation sees it (a prefix prefilled, the rest fed a chunk at a time and attending over the
cache in its policy's formats; chunk 1 is exactly decoding). The vocabulary head runs only on the positions
scored, `chunk` rows at a time, so memory stays bounded at long lengths."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

from production.cache.policy import KVPolicy
from production.model.gpt import GPT

HEAD_ROWS = 256  # positions per head evaluation: 256 x 50304 float32 logits = 51 MB per batch row


def _score(model: GPT, hidden: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """hidden (B, T, d), targets (B, T) -> log-probabilities (float32) and argmax hits (B, T)."""
    if hidden.shape[1] == 0:  # nothing to score (an empty continuation)
        return nothing_scored(targets)
    logps, hits = [], []
    for t0 in range(0, hidden.shape[1], HEAD_ROWS):
        logits = model.head(hidden[:, t0 : t0 + HEAD_ROWS]).float()
        target = targets[:, t0 : t0 + HEAD_ROWS]
        logps.append(torch.log_softmax(logits, dim=-1).gather(-1, target[..., None])[..., 0])
        hits.append(logits.argmax(dim=-1) == target)
    return torch.cat(logps, dim=1), torch.cat(hits, dim=1)


def nothing_scored(targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The result for zero scored positions: (B, 0) log-probabilities and hits."""
    empty = targets[:, :0]
    return torch.zeros(empty.shape, device=targets.device), torch.ones(empty.shape, dtype=torch.bool)


def hidden_chunks(
    model: GPT, inputs: torch.Tensor, policy: KVPolicy | None, prefill: int, chunk: int
) -> Iterator[tuple[int, torch.Tensor]]:
    """(start, hidden states (B, n, d)) for consecutive runs of input positions. No policy: one forward pass over
    all of `inputs`. A policy: inputs[:, :prefill] prefilled into a fresh cache, then `chunk` positions at a time
    through it."""
    if policy is None:
        yield 0, model.features(inputs)
        return
    cache = model.new_cache(policy, inputs.shape[0], inputs.shape[1])
    yield 0, model.features(inputs[:, :prefill], cache)
    for t0 in range(prefill, inputs.shape[1], chunk):
        yield t0, model.features(inputs[:, t0 : t0 + chunk], cache)


@torch.no_grad()
def score_tokens(
    model: GPT,
    ids: torch.Tensor,
    policy: KVPolicy | None = None,
    prefill: int | None = None,
    chunk: int = 64,
    first: int = 0,
    autocast=None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """ids (B, N) -> log p(ids[:, t+1] | ids[:, :t+1]) and argmax hits for t in [first, N-1), each (B, N-1-first).
    With a policy the first `prefill` inputs (default `chunk`) are prefilled and the rest fed `chunk` at a time."""
    autocast = autocast or contextlib.nullcontext
    ids = ids.to(model.wte.weight.device)
    inputs, targets = ids[:, :-1], ids[:, 1:]
    prefill = min(chunk if prefill is None else prefill, inputs.shape[1])
    if prefill < 1:
        raise ValueError(f"prefill must be >= 1, got {prefill}")
    logps, hits = [], []
    with autocast():
        for t0, hidden in hidden_chunks(model, inputs, policy, prefill, chunk):
            t1 = t0 + hidden.shape[1]
            if t1 > first:
                lo = max(first, t0)
                logp, hit = _score(model, hidden[:, lo - t0 :], targets[:, lo:t1])
                logps.append(logp)
                hits.append(hit)
    if not logps:  # nothing to score (first = N - 1: an empty continuation)
        return nothing_scored(targets)
    return torch.cat(logps, dim=1), torch.cat(hits, dim=1)


@torch.no_grad()
def last_logits(model: GPT, ids: torch.Tensor, policy: KVPolicy | None = None, chunk: int = 64, autocast=None):
    """ids (B, N) -> the logits (B, vocab) after the last token, by a full forward pass or, with a policy, through
    a cache (the first `chunk` tokens prefilled, the rest fed `chunk` at a time)."""
    autocast = autocast or contextlib.nullcontext
    ids = ids.to(model.wte.weight.device)
    with autocast():
        for _, hidden in hidden_chunks(model, ids, policy, min(chunk, ids.shape[1]), chunk):
            last = hidden[:, -1]
        return model.head(last).float()


@torch.no_grad()
def forward_logprobs(
    model: GPT, seqs: list[list[int]], n_scored: list[int], autocast=None
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """One batch of full forward passes: sequence i runs as inputs seqs[i][:-1] and
    its last n_scored[i] tokens are scored. Rows are right-padded (causal attention never looks right)."""
    autocast = autocast or contextlib.nullcontext
    width = max(len(s) for s in seqs)
    ids = torch.zeros(len(seqs), width, dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = torch.tensor(s)
    ids = ids.to(model.wte.weight.device)
    with autocast():
        hidden = model.features(ids[:, :-1])
        out = []
        for i, (s, n) in enumerate(zip(seqs, n_scored, strict=True)):
            end = len(s) - 1
            logp, hit = _score(model, hidden[i : i + 1, end - n : end], ids[i : i + 1, end - n + 1 : end + 1])
            out.append((logp[0], hit[0]))
    return out
