"""Evaluation of a trained policy against its reference: the model side (scoring, generating, judging).

- `preference_scores`: held-out pairs -> the policy's log-probs (`dpo_core.scoring.score_pairs`) joined with the
  precomputed reference table, one row per pair; `preference_record` -> one metrics record per eval set
  (`data_contracts.evaluation.EvalMetrics`); `evaluate_preferences` does both. Unpaired held-out rows (KTO rows,
  laid out as pairs with the completion in the chosen slot) are scored the same way; `unpaired_record` -> one
  `data_contracts.evaluation.UnpairedEvalMetrics` record (`dpo_core.metrics.unpaired_metrics`).
- `compare_generations`: generate with the reference and the policy on the first N held-out prompts, score each
  answer (implicit reward, repetition, length, end-of-turn, a judge) -> a side-by-side table
  (`data_contracts.evaluation.Generations`) and a summary: the judge's validity beside its win rates (raw and
  length-controlled), the length ratio, end-of-turn and repetition rates, each with a bootstrap CI;
  `judged_answers` decodes and judges one more model the same way (the champion, for the promotion gate).

The maths on the resulting arrays (accuracy, bootstrap CI, repetition statistics, win rate) is `dpo_core.metrics`.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd

from dpo_core.generation import PromptRenderError, encode_prompts, generate_from_ids
from dpo_core.judges import make_judge
from dpo_core.metrics import (
    EvaluationError,
    distinct_n,
    generation_metrics,
    longest_repeated_ngram,
    preference_metrics,
    unpaired_metrics,
    win_rate,
)
from dpo_core.scoring import score_pairs

__all__ = ["EvaluationError", "preference_scores", "preference_record", "unpaired_record", "evaluate_preferences", "compare_generations",
           "judged_answers"]

_TOKENIZED_NEEDED = ("pair_id", "prompt_ids", "chosen_ids", "rejected_ids")
_REFERENCE_NEEDED = ("pair_id", "chosen_logps", "rejected_logps", "chosen_tokens", "rejected_tokens")


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


def preference_scores(
    policy: Any,
    tokenized_df: Any,
    *,
    reference_df: Any,
    batch_size: int,
    spec: Any = None,
    chunk_size: int = 1024,
    layout: str = "auto",
    eval_set: str = "eval",
) -> pd.DataFrame:
    """Per pair of `tokenized_df`, in its order: `pair_id`, the policy's summed response log-probs of chosen and
    rejected (`policy_chosen_logps`, `policy_rejected_logps`), the reference table's (`reference_chosen_logps`,
    `reference_rejected_logps`) and the response token counts (`chosen_tokens`, `rejected_tokens`).

    The policy's log-probs on the held-out `tokenized_df` (columns of `dpo_core.templating.tokenize_pairs`) come from
    `dpo_core.scoring.score_pairs` and are joined by `pair_id` with the precomputed `reference_df`
    (`dpo_core.reference.compute_reference_logps`). Raises `EvaluationError` when the set has zero pairs, when a pair
    has no reference row, or when the policy and the reference table disagree on a pair's response token counts (the
    two were tokenized differently).
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
    scores = score_pairs(policy, rows, batch_size=batch_size, spec=spec, chunk_size=chunk_size, layout=layout)
    bad = ((scores.chosen_tokens != ref["chosen_tokens"].to_numpy())
           | (scores.rejected_tokens != ref["rejected_tokens"].to_numpy()))
    if bad.any():
        raise EvaluationError(
            f"eval set '{eval_set}': {int(bad.sum())} pairs have response token counts that differ from the reference "
            f"table (e.g. {np.asarray(ref.index)[bad][:3].tolist()}); the reference was computed on a different "
            "tokenization"
        )
    return pd.DataFrame({
        "pair_id": tokenized_df["pair_id"].astype(str).tolist(),
        "policy_chosen_logps": scores.chosen_logps,
        "policy_rejected_logps": scores.rejected_logps,
        "reference_chosen_logps": ref["chosen_logps"].to_numpy(dtype=np.float64),
        "reference_rejected_logps": ref["rejected_logps"].to_numpy(dtype=np.float64),
        "chosen_tokens": scores.chosen_tokens,
        "rejected_tokens": scores.rejected_tokens,
    })


def preference_record(
    scores: pd.DataFrame,
    beta: float,
    *,
    bootstrap_samples: int = 1000,
    confidence: float = 0.95,
    seed: int = 0,
    eval_set: str = "eval",
) -> dict[str, Any]:
    """One metrics record (`data_contracts.evaluation.EvalMetrics` row) from a `preference_scores` table."""
    metrics = preference_metrics(
        scores["policy_chosen_logps"].to_numpy(),
        scores["policy_rejected_logps"].to_numpy(),
        scores["reference_chosen_logps"].to_numpy(),
        scores["reference_rejected_logps"].to_numpy(),
        beta,
        bootstrap_samples=bootstrap_samples,
        confidence=confidence,
        seed=seed,
    )
    return {
        "eval_set": eval_set,
        **metrics,
        "chosen_tokens_mean": float(scores["chosen_tokens"].mean()),
        "rejected_tokens_mean": float(scores["rejected_tokens"].mean()),
    }


def unpaired_record(
    scores: pd.DataFrame,
    labels: Sequence[bool],
    beta: float,
    *,
    bootstrap_samples: int = 1000,
    confidence: float = 0.95,
    seed: int = 0,
    eval_set: str = "eval",
) -> dict[str, Any]:
    """One unpaired metrics record (`data_contracts.evaluation.UnpairedEvalMetrics` row) from a `preference_scores`
    table of KTO rows (the completion in the chosen columns; the mismatched KL completion is not read) and their
    `labels`, in the same order."""
    metrics = unpaired_metrics(scores["policy_chosen_logps"].to_numpy(), scores["reference_chosen_logps"].to_numpy(),
                               np.asarray(labels, dtype=bool), beta, bootstrap_samples=bootstrap_samples,
                               confidence=confidence, seed=seed)
    return {"eval_set": eval_set, **metrics, "completion_tokens_mean": float(scores["chosen_tokens"].mean())}


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
    """One metrics record (`data_contracts.evaluation.EvalMetrics` row) for one eval set: `preference_scores`, then
    `preference_record` (the errors are those of `preference_scores`)."""
    scores = preference_scores(policy, tokenized_df, reference_df=reference_df, batch_size=batch_size, spec=spec,
                               chunk_size=chunk_size, layout=layout, eval_set=eval_set)
    return preference_record(scores, beta, bootstrap_samples=bootstrap_samples, confidence=confidence, seed=seed,
                             eval_set=eval_set)


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


def _generation_setup(
    pairs_df: Any, tokenizer: Any, eval_cfg: Any, system_prompt: str | None, spec: Any, max_prompt_length: int | None,
) -> tuple[list[dict], list[list[dict[str, str]]], list[list[int]], dict[str, Any]]:
    """The first `eval_cfg.n_generations` held-out rows, their chat messages, the prompt ids every model decodes from
    (rendered once; a prompt that cannot be rendered is an EvaluationError naming its pair) and the decoding
    settings."""
    _check_columns(pairs_df, _PAIRS_NEEDED, "held-out pairs", "generation comparison")
    n = int(eval_cfg.n_generations)
    if n == 0:
        raise EvaluationError("eval.n_generations is 0: the generation comparison has nothing to do; skip the stage")
    if len(pairs_df) == 0:
        raise EvaluationError("the generation comparison got zero held-out pairs; nothing to generate from")
    rows = pairs_df.head(n).to_dict("records")
    settings = dict(
        max_new_tokens=eval_cfg.max_new_tokens,
        do_sample=eval_cfg.do_sample,
        temperature=eval_cfg.temperature,
        top_p=eval_cfg.top_p,
        seed=eval_cfg.seed,
        batch_size=eval_cfg.generation_batch_size,
        spec=spec,
        num_threads=eval_cfg.generation_threads,
    )
    prompts = [_messages(r["prompt"]) for r in rows]
    try:
        prompt_ids = encode_prompts(tokenizer, prompts, system_prompt=system_prompt,
                                    max_prompt_length=max_prompt_length)
    except PromptRenderError as exc:
        raise EvaluationError(f"pair {rows[exc.index]['pair_id']}: its prompt cannot be rendered: {exc.reason}") from exc
    return rows, prompts, prompt_ids, settings


def judged_answers(
    model: Any,
    tokenizer: Any,
    pairs_df: Any,
    *,
    eval_cfg: Any,
    judge: Any,
    spec: Any = None,
    system_prompt: str | None = None,
    max_prompt_length: int | None = None,
) -> pd.DataFrame:
    """One model's answers to the first `eval_cfg.n_generations` held-out prompts, decoded exactly as
    `compare_generations` decodes the policy's (same prompts, settings and seed), scored by `judge`: a table with
    `pair_id`, `answer`, `answer_tokens`, `judge_score` (to put another model beside a comparison's reference)."""
    rows, prompts, prompt_ids, settings = _generation_setup(pairs_df, tokenizer, eval_cfg, system_prompt, spec,
                                                            max_prompt_length)
    gens = generate_from_ids(model, tokenizer, prompt_ids, **settings)
    scores = judge.score(prompts, [g.text for g in gens], [str(r["chosen"]) for r in rows],
                         [str(r["rejected"]) for r in rows])
    return pd.DataFrame({
        "pair_id": [str(r["pair_id"]) for r in rows],
        "answer": [g.text for g in gens],
        "answer_tokens": [len(g.content_ids) for g in gens],
        "judge_score": [float(x) for x in scores],
    })


def compare_generations(
    policy: Any,
    reference_model: Any,
    tokenizer: Any,
    pairs_df: Any,
    *,
    eval_cfg: Any,
    beta: float,
    judge: Any = None,
    judge_validity: dict[str, Any] | None = None,
    spec: Any = None,
    system_prompt: str | None = None,
    max_prompt_length: int | None = None,
) -> tuple[Any, dict[str, Any]]:
    """Reference vs policy answers on the first `eval_cfg.n_generations` held-out prompts, scored side by side.

    The prompts are rendered once (`dpo_core.generation.encode_prompts`) and both models decode those ids with the
    same settings and seed (`generate_from_ids`); the answers are scored on exactly those ids.
    Per answer: length in tokens (end-of-turn excluded), whether it stopped at end-of-turn, distinct-2, longest
    repeated n-gram, the judge's score, and the DPO implicit reward `beta * (log pi_policy(y|x) - log pi_ref(y|x))`
    of exactly the generated tokens (end-of-turn included when emitted), each answer scored under both models.

    Args:
        pairs_df: canonical held-out pairs (`pair_id`, `prompt`, `chosen`, `rejected`); the first N rows are used.
        eval_cfg: `dpo_core.config.EvalConfig` (n_generations, max_new_tokens, sampling, seed, batch sizes, judge).
        judge: a `dpo_core.judges.Judge`; None builds `eval_cfg.judge` with `make_judge` (a trained
            `bradley_terry` judge must be given: it has no folder to load from here).
        judge_validity: the judge's `dpo_core.judges.judge_validity` on held-out pairs, copied into the summary
            beside the win rates (None: recorded as not measured).
        max_prompt_length: cut longer rendered prompts from the left (as the training data was); None keeps all.

    Returns:
        (generations table, one row per prompt, `data_contracts.evaluation.Generations`; summary dict with the judge
        name and its validity (`judge_validity`, its CI, `judge_validated`), then `dpo_core.metrics
        .generation_metrics` with bootstrap CIs: `win_rate` of the policy over the reference (tie = 1/2), the soft and
        length-controlled win rates, `length_ratio` policy/reference mean answer tokens (NaN when every reference
        answer is empty), end-of-turn rates, repetition; and the mean implicit rewards).
    """
    if beta <= 0:
        raise EvaluationError(f"beta must be > 0, got {beta}")
    rows, prompts, prompt_ids, settings = _generation_setup(pairs_df, tokenizer, eval_cfg, system_prompt, spec,
                                                            max_prompt_length)
    ref_gens = generate_from_ids(reference_model, tokenizer, prompt_ids, **settings)
    pol_gens = generate_from_ids(policy, tokenizer, prompt_ids, **settings)

    # one "pair" per prompt: chosen = the policy's answer, rejected = the reference's answer, both after the same
    # prompt ids (the two models were given the same rendered prompts)
    scored = [
        {"pair_id": r["pair_id"], "prompt_ids": rg.prompt_ids, "chosen_ids": pg.token_ids, "rejected_ids": rg.token_ids}
        for r, pg, rg in zip(rows, pol_gens, ref_gens)
    ]
    on_policy = score_pairs(policy, scored, batch_size=eval_cfg.batch_size, spec=spec)
    on_reference = score_pairs(reference_model, scored, batch_size=eval_cfg.batch_size, spec=spec)
    policy_rewards = beta * (on_policy.chosen_logps - on_reference.chosen_logps)
    reference_rewards = beta * (on_policy.rejected_logps - on_reference.rejected_logps)

    judge = judge if judge is not None else make_judge(eval_cfg.judge)
    chosen = [str(r["chosen"]) for r in rows]
    rejected = [str(r["rejected"]) for r in rows]
    policy_scores = judge.score(prompts, [g.text for g in pol_gens], chosen, rejected)
    reference_scores = judge.score(prompts, [g.text for g in ref_gens], chosen, rejected)
    _, winners = win_rate(policy_scores, reference_scores)

    def n_tokens(texts: list[str]) -> list[int]:
        return [len(ids) for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]]

    table = pd.DataFrame(
        {
            "pair_id": [str(r["pair_id"]) for r in rows],
            "prompt": [_last_user_text(m) for m in prompts],
            "prompt_messages": [json.dumps(m, ensure_ascii=False) for m in prompts],
            "prompt_tokens": [g.prompt_tokens for g in ref_gens],
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
    stats = generation_metrics(table, n_samples=eval_cfg.bootstrap_samples, confidence=eval_cfg.confidence,
                               seed=eval_cfg.seed)
    validity = dict(judge_validity) if judge_validity is not None else {"validated": False, "note": "not measured"}
    summary = {
        "judge": judge.name,
        # the judge's own accuracy on held-out pairs, beside every win rate it produces
        "judge_validity": validity.get("validity"),
        "judge_validity_ci_low": validity.get("validity_ci_low"),
        "judge_validity_ci_high": validity.get("validity_ci_high"),
        "judge_validated": bool(validity.get("validated", False)),
        "judge_validity_note": validity.get("note", ""),
        **stats,
        "policy_implicit_reward_mean": float(policy_rewards.mean()),
        "reference_implicit_reward_mean": float(reference_rewards.mean()),
        "policy_judge_score_mean": float(np.mean(policy_scores)),
        "reference_judge_score_mean": float(np.mean(reference_scores)),
        "confidence": float(eval_cfg.confidence),
        "do_sample": bool(eval_cfg.do_sample),
        "seed": int(eval_cfg.seed),
        "max_new_tokens": int(eval_cfg.max_new_tokens),
    }
    return table, summary
