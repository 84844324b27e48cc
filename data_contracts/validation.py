"""Run a pandera schema lazily (all failures at once) and turn its failure cases into per-row check names."""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field

import pandas as pd
import pandera.pandas as pa

from data_contracts.errors import ContractError

__all__ = ["Failures", "collect_failures", "check_label"]


@dataclass
class Failures:
    """``rows``: row index -> sorted check names it failed; ``table``: failures not tied to a row (a missing
    column, a wrong dtype)."""

    rows: dict[object, list[str]] = field(default_factory=dict)
    table: list[str] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.rows or self.table)

    def counts(self) -> dict[str, int]:
        out: dict[str, int] = defaultdict(int)
        for checks in self.rows.values():
            for c in checks:
                out[c] += 1
        for c in self.table:
            out[c] += 1
        return dict(out)

    def examples(self, df: pd.DataFrame, key: str = "pair_id", n: int = 3) -> dict[str, list[str]]:
        out: dict[str, list[str]] = defaultdict(list)
        for idx, checks in self.rows.items():
            label = str(df.at[idx, key]) if key in df.columns and idx in df.index else f"row {idx}"
            for c in checks:
                if len(out[c]) < n:
                    out[c].append(label)
        return dict(out)

    def merge(self, other: "Failures") -> "Failures":
        rows = {k: list(v) for k, v in self.rows.items()}
        for idx, checks in other.rows.items():
            rows[idx] = sorted(set(rows.get(idx, [])) | set(checks))
        return Failures(rows, self.table + other.table)

    def raise_if_any(self, table: str, df: pd.DataFrame, key: str = "pair_id") -> None:
        if self:
            raise ContractError(table, self.counts(), self.examples(df, key), n_rows=len(self.rows) or None)


def check_label(column: str | None, check: str, failure_case: object) -> str:
    """A short, stable name for a failed check (custom checks keep their own name)."""
    col = column or "table"
    if check == "not_nullable":
        return f"null_{col}"
    if check == "field_uniqueness":
        return f"duplicate_{col}"
    if check == "column_in_dataframe":
        return f"missing_column_{failure_case}"
    if check == "column_in_schema":
        return f"unexpected_column_{failure_case}"
    if check.startswith("dtype("):
        return f"wrong_dtype_{col}"
    return check


def collect_failures(schema: pa.DataFrameSchema, df: pd.DataFrame) -> Failures:
    """Validate ``df`` against ``schema`` lazily; every failure, per row where it has one."""
    try:
        schema.validate(df, lazy=True)
    except pa.errors.SchemaErrors as exc:
        rows: dict[object, set[str]] = defaultdict(set)
        table: set[str] = set()
        for rec in exc.failure_cases.to_dict("records"):
            label = check_label(rec.get("column"), str(rec.get("check")), rec.get("failure_case"))
            idx = rec.get("index")
            if idx is None or (isinstance(idx, float) and pd.isna(idx)):
                table.add(label)
            else:
                rows[idx].add(label)
        return Failures({k: sorted(v) for k, v in rows.items()}, sorted(table))
    return Failures()
