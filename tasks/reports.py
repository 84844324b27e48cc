"""Human-readable views of stage manifests for Prefect artifacts (markdown and tables). Pure functions."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pandas as pd


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def data_report_markdown(pairs: dict[str, Any]) -> str:
    """The ingest report as markdown: one row per split (read, accepted, quarantined per check, duplicates)."""
    from dpo_data.ingest import report_rows

    report = pairs.get("report", {})
    quarantine = Path(pairs["path"]) / pairs.get("quarantine_file", "quarantine.jsonl")
    lines = [f"# Data report\n\nfingerprint `{pairs.get('fingerprint')}`; quarantine file `{quarantine}`\n"]
    rows = report_rows(report) if "splits" in report else []
    if rows:
        cols = list(rows[0])
        lines += ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
        lines += ["| " + " | ".join(_fmt(r.get(c, "")) for c in cols) + " |" for r in rows]
    lines.append("\nInvariant per split: read = accepted + quarantined + duplicates removed.")
    return "\n".join(lines)


def metrics_rows(evaluate: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per eval set, numbers rounded for display."""
    return [{k: (round(v, 4) if isinstance(v, float) else v) for k, v in row.items()} for row in evaluate["metrics"]]


def generations_rows(compare: dict[str, Any], max_chars: int = 400) -> list[dict[str, Any]]:
    """The side-by-side generations table with long texts shortened for the Prefect UI."""
    table = pd.read_parquet(Path(compare["path"]) / compare["generations_file"])
    rows = []
    for row in table.to_dict("records"):
        out = {}
        for k, v in row.items():
            if isinstance(v, str) and len(v) > max_chars:
                v = v[:max_chars] + "..."
            elif isinstance(v, float):
                v = round(v, 4)
            elif not isinstance(v, (str, int, bool)) and v is not None:
                v = str(v)
            out[k] = v
        rows.append(out)
    return rows
