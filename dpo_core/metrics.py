"""Evaluation maths on arrays: numpy only, no model and no torch.

- `preference_metrics`: DPO reward accuracy with a bootstrap CI, margins, rewards, log-probs and the reference's own
  accuracy, from per-pair summed log-probs; `trl_metric_names` gives the record TRL's metric names.
- `bootstrap_ci`: percentile bootstrap interval of a mean (seeded, reproducible).
- Repetition statistics of a generated answer's token ids: `distinct_n`, `longest_repeated_ngram`.
- Policy-vs-reference comparison of generations: `win_rate` under a judge's scores, `length_ratio` of answer lengths.

Conventions (DPO, arXiv 2305.18290): the implicit reward of a response y to prompt x is
`beta * (log pi_policy(y|x) - log pi_ref(y|x))`, log-probs summed over the response tokens.
`dpo_core.evaluation` feeds these from models; they take plain arrays and can be used alone.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

__all__ = ["EvaluationError", "bootstrap_ci", "preference_metrics", "trl_metric_names", "distinct_n",
           "longest_repeated_ngram", "length_ratio", "win_rate"]


class EvaluationError(ValueError):
    """Evaluation cannot run on what it was given; the message says which eval set and what is wrong."""


def _as_1d(name: str, values: Any) -> np.ndarray:
    arr = np.asarray(values, dtype=np.float64)
    if arr.ndim != 1:
        raise EvaluationError(f"{name} must be one-dimensional, got shape {arr.shape}")
    if not np.all(np.isfinite(arr)):
        raise EvaluationError(f"{name} holds {int((~np.isfinite(arr)).sum())} non-finite value(s)")
    return arr


def bootstrap_ci(values: Sequence[float] | np.ndarray, n_samples: int, confidence: float, seed: int) -> tuple[float, float]:
    """Percentile bootstrap confidence interval of the mean of `values`.

    Draws `n_samples` resamples of len(values) with replacement (numpy PCG64 seeded with `seed`, so the interval is
    reproducible), takes each resample's mean, and returns the `(1-confidence)/2` and `(1+confidence)/2` quantiles.
    With 0/1 values (correct / not) this is the CI of an accuracy. A constant input gives a zero-width interval.
    """
    arr = _as_1d("bootstrap values", values)
    if arr.size == 0:
        raise EvaluationError("bootstrap_ci needs at least one value")
    if n_samples < 1:
        raise EvaluationError(f"bootstrap n_samples must be >= 1, got {n_samples}")
    if not 0.0 < confidence < 1.0:
        raise EvaluationError(f"bootstrap confidence must be in (0, 1), got {confidence}")
    rng = np.random.default_rng(seed)
    n = arr.size
    means = np.empty(n_samples, dtype=np.float64)
    rows_per_chunk = max(1, 4_000_000 // n)  # bound the index matrix to ~32 MB
    for start in range(0, n_samples, rows_per_chunk):
        stop = min(n_samples, start + rows_per_chunk)
        idx = rng.integers(0, n, size=(stop - start, n))
        means[start:stop] = arr[idx].mean(axis=1)
    alpha = 1.0 - confidence
    low, high = np.quantile(means, [alpha / 2.0, 1.0 - alpha / 2.0])
    return float(low), float(high)


def preference_metrics(
    policy_chosen: Sequence[float] | np.ndarray,
    policy_rejected: Sequence[float] | np.ndarray,
    ref_chosen: Sequence[float] | np.ndarray,
    ref_rejected: Sequence[float] | np.ndarray,
    beta: float,
    *,
    bootstrap_samples: int = 1000,
    confidence: float = 0.95,
    seed: int = 0,
) -> dict[str, float | int]:
    """DPO preference metrics from per-pair summed log-probs (all four arrays shaped [N], same pair order).

    rewards: `chosen_reward = beta * (policy_chosen - ref_chosen)`, `rejected_reward = beta * (policy_rejected -
    ref_rejected)`, `margin = chosen_reward - rejected_reward`.

    Ties: a pair counts as correct only when `chosen_reward > rejected_reward` strictly (TRL's `rewards/accuracies`),
    so a policy identical to the reference scores accuracy 0, not 0.5; `reward_tie_rate` reports how many pairs tied
    so that case is visible. The same strict rule gives `reference_accuracy` (`ref_chosen > ref_rejected`: how often
    the reference model alone already prefers the chosen answer) and `policy_accuracy` (`policy_chosen >
    policy_rejected`, the policy's own log-prob preference).

    The reward accuracy comes with a percentile bootstrap CI (`bootstrap_ci` over the 0/1 correctness). Resampling
    noise can in rare small-sample cases put the percentile interval beside the point estimate; the interval is then
    widened to include it, so `ci_low <= reward_accuracy <= ci_high` always holds.
    """
    if beta <= 0:
        raise EvaluationError(f"beta must be > 0, got {beta}")
    pc = _as_1d("policy_chosen", policy_chosen)
    pr = _as_1d("policy_rejected", policy_rejected)
    rc = _as_1d("ref_chosen", ref_chosen)
    rr = _as_1d("ref_rejected", ref_rejected)
    sizes = {pc.size, pr.size, rc.size, rr.size}
    if len(sizes) != 1:
        raise EvaluationError(
            f"log-prob arrays differ in length: policy_chosen={pc.size}, policy_rejected={pr.size}, "
            f"ref_chosen={rc.size}, ref_rejected={rr.size}"
        )
    n = pc.size
    if n == 0:
        raise EvaluationError("preference metrics need at least one pair")
    chosen_rewards = beta * (pc - rc)
    rejected_rewards = beta * (pr - rr)
    margins = chosen_rewards - rejected_rewards
    correct = (chosen_rewards > rejected_rewards).astype(np.float64)
    accuracy = float(correct.mean())
    low, high = bootstrap_ci(correct, bootstrap_samples, confidence, seed)
    return {
        "n_pairs": int(n),
        "beta": float(beta),
        "reward_accuracy": accuracy,
        "reward_accuracy_ci_low": min(low, accuracy),
        "reward_accuracy_ci_high": max(high, accuracy),
        "confidence": float(confidence),
        "reward_tie_rate": float((chosen_rewards == rejected_rewards).mean()),
        "margin_mean": float(margins.mean()),
        "chosen_reward_mean": float(chosen_rewards.mean()),
        "rejected_reward_mean": float(rejected_rewards.mean()),
        "policy_chosen_logps_mean": float(pc.mean()),
        "policy_rejected_logps_mean": float(pr.mean()),
        "policy_accuracy": float((pc > pr).mean()),
        "reference_chosen_logps_mean": float(rc.mean()),
        "reference_rejected_logps_mean": float(rr.mean()),
        "reference_accuracy": float((rc > rr).mean()),
    }


def trl_metric_names(metrics: dict[str, Any], prefix: str = "eval_") -> dict[str, float]:
    """The metrics record under the names people know from TRL (`eval_rewards/accuracies`, ...), for MLflow."""
    mapping = {
        "reward_accuracy": "rewards/accuracies",
        "margin_mean": "rewards/margins",
        "chosen_reward_mean": "rewards/chosen",
        "rejected_reward_mean": "rewards/rejected",
        "policy_chosen_logps_mean": "logps/chosen",
        "policy_rejected_logps_mean": "logps/rejected",
    }
    return {f"{prefix}{trl}": float(metrics[ours]) for ours, trl in mapping.items() if ours in metrics}


def distinct_n(tokens: Sequence[int], n: int = 2) -> float:
    """Distinct-n (Li et al. 2016): unique n-grams / total n-grams of one sequence, in (0, 1]; 1 = no repetition.

    Computed on token ids (the generated answer's ids, end-of-turn excluded), so it is language- and
    whitespace-agnostic and consistent with the token lengths reported beside it. A sequence shorter than `n` has no
    n-gram and hence nothing repeated: it scores 1.0.
    """
    if n < 1:
        raise EvaluationError(f"distinct_n needs n >= 1, got {n}")
    seq = list(tokens)
    total = len(seq) - n + 1
    if total <= 0:
        return 1.0
    grams = {tuple(seq[i : i + n]) for i in range(total)}
    return len(grams) / total


def _has_repeat(seq: list[int], length: int) -> bool:
    seen: set[tuple[int, ...]] = set()
    for i in range(len(seq) - length + 1):
        gram = tuple(seq[i : i + length])
        if gram in seen:
            return True
        seen.add(gram)
    return False


def longest_repeated_ngram(tokens: Sequence[int]) -> int:
    """Length of the longest n-gram (contiguous token-id run) occurring at least twice in `tokens`; 0 if none.

    Occurrences may overlap (`a a a` has the 2-gram `a a` twice, so it scores 2). A degenerate loop that repeats a
    sentence shows up as a long repeated n-gram. Binary search on the length: a repeated n-gram implies a repeated
    (n-1)-gram, so the property is monotone. O(L log L) set look-ups of tuples for L tokens.
    """
    seq = list(tokens)
    lo, hi = 0, max(0, len(seq) - 1)  # the longest possible repeat is L-1 (two overlapping occurrences)
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if _has_repeat(seq, mid):
            lo = mid
        else:
            hi = mid - 1
    return lo


def length_ratio(policy_lengths: Sequence[float], reference_lengths: Sequence[float]) -> float:
    """mean(policy lengths) / mean(reference lengths): > 1 means the policy answers longer (DPO often does).

    NaN when every reference answer is empty (mean length 0): there is no length to compare with.
    """
    p = _as_1d("policy lengths", policy_lengths)
    r = _as_1d("reference lengths", reference_lengths)
    if p.size == 0 or r.size == 0:
        raise EvaluationError("length_ratio needs at least one length on each side")
    ref_mean = float(r.mean())
    if ref_mean <= 0:
        return math.nan
    return float(p.mean()) / ref_mean


def win_rate(policy_scores: Sequence[float], reference_scores: Sequence[float], tie_tolerance: float = 1e-6) -> tuple[float, list[str]]:
    """Policy-vs-reference win rate under a judge: a win counts 1, a tie (|difference| <= tie_tolerance) 0.5.

    Returns the rate and the per-prompt winners ("policy", "reference" or "tie"). The tolerance absorbs float noise
    between two identical answers scored in different batches.
    """
    p = _as_1d("policy judge scores", policy_scores)
    r = _as_1d("reference judge scores", reference_scores)
    if p.size != r.size:
        raise EvaluationError(f"judge scores differ in length: policy={p.size}, reference={r.size}")
    if p.size == 0:
        raise EvaluationError("win_rate needs at least one scored prompt")
    winners = ["tie" if abs(a - b) <= tie_tolerance else ("policy" if a > b else "reference") for a, b in zip(p, r)]
    points = sum(1.0 if w == "policy" else 0.5 if w == "tie" else 0.0 for w in winners)
    return points / len(winners), winners
