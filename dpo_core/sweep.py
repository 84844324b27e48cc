"""Hyperparameter sweeps as data: the sweep file, the trials it expands to, and the rule that picks the winner.

A sweep file (``configs/sweep.yaml``) names the run config every trial starts from, overrides applied to all of them,
and the search space: any config keys in ``--set`` syntax, each with a list of values or (random search) a range::

    config: configs/default.yaml
    overrides: [data.validation_fraction=0.1, train.eval_every=16, train.select=best_val]
    sweep:
      method: grid                       # grid: every combination; random: `trials` seeded draws
      params:
        train.learning_rate: [5.0e-6, 1.0e-5]
        train.beta: {low: 0.05, high: 0.5, log: true}   # random search only
      concurrency: 2
      metric: val/rewards/accuracies

The winner is chosen on the validation split only (``metric``, ``dpo_core.config.VALIDATION_METRIC_MODE`` says
whether higher or lower wins; ties: the earlier trial). Pure Python: the ``dpo-sweep`` flow (``flows/sweep.py``) runs
what this module plans.
"""

from __future__ import annotations

import itertools
import math
from pathlib import Path
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, model_validator

from dpo_core.config import (VALIDATION_METRIC_MODE, RunConfig, UserError, ValidationMetric, load_config, parse_override,
                             read_yaml_mapping)

__all__ = ["Range", "SweepSettings", "SweepSpec", "Trial", "load_sweep", "plan_trials", "trial_config",
           "base_config", "pick_winner"]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Range(_Strict):
    """A continuous range for random search: uniform in [low, high], or log-uniform with ``log: true``."""

    low: float
    high: float
    log: bool = False

    @model_validator(mode="after")
    def _ordered(self) -> "Range":
        if not self.low < self.high:
            raise ValueError(f"a range needs low < high, got low={self.low}, high={self.high}")
        if self.log and self.low <= 0:
            raise ValueError(f"a log range needs low > 0, got {self.low}")
        return self


class SweepSettings(_Strict):
    method: Literal["grid", "random"] = "grid"
    # config key in --set syntax (section.key) -> the values to try, or a Range (random search only)
    params: dict[str, list[Any] | Range]
    trials: int | None = Field(None, gt=0)  # random search: how many trials (required there); grid: all combinations
    seed: int = 0  # random search draws
    concurrency: int = Field(1, gt=0)  # trials running at once, each in its own worker process
    metric: ValidationMetric = "val/rewards/accuracies"  # what picks the winner (validation only)

    @model_validator(mode="after")
    def _space_fits_method(self) -> "SweepSettings":
        if not self.params:
            raise ValueError("sweep.params is empty: name at least one config key to sweep")
        for key, values in self.params.items():
            if "." not in key:
                raise ValueError(f"sweep.params key '{key}' must be a config key in --set syntax (section.key)")
            if isinstance(values, list) and not values:
                raise ValueError(f"sweep.params.{key} lists no values")
            if isinstance(values, Range) and self.method == "grid":
                raise ValueError(f"sweep.params.{key} is a range: a grid needs a list of values (or method: random)")
        if self.method == "random" and self.trials is None:
            raise ValueError("sweep.method=random needs sweep.trials (how many draws)")
        return self


class SweepSpec(_Strict):
    config: str = "configs/default.yaml"  # the run config every trial starts from
    overrides: list[str] = Field(default_factory=list)  # section.key=value, applied to every trial before its own
    sweep: SweepSettings


class Trial(_Strict):
    index: int
    name: str  # trial-03
    params: dict[str, Any]  # the swept keys' values of this trial


def load_sweep(path: str | Path, sets: list[str] | None = None) -> SweepSpec:
    """Read a sweep file and apply ``--set`` items: ``sweep.<field>=...`` and ``config=...`` change the sweep itself
    (``sweep.params.<section.key>=[...]`` one swept key), anything else is a run-config override for every trial."""
    tree = read_yaml_mapping(path, "sweep file")
    tree.setdefault("overrides", [])
    tree.setdefault("sweep", {})
    for item in sets or []:
        key, value = parse_override(item)
        if key == "config":
            tree["config"] = value
        elif key.startswith("sweep.params."):
            tree["sweep"].setdefault("params", {})[key[len("sweep.params."):]] = value
        elif key.startswith("sweep."):
            tree["sweep"][key[len("sweep."):]] = value
        else:
            tree["overrides"] = [*tree["overrides"], item]
    return SweepSpec.model_validate(tree)


def plan_trials(settings: SweepSettings) -> list[Trial]:
    """The trials of a sweep, in a fixed order: every grid combination (the first key varies slowest), or
    ``trials`` distinct seeded random draws (a list: a uniform choice; a range: uniform or log-uniform)."""
    keys = list(settings.params)
    if settings.method == "grid":
        combos = [dict(zip(keys, values)) for values in itertools.product(*settings.params.values())]
    else:
        rng = np.random.default_rng(settings.seed)
        combos, seen = [], set()
        for _ in range(100 * settings.trials):  # distinct draws; a small discrete space may hold fewer
            draw = {key: _draw(rng, settings.params[key]) for key in keys}
            marker = repr(sorted(draw.items()))
            if marker not in seen:
                seen.add(marker)
                combos.append(draw)
            if len(combos) == settings.trials:
                break
    width = len(str(len(combos) - 1))
    return [Trial(index=i, name=f"trial-{i:0{width}d}", params=combo) for i, combo in enumerate(combos)]


def _draw(rng: np.random.Generator, space: list[Any] | Range) -> Any:
    if isinstance(space, list):
        return space[int(rng.integers(len(space)))]
    if space.log:
        return float(math.exp(rng.uniform(math.log(space.low), math.log(space.high))))
    return float(rng.uniform(space.low, space.high))


def _overrides(spec: SweepSpec) -> dict[str, Any]:
    return dict(parse_override(item) for item in spec.overrides)


def base_config(spec: SweepSpec) -> RunConfig:
    """The run config shared by every trial (before its own values); a sweep needs a validation split to pick on."""
    cfg = load_config(spec.config, _overrides(spec))
    if cfg.data.validation_fraction == 0:
        raise UserError("a sweep picks its winner on the validation split: set data.validation_fraction (e.g. 0.1) "
                         "in the run config or the sweep's overrides")
    return cfg


def trial_config(spec: SweepSpec, trial: Trial) -> RunConfig:
    """The run config of one trial: the base config, the sweep's overrides, then the trial's own values."""
    return load_config(spec.config, {**_overrides(spec), **trial.params})


def pick_winner(records: list[dict[str, Any]], metric: str) -> dict[str, Any] | None:
    """The completed trial record with the best finite ``record['validation'][metric]`` (ties: the earlier trial);
    None when no trial completed with that metric. The test split plays no part."""
    scored = [r for r in records if r.get("status") == "completed"
              and math.isfinite(float(r.get("validation", {}).get(metric, math.nan)))]
    if not scored:
        return None
    sign = -1.0 if VALIDATION_METRIC_MODE[metric] == "max" else 1.0
    return min(scored, key=lambda r: (sign * float(r["validation"][metric]), r["index"]))
