"""Stage 8: one MLflow run per flow run (config, data, training curves, evaluation, generations, timings), then
registration of the policy with the promotion gate.

Tracking happens here, after the compute stages, from their manifests: an MLflow outage therefore fails only this
stage, and a re-run once MLflow is back finds every earlier stage Cached and goes straight to registration.
Not cached by Prefect on purpose: it is idempotent itself (the MLflow run is found by the flow run id, training
steps already logged are skipped, a version with the same config hash + data fingerprint is reused).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pandas as pd
from prefect import get_run_logger, task
from prefect.artifacts import create_link_artifact
from prefect.runtime import flow_run

from dpo_data.ingest import read_pairs
from dpo_core.config import RunConfig
from dpo_core.models import pick_device
from tracking.registry import register_policy
from tracking.tracker import RunTracker
from tasks.train import policy_dir, read_history


def gate_metrics(metrics: dict[str, Any], comparison: dict[str, Any] | None) -> dict[str, float]:
    """The flat numbers the promotion gate and the version tags use (held-out `eval` set + the judge's win rate)."""
    rows = {row["eval_set"]: row for row in metrics["metrics"]}
    main = rows.get("eval", next(iter(rows.values()), {}))
    flat = {f"eval_{k}": float(v) for k, v in main.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    if comparison is not None:
        summary = comparison.get("summary", {})
        for key in ("win_rate", "length_ratio"):
            if isinstance(summary.get(key), (int, float)):
                flat[key] = float(summary[key])
    return flat


def mlflow_run_url(uri: str, experiment_id: str, run_id: str) -> str:
    """The run's page: on the tracking server, or on `mlflow ui` (default port 5000) for the local SQLite store."""
    base = uri.rstrip("/") if uri.startswith("http") else "http://127.0.0.1:5000"
    return f"{base}/#/experiments/{experiment_id}/runs/{run_id}"


@task(name="register")
def register_stage(
    cfg: RunConfig,
    model: dict[str, Any],
    pairs: dict[str, Any],
    tokenized: dict[str, Any],
    reference: dict[str, Any],
    trained: dict[str, Any],
    metrics: dict[str, Any],
    comparison: dict[str, Any] | None,
    timings: dict[str, float],
) -> dict[str, Any]:
    logger = get_run_logger()
    tracker = RunTracker(cfg)
    flow_run_id = str(flow_run.id or "local")
    run_id = tracker.start_run(cfg, flow_run_id=flow_run_id, flow_run_name=str(flow_run.name or "local"),
                               prefect_ui_url=flow_run.ui_url, device=str(pick_device(cfg.model).device))
    try:
        tracker.log_config(run_id, cfg)
        canonical = read_pairs(Path(pairs["path"]) / pairs["pairs_file"])
        tracker.log_dataset(run_id, pairs["fingerprint"], ", ".join(pairs.get("sources", [])), canonical)
        tracker.log_data_report(run_id, pairs.get("report", {}), Path(pairs["path"]) / pairs["quarantine_file"])
        tracker.log_training(run_id, read_history(trained))
        per_set = {row["eval_set"]: row for row in metrics["metrics"]}
        generations = None
        if comparison is not None:
            generations = pd.read_parquet(Path(comparison["path"]) / comparison["generations_file"])
        tracker.log_eval(run_id, per_set, generations, comparison["summary"] if comparison else None)
        # wall time per stage in this flow run (a Cached stage costs ~0) and the compute time it took when built
        stage_seconds = dict(timings)
        for m in (pairs, tokenized, reference, trained, metrics, *([comparison] if comparison else [])):
            stage_seconds[f"{m['stage']}_build"] = float(m.get("seconds", 0.0))
        tokens_per_second = trained["tokens"] / trained["train_seconds"] if trained.get("train_seconds") else None
        tracker.log_timings(run_id, stage_seconds, tokens_per_second)
        flat = gate_metrics(metrics, comparison)
        result = register_policy(
            cfg, run_id=run_id, model_dir=policy_dir(trained), metrics=flat, fingerprint=pairs["fingerprint"],
            config_hash=cfg.config_hash(), flow_run_id=flow_run_id,
        )
    except BaseException:
        try:
            tracker.end_run(run_id, "FAILED")
        except Exception as exc:  # the tracking server is what failed; the original error matters more
            logger.warning("could not mark MLflow run %s failed: %s", run_id, exc)
        raise
    tracker.end_run(run_id, "FINISHED")
    experiment_id = tracker.experiment_id()
    url = mlflow_run_url(tracker.uri, experiment_id, run_id)
    try:
        create_link_artifact(link=url, link_text=f"MLflow run {run_id}", key="mlflow-run",
                             description=f"tracking URI {tracker.uri}")
    except Exception as exc:
        logger.warning("could not publish the MLflow link artifact: %s", exc)
    out = json.loads(json.dumps(vars(result) if hasattr(result, "__dict__") else dict(result), default=str))
    out.update({"run_id": run_id, "run_url": url, "tracking_uri": tracker.uri})
    logger.info("registered %s version %s (champion: %s)", out.get("name"), out.get("version"),
                out.get("champion_version"))
    return out
