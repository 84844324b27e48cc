"""The quarantine file: one JSON line per rejected input row, saying where it came from and which checks it failed.

Entry keys: ``split`` (the group it was read for), ``source`` (the source's label), ``file``, ``line`` (1-based, for
line-oriented files, else null), ``row`` (0-based record index in the file), ``checks`` (check names, sorted),
``errors`` (human-readable details), ``record`` (the raw record as parsed, JSON-safe) or ``raw`` (the text as far as
it could be decoded, when the record could not be parsed).
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from dpo_core.fileio import atomic_file
from dpo_data.formats import json_safe

__all__ = ["QuarantineEntry", "write_quarantine", "read_quarantine", "count_checks"]


@dataclass
class QuarantineEntry:
    split: str
    source: str
    file: str
    row: int
    line: int | None
    checks: list[str]
    errors: list[str] = field(default_factory=list)
    record: dict[str, Any] | None = None
    raw: str | None = None

    def to_json(self) -> str:
        return json.dumps(json_safe(asdict(self)), ensure_ascii=False)


def write_quarantine(entries: Iterable[QuarantineEntry], path: Path) -> Path:
    """Write all entries as JSON lines, atomically (temporary file + rename); an empty file when there are none.
    A path that exists but is not a regular file (``/dev/null`` to discard) is written through, not replaced."""
    path = Path(path)
    if path.exists() and not path.is_file():  # a device such as /dev/null: write through, never replace it
        with open(path, "w", encoding="utf-8") as fh:
            for entry in entries:
                fh.write(entry.to_json() + "\n")
        return path
    with atomic_file(path) as fh:
        for entry in entries:
            fh.write(entry.to_json() + "\n")
    return path


def read_quarantine(path: Path) -> list[dict[str, Any]]:
    """The entries of a quarantine file, as dicts."""
    with open(path, encoding="utf-8") as fh:
        return [json.loads(line) for line in fh if line.strip()]


def count_checks(entries: Iterable[QuarantineEntry]) -> dict[str, int]:
    """Rows per failed check (a row that failed two checks counts under both)."""
    counts: Counter[str] = Counter()
    for e in entries:
        counts.update(set(e.checks))
    return dict(sorted(counts.items()))
