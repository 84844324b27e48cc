"""Three nights of scheduled retraining, measured (README "Scheduled retraining").

    .venv/bin/python -m bench.nightly --state-dir .dpo_state/bench-nightly [--pairs-per-file 500] [--set KEY=VALUE ...]

A fresh state folder and incoming folder; night 1 finds one file (the first `--pairs-per-file` shipped UltraFeedback
train pairs), night 2 a second file (the next ones) delivered a day later, night 3 nothing new. Each night runs the
`dpo` flow with `configs/nightly.yaml` (plus `--set` overrides) in this process (ephemeral Prefect, MLflow in
SQLite under the state folder), like the `nightly` deployment does. Prints one markdown row per night (pairs, new
pairs, both gate numbers, the decision, wall time) and writes them to `<state>/nights.json`.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
SOURCE = REPO / "data" / "ultrafeedback_binarized_sample" / "train.jsonl"
DAY = 86_400


def deliver(folder: Path, name: str, lines: list[str], day: int) -> Path:
    """One delivery: a new file in the incoming folder, modified on `day` (arrival order)."""
    path = folder / name
    path.write_text("\n".join(lines) + "\n")
    stamp = time.time() - (3 - day) * DAY
    os.utime(path, (stamp, stamp))
    return path


def night_row(night: int, summary: dict[str, Any], seconds: float) -> dict[str, Any]:
    """What a night did, from the flow's summary."""
    row: dict[str, Any] = {"night": night, "wall_s": round(seconds, 1), "pairs": summary["pairs"],
                           "stages": summary["stages"], "stage_seconds": summary["timings_s"],
                           "skipped": summary["skipped"]}
    reg = summary.get("registration")
    if reg:
        gate = reg["gate"]
        row.update({"version": reg["version"], "promoted": reg["promoted"], "reason": reg["decision"]["reason"],
                    "new_pairs": reg["lineage"]["new_pairs"], "gate_pairs": gate["n_pairs"],
                    "candidate": gate["candidate"], "champion": gate["champion"], "paired": gate["paired"]})
    return row


def _fmt(values: dict[str, float] | None, key: str) -> str:
    return f"{values[key]:.3f}" if values and key in values else "-"


def table(rows: list[dict[str, Any]]) -> str:
    lines = ["| night | train / eval (gate) pairs | new train pairs | gate accuracy: candidate / champion | "
             "gate win rate: candidate / champion | decision | wall time |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        pairs = f"{r['pairs'].get('train', 0)} / {r['pairs'].get('eval', 0)}"
        if r["skipped"]:
            lines.append(f"| {r['night']} | {pairs} | 0 | - | - | skipped: nothing new | {r['wall_s']:.0f} s |")
            continue
        new = "-" if r["new_pairs"] is None else str(r["new_pairs"])
        decision = f"v{r['version']} {'promoted' if r['promoted'] else 'not promoted'}"
        lines.append(f"| {r['night']} | {pairs} | {new} | "
                     f"{_fmt(r['candidate'], 'accuracy')} / {_fmt(r['champion'], 'accuracy')} | "
                     f"{_fmt(r['candidate'], 'win_rate')} / {_fmt(r['champion'], 'win_rate')} | {decision} | "
                     f"{r['wall_s']:.0f} s |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.nightly", description=__doc__.splitlines()[0])
    parser.add_argument("--state-dir", default=str(REPO / ".dpo_state" / "bench-nightly"))
    parser.add_argument("--pairs-per-file", type=int, default=500)
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    args = parser.parse_args(argv)
    state = Path(args.state_dir).resolve()
    if state.exists():
        shutil.rmtree(state)  # a measurement starts from nothing: no champion, no cache
    incoming = state / "incoming"
    incoming.mkdir(parents=True)
    os.environ["DPO_STATE_DIR"] = str(state)
    os.environ.pop("MLFLOW_TRACKING_URI", None)
    from flows.dpo import dpo  # after DPO_STATE_DIR: Prefect's home and results go under the state folder

    lines = SOURCE.read_text().splitlines()
    n = args.pairs_per_file
    if 2 * n > len(lines):
        raise SystemExit(f"--pairs-per-file {n}: the shipped file has {len(lines)} pairs, two files need {2 * n}")
    overrides = [f"data.train=[{{path: {incoming}}}]", *args.overrides]
    deliveries = {1: ("delivery-1.jsonl", lines[:n]), 2: ("delivery-2.jsonl", lines[n:2 * n])}
    rows = []
    for night in (1, 2, 3):
        if night in deliveries:
            deliver(incoming, *deliveries[night], day=night)
        started = time.perf_counter()
        summary = dpo(config_path=str(REPO / "configs" / "nightly.yaml"), overrides=overrides)
        rows.append(night_row(night, summary, time.perf_counter() - started))
        print(json.dumps(rows[-1], default=str), flush=True)
    (state / "nights.json").write_text(json.dumps({"overrides": overrides, "nights": rows}, indent=1, default=str))
    print(table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
