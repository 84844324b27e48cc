"""Human-readable views of stage manifests for Prefect artifacts (markdown and tables). Pure functions."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pandas as pd

from tracking.tracker import comparison_lines

__all__ = ["comparison_lines", "comparison_markdown", "data_report_markdown", "decision_markdown", "generations_rows",
           "judge_markdown", "metrics_rows"]


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
    """One row per eval set (pairs' sets, then unpaired ones), numbers rounded for display."""
    rows = [*evaluate["metrics"], *evaluate.get("unpaired_metrics", [])]
    return [{k: (round(v, 4) if isinstance(v, float) else v) for k, v in row.items()} for row in rows]


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


def judge_markdown(judge: dict[str, Any]) -> str:
    """The judge stage's manifest as markdown: the judge, its validity with CI, and how it was trained."""
    v = judge.get("validity", {})
    lines = [f"# Judge: {judge.get('name')}", ""]
    if v.get("validity") is None:
        lines.append(f"Validity not measured: {v.get('note')}.")
    else:
        verdict = "validated" if v.get("validated") else "NOT validated (the CI reaches 0.5)"
        lines.append(f"Validity (pairwise accuracy on {v.get('validity_n_pairs')} held-out pairs: chosen scored above "
                     f"rejected): **{v['validity']:.3f}** ({v.get('confidence', 0.95):.0%} bootstrap CI "
                     f"{v['validity_ci_low']:.3f}-{v['validity_ci_high']:.3f}, ties {v.get('validity_tie_rate', 0):.3f})"
                     f": {verdict}.")
    training = judge.get("training")
    if training:
        lines += ["", f"Trained on {training['n_pairs']} train pairs; features `{training['features']}` and L2 "
                      f"{training['l2']:g} picked by {training['folds']}-fold cross-validation on them:", "",
                  "| features | L2 | cross-validated accuracy |", "|---|---|---|"]
        lines += [f"| {features} | {float(l2):g} | {acc:.3f} |"
                  for features, per_l2 in training["cross_validation"].items() for l2, acc in per_l2.items()]
    return "\n".join(lines) + "\n"


def comparison_markdown(summary: dict[str, Any]) -> str:
    """The generation comparison's summary as markdown: the judge's validity beside the win rates, then every number
    with its CI."""
    lines = ["# Generation comparison (policy vs reference)", ""]
    lines += [f"- {line}" for line in comparison_lines(summary)]
    lines += ["", "| metric | value | CI low | CI high |", "|---|---|---|---|"]
    for key, value in summary.items():
        if key.endswith(("_ci_low", "_ci_high")) or isinstance(value, (dict, list)):
            continue
        low, high = summary.get(f"{key}_ci_low"), summary.get(f"{key}_ci_high")
        lines.append(f"| {key} | {_fmt(value)} | {_fmt(low) if low is not None else ''} | "
                     f"{_fmt(high) if high is not None else ''} |")
    return "\n".join(lines) + "\n"


def decision_markdown(name: str, version: str, decision: dict[str, Any], gate: dict[str, Any]) -> str:
    """The promotion decision: candidate and champion numbers on the same gate pairs, the paired differences with
    their CI, and the reason."""
    verdict = "promoted to champion" if decision["promote"] else "not promoted"
    lines = [f"# {name} v{version}: {verdict}", "", decision["reason"], "",
             f"gate set `{gate['gate_set_id']}`: {gate['n_pairs']} pairs"
             + (f", {gate['n_prompts']} judged prompts ({gate.get('judge')})" if gate.get("n_prompts") else ""), ""]
    champion = gate.get("champion") or {}
    lines += [f"| metric | candidate v{version} | champion v{gate.get('champion_version') or '-'} | paired difference "
              f"| {gate.get('confidence', 0.95):.0%} CI |", "|---|---|---|---|---|"]
    for metric, value in gate["candidate"].items():
        paired = gate["paired"].get(metric)
        ci = f"{paired['ci_low']:+.4f} to {paired['ci_high']:+.4f}" if paired else "-"
        diff = f"{paired['difference']:+.4f}" if paired else "-"
        theirs = f"{champion[metric]:.4f}" if metric in champion else "-"
        lines.append(f"| {metric} | {value:.4f} | {theirs} | {diff} | {ci} |")
    return "\n".join(lines) + "\n"
