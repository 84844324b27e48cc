"""What a trained model learned from: the files, a short profile of its train pairs and how it drifted from the
champion's. Pure functions of the canonical pairs and the ingest report (dpo_data.ingest); tasks/register.py sends
the result to MLflow.

    profile = data_profile(train_pairs, report)
    lineage = lineage_record(report, profile, champion_profile=..., new_pairs=..., previous_version=...)
    lineage_markdown(lineage)
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd

__all__ = ["QUANTILES", "data_profile", "drift", "lineage_record", "lineage_markdown", "train_files"]

QUANTILES = (0.1, 0.5, 0.9)


def _quantiles(lengths: pd.Series) -> dict[str, float]:
    if lengths.empty:
        return {f"p{int(q * 100)}": 0.0 for q in QUANTILES}
    values = np.quantile(lengths.to_numpy(dtype=float), QUANTILES)
    return {f"p{int(q * 100)}": float(v) for q, v in zip(QUANTILES, values)}


def train_files(report: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Every file the train split was read from: {relative path: {format, records, sha256, modified}}."""
    files: dict[str, dict[str, Any]] = {}
    for source in report["splits"]["train"]["sources"]:
        files.update(source.get("files", {}))
    return files


def data_profile(train: pd.DataFrame, report: dict[str, Any]) -> dict[str, Any]:
    """A short profile of the train pairs: how many, the format mix of the records read (share per detected format),
    prompt / chosen / rejected length quantiles in characters, and the duplicate rate of the train split (exact
    duplicates removed / records read)."""
    records: dict[str, int] = {}
    for info in train_files(report).values():
        records[info["format"]] = records.get(info["format"], 0) + int(info["records"])
    total = sum(records.values())
    split = report["splits"]["train"]
    prompt_chars = train["prompt"].map(lambda messages: sum(len(m["content"]) for m in messages))
    return {
        "pairs": int(len(train)),
        "formats": {fmt: round(n / total, 4) for fmt, n in sorted(records.items())} if total else {},
        "prompt_chars": _quantiles(prompt_chars),
        "chosen_chars": _quantiles(train["chosen"].str.len()),
        "rejected_chars": _quantiles(train["rejected"].str.len()),
        "duplicate_rate": round(split["duplicates_removed"] / split["read"], 4) if split["read"] else 0.0,
    }


def drift(current: dict[str, Any], champion: dict[str, Any] | None) -> dict[str, Any]:
    """Side by side: every profile field now and in the champion's data, with the change (now - champion) for
    numbers. None without a champion profile."""
    if champion is None:
        return None
    out: dict[str, Any] = {}
    for key in ("pairs", "duplicate_rate"):
        out[key] = {"now": current[key], "champion": champion.get(key),
                    "change": current[key] - champion[key] if champion.get(key) is not None else None}
    formats = sorted(set(current["formats"]) | set(champion.get("formats", {})))
    out["formats"] = {f: {"now": current["formats"].get(f, 0.0), "champion": champion.get("formats", {}).get(f, 0.0)}
                      for f in formats}
    for key in ("prompt_chars", "chosen_chars", "rejected_chars"):
        theirs = champion.get(key, {})
        out[key] = {q: {"now": v, "champion": theirs.get(q),
                        "change": v - theirs[q] if theirs.get(q) is not None else None}
                    for q, v in current[key].items()}
    return out


def lineage_record(report: dict[str, Any], profile: dict[str, Any], *, champion_profile: dict[str, Any] | None,
                   champion_version: str | None, new_pairs: int | None, previous_version: str | None) -> dict[str, Any]:
    """Everything a registered version carries about its data: fingerprints, files (sha256, records), the selection
    rule, the new-pair count since the previous version (train pairs it did not train on; every pair for a first
    version, None when that version recorded no lineage) and the drift from the champion's data."""
    return {
        "data_fingerprint": report["fingerprint"],
        "train_fingerprint": report["train_fingerprint"],
        "gate_set_id": report.get("gate_set_id"),
        "select": report.get("select"),
        "pairs": report["pairs"],
        "files": train_files(report),
        "previous_version": previous_version,
        "new_pairs": new_pairs,
        "champion_version": champion_version,
        "profile": profile,
        "drift": drift(profile, champion_profile),
    }


def _num(value: Any) -> str:
    if value is None:
        return "-"
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def lineage_markdown(lineage: dict[str, Any]) -> str:
    """The lineage record as a short markdown report (MLflow `lineage/report.md`, a Prefect artifact)."""
    new, previous = lineage["new_pairs"], lineage["previous_version"]
    if previous is None:
        since = f"{new} new train pairs (no earlier version)"
    else:
        since = f"{new} new train pairs since v{previous}" if new is not None else f"v{previous} has no lineage"
    lines = ["# Data lineage", "",
             f"data fingerprint `{lineage['data_fingerprint']}`, train pairs `{lineage['train_fingerprint']}`, "
             f"gate set `{lineage['gate_set_id']}`; {since}", "",
             "| file | format | records | modified | sha256 |", "|---|---|---|---|---|"]
    for name, info in lineage["files"].items():
        lines.append(f"| {name} | {info['format']} | {info['records']} | {info.get('modified', '-')} | "
                     f"`{(info.get('sha256') or '-')[:16]}` |")
    drift_table = lineage["drift"]
    profile = lineage["profile"]
    lines += ["", f"## Drift against champion v{lineage['champion_version']}" if drift_table else "## Profile", ""]
    lines += ["| measure | now | champion | change |", "|---|---|---|---|"]
    for key in ("pairs", "duplicate_rate"):
        row = drift_table[key] if drift_table else {"now": profile[key]}
        lines.append(f"| {key} | {_num(row['now'])} | {_num(row.get('champion'))} | {_num(row.get('change'))} |")
    for key in ("prompt_chars", "chosen_chars", "rejected_chars"):
        for q, now in profile[key].items():
            row = drift_table[key][q] if drift_table else {"now": now}
            lines.append(f"| {key} {q} | {_num(row['now'])} | {_num(row.get('champion'))} | "
                         f"{_num(row.get('change'))} |")
    formats = drift_table["formats"] if drift_table else {f: {"now": v} for f, v in profile["formats"].items()}
    for fmt, row in formats.items():
        lines.append(f"| format {fmt} | {_num(row['now'])} | {_num(row.get('champion'))} | - |")
    return "\n".join(lines) + "\n"
