"""Evaluation maths on arrays: numpy only, no model and no torch.

- `preference_metrics`: DPO reward accuracy with a bootstrap CI, margins, rewards, log-probs and the reference's own
  accuracy, from per-pair summed log-probs; `trl_metric_names` gives the record TRL's metric names.
- `unpaired_metrics`: the same implicit reward on unpaired labelled rows (KTO's data): its mean per label and how
  often its sign agrees with the label, with a bootstrap CI.
- `bootstrap_ci`: percentile bootstrap interval of a mean (seeded, reproducible); `bootstrap_ci_of` the same for any
  statistic of paired rows; `mean_with_ci`; `pairwise_accuracy` (how often a scorer ranks chosen above rejected: the
  reward accuracy and a judge's validity).
- Repetition statistics of a generated answer's token ids: `distinct_n`, `longest_repeated_ngram`.
- Policy-vs-reference comparison of generations: `win_rate` under a judge's scores, `length_ratio` of answer lengths,
  `preference_probability`, `length_controlled_win_rate`, and `generation_metrics` (all of them with bootstrap CIs).

Conventions (DPO, arXiv 2305.18290): the implicit reward of a response y to prompt x is
`beta * (log pi_policy(y|x) - log pi_ref(y|x))`, log-probs summed over the response tokens.
`dpo_core.evaluation` feeds these from models; they take plain arrays and can be used alone.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import numpy as np

__all__ = ["EvaluationError", "bootstrap_ci", "bootstrap_ci_of", "mean_with_ci", "pairwise_accuracy",
           "preference_metrics", "unpaired_metrics", "trl_metric_names", "distinct_n", "longest_repeated_ngram",
           "length_ratio", "win_rate", "preference_probability", "length_controlled_win_rate", "generation_metrics"]


class EvaluationError(ValueError):
    """Evaluation cannot run on what it was given; the message says which eval set and what is wrong."""


def _as_1d(name: str, values: Any) -> np.ndarray:
    arr = np.asarray(values, dtype=np.float64)
    if arr.ndim != 1:
        raise EvaluationError(f"{name} must be one-dimensional, got shape {arr.shape}")
    if not np.all(np.isfinite(arr)):
        raise EvaluationError(f"{name} holds {int((~np.isfinite(arr)).sum())} non-finite value(s)")
    return arr


def _aligned(what: str, arrays: dict[str, Any], unit: str | None = None) -> list[np.ndarray]:
    """Each of ``arrays`` (name -> values) as ``_as_1d``; EvaluationError unless they all hold as many values, and
    (``unit`` given) at least one ``unit`` each. ``what`` names the computation in the messages."""
    out = [_as_1d(name, values) for name, values in arrays.items()]
    sizes = [a.size for a in out]
    if len(set(sizes)) != 1:
        listed = ", ".join(f"{name}={size}" for name, size in zip(arrays, sizes))
        raise EvaluationError(f"{what}: the arrays differ in length: {listed}")
    if unit is not None and sizes[0] == 0:
        raise EvaluationError(f"{what} needs at least one {unit}")
    return out


def _check_bootstrap(n: int, n_samples: int, confidence: float) -> None:
    if n == 0:
        raise EvaluationError("a bootstrap needs at least one value")
    if n_samples < 1:
        raise EvaluationError(f"bootstrap n_samples must be >= 1, got {n_samples}")
    if not 0.0 < confidence < 1.0:
        raise EvaluationError(f"bootstrap confidence must be in (0, 1), got {confidence}")


def _resamples(n: int, n_samples: int, seed: int) -> Iterator[np.ndarray]:
    """`n_samples` bootstrap resamples of `range(n)` (with replacement), in index matrices of shape [rows, n].

    numpy PCG64 seeded with `seed`; every bootstrap in this module draws through here, so one seed resamples the same
    rows whatever statistic is computed on them."""
    rng = np.random.default_rng(seed)
    rows_per_chunk = max(1, 4_000_000 // n)  # bound the index matrix to ~32 MB
    for start in range(0, n_samples, rows_per_chunk):
        yield rng.integers(0, n, size=(min(n_samples, start + rows_per_chunk) - start, n))


def _percentiles(stats: np.ndarray, confidence: float) -> tuple[float, float]:
    alpha = 1.0 - confidence
    low, high = np.quantile(stats, [alpha / 2.0, 1.0 - alpha / 2.0])
    return float(low), float(high)


def bootstrap_ci(values: Sequence[float] | np.ndarray, n_samples: int, confidence: float, seed: int) -> tuple[float, float]:
    """Percentile bootstrap confidence interval of the mean of `values`.

    Draws `n_samples` resamples of len(values) with replacement (numpy PCG64 seeded with `seed`, so the interval is
    reproducible), takes each resample's mean, and returns the `(1-confidence)/2` and `(1+confidence)/2` quantiles.
    With 0/1 values (correct / not) this is the CI of an accuracy. A constant input gives a zero-width interval.
    """
    arr = _as_1d("bootstrap values", values)
    _check_bootstrap(arr.size, n_samples, confidence)
    means = np.concatenate([arr[idx].mean(axis=1) for idx in _resamples(arr.size, n_samples, seed)])
    return _percentiles(means, confidence)


def bootstrap_ci_of(statistic: Callable[[np.ndarray], float], n: int, n_samples: int, confidence: float,
                    seed: int) -> tuple[float, float]:
    """Percentile bootstrap CI of any statistic of n paired observations: `statistic(idx)` gets one resample's row
    indices (int array [n]) and returns a number; drawn like `bootstrap_ci` (same seed, same resamples). Resamples
    whose statistic is not finite (e.g. a ratio over an all-zero resample) are left out."""
    _check_bootstrap(n, n_samples, confidence)
    stats = np.array([statistic(row) for idx in _resamples(n, n_samples, seed) for row in idx], dtype=np.float64)
    stats = stats[np.isfinite(stats)]
    if stats.size == 0:
        return math.nan, math.nan
    return _percentiles(stats, confidence)


def _widened(value: float, low: float, high: float) -> tuple[float, float]:
    """A percentile interval widened to include its point estimate (small-sample resampling noise can put the point
    just outside), so `low <= value <= high` always holds; NaN ends are left as they are."""
    if math.isnan(value) or math.isnan(low):
        return low, high
    return min(low, value), max(high, value)


def mean_with_ci(values: Sequence[float] | np.ndarray, n_samples: int, confidence: float,
                 seed: int) -> tuple[float, float, float]:
    """(mean, ci_low, ci_high) of `values`: `bootstrap_ci`, widened to include the mean."""
    arr = _as_1d("values", values)
    mean = float(arr.mean()) if arr.size else math.nan
    low, high = bootstrap_ci(arr, n_samples, confidence, seed)
    return (mean, *_widened(mean, low, high))


def pairwise_accuracy(chosen_scores: Sequence[float] | np.ndarray, rejected_scores: Sequence[float] | np.ndarray,
                      *, n_samples: int = 1000, confidence: float = 0.95, seed: int = 0) -> dict[str, float | int]:
    """How often a scorer puts the chosen answer of a pair above the rejected one, with a bootstrap CI.

    A pair counts as correct only when `chosen > rejected` strictly (TRL's `rewards/accuracies`): a scorer that
    cannot tell the two apart scores 0, not 0.5, and `tie_rate` says how many pairs tied. Returns `accuracy`,
    `ci_low`, `ci_high` (`mean_with_ci` over the 0/1 correctness), `tie_rate` and `n_pairs`."""
    c, r = _aligned("pairwise accuracy", {"chosen scores": chosen_scores, "rejected scores": rejected_scores}, "pair")
    accuracy, low, high = mean_with_ci((c > r).astype(np.float64), n_samples, confidence, seed)
    return {"accuracy": accuracy, "ci_low": low, "ci_high": high, "tie_rate": float((c == r).mean()),
            "n_pairs": int(c.size)}


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

    The reward accuracy is `pairwise_accuracy` of the two rewards: a percentile bootstrap CI over the 0/1
    correctness, widened to include the point estimate, so `ci_low <= reward_accuracy <= ci_high` always holds.
    """
    if beta <= 0:
        raise EvaluationError(f"beta must be > 0, got {beta}")
    pc, pr, rc, rr = _aligned("preference metrics", {"policy_chosen": policy_chosen, "policy_rejected": policy_rejected,
                                                     "ref_chosen": ref_chosen, "ref_rejected": ref_rejected}, "pair")
    n = pc.size
    chosen_rewards = beta * (pc - rc)
    rejected_rewards = beta * (pr - rr)
    margins = chosen_rewards - rejected_rewards
    accuracy = pairwise_accuracy(chosen_rewards, rejected_rewards, n_samples=bootstrap_samples,
                                 confidence=confidence, seed=seed)
    return {
        "n_pairs": int(n),
        "beta": float(beta),
        "reward_accuracy": accuracy["accuracy"],
        "reward_accuracy_ci_low": accuracy["ci_low"],
        "reward_accuracy_ci_high": accuracy["ci_high"],
        "confidence": float(confidence),
        "reward_tie_rate": accuracy["tie_rate"],
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


def unpaired_metrics(
    policy_logps: Sequence[float] | np.ndarray,
    ref_logps: Sequence[float] | np.ndarray,
    labels: Sequence[bool] | np.ndarray,
    beta: float,
    *,
    bootstrap_samples: int = 1000,
    confidence: float = 0.95,
    seed: int = 0,
) -> dict[str, float | int]:
    """Metrics of unpaired labelled rows (thumbs up / down on one completion each; arrays shaped [N], same order).

    reward = `beta * (policy - ref)` of each row's completion. A pair's accuracy has no counterpart here, so the
    record says how well the reward's sign agrees with the label: `desirable_positive_rate` (desirable rows with
    reward > 0), `undesirable_negative_rate` (undesirable rows with reward < 0) and `sign_accuracy` over all rows
    (with a bootstrap CI, widened to include it; ties at 0 count as wrong, as in `preference_metrics`), beside the
    mean reward of each label and their gap. A rate or mean of a label with no rows is NaN.
    """
    if beta <= 0:
        raise EvaluationError(f"beta must be > 0, got {beta}")
    policy, ref, desirable = _aligned("unpaired metrics", {"policy_logps": policy_logps, "ref_logps": ref_logps,
                                                           "labels": np.asarray(labels, dtype=bool)}, unit="row")
    desirable = desirable.astype(bool)
    rewards = beta * (policy - ref)
    correct = np.where(desirable, rewards > 0, rewards < 0).astype(np.float64)
    accuracy, low, high = mean_with_ci(correct, bootstrap_samples, confidence, seed)

    def mean(values: np.ndarray) -> float:
        return float(values.mean()) if values.size else math.nan

    return {
        "n_rows": int(policy.size),
        "n_desirable": int(desirable.sum()),
        "beta": float(beta),
        "sign_accuracy": accuracy,
        "sign_accuracy_ci_low": low,
        "sign_accuracy_ci_high": high,
        "confidence": float(confidence),
        "desirable_positive_rate": mean(correct[desirable]),
        "undesirable_negative_rate": mean(correct[~desirable]),
        "desirable_reward_mean": mean(rewards[desirable]),
        "undesirable_reward_mean": mean(rewards[~desirable]),
        "reward_gap": mean(rewards[desirable]) - mean(rewards[~desirable]),
        "policy_logps_mean": float(policy.mean()),
        "reference_logps_mean": float(ref.mean()),
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
    p, r = _aligned("win_rate", {"policy judge scores": policy_scores, "reference judge scores": reference_scores},
                    "scored prompt")
    winners = ["tie" if abs(a - b) <= tie_tolerance else ("policy" if a > b else "reference") for a, b in zip(p, r)]
    points = sum(1.0 if w == "policy" else 0.5 if w == "tie" else 0.0 for w in winners)
    return points / len(winners), winners


def preference_probability(policy_scores: Sequence[float] | np.ndarray,
                           reference_scores: Sequence[float] | np.ndarray) -> np.ndarray:
    """`sigmoid(policy_score - reference_score)` per prompt: the judge's scores read as Bradley-Terry logits, i.e. the
    probability that the policy's answer is the better one (a tie is 0.5). Calibrated for judges trained with a
    Bradley-Terry loss (the trained judge, most reward models); for other scores it is only monotone in the gap."""
    p, r = _aligned("preference_probability",
                    {"policy judge scores": policy_scores, "reference judge scores": reference_scores})
    return 1.0 / (1.0 + np.exp(-(p - r)))


def length_controlled_win_rate(preferences: Sequence[float] | np.ndarray, length_diffs: Sequence[float] | np.ndarray,
                               *, l2: float = 1e-6, max_iter: int = 100) -> float:
    """The judge's preference for the policy at zero length difference (the length-controlled win rate of AlpacaEval
    2, Dubois et al. 2024, arXiv 2404.04475).

    A logistic regression `P(policy preferred) = sigmoid(b + w * d / sd(d))` of the per-prompt preferences (0..1:
    `preference_probability`, or hard wins 1 / ties 0.5 / losses 0) on the length differences `d` (policy minus
    reference answer tokens), fitted by Newton's method; the result is `sigmoid(b)`: what the judge would say if both
    answers had the same length. A judge that only rewards length gets 0.5 however much longer the policy answers. The
    tiny `l2` keeps the fit finite when the preferences are perfectly separated by length (the prompts nearest equal
    length then decide `b`; a bootstrap CI shows how loosely). With no spread in `d` it is the mean preference.
    """
    y, d = _aligned("the length-controlled win rate", {"preferences": preferences, "length differences": length_diffs},
                    "prompt")
    if np.any((y < 0) | (y > 1)):
        raise EvaluationError("preferences must lie in [0, 1]")
    spread = float(d.std())
    x = np.stack([np.ones_like(d), d / spread if spread > 0 else np.zeros_like(d)], axis=1)
    theta, n = np.zeros(2), y.size
    for _ in range(max_iter):
        p = 1.0 / (1.0 + np.exp(-np.clip(x @ theta, -50.0, 50.0)))
        grad = x.T @ (p - y) / n + l2 * theta
        hess = (x.T * (p * (1.0 - p))) @ x / n + l2 * np.eye(2)
        step = np.clip(np.linalg.solve(hess, grad), -10.0, 10.0)
        theta -= step
        if np.abs(step).max() < 1e-10:
            break
    return float(1.0 / (1.0 + np.exp(-theta[0])))


def generation_metrics(columns: Mapping[str, Any], *, n_samples: int = 1000, confidence: float = 0.95,
                       seed: int = 0) -> dict[str, float | int]:
    """The generation comparison's numbers, each with a percentile bootstrap CI over the prompts.

    `columns` holds one value per prompt under the side-by-side table's names (`data_contracts.evaluation
    .Generations`): `policy_judge_score`, `reference_judge_score`, `policy_tokens`, `reference_tokens`,
    `policy_stopped_at_eos`, `reference_stopped_at_eos`, `policy_distinct_2`, `reference_distinct_2`,
    `policy_longest_repeat`, `reference_longest_repeat`. Returns, each with `<name>_ci_low` / `<name>_ci_high`:

    - `win_rate`: wins count 1, ties 0.5 (`win_rate`); `policy_wins`, `reference_wins`, `ties` beside it;
    - `win_rate_soft`: the mean `preference_probability` (the judge's Bradley-Terry reading);
    - `lc_win_rate`: `length_controlled_win_rate` of those preferences on the answer length differences: compare it
      with `win_rate_soft` to see how much of the judge's preference is answer length;
    - `length_ratio` (policy / reference mean answer tokens, resampled in pairs), the end-of-turn rates
      `<side>_eot_rate`, `<side>_distinct_2_mean`, `<side>_longest_repeat_mean`, `<side>_tokens_mean`.
    """
    def col(name: str) -> np.ndarray:
        if name not in columns:
            raise EvaluationError(f"generation metrics need the column '{name}'")
        return _as_1d(name, np.asarray(columns[name], dtype=np.float64))

    boot = dict(n_samples=n_samples, confidence=confidence, seed=seed)
    rate, winners = win_rate(col("policy_judge_score"), col("reference_judge_score"))
    points = np.array([1.0 if w == "policy" else 0.5 if w == "tie" else 0.0 for w in winners])
    prefs = preference_probability(col("policy_judge_score"), col("reference_judge_score"))
    pol_len, ref_len = col("policy_tokens"), col("reference_tokens")
    diffs = pol_len - ref_len
    out: dict[str, float | int] = {"n_prompts": int(points.size), "policy_wins": winners.count("policy"),
                                   "reference_wins": winners.count("reference"), "ties": winners.count("tie")}

    def put(name: str, value: float, low: float, high: float) -> None:
        out[name] = value
        out[f"{name}_ci_low"], out[f"{name}_ci_high"] = _widened(value, low, high)

    put("win_rate", *mean_with_ci(points, **boot))
    put("win_rate_soft", *mean_with_ci(prefs, **boot))
    put("lc_win_rate", length_controlled_win_rate(prefs, diffs),
        *bootstrap_ci_of(lambda i: length_controlled_win_rate(prefs[i], diffs[i]), points.size, **boot))

    def ratio(i: np.ndarray) -> float:
        ref_total = ref_len[i].sum()
        return float(pol_len[i].sum() / ref_total) if ref_total > 0 else math.nan

    put("length_ratio", length_ratio(pol_len, ref_len), *bootstrap_ci_of(ratio, points.size, **boot))
    for side in ("policy", "reference"):
        put(f"{side}_tokens_mean", *mean_with_ci(col(f"{side}_tokens"), **boot))
        put(f"{side}_eot_rate", *mean_with_ci(col(f"{side}_stopped_at_eos"), **boot))
        put(f"{side}_distinct_2_mean", *mean_with_ci(col(f"{side}_distinct_2"), **boot))
        put(f"{side}_longest_repeat_mean", *mean_with_ci(col(f"{side}_longest_repeat"), **boot))
    return out
