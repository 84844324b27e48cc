"""Errors of the data stages. Both are ValueErrors whose message is one line a user can act on; a DataError is a
`dpo_core.config.UserError` (the input data needs fixing), a ContractError may also be a bug in a stage."""

from __future__ import annotations

from collections.abc import Mapping

from dpo_core.config import UserError

__all__ = ["DataError", "ContractError"]


class DataError(UserError):
    """Input data cannot be used: a source is missing/unreadable, or too many rows failed validation."""


class ContractError(ValueError):
    """A table violates its contract. ``counts`` maps each failed check to how many rows failed it; ``examples``
    maps each check to a few offending row keys (pair_ids where the table has them)."""

    def __init__(self, table: str, counts: Mapping[str, int], examples: Mapping[str, list[str]] | None = None,
                 n_rows: int | None = None) -> None:
        self.table = table
        self.counts = dict(counts)
        self.examples = {k: list(v) for k, v in (examples or {}).items()}
        failing = f"{n_rows} row(s) fail" if n_rows is not None else "checks fail"
        parts = []
        for check, n in sorted(self.counts.items(), key=lambda kv: (-kv[1], kv[0])):
            ex = self.examples.get(check)
            parts.append(f"{check}: {n}" + (f" (e.g. {', '.join(ex[:3])})" if ex else ""))
        super().__init__(f"{table} violate their contract, {failing}: " + "; ".join(parts))
