"""What a sweep records: one MLflow parent run, a nested child run per trial, and the comparison of the trials.

The ``dpo-sweep`` flow (``flows/sweep.py``) calls these; the trials themselves run the ordinary stage tasks.

- ``start_sweep_run``: the parent run (the sweep file, the planned trials).
- ``TrialRun``: a trial's child run, nested under the parent: its config, training curves with the validation
  metrics, the swept values as tags; FAILED with the error when the trial fails.
- ``comparison_rows`` + ``log_sweep``: the comparison table (MLflow table artifact and Prefect table), a plot of the
  validation metric against each swept key, the winner and its one test-split score on the parent.
"""

from __future__ import annotations

import json
import logging
from typing import Any

import pandas as pd
from prefect import task
from prefect.cache_policies import NO_CACHE
from prefect.artifacts import create_table_artifact
from prefect.runtime import flow_run

from dpo_core.config import RunConfig
from dpo_core.sweep import SweepSpec, Trial
from tracking.curves import plot_sweep
from tasks.train_output import read_history
from tracking.tracker import RunTracker

log = logging.getLogger(__name__)

# the validation metrics shown per trial in the comparison table (the sweep's own metric is always among them)
SHOWN_METRICS = ("val/rewards/accuracies", "val/rewards/margins", "val/loss")


def start_sweep_run(cfg: RunConfig, spec: SweepSpec, trials: list[Trial]) -> tuple[RunTracker, str]:
    """The sweep's parent MLflow run (one per sweep flow run): the sweep file as params, the planned trials as a
    JSON artifact."""
    tracker = RunTracker(cfg)
    run_id = tracker.start_run(cfg, flow_run_id=str(flow_run.id or "local"),
                               flow_run_name=str(flow_run.name or "sweep"), prefect_ui_url=flow_run.ui_url)
    settings = spec.sweep.model_dump(mode="json", exclude={"params"})
    tracker.set_tags(run_id, {"sweep.role": "parent", "sweep.base_config": spec.config,
                              "sweep.overrides": json.dumps(spec.overrides)[:5000],
                              **{f"sweep.{k}": v for k, v in settings.items()}})
    tracker.log_config(run_id, cfg)
    tracker.call("log_dict(trials)", lambda: tracker.client.log_dict(
        run_id, {"params": spec.sweep.model_dump(mode="json")["params"],
                 "trials": [t.model_dump(mode="json") for t in trials]}, "sweep/plan.json"))
    return tracker, run_id


class TrialRun:
    """A trial's child MLflow run (nested under the sweep's parent run), keyed by the trial's flow run id."""

    def __init__(self, cfg: RunConfig, trial: Trial, parent_run_id: str) -> None:
        self.cfg, self.trial = cfg, trial
        self.tracker = RunTracker(cfg)
        self.run_id = self.tracker.start_run(
            cfg, flow_run_id=str(flow_run.id or f"local-{trial.name}"), flow_run_name=trial.name,
            prefect_ui_url=flow_run.ui_url, parent_run_id=parent_run_id)
        self.tracker.set_tags(self.run_id, {"sweep.role": "trial", "sweep.trial": trial.name,
                                            **{f"sweep.param.{k}": v for k, v in trial.params.items()}})

    def finished(self, trial_cfg: RunConfig, trained: dict[str, Any]) -> None:
        """Config, training history (train/ and val/ metrics, curves), the selected step's validation metrics as
        `selected/val/...`; FINISHED."""
        tracker = RunTracker(trial_cfg, uri=self.tracker.uri)  # the trial's loss and beta title its curves
        tracker.log_config(self.run_id, trial_cfg)
        tracker.log_training(self.run_id, read_history(trained))
        selected = {f"selected/{k}": v for k, v in trained.get("validation", {}).items()}
        tracker.log_metrics(self.run_id, {**selected, "selected_step": trained["selected_step"]})
        tracker.end_run(self.run_id, "FINISHED")

    def failed(self, error: str) -> None:
        self.tracker.set_tags(self.run_id, {"sweep.error": error[:5000]})
        self.tracker.end_run(self.run_id, "FAILED")


def comparison_rows(records: list[dict[str, Any]], spec: SweepSpec, winner: dict[str, Any] | None) -> list[dict]:
    """One row per trial: its swept values, status, validation metrics at its selected step, the step, train time,
    whether it won, its MLflow run, and the error of a failed trial."""
    rows = []
    for r in sorted(records, key=lambda rec: rec["index"]):
        validation = r.get("validation", {})
        metrics = dict.fromkeys((spec.sweep.metric, *SHOWN_METRICS))
        rows.append({
            "trial": r["index"], "name": r["name"], "status": r["status"],
            **{key: r["params"].get(key) for key in spec.sweep.params},
            **{m: validation.get(m) for m in metrics},
            "selected_step": r.get("selected_step"), "steps": r.get("steps"),
            "train_seconds": r.get("train_seconds"),
            "winner": winner is not None and r["index"] == winner["index"],
            "mlflow_run_id": r.get("run_id"), "error": r.get("error") or "",
        })
    return rows


def _metric_file(metric: str) -> str:
    return metric.replace("/", "_")


@task(name="log-sweep", cache_policy=NO_CACHE)
def log_sweep(cfg: RunConfig, spec: SweepSpec, parent_run_id: str | None, records: list[dict[str, Any]],
              winner: dict[str, Any] | None, final: dict[str, Any] | None) -> list[dict[str, Any]]:
    """The comparison table (Prefect artifact `sweep-trials`, and with tracking the parent run's `sweep/trials.json`
    table), the plot `sweep/<metric>_vs_params.png`, the winner and its test-split metrics on the parent run."""
    rows = comparison_rows(records, spec, winner)
    create_table_artifact(table=[{k: (round(v, 4) if isinstance(v, float) else v) for k, v in row.items()}
                                 for row in rows],
                          key="sweep-trials", description=f"sweep trials; winner by {spec.sweep.metric} on validation")
    if parent_run_id is None:
        return rows
    tracker = RunTracker(cfg)
    tracker.log_table(parent_run_id, pd.DataFrame(rows), "sweep/trials.json")
    keys = list(spec.sweep.params)
    figure = plot_sweep(rows, keys, spec.sweep.metric, winner=winner["index"] if winner else None)
    tracker.log_figure(parent_run_id, figure, f"sweep/{_metric_file(spec.sweep.metric)}_vs_params.png")
    tags: dict[str, Any] = {"sweep.trials": len(records),
                            "sweep.failed_trials": sum(r["status"] != "completed" for r in records)}
    if winner is not None:
        tags.update({"sweep.winner": winner["name"], "sweep.winner_params": json.dumps(winner["params"]),
                     "sweep.winner_run_id": winner.get("run_id") or ""})
        tracker.log_metrics(parent_run_id, {f"winner/{k}": v for k, v in winner["validation"].items()})
    if final is not None:
        registration = final.get("registration") or {}
        if registration.get("run_id"):  # the winner's test-split run, nested under the sweep too
            tracker.set_tags(registration["run_id"], {"mlflow.parentRunId": parent_run_id, "sweep.role": "test",
                                                      "sweep.trial": winner["name"] if winner else ""})
            tags.update({"sweep.test_run_id": registration["run_id"],
                         "registry.version": registration.get("version") or "",
                         "registry.promoted": str(registration.get("promoted")).lower()})
        for row in final.get("metrics", []):
            numbers = {f"test/{row['eval_set']}/{k}": v for k, v in row.items()
                       if isinstance(v, (int, float)) and not isinstance(v, bool)}
            tracker.log_metrics(parent_run_id, numbers)
    tracker.set_tags(parent_run_id, tags)
    return rows
