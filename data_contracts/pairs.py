"""The canonical-pairs contract: what every ingested preference pair must satisfy before it reaches templating.

`CanonicalPairs` holds the structural checks; `pairs_schema(...)` adds the length bounds from `DataConfig`.
Check names are the quarantine reasons (`blank_chosen`, `chosen_equals_rejected`, `prompt_role_order`, ...).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

import pandas as pd
import pandera.pandas as pa
from pandera.typing import Series

from data_contracts.validation import Failures, collect_failures

__all__ = ["CanonicalPairs", "PAIR_COLUMNS", "ROLES", "pairs_schema", "pair_failures", "validate_pairs",
           "prompt_problem"]

PAIR_COLUMNS = ["pair_id", "prompt", "chosen", "rejected", "source", "meta", "split"]
ROLES = ("system", "user", "assistant")


def _is_messages(value: Any) -> bool:
    return (
        isinstance(value, Sequence) or hasattr(value, "tolist")
    ) and not isinstance(value, str) and all(
        isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str) for m in value
    )


def prompt_problem(value: Any) -> str | None:
    """The first thing wrong with a prompt (as a check name), or None: a non-empty list of {role, content} with
    roles in ROLES, an optional leading system message, then user/assistant alternating from user, ending with user."""
    if not _is_messages(value) or len(value) == 0:
        return "prompt_malformed"
    roles = [m["role"] for m in value]
    if any(r not in ROLES for r in roles):
        return "prompt_bad_role"
    turns = roles[1:] if roles[0] == "system" else roles
    expected = ["user" if i % 2 == 0 else "assistant" for i in range(len(turns))]
    if not turns or turns != expected or turns[-1] != "user":
        return "prompt_role_order"
    return None


def _non_blank(s: pd.Series) -> pd.Series:
    return s.map(lambda x: isinstance(x, str) and bool(x.strip()))


def _prompt_check(name: str):
    return lambda s: s.map(lambda p: prompt_problem(p) != name)


def _prompt_chars(p: Any) -> int:
    return sum(len(m["content"]) for m in p) if _is_messages(p) else 0


class PromptedRecord(pa.DataFrameModel):
    """The columns and checks every canonical record shares (pairs and unpaired rows): its prompt as messages, where
    it came from, its split and its meta as a JSON object."""

    prompt: Series[object]
    source: Series[str]
    meta: Series[str]
    split: Series[str]

    class Config:
        strict = True

    @pa.check("prompt", name="prompt_malformed")
    def _prompt_malformed(cls, s: Series[object]) -> Series[bool]:
        return _prompt_check("prompt_malformed")(s)

    @pa.check("prompt", name="prompt_bad_role")
    def _prompt_bad_role(cls, s: Series[object]) -> Series[bool]:
        return _prompt_check("prompt_bad_role")(s)

    @pa.check("prompt", name="prompt_role_order")
    def _prompt_role_order(cls, s: Series[object]) -> Series[bool]:
        return _prompt_check("prompt_role_order")(s)

    @pa.check("prompt", name="blank_prompt")
    def _prompt_blank(cls, s: Series[object]) -> Series[bool]:
        return s.map(lambda p: not _is_messages(p) or all(m["content"].strip() for m in p))

    @pa.check("source", name="blank_source")
    def _source_blank(cls, s: Series[str]) -> Series[bool]:
        return _non_blank(s)

    @pa.check("split", name="blank_split")
    def _split_blank(cls, s: Series[str]) -> Series[bool]:
        return _non_blank(s)

    @pa.check("meta", name="meta_not_json")
    def _meta_json(cls, s: Series[str]) -> Series[bool]:
        def ok(x: Any) -> bool:
            try:
                return isinstance(json.loads(x), dict)
            except (TypeError, ValueError):
                return False

        return s.map(ok)


class CanonicalPairs(PromptedRecord):
    """One row per preference pair (docs/architecture.md, "canonical pairs")."""

    pair_id: Series[str] = pa.Field(unique=True)
    chosen: Series[str]
    rejected: Series[str]

    @pa.check("pair_id", name="bad_pair_id")
    def _pair_id_hex(cls, s: Series[str]) -> Series[bool]:
        return s.str.fullmatch(r"[0-9a-f]{16}").fillna(False).astype(bool)

    @pa.check("chosen", name="blank_chosen")
    def _chosen_blank(cls, s: Series[str]) -> Series[bool]:
        return _non_blank(s)

    @pa.check("rejected", name="blank_rejected")
    def _rejected_blank(cls, s: Series[str]) -> Series[bool]:
        return _non_blank(s)

    @pa.dataframe_check(name="chosen_equals_rejected")
    def _distinct(cls, df: pd.DataFrame) -> Series[bool]:
        def differ(c: Any, r: Any) -> bool:
            return not (isinstance(c, str) and isinstance(r, str) and c.strip() == r.strip())

        return pd.Series([differ(c, r) for c, r in zip(df["chosen"], df["rejected"], strict=True)], index=df.index)


def pairs_schema(*, min_chars: int = 1, max_prompt_chars: int = 100_000,
                 max_response_chars: int = 100_000) -> pa.DataFrameSchema:
    """CanonicalPairs plus the configured length bounds (``DataConfig.min_chars``, ``max_*_chars``): responses of
    ``min_chars``..``max_response_chars`` characters (stripped for the minimum), prompts of at most
    ``max_prompt_chars`` characters summed over messages."""
    schema = CanonicalPairs.to_schema()
    resp = lambda col: [  # noqa: E731
        pa.Check(lambda s: s.map(lambda x: len(x.strip()) >= min_chars or not x.strip() if isinstance(x, str) else True),
                 name=f"{col}_too_short"),
        pa.Check(lambda s: s.map(lambda x: len(x) <= max_response_chars if isinstance(x, str) else True),
                 name=f"{col}_too_long"),
    ]
    prompt_len = pa.Check(lambda s: s.map(lambda p: _prompt_chars(p) <= max_prompt_chars), name="prompt_too_long")
    return schema.update_columns({
        "chosen": {"checks": [*schema.columns["chosen"].checks, *resp("chosen")]},
        "rejected": {"checks": [*schema.columns["rejected"].checks, *resp("rejected")]},
        "prompt": {"checks": [*schema.columns["prompt"].checks, prompt_len]},
    })


def pair_failures(df: pd.DataFrame, **bounds: int) -> Failures:
    """Every contract failure of a canonical-pairs table, per row (lazy: all at once)."""
    return collect_failures(pairs_schema(**bounds), df)


def validate_pairs(df: pd.DataFrame, **bounds: int) -> pd.DataFrame:
    """``df`` unchanged if it satisfies the contract, else ContractError naming every failed check with counts."""
    pair_failures(df, **bounds).raise_if_any("canonical pairs", df)
    return df
