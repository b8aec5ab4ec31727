"""One config path: presets + overrides (a plain dict keyed by field names) -> a validated ResolvedRun.

`main.py`, the manifest planner and the benchmarks all call `resolve(size, exp, overrides)`; every effective
value it returns is what `resolved_config.json` records.
"""

from __future__ import annotations

from dataclasses import dataclass

from production.config.build import check_overrides, resolve_model, resolve_train
from production.config.fields import section
from production.config.presets import DEFAULT_EXP, DEFAULT_SIZE
from production.config.recipe import TrainConfig
from production.core.runtime import RuntimeConfig, resolve_runtime
from production.model.config import ModelConfig
from production.model.gpt import param_count


@dataclass(frozen=True)
class ResolvedRun:
    size: str
    exp: str
    model: ModelConfig
    train: TrainConfig
    runtime: RuntimeConfig

    def to_dict(self) -> dict:
        """The resolved-config record (the train command adds `data` and `out_dir`)."""
        return {
            "size": self.size,
            "exp": self.exp,
            "model": {**self.model.to_dict(), "n_params": param_count(self.model)},
            "train": self.train.to_dict(),
            "runtime": self.runtime.to_dict(),
        }


def resolve(size: str | None = None, exp: str | None = None, overrides: dict | None = None) -> ResolvedRun:
    """Size preset (default nano) + experiment preset (default paper_decoupled) + overrides -> ResolvedRun.
    Overrides name model, recipe or runtime fields of production.config.fields (None values are ignored)."""
    size, exp = size or DEFAULT_SIZE, exp or DEFAULT_EXP
    values = check_overrides(overrides)
    model = resolve_model(size, exp, section(values, "model"))
    train = resolve_train(size, exp, section(values, "train"))
    return ResolvedRun(size, exp, model, train, resolve_runtime(**section(values, "runtime")))
