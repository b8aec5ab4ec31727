"""Options of `--mode eval`, parsed torch-free (so `main.py` rejects a bad value at once): context lengths as
multiples of the training block, RoPE context extensions, and the cache policies to compare."""

from __future__ import annotations

from production.core.errors import UserError

ROPE_SCALINGS = ("none", "linear", "ntk", "yarn")  # production.model.rope implements each


def parse_multiples(text: str) -> list[int]:
    """ "1,2,4,8" -> [1, 2, 4, 8] (ascending, unique, each a positive integer)."""
    try:
        multiples = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        multiples = []
    if not multiples or any(m < 1 for m in multiples):
        raise UserError(
            f"--lengths takes positive integers (multiples of the training block) like 1,2,4,8; got {text!r}"
        )
    return sorted(set(multiples))


def parse_scalings(text: str) -> list[str]:
    kinds = [x.strip() for x in text.split(",") if x.strip()]
    bad = [k for k in kinds if k not in ROPE_SCALINGS]
    if not kinds or bad:
        raise UserError(f"--rope-scaling takes a comma-separated list of {', '.join(ROPE_SCALINGS)}; got {text!r}")
    return list(dict.fromkeys(kinds))


def split_policies(text: str) -> list[str]:
    """ "fp16;auto" -> ["fp16", "auto"]; `none` (full forward passes only) drops out."""
    items = [x.strip() for x in text.split(";") if x.strip()]
    if not items:
        raise UserError("--kv-policy is empty; give policies separated by ';', e.g. fp16;auto")
    return [x for x in dict.fromkeys(items) if x != "none"]
