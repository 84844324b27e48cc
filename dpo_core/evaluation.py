"""Evaluation: did the policy get better than the reference, and how?

Three layers, each usable alone:

1. Pure maths on arrays (no model): `preference_metrics` (reward accuracy with a bootstrap CI, margins, rewards,
   log-probs, the reference's own accuracy), `bootstrap_ci`, and the repetition statistics `distinct_n` /
   `longest_repeated_ngram`, plus `length_ratio`.
2. `evaluate_preferences`: held-out pairs -> the policy's log-probs (batched, no grad) joined with the precomputed
   reference table -> one metrics record per eval set (`data_contracts.evaluation.EvalMetrics`).
3. `compare_generations`: generate with the reference and the policy on the first N held-out prompts, score each
   answer (implicit reward, repetition, length, end-of-turn, a judge) -> a side-by-side table
   (`data_contracts.evaluation.Generations`) and a summary with the judge's win rate and the length ratio.

Conventions (DPO, arXiv 2305.18290): the implicit reward of a response y to prompt x is
`beta * (log pi_policy(y|x) - log pi_ref(y|x))`, log-probs summed over the response tokens.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np


class EvaluationError(ValueError):
    """Evaluation cannot run on what it was given; the message says which eval set and what is wrong."""


# ----------------------------------------------------------------------------------------------------------------------
# 1. Pure maths
# ----------------------------------------------------------------------------------------------------------------------


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
    """mean(policy lengths) / mean(reference lengths): > 1 means the policy answers longer (DPO often does)."""
    p = _as_1d("policy lengths", policy_lengths)
    r = _as_1d("reference lengths", reference_lengths)
    if p.size == 0 or r.size == 0:
        raise EvaluationError("length_ratio needs at least one length on each side")
    ref_mean = float(r.mean())
    if ref_mean <= 0:
        raise EvaluationError("length_ratio: the reference answers have mean length 0")
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


# ----------------------------------------------------------------------------------------------------------------------
# 2. Preference evaluation on held-out tokenized pairs
# ----------------------------------------------------------------------------------------------------------------------

_TOKENIZED_NEEDED = ("pair_id", "prompt_ids", "chosen_ids", "rejected_ids")
_REFERENCE_NEEDED = ("pair_id", "chosen_logps", "rejected_logps", "chosen_tokens", "rejected_tokens")


def _model_device(model: Any) -> Any:
    import torch

    try:
        return next(model.parameters()).device
    except StopIteration:
        return torch.device("cpu")


def pair_logps(
    model: Any,
    rows: Sequence[dict],
    *,
    batch_size: int,
    spec: Any = None,
    chunk_size: int = 1024,
    pad_id: int = 0,
    layout: str = "auto",
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Summed response log-probs of `rows` (tokenized pairs) under `model`, batched, no grad, in the rows' order.

    Rows are grouped by length (longest first) so batches carry little padding; results are put back in input order.
    Returns float64 `chosen_logps[N]`, `rejected_logps[N]` and int64 `chosen_tokens[N]`, `rejected_tokens[N]`.
    """
    import torch

    from dpo_core.batching import make_batch, pair_length
    from dpo_core.logprobs import layout_for, sequence_logps, split_pair_logps

    if batch_size < 1:
        raise EvaluationError(f"batch_size must be >= 1, got {batch_size}")
    n = len(rows)
    chosen, rejected = np.zeros(n, dtype=np.float64), np.zeros(n, dtype=np.float64)
    chosen_n, rejected_n = np.zeros(n, dtype=np.int64), np.zeros(n, dtype=np.int64)
    order = np.argsort([-pair_length(r) for r in rows], kind="stable")
    layout = layout_for(model, layout)
    device = spec.device if spec is not None else _model_device(model)
    autocast = spec.autocast() if spec is not None else torch.autocast(device_type=device.type, enabled=False)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), autocast:
            for start in range(0, n, batch_size):
                idx = order[start : start + batch_size]
                batch = make_batch([rows[i] for i in idx], pad_id, layout).to(device)
                logps, counts = sequence_logps(model, batch, chunk_size=chunk_size)
                (c, r), (cn, rn) = split_pair_logps(logps.double().cpu()), split_pair_logps(counts.cpu())
                chosen[idx], rejected[idx] = c.numpy(), r.numpy()
                chosen_n[idx], rejected_n[idx] = cn.numpy(), rn.numpy()
    finally:
        model.train(was_training)
    return chosen, rejected, chosen_n, rejected_n


def _check_columns(df: Any, needed: Sequence[str], what: str, eval_set: str) -> None:
    missing = [c for c in needed if c not in getattr(df, "columns", [])]
    if missing:
        raise EvaluationError(f"eval set '{eval_set}': the {what} table is missing column(s) {missing}")


def _join_reference(tokenized_df: Any, reference_df: Any, eval_set: str) -> Any:
    """The reference rows of the tokenized pairs, in the tokenized pairs' order; every pair must be in the table."""
    for name, df in (("tokenized", tokenized_df), ("reference", reference_df)):
        dup = df["pair_id"].duplicated()
        if dup.any():
            raise EvaluationError(
                f"eval set '{eval_set}': the {name} table repeats pair_id(s) {df['pair_id'][dup].head(3).tolist()}"
            )
    ref = reference_df.set_index("pair_id")
    missing = ~tokenized_df["pair_id"].isin(ref.index)
    if missing.any():
        raise EvaluationError(
            f"eval set '{eval_set}': {int(missing.sum())} of {len(tokenized_df)} pairs have no reference log-probs "
            f"(e.g. {tokenized_df['pair_id'][missing].head(3).tolist()}); compute the reference table for these pairs"
        )
    return ref.loc[tokenized_df["pair_id"].tolist()]


def evaluate_preferences(
    policy: Any,
    tokenized_df: Any,
    *,
    reference_df: Any,
    beta: float,
    batch_size: int,
    spec: Any = None,
    chunk_size: int = 1024,
    layout: str = "auto",
    bootstrap_samples: int = 1000,
    confidence: float = 0.95,
    seed: int = 0,
    eval_set: str = "eval",
) -> dict[str, Any]:
    """One metrics record (`data_contracts.evaluation.EvalMetrics` row) for one eval set.

    The policy's summed response log-probs on the held-out `tokenized_df` (columns of
    `dpo_core.templating.tokenize_pairs`) are computed batched with no grad and joined by `pair_id` with the
    precomputed `reference_df` (`dpo_core.reference.compute_reference_logps`), then turned into `preference_metrics`.

    Raises `EvaluationError` when the set has zero pairs, when a pair has no reference row, or when the policy and
    the reference table disagree on a pair's response token counts (the two were tokenized differently).
    """
    _check_columns(tokenized_df, _TOKENIZED_NEEDED, "tokenized pairs", eval_set)
    _check_columns(reference_df, _REFERENCE_NEEDED, "reference log-prob", eval_set)
    if len(tokenized_df) == 0:
        raise EvaluationError(
            f"eval set '{eval_set}' has zero valid pairs (all were quarantined, rejected by the template, or the set "
            "is empty); nothing to evaluate"
        )
    ref = _join_reference(tokenized_df, reference_df, eval_set)
    rows = tokenized_df[list(_TOKENIZED_NEEDED)].to_dict("records")
    pc, pr, pcn, prn = pair_logps(policy, rows, batch_size=batch_size, spec=spec, chunk_size=chunk_size,
                                  layout=layout)
    bad = (pcn != ref["chosen_tokens"].to_numpy()) | (prn != ref["rejected_tokens"].to_numpy())
    if bad.any():
        raise EvaluationError(
            f"eval set '{eval_set}': {int(bad.sum())} pairs have response token counts that differ from the reference "
            f"table (e.g. {np.asarray(ref.index)[bad][:3].tolist()}); the reference was computed on a different "
            "tokenization"
        )
    metrics = preference_metrics(
        pc,
        pr,
        ref["chosen_logps"].to_numpy(),
        ref["rejected_logps"].to_numpy(),
        beta,
        bootstrap_samples=bootstrap_samples,
        confidence=confidence,
        seed=seed,
    )
    return {
        "eval_set": eval_set,
        **metrics,
        "chosen_tokens_mean": float(pcn.mean()),
        "rejected_tokens_mean": float(prn.mean()),
    }


# ----------------------------------------------------------------------------------------------------------------------
# 3. Generation comparison
# ----------------------------------------------------------------------------------------------------------------------

_PAIRS_NEEDED = ("pair_id", "prompt", "chosen", "rejected")


def _messages(prompt: Any) -> list[dict[str, str]]:
    items = prompt.tolist() if hasattr(prompt, "tolist") else list(prompt)
    return [{"role": str(m["role"]), "content": str(m["content"])} for m in items]


def _last_user_text(messages: list[dict[str, str]]) -> str:
    users = [m["content"] for m in messages if m["role"] == "user"]
    return users[-1] if users else ""


def _answer_stats(prefix: str, gens: Sequence[Any]) -> dict[str, list]:
    return {
        f"{prefix}_answer": [g.text for g in gens],
        f"{prefix}_tokens": [len(g.content_ids) for g in gens],
        f"{prefix}_stopped_at_eos": [bool(g.stopped_at_eos) for g in gens],
        f"{prefix}_distinct_2": [distinct_n(g.content_ids, 2) for g in gens],
        f"{prefix}_longest_repeat": [longest_repeated_ngram(g.content_ids) for g in gens],
    }


def compare_generations(
    policy: Any,
    reference_model: Any,
    tokenizer: Any,
    pairs_df: Any,
    *,
    eval_cfg: Any,
    beta: float,
    judge: Any = None,
    spec: Any = None,
    system_prompt: str | None = None,
    max_prompt_length: int | None = None,
) -> tuple[Any, dict[str, Any]]:
    """Reference vs policy answers on the first `eval_cfg.n_generations` held-out prompts, scored side by side.

    Both models decode the same rendered prompts with the same settings and seed (`dpo_core.generation.generate`).
    Per answer: length in tokens (end-of-turn excluded), whether it stopped at end-of-turn, distinct-2, longest
    repeated n-gram, the judge's score, and the DPO implicit reward `beta * (log pi_policy(y|x) - log pi_ref(y|x))`
    of exactly the generated tokens (end-of-turn included when emitted), each answer scored under both models.

    Args:
        pairs_df: canonical held-out pairs (`pair_id`, `prompt`, `chosen`, `rejected`); the first N rows are used.
        eval_cfg: `dpo_core.config.EvalConfig` (n_generations, max_new_tokens, sampling, seed, batch sizes, judge).
        judge: a `dpo_core.judges.Judge`; None builds `eval_cfg.judge` with `make_judge`.
        max_prompt_length: cut longer rendered prompts from the left (as the training data was); None keeps all.

    Returns:
        (generations table, one row per prompt, `data_contracts.evaluation.Generations`; summary dict with the judge
        name, `win_rate` of the policy over the reference (tie = 1/2), `length_ratio` policy/reference mean answer
        tokens (NaN when every reference answer is empty), end-of-turn rates and mean implicit rewards).
    """
    import json

    import pandas as pd

    from dpo_core.generation import generate
    from dpo_core.judges import make_judge
    from dpo_core.templating import ChatRenderer, PairRenderError

    if beta <= 0:
        raise EvaluationError(f"beta must be > 0, got {beta}")
    _check_columns(pairs_df, _PAIRS_NEEDED, "held-out pairs", "generation comparison")
    n = int(eval_cfg.n_generations)
    if n == 0:
        raise EvaluationError("eval.n_generations is 0: the generation comparison has nothing to do; skip the stage")
    if len(pairs_df) == 0:
        raise EvaluationError("the generation comparison got zero held-out pairs; nothing to generate from")
    rows = pairs_df.head(n).to_dict("records")
    prompts = [_messages(r["prompt"]) for r in rows]
    renderer = ChatRenderer(tokenizer, system_prompt)
    prompt_ids = []
    for row, messages in zip(rows, prompts):
        try:
            ids = renderer.encode([renderer.prompt_text(messages)])[0]
        except PairRenderError as exc:
            raise EvaluationError(f"pair {row['pair_id']}: its prompt cannot be rendered: {exc}") from exc
        prompt_ids.append(ids[-max_prompt_length:] if max_prompt_length else ids)

    settings = dict(
        max_new_tokens=eval_cfg.max_new_tokens,
        do_sample=eval_cfg.do_sample,
        temperature=eval_cfg.temperature,
        top_p=eval_cfg.top_p,
        seed=eval_cfg.seed,
        batch_size=eval_cfg.generation_batch_size,
        system_prompt=system_prompt,
        spec=spec,
        max_prompt_length=max_prompt_length,
    )
    ref_gens = generate(reference_model, tokenizer, prompts, **settings)
    pol_gens = generate(policy, tokenizer, prompts, **settings)

    # one "pair" per prompt: chosen = the policy's answer, rejected = the reference's answer
    scored = [
        {"pair_id": r["pair_id"], "prompt_ids": p, "chosen_ids": pg.token_ids, "rejected_ids": rg.token_ids}
        for r, p, pg, rg in zip(rows, prompt_ids, pol_gens, ref_gens)
    ]
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    lp_kwargs = dict(batch_size=eval_cfg.batch_size, spec=spec, pad_id=pad_id)
    pol_on_pol, pol_on_ref, _, _ = pair_logps(policy, scored, **lp_kwargs)
    ref_on_pol, ref_on_ref, _, _ = pair_logps(reference_model, scored, **lp_kwargs)
    policy_rewards = beta * (pol_on_pol - ref_on_pol)
    reference_rewards = beta * (pol_on_ref - ref_on_ref)

    judge = judge if judge is not None else make_judge(eval_cfg.judge)
    chosen = [str(r["chosen"]) for r in rows]
    rejected = [str(r["rejected"]) for r in rows]
    policy_scores = judge.score(prompts, [g.text for g in pol_gens], chosen, rejected)
    reference_scores = judge.score(prompts, [g.text for g in ref_gens], chosen, rejected)
    rate, winners = win_rate(policy_scores, reference_scores)

    def n_tokens(texts: list[str]) -> list[int]:
        return [len(ids) for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]]

    table = pd.DataFrame(
        {
            "pair_id": [str(r["pair_id"]) for r in rows],
            "prompt": [_last_user_text(m) for m in prompts],
            "prompt_messages": [json.dumps(m, ensure_ascii=False) for m in prompts],
            "prompt_tokens": [len(p) for p in prompt_ids],
            **_answer_stats("reference", ref_gens),
            **_answer_stats("policy", pol_gens),
            "chosen": chosen,
            "rejected": rejected,
            "chosen_tokens": n_tokens(chosen),
            "rejected_tokens": n_tokens(rejected),
            "reference_implicit_reward": reference_rewards,
            "policy_implicit_reward": policy_rewards,
            "reference_judge_score": reference_scores,
            "policy_judge_score": policy_scores,
            "winner": winners,
            "judge": judge.name,
        }
    )
    ref_len, pol_len = table["reference_tokens"].mean(), table["policy_tokens"].mean()
    summary = {
        "judge": judge.name,
        "n_prompts": len(table),
        "win_rate": rate,
        "policy_wins": winners.count("policy"),
        "reference_wins": winners.count("reference"),
        "ties": winners.count("tie"),
        "length_ratio": float(pol_len / ref_len) if ref_len > 0 else math.nan,
        "policy_tokens_mean": float(pol_len),
        "reference_tokens_mean": float(ref_len),
        "policy_eot_rate": float(table["policy_stopped_at_eos"].mean()),
        "reference_eot_rate": float(table["reference_stopped_at_eos"].mean()),
        "policy_implicit_reward_mean": float(policy_rewards.mean()),
        "reference_implicit_reward_mean": float(reference_rewards.mean()),
        "policy_distinct_2_mean": float(table["policy_distinct_2"].mean()),
        "reference_distinct_2_mean": float(table["reference_distinct_2"].mean()),
        "policy_longest_repeat_mean": float(table["policy_longest_repeat"].mean()),
        "reference_longest_repeat_mean": float(table["reference_longest_repeat"].mean()),
        "policy_judge_score_mean": float(np.mean(policy_scores)),
        "reference_judge_score_mean": float(np.mean(reference_scores)),
        "do_sample": bool(eval_cfg.do_sample),
        "seed": int(eval_cfg.seed),
        "max_new_tokens": int(eval_cfg.max_new_tokens),
    }
    return table, summary
