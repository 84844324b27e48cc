"""Contracts of the evaluation stage's two outputs: the metrics record and the generations table.

* `EvalMetrics`: one row per eval set (`eval` and any extra eval set), as returned by
  `dpo_core.evaluation.evaluate_preferences`. Rewards follow DPO (arXiv 2305.18290): `reward = beta * (log
  pi_policy(y|x) - log pi_ref(y|x))`, log-probs summed over the response tokens. Accuracies count strict wins.
* `UnpairedEvalMetrics`: one row per unpaired eval set (labelled completions; `dpo_core.evaluation.unpaired_record`):
  the same reward's sign agreement with the label and its mean per label.
* `Generations`: one row per held-out prompt, as returned by `dpo_core.evaluation.compare_generations`: the
  reference's and the policy's answers side by side with the dataset's chosen / rejected answers and per-answer
  scores. Token counts of answers exclude the end-of-turn token; `judge` names what produced the judge scores.

`validate_metrics(df)` / `validate_unpaired_metrics(df)` / `validate_generations(df)` return the validated frame or
raise `data_contracts.errors.ContractError` with a one-line message naming every failed check.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pandera.pandas as pa
from pandera.typing.pandas import Series

from data_contracts.errors import ContractError

__all__ = ["EvalMetrics", "UnpairedEvalMetrics", "Generations", "validate_metrics", "validate_unpaired_metrics",
           "validate_generations", "METRIC_COLUMNS",
           "GENERATION_COLUMNS"]

_UNIT = {"ge": 0.0, "le": 1.0}


class EvalMetrics(pa.DataFrameModel):
    """One preference-evaluation record per eval set."""

    eval_set: Series[str] = pa.Field(unique=True, str_length={"min_value": 1})
    n_pairs: Series[int] = pa.Field(ge=1)
    beta: Series[float] = pa.Field(gt=0.0)
    # fraction of pairs with chosen reward > rejected reward, and its percentile-bootstrap interval
    reward_accuracy: Series[float] = pa.Field(**_UNIT)
    reward_accuracy_ci_low: Series[float] = pa.Field(**_UNIT)
    reward_accuracy_ci_high: Series[float] = pa.Field(**_UNIT)
    confidence: Series[float] = pa.Field(gt=0.0, lt=1.0)
    reward_tie_rate: Series[float] = pa.Field(**_UNIT)
    margin_mean: Series[float] = pa.Field()
    chosen_reward_mean: Series[float] = pa.Field()
    rejected_reward_mean: Series[float] = pa.Field()
    # mean summed log-probs of the policy, and how often it prefers chosen by log-prob alone
    policy_chosen_logps_mean: Series[float] = pa.Field(le=0.0)
    policy_rejected_logps_mean: Series[float] = pa.Field(le=0.0)
    policy_accuracy: Series[float] = pa.Field(**_UNIT)
    # the same for the reference model (the "before" numbers)
    reference_chosen_logps_mean: Series[float] = pa.Field(le=0.0)
    reference_rejected_logps_mean: Series[float] = pa.Field(le=0.0)
    reference_accuracy: Series[float] = pa.Field(**_UNIT)
    chosen_tokens_mean: Series[float] = pa.Field(gt=0.0)
    rejected_tokens_mean: Series[float] = pa.Field(gt=0.0)

    class Config:
        strict = True
        coerce = True

    @pa.dataframe_check(error="reward_accuracy must lie inside [reward_accuracy_ci_low, reward_accuracy_ci_high]")
    @classmethod
    def _ci_contains_accuracy(cls, df: pd.DataFrame) -> pd.Series:
        eps = 1e-12
        return (df["reward_accuracy_ci_low"] <= df["reward_accuracy"] + eps) & (
            df["reward_accuracy"] <= df["reward_accuracy_ci_high"] + eps
        )

    @pa.dataframe_check(error="margin_mean must equal chosen_reward_mean - rejected_reward_mean")
    @classmethod
    def _margin_is_difference(cls, df: pd.DataFrame) -> pd.Series:
        diff = df["chosen_reward_mean"] - df["rejected_reward_mean"]
        return (df["margin_mean"] - diff).abs() <= 1e-6 * (1.0 + diff.abs())


class UnpairedEvalMetrics(pa.DataFrameModel):
    """One record per unpaired eval set (labelled completions, KTO's data; `dpo_core.metrics.unpaired_metrics`):
    how often the implicit reward's sign agrees with the label, and the mean reward per label. A label with no rows
    has NaN rates and means."""

    eval_set: Series[str] = pa.Field(unique=True, str_length={"min_value": 1})
    n_rows: Series[int] = pa.Field(ge=1)
    n_desirable: Series[int] = pa.Field(ge=0)
    beta: Series[float] = pa.Field(gt=0.0)
    sign_accuracy: Series[float] = pa.Field(**_UNIT)
    sign_accuracy_ci_low: Series[float] = pa.Field(**_UNIT)
    sign_accuracy_ci_high: Series[float] = pa.Field(**_UNIT)
    confidence: Series[float] = pa.Field(gt=0.0, lt=1.0)
    desirable_positive_rate: Series[float] = pa.Field(nullable=True, **_UNIT)
    undesirable_negative_rate: Series[float] = pa.Field(nullable=True, **_UNIT)
    desirable_reward_mean: Series[float] = pa.Field(nullable=True)
    undesirable_reward_mean: Series[float] = pa.Field(nullable=True)
    reward_gap: Series[float] = pa.Field(nullable=True)
    policy_logps_mean: Series[float] = pa.Field(le=0.0)
    reference_logps_mean: Series[float] = pa.Field(le=0.0)
    completion_tokens_mean: Series[float] = pa.Field(gt=0.0)

    class Config:
        strict = True
        coerce = True

    @pa.dataframe_check(error="n_desirable must be at most n_rows")
    @classmethod
    def _desirable_fit(cls, df: pd.DataFrame) -> pd.Series:
        return df["n_desirable"] <= df["n_rows"]

    @pa.dataframe_check(error="sign_accuracy must lie inside [sign_accuracy_ci_low, sign_accuracy_ci_high]")
    @classmethod
    def _ci_contains_accuracy(cls, df: pd.DataFrame) -> pd.Series:
        eps = 1e-12
        return (df["sign_accuracy_ci_low"] <= df["sign_accuracy"] + eps) & (
            df["sign_accuracy"] <= df["sign_accuracy_ci_high"] + eps
        )


class Generations(pa.DataFrameModel):
    """One row per held-out prompt: reference and policy answers side by side, with per-answer scores."""

    pair_id: Series[str] = pa.Field(unique=True, str_length={"min_value": 1})
    prompt: Series[str] = pa.Field()  # the last user message (readable)
    prompt_messages: Series[str] = pa.Field(str_startswith="[")  # the whole chat prompt as JSON
    prompt_tokens: Series[int] = pa.Field(ge=1)  # rendered prompt the models saw, generation header included
    reference_answer: Series[str] = pa.Field()
    reference_tokens: Series[int] = pa.Field(ge=0)  # generated tokens, end-of-turn excluded
    reference_stopped_at_eos: Series[bool] = pa.Field()
    reference_distinct_2: Series[float] = pa.Field(gt=0.0, le=1.0)
    reference_longest_repeat: Series[int] = pa.Field(ge=0)
    policy_answer: Series[str] = pa.Field()
    policy_tokens: Series[int] = pa.Field(ge=0)
    policy_stopped_at_eos: Series[bool] = pa.Field()
    policy_distinct_2: Series[float] = pa.Field(gt=0.0, le=1.0)
    policy_longest_repeat: Series[int] = pa.Field(ge=0)
    chosen: Series[str] = pa.Field()  # the dataset's preferred answer
    rejected: Series[str] = pa.Field()  # the dataset's dispreferred answer
    chosen_tokens: Series[int] = pa.Field(ge=0)
    rejected_tokens: Series[int] = pa.Field(ge=0)
    # beta * (log pi_policy(y|x) - log pi_ref(y|x)) of each generated answer
    reference_implicit_reward: Series[float] = pa.Field()
    policy_implicit_reward: Series[float] = pa.Field()
    reference_judge_score: Series[float] = pa.Field()
    policy_judge_score: Series[float] = pa.Field()
    winner: Series[str] = pa.Field(isin=["policy", "reference", "tie"])
    judge: Series[str] = pa.Field(str_length={"min_value": 1})

    class Config:
        strict = True
        coerce = True

    @pa.dataframe_check(error="every answer's float scores must be finite")
    @classmethod
    def _finite_scores(cls, df: pd.DataFrame) -> pd.Series:
        cols = ["reference_implicit_reward", "policy_implicit_reward", "reference_judge_score", "policy_judge_score"]
        return pd.Series(np.isfinite(df[cols].to_numpy(dtype=float)).all(axis=1), index=df.index)

    @pa.dataframe_check(error="repeated n-gram longer than the answer")
    @classmethod
    def _repeat_fits(cls, df: pd.DataFrame) -> pd.Series:
        return (df["reference_longest_repeat"] < df["reference_tokens"].clip(lower=1)) & (
            df["policy_longest_repeat"] < df["policy_tokens"].clip(lower=1)
        )

    @pa.dataframe_check(error="one judge scores the whole table")
    @classmethod
    def _one_judge(cls, df: pd.DataFrame) -> bool:
        return df["judge"].nunique() <= 1


METRIC_COLUMNS = list(EvalMetrics.to_schema().columns)
GENERATION_COLUMNS = list(Generations.to_schema().columns)


def _label(column: object, check: object, failure_case: object) -> str:
    """A short name for one failed check: `column: check` (table-level checks by their message)."""
    check = str(check)
    if check == "column_in_dataframe":
        return f"missing column {failure_case}"
    if check == "column_in_schema":
        return f"unexpected column {failure_case}"
    if column is None or (isinstance(column, float) and pd.isna(column)):
        return check
    return f"{column}: {check}"


def _validate(model: type[pa.DataFrameModel], table: str, df: pd.DataFrame, key: str) -> pd.DataFrame:
    """Validate lazily; raise one ContractError listing every failed check with a few offending rows (by `key`)."""
    if not isinstance(df, pd.DataFrame):
        raise ContractError(table, {f"not a DataFrame but a {type(df).__name__}": 1})
    if len(df) == 0:
        raise ContractError(table, {"no rows (the evaluation produced nothing)": 1})
    try:
        return model.validate(df, lazy=True)
    except pa.errors.SchemaErrors as exc:
        counts: dict[str, int] = {}
        examples: dict[str, list[str]] = {}
        rows: set[object] = set()
        for rec in exc.failure_cases.to_dict("records"):
            label = _label(rec.get("column"), rec.get("check"), rec.get("failure_case"))
            counts[label] = counts.get(label, 0) + 1
            idx = rec.get("index")
            if idx is not None and not (isinstance(idx, float) and pd.isna(idx)) and idx in df.index:
                rows.add(idx)
                name = str(df.at[idx, key]) if key in df.columns else f"row {idx}"
                if len(examples.setdefault(label, [])) < 3:
                    examples[label].append(name)
        raise ContractError(table, counts, examples, n_rows=len(rows) or None) from None


def validate_metrics(df: pd.DataFrame) -> pd.DataFrame:
    """Validate eval metrics records (`pd.DataFrame([record, ...])`) against `EvalMetrics`."""
    return _validate(EvalMetrics, "eval metrics", df, key="eval_set")


def validate_unpaired_metrics(df: pd.DataFrame) -> pd.DataFrame:
    """Validate unpaired eval metrics records against `UnpairedEvalMetrics`."""
    return _validate(UnpairedEvalMetrics, "unpaired eval metrics", df, key="eval_set")


def validate_generations(df: pd.DataFrame) -> pd.DataFrame:
    """Validate a generations table against `Generations`."""
    return _validate(Generations, "generations", df, key="pair_id")
