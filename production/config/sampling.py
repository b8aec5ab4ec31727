"""Options of `--mode sample`: how tokens are drawn, and the quality guard of `--kv-policy auto`."""

from __future__ import annotations

from dataclasses import asdict, dataclass

from production.core.errors import UserError

MAX_CANDIDATES = 24  # policies `--kv-policy auto` judges at most before it settles for fp16


@dataclass(frozen=True)
class SamplingConfig:
    max_new_tokens: int = 64
    temperature: float = 1.0
    top_k: int | None = None
    greedy: bool = False
    seed: int = 1337

    def __post_init__(self):
        if self.max_new_tokens < 1:
            raise UserError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if not self.greedy and not self.temperature > 0:
            raise UserError(f"temperature must be > 0 (or use greedy), got {self.temperature}")
        if self.top_k is not None and self.top_k < 1:
            raise UserError(f"top_k must be >= 1, got {self.top_k}")


@dataclass(frozen=True)
class GuardLimits:
    """A cache policy passes when, against an fp16 cache on calibration tokens, all three stay within limits."""

    max_abs_logit: float = 0.5  # max |delta logit|
    delta_nll: float = 0.02  # mean delta NLL of the true next token, nats
    ppl_ratio: float = 1.02  # exp(mean delta NLL)

    def __post_init__(self):
        if not (self.max_abs_logit > 0 and self.delta_nll > 0 and self.ppl_ratio > 1):
            raise UserError(
                "the quality guard needs --guard-max-logit > 0, --guard-nll > 0 and --guard-ppl > 1 (a policy that "
                f"must match fp16 exactly is fp16), got {self.max_abs_logit}, {self.delta_nll}, {self.ppl_ratio}"
            )

    def to_dict(self) -> dict:
        return asdict(self)


def dataclass_default(cls, name: str):
    """The default a dataclass declares for a field (so the CLI shows the one the code uses)."""
    return cls.__dataclass_fields__[name].default
