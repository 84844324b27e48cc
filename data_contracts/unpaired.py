"""The canonical unpaired-rows contract: thumbs-up / thumbs-down feedback on one completion, what KTO trains on.

One row per (prompt, completion, label): ``row_id`` (stable content hash of the three), ``prompt`` (chat messages,
the same rules as a pair's prompt), ``completion`` (the assistant text), ``label`` (True: desirable, False:
undesirable), ``source``, ``meta``, ``split``. `unpaired_schema(...)` adds the length bounds from `DataConfig`, as
`data_contracts.pairs.pairs_schema` does for pairs. Check names are the quarantine reasons (`blank_completion`,
`completion_too_long`, `prompt_role_order`, ...).
"""

from __future__ import annotations

import pandas as pd
import pandera.pandas as pa
from pandera.typing import Series

from data_contracts.pairs import PromptedRecord, _non_blank, _prompt_chars
from data_contracts.validation import Failures, collect_failures

__all__ = ["CanonicalUnpaired", "UNPAIRED_COLUMNS", "unpaired_schema", "unpaired_failures", "validate_unpaired"]

UNPAIRED_COLUMNS = ["row_id", "prompt", "completion", "label", "source", "meta", "split"]


class CanonicalUnpaired(PromptedRecord):
    """One row per unpaired completion with its label (docs/architecture.md, "canonical unpaired rows")."""

    row_id: Series[str] = pa.Field(unique=True)
    completion: Series[str]
    label: Series[bool]

    @pa.check("row_id", name="bad_row_id")
    def _row_id_hex(cls, s: Series[str]) -> Series[bool]:
        return s.str.fullmatch(r"[0-9a-f]{16}").fillna(False).astype(bool)

    @pa.check("completion", name="blank_completion")
    def _completion_blank(cls, s: Series[str]) -> Series[bool]:
        return _non_blank(s)


def unpaired_schema(*, min_chars: int = 1, max_prompt_chars: int = 100_000,
                    max_response_chars: int = 100_000) -> pa.DataFrameSchema:
    """CanonicalUnpaired plus the configured length bounds (``DataConfig.min_chars``, ``max_*_chars``), as for
    pairs: a completion of ``min_chars``..``max_response_chars`` characters, a prompt of at most
    ``max_prompt_chars`` characters summed over messages."""
    schema = CanonicalUnpaired.to_schema()
    def long_enough(x: object) -> bool:  # a blank completion is blank_completion's to report
        return len(x.strip()) >= min_chars or not x.strip() if isinstance(x, str) else True

    completion = [
        pa.Check(lambda s: s.map(long_enough), name="completion_too_short"),
        pa.Check(lambda s: s.map(lambda x: len(x) <= max_response_chars if isinstance(x, str) else True),
                 name="completion_too_long"),
    ]
    prompt_len = pa.Check(lambda s: s.map(lambda p: _prompt_chars(p) <= max_prompt_chars), name="prompt_too_long")
    return schema.update_columns({
        "completion": {"checks": [*schema.columns["completion"].checks, *completion]},
        "prompt": {"checks": [*schema.columns["prompt"].checks, prompt_len]},
    })


def unpaired_failures(df: pd.DataFrame, **bounds: int) -> Failures:
    """Every contract failure of a canonical unpaired table, per row (lazy: all at once)."""
    return collect_failures(unpaired_schema(**bounds), df)


def validate_unpaired(df: pd.DataFrame, **bounds: int) -> pd.DataFrame:
    """``df`` unchanged if it satisfies the contract, else ContractError naming every failed check with counts."""
    unpaired_failures(df, **bounds).raise_if_any("canonical unpaired rows", df, key="row_id")
    return df
