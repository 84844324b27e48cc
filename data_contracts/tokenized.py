"""The tokenized-pairs contract, checked where `dpo_core.templating.tokenize_pairs` hands its table on.

One row per pair: ``prompt_ids`` (the rendered prompt with the generation header), ``chosen_ids`` and
``rejected_ids`` (response tokens only), truncation flags. Checks (names are what `ContractError.counts` reports):
``empty_prompt_ids`` / ``empty_chosen_ids`` / ``empty_rejected_ids`` (at least one token each),
``bad_token_ids`` (non-negative integers only), ``chosen_exceeds_max_length`` / ``rejected_exceeds_max_length``
(prompt + response <= max_length), ``missing_generation_header`` (with ``generation_header_ids``: the prompt ends
with the assistant header, i.e. the response starts right where generation would), ``duplicate_pair_id``,
``null_*`` and ``wrong_dtype_*`` (flags must be bool).
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import Any

import pandas as pd
import pandera.pandas as pa
from pandera.typing import Series

from data_contracts.validation import Failures, collect_failures

__all__ = ["TokenizedPairs", "tokenized_schema", "tokenized_failures", "validate_tokenized"]


def _ids(value: Any) -> list | None:
    """A token-id sequence as a list (lists, tuples, numpy/arrow arrays), or None if it is not a sequence."""
    if isinstance(value, (str, bytes, dict)) or value is None:
        return None
    if hasattr(value, "tolist"):
        value = value.tolist()
    return list(value) if isinstance(value, Sequence) else None


def _ids_ok(value: Any) -> bool:
    ids = _ids(value)
    return ids is not None and all(isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in ids)


def _n(value: Any) -> int:
    ids = _ids(value)
    return len(ids) if ids is not None else 0


class TokenizedPairs(pa.DataFrameModel):
    """One row per templated pair (docs/architecture.md, "tokenized pairs")."""

    pair_id: Series[str] = pa.Field(unique=True)
    split: Series[str]
    prompt_ids: Series[object]
    chosen_ids: Series[object]
    rejected_ids: Series[object]
    prompt_truncated: Series[bool]
    chosen_truncated: Series[bool]
    rejected_truncated: Series[bool]

    class Config:
        strict = "filter"  # extra columns (e.g. diagnostics) are allowed and ignored

    @pa.dataframe_check(name="bad_token_ids")
    def _token_ids(cls, df: pd.DataFrame) -> Series[bool]:
        cols = ["prompt_ids", "chosen_ids", "rejected_ids"]
        return df[cols].apply(lambda row: all(_ids_ok(row[c]) for c in cols), axis=1).astype(bool)

    @pa.check("prompt_ids", name="empty_prompt_ids")
    def _prompt_nonempty(cls, s: Series[object]) -> Series[bool]:
        return s.map(lambda v: _n(v) > 0)

    @pa.check("chosen_ids", name="empty_chosen_ids")
    def _chosen_nonempty(cls, s: Series[object]) -> Series[bool]:
        return s.map(lambda v: _n(v) > 0)

    @pa.check("rejected_ids", name="empty_rejected_ids")
    def _rejected_nonempty(cls, s: Series[object]) -> Series[bool]:
        return s.map(lambda v: _n(v) > 0)


def tokenized_schema(max_length: int, generation_header_ids: Sequence[int] | None = None) -> pa.DataFrameSchema:
    """TokenizedPairs plus the length bound and (optionally) the generation-header check."""
    schema = TokenizedPairs.to_schema()
    checks = [
        pa.Check(lambda df: pd.Series([_n(p) + _n(c) <= max_length for p, c in
                                       zip(df["prompt_ids"], df["chosen_ids"], strict=True)], index=df.index),
                 name="chosen_exceeds_max_length"),
        pa.Check(lambda df: pd.Series([_n(p) + _n(r) <= max_length for p, r in
                                       zip(df["prompt_ids"], df["rejected_ids"], strict=True)], index=df.index),
                 name="rejected_exceeds_max_length"),
    ]
    schema = copy.deepcopy(schema)  # to_schema() is cached on the class: never mutate it
    schema.checks = [*schema.checks, *checks]
    if generation_header_ids:
        header = [int(t) for t in generation_header_ids]

        def ends_with_header(v: Any) -> bool:
            ids = _ids(v)
            return ids is not None and len(ids) >= len(header) and ids[len(ids) - len(header):] == header

        schema = schema.update_column(
            "prompt_ids",
            checks=[*schema.columns["prompt_ids"].checks, pa.Check(lambda s: s.map(ends_with_header),
                                                                   name="missing_generation_header")],
        )
    return schema


def tokenized_failures(df: pd.DataFrame, max_length: int,
                       generation_header_ids: Sequence[int] | None = None) -> Failures:
    """Every failure of a tokenized-pairs table, per row (lazy)."""
    return collect_failures(tokenized_schema(max_length, generation_header_ids), df)


def validate_tokenized(df: pd.DataFrame, max_length: int, *,
                       generation_header_ids: Sequence[int] | None = None) -> pd.DataFrame:
    """``df`` unchanged if it satisfies TokenizedPairs with ``max_length`` (and ends every prompt with
    ``generation_header_ids`` when given), else ContractError counting rows per failed check, all at once."""
    tokenized_failures(df, max_length, generation_header_ids).raise_if_any("tokenized pairs", df)
    return df
