"""The reference log-probs contract, checked where `dpo_core.reference.compute_reference_logps` hands its table on.

One row per tokenized pair: ``chosen_logps`` / ``rejected_logps`` (float64 sums of the reference model's response
token log-probs), ``chosen_tokens`` / ``rejected_tokens`` (int64 counts) and ``chosen_shared_logps`` /
``rejected_shared_logps`` (float64 sums over the first min(chosen_tokens, rejected_tokens) response tokens, which
LD-DPO reads). Checks: ``nonfinite_*_logps``,
``positive_*_logps`` (a sum of log-probabilities is <= 0; a rounding slack of LOGP_TOLERANCE is allowed),
``shared_exceeds_*_logps`` (a part of a sum of non-positive terms is >= the whole, with the same slack),
``nonpositive_*_tokens``, ``duplicate_pair_id``, ``wrong_dtype_*``, ``null_*``; and against the tokenized table:
``missing_pair_id`` (a tokenized pair with no row), ``unknown_pair_id`` (a row for no tokenized pair),
``chosen_token_count_mismatch`` / ``rejected_token_count_mismatch`` (counts differ from the response ids' lengths).
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pandera.pandas as pa
from pandera.typing import Series

from data_contracts.errors import ContractError
from data_contracts.validation import Failures, collect_failures

__all__ = ["ReferenceLogps", "reference_failures", "validate_reference", "LOGP_TOLERANCE"]

LOGP_TOLERANCE = 1e-4


class ReferenceLogps(pa.DataFrameModel):
    """One row per tokenized pair (docs/architecture.md, "reference log-probs")."""

    pair_id: Series[str] = pa.Field(unique=True)
    chosen_logps: Series[np.float64]
    rejected_logps: Series[np.float64]
    chosen_tokens: Series[np.int64]
    rejected_tokens: Series[np.int64]
    chosen_shared_logps: Series[np.float64]
    rejected_shared_logps: Series[np.float64]

    class Config:
        strict = True

    @pa.dataframe_check(name="shared_exceeds_chosen_logps")
    def _chosen_shared_part(cls, df: pd.DataFrame) -> Series[bool]:
        return _part_of(df["chosen_shared_logps"], df["chosen_logps"])

    @pa.dataframe_check(name="shared_exceeds_rejected_logps")
    def _rejected_shared_part(cls, df: pd.DataFrame) -> Series[bool]:
        return _part_of(df["rejected_shared_logps"], df["rejected_logps"])

    @pa.check("chosen_logps", name="nonfinite_chosen_logps")
    def _chosen_finite(cls, s: Series[float]) -> Series[bool]:
        return s.map(math.isfinite)

    @pa.check("rejected_logps", name="nonfinite_rejected_logps")
    def _rejected_finite(cls, s: Series[float]) -> Series[bool]:
        return s.map(math.isfinite)

    @pa.check("chosen_logps", name="positive_chosen_logps")
    def _chosen_nonpositive(cls, s: Series[float]) -> Series[bool]:
        return ~(np.isfinite(s) & (s > LOGP_TOLERANCE))

    @pa.check("rejected_logps", name="positive_rejected_logps")
    def _rejected_nonpositive(cls, s: Series[float]) -> Series[bool]:
        return ~(np.isfinite(s) & (s > LOGP_TOLERANCE))

    @pa.check("chosen_tokens", name="nonpositive_chosen_tokens")
    def _chosen_tokens(cls, s: Series[int]) -> Series[bool]:
        return s > 0

    @pa.check("rejected_tokens", name="nonpositive_rejected_tokens")
    def _rejected_tokens(cls, s: Series[int]) -> Series[bool]:
        return s > 0


def _part_of(part: pd.Series, whole: pd.Series) -> pd.Series:
    """A finite part of a sum of log-probs is >= the sum (up to LOGP_TOLERANCE, relative); a non-finite whole is
    the ``nonfinite_*`` checks' to report."""
    return ~np.isfinite(whole) | (np.isfinite(part) & (part >= whole - LOGP_TOLERANCE * (1 + whole.abs())))


def _length(value: object) -> int:
    return len(value) if value is not None and hasattr(value, "__len__") else -1


def reference_failures(ref_df: pd.DataFrame, tokenized_df: pd.DataFrame) -> Failures:
    """All failures of ``ref_df``: its own contract plus the match with ``tokenized_df`` (one row per pair)."""
    failures = collect_failures(ReferenceLogps.to_schema(), ref_df)
    if "pair_id" not in ref_df.columns or "pair_id" not in tokenized_df.columns:
        return failures
    tok = tokenized_df.drop_duplicates("pair_id").set_index("pair_id")
    rows: dict[object, list[str]] = {}
    for idx, pid in zip(ref_df.index, ref_df["pair_id"], strict=True):
        checks = []
        if pid not in tok.index:
            checks.append("unknown_pair_id")
        else:
            for side in ("chosen", "rejected"):
                col, ids = f"{side}_tokens", f"{side}_ids"
                if col in ref_df.columns and ids in tok.columns and ref_df.at[idx, col] != _length(tok.at[pid, ids]):
                    checks.append(f"{side}_token_count_mismatch")
        if checks:
            rows[idx] = checks
    missing = sorted(set(tok.index) - set(ref_df["pair_id"]))
    table = ["missing_pair_id" for _ in missing]
    return failures.merge(Failures(rows, table))


def validate_reference(ref_df: pd.DataFrame, tokenized_df: pd.DataFrame) -> pd.DataFrame:
    """``ref_df`` unchanged if it satisfies ReferenceLogps and has exactly one row per pair of ``tokenized_df``
    with matching token counts; else ContractError counting rows per failed check, all at once."""
    failures = reference_failures(ref_df, tokenized_df)
    if failures:
        examples = failures.examples(ref_df)
        missing = sorted(set(tokenized_df["pair_id"]) - set(ref_df.get("pair_id", pd.Series(dtype=str))))
        if missing:
            examples["missing_pair_id"] = [str(p) for p in missing[:3]]
        raise ContractError("reference log-probs", failures.counts(), examples,
                            n_rows=len(failures.rows) + len(missing) or None)
    return ref_df
