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
    """The ingest report as a markdown table: per split, rows read/accepted/quarantined/duplicates, and reasons."""
    report = pairs.get("report", {})
    lines = [f"# Data report\n\nfingerprint `{pairs.get('fingerprint')}`, quarantine file "
             f"`{Path(pairs['path']) / pairs.get('quarantine_file', 'quarantine.jsonl')}`\n"]
    scalar = {k: v for k, v in report.items() if not isinstance(v, (dict, list))}
    if scalar:
        lines += ["| field | value |", "|---|---|", *[f"| {k} | {_fmt(v)} |" for k, v in scalar.items()], ""]
    for name, value in report.items():
        if isinstance(value, dict):
            flat = {k: v for k, v in value.items() if not isinstance(v, (dict, list))}
            nested = {k: v for k, v in value.items() if isinstance(v, dict)}
            lines += [f"## {name}", "", "| field | value |", "|---|---|"]
            lines += [f"| {k} | {_fmt(v)} |" for k, v in flat.items()]
            for k, v in nested.items():
                lines += [f"| {k}: {kk} | {_fmt(vv)} |" for kk, vv in v.items()] or [f"| {k} | (none) |"]
            lines.append("")
    splits = pairs.get("splits", {})
    if splits:
        lines += ["## accepted pairs per split", "", "| split | pairs |", "|---|---|"]
        lines += [f"| {k} | {v} |" for k, v in splits.items()]
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
