"""The benchmark's statistics and verdicts (bench/stats.py) and how bench.run turns per-round results into them."""

from __future__ import annotations

import math

import pytest

from bench import run as bench_run
from bench.common import BenchSettings
from bench.stats import gemm_drift, judge, quartiles


def test_quartiles_inclusive_method():
    q = quartiles([5.0, 1.0, 4.0, 2.0, 3.0])
    assert (q.q1, q.median, q.q3) == (2.0, 3.0, 4.0)
    assert q.iqr == 2.0
    # even count: linear interpolation between the closest ranks
    q = quartiles([1.0, 2.0, 3.0, 4.0])
    assert (q.q1, q.median, q.q3) == (1.75, 2.5, 3.25)
    # one outlier step moves the median and the quartiles little
    q = quartiles([6.0, 6.1, 5.9, 6.2, 6.0, 5.8, 6.1, 18.0])
    assert q.median == pytest.approx(6.05) and q.q3 == pytest.approx(6.125)


def test_quartiles_of_one_and_of_none():
    q = quartiles([7.5])
    assert (q.q1, q.median, q.q3, q.iqr) == (7.5, 7.5, 7.5, 0.0)
    assert all(math.isnan(x) for x in (quartiles([]).q1, quartiles([]).median, quartiles([]).q3))


def test_met_only_when_every_round_meets_it():
    v = judge([1.60, 1.55, 1.52], 1.5, ">=")
    assert v.status == "met"
    assert "1.52-1.60x" in v.detail and "worst by 1%" in v.detail
    mixed = judge([1.75, 1.64, 1.49], 1.5, ">=")  # the median meets it, one round does not
    assert mixed.status == "inconclusive" and "2 of 3 rounds" in mixed.detail and "1.49-1.75x" in mixed.detail
    missed = judge([1.4, 1.45, 1.3], 1.5, ">=")
    assert missed.status == "missed" and "short by 3%" in missed.detail


def test_lower_is_better_targets():
    assert judge([0.76, 0.77, 0.78], 0.8, "<=").status == "met"
    assert judge([0.76, 0.81, 0.78], 0.8, "<=").status == "inconclusive"
    v = judge([0.77, 0.77, 0.78], 0.6, "<=")
    assert v.status == "missed" and "short by 28%" in v.detail  # 0.77 is 28% above 0.6


def test_too_few_rounds_are_inconclusive_and_nan_rounds_are_ignored():
    two = judge([2.2, 2.3], 2.0, ">=")
    assert two.status == "inconclusive" and "only 2 round(s)" in two.detail
    assert judge([2.2, float("nan"), 2.3, 2.1], 2.0, ">=").status == "met"
    assert judge([], 2.0, ">=").status == "not measured"
    with pytest.raises(ValueError, match="op must be"):
        judge([1.0], 1.0, ">")


def test_gemm_drift_flags_rounds_beyond_ten_percent_of_the_first():
    drift = gemm_drift([220.0, 230.0, 152.0, 243.0])
    assert [d.flagged for d in drift] == [False, False, True, True]
    assert drift[1].change == pytest.approx(10 / 220)
    assert drift[2].change == pytest.approx(152 / 220 - 1)
    assert not gemm_drift([200.0, 220.0])[1].flagged  # exactly 10%: not beyond it
    assert gemm_drift([]) == []


def _result(tokens_per_second: float, rss: float, steps: list[float], *, precompute: float | None = None,
            evaluation: float | None = None) -> dict:
    tokens = [int(tokens_per_second * s) for s in steps]
    return {
        "step_seconds": steps, "step_tokens": tokens, "padded_tokens": tokens, "step_pairs": [4] * len(steps),
        "tokens_per_second": tokens_per_second, "pairs_per_second": 4 * len(steps) / sum(steps),
        "tokens_per_cpu_second": tokens_per_second / 2, "train_peak_rss_mb": rss, "peak_rss_mb": rss,
        "flops_per_second": 1e11, "computed_flops_per_second": 1e11, "warmup_seconds": steps[0] * 1.1,
        "precompute_seconds": precompute, "precompute_pairs": 32 if precompute else None,
        "eval_seconds": evaluation, "eval_pairs": 32 if evaluation else None,
    }


def test_report_gives_per_round_verdicts_and_flags_gemm_drift():
    run = bench_run.Run(settings=BenchSettings(threads=2), rounds=3)
    ours_tps, trl_tps = (300.0, 290.0, 280.0), (140.0, 150.0, 145.0)  # ratios 2.14, 1.93, 1.93
    for r in (1, 2, 3):
        run.peaks[r] = {"peak_gflops": (220.0, 215.0, 180.0)[r - 1]}
        run.outcomes += [
            bench_run.Outcome("ours_precompute", r, _result(ours_tps[r - 1], 4800, [6.0, 5.0, 4.0, 5.0],
                                                            precompute=10.0, evaluation=9.5), 90.0, load=2.1),
            bench_run.Outcome("trl_precompute", r, _result(trl_tps[r - 1], 6400, [9.0, 9.1, 8.9, 9.0],
                                                           precompute=25.0), 120.0, load=2.3),
        ]
    ratios = bench_run.per_round_ratios(run, bench_run.TARGETS[0])
    assert [(r, round(x, 2)) for r, x in ratios] == [(1, 2.14), (2, 1.93), (3, 1.93)]
    text = bench_run.render(run, "python -m bench.run", None)
    lines = text.splitlines()

    def row(start: str) -> str:
        found = [line for line in lines if line.startswith(start)]
        assert len(found) == 1, (start, found)
        return found[0]

    tokens = row("| trained tokens/s vs TRL (both precompute the reference) |")
    assert ">= 1.5x: **met**" in tokens and ">= 2.0x: **inconclusive**, 1 of 3 rounds" in tokens
    memory = row("| peak training RSS vs TRL (both precompute the reference) |")
    assert "<= 0.8x: **met**" in memory and "<= 0.6x: **missed**" in memory
    assert "not measured (ours_precompute or seed_loop missing)" in row("| pairs/s vs the seed loop on equal pairs")
    precompute = row("| reference precompute pairs/s vs TRL's, same pairs |")  # 3.2 vs 1.28 pairs/s
    assert "2.50x" in precompute and ">= 2.0x: **met**" in precompute
    assert "1.05x" in row("| evaluation pairs/s vs our reference precompute")  # 32 / 9.5 vs 32 / 10
    # the rounds table: round 3's GEMM peak is 18% below round 1's, round 2's within 10%
    assert row("| 3 | 180 | -18% |").endswith("**GEMM peak moved > 10%** |")
    assert "moved" not in row("| 2 | 215 | -2% |")
    assert row("| ours: evaluation of the trained policy |") == (
        "| ours: evaluation of the trained policy | 32 | 9.5 | 3.37 (3.37-3.37) |")
    # each run's step column: the median and the inter-quartile range of its timed steps
    assert "| 5.00 (4.75-5.25) |" in row("| 1 | ours_precompute |")
