"""The benchmark's statistics and verdicts: pure functions on plain numbers (no torch), tested in
tests/test_bench_stats.py.

* `quartiles`: median and inter-quartile range of a run's step times.
* `judge`: a target's verdict over interleaved rounds: **met** only when every round meets it (and there are at
  least `MIN_ROUNDS`), **missed** when no round does, **inconclusive** otherwise, with the rounds' spread.
* `gemm_drift`: each round's fp32 GEMM peak relative to the first round's, flagged beyond `DRIFT_TOLERANCE`.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass

MIN_ROUNDS = 3  # fewer interleaved rounds than this give no verdict but "inconclusive"
DRIFT_TOLERANCE = 0.10  # a round whose GEMM peak moved more than this from the first round's is flagged

OPS = {">=": lambda x, target: x >= target, "<=": lambda x, target: x <= target}


@dataclass(frozen=True)
class Quartiles:
    q1: float
    median: float
    q3: float

    @property
    def iqr(self) -> float:
        return self.q3 - self.q1


def quartiles(xs: Sequence[float]) -> Quartiles:
    """Lower quartile, median and upper quartile of `xs` (linear interpolation between the closest ranks, the
    'inclusive' method: for 1, 2, 3, 4, 5 they are 2, 3, 4). NaN for an empty sequence."""
    values = sorted(float(x) for x in xs)
    if not values:
        return Quartiles(math.nan, math.nan, math.nan)
    if len(values) == 1:
        return Quartiles(values[0], values[0], values[0])
    q1, median, q3 = statistics.quantiles(values, n=4, method="inclusive")
    return Quartiles(q1, median, q3)


@dataclass(frozen=True)
class Verdict:
    status: str  # "met", "missed", "inconclusive" or "not measured"
    detail: str  # the rounds behind it, for the report


def judge(ratios: Sequence[float], target: float, op: str, min_rounds: int = MIN_ROUNDS) -> Verdict:
    """The verdict on per-round ratios against `target` (`op` ">=": a ratio must reach it; "<=": stay at or below).

    met: at least `min_rounds` rounds and every one meets the target (the margin quoted is the worst round's);
    missed: no round meets it; inconclusive: the rounds disagree, or there are fewer than `min_rounds`.
    """
    if op not in OPS:
        raise ValueError(f"op must be one of {sorted(OPS)}, got {op!r}")
    values = [float(r) for r in ratios if r == r]  # NaN: a round without both variants
    if not values:
        return Verdict("not measured", "no round has both variants")
    meets = [OPS[op](r, target) for r in values]
    n = len(values)
    spread = f"{min(values):.2f}-{max(values):.2f}x" if n > 1 else f"{values[0]:.2f}x"
    if all(meets) and n >= min_rounds:
        worst = min(values) if op == ">=" else max(values)
        return Verdict("met", f"every one of {n} rounds ({spread}); the worst by {abs(worst / target - 1):.0%}")
    if not any(meets):
        best = max(values) if op == ">=" else min(values)
        return Verdict("missed", f"no round of {n} ({spread}); the best short by {abs(best / target - 1):.0%}")
    if all(meets):
        return Verdict("inconclusive", f"only {n} round(s) ({spread}), {min_rounds} needed")
    return Verdict("inconclusive", f"{sum(meets)} of {n} rounds meet it ({spread})")


@dataclass(frozen=True)
class Drift:
    peak: float  # GFLOP/s
    change: float  # relative to the first round's peak: +0.05 = 5% higher
    flagged: bool


def gemm_drift(peaks: Sequence[float], tolerance: float = DRIFT_TOLERANCE) -> list[Drift]:
    """Each round's GEMM peak against the first round's; flagged when it moved by more than `tolerance`."""
    if not peaks:
        return []
    first = float(peaks[0])
    out = []
    for p in peaks:
        change = float(p) / first - 1 if first > 0 else math.nan
        # compared in GFLOP/s, so that exactly `tolerance` (e.g. 200 -> 220) is not flagged by a rounding error
        out.append(Drift(float(p), change, not abs(float(p) - first) <= tolerance * first))
    return out
