"""Stage 8: one MLflow run per flow run (config, data, lineage, training curves, evaluation, generations, timings),
then registration of the policy behind the head-to-head promotion gate (tracking.registry).

Tracking happens here, after the compute stages, from their manifests: an MLflow outage therefore fails only this
stage, and a re-run once MLflow is back finds every earlier stage Cached and goes straight to registration.
Not cached by Prefect on purpose: it is idempotent itself (the MLflow run is found by the flow run id, training
steps already logged are skipped, a version with the same config hash + data fingerprint is reused).
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any

import pandas as pd
from prefect import get_run_logger, task
from prefect.artifacts import create_link_artifact, create_markdown_artifact
from prefect.runtime import flow_run

from dpo_data.ingest import read_pairs, write_pairs
from dpo_data.lineage import data_profile, lineage_markdown, lineage_record
from dpo_core.config import RunConfig
from dpo_core.models import pick_device
from tracking.registry import (
    GATE_PAIRS_FILE,
    PROFILE_FILE,
    TAG_GATE_SET,
    TAG_TRAIN_FINGERPRINT,
    TRAIN_IDS_FILE,
    download_run_file,
    gate_comparison,
    log_lineage_files,
    previous_version,
    register_policy,
)
from tracking.retry import RetryPolicy
from tracking.tracker import RunTracker
from tasks.champion import read_champion_scores
from tasks.evaluate import pair_scores
from tasks.ingest import split_pairs
from tasks.reports import decision_markdown
from tasks.train_output import policy_dir, read_history


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


def head_to_head(cfg: RunConfig, pairs: dict[str, Any], metrics: dict[str, Any], comparison: dict[str, Any] | None,
                 champion: dict[str, Any] | None, champion_scores: dict[str, Any] | None) -> dict[str, Any]:
    """The gate comparison of this run's candidate with the champion scored in this run (tracking.registry)."""
    candidate = pair_scores(metrics, pairs["gate_split"])
    candidate_judge = None
    if comparison is not None:
        table = pd.read_parquet(Path(comparison["path"]) / comparison["generations_file"])
        candidate_judge = table[["pair_id", "policy_judge_score", "reference_judge_score"]]
    champion_table, champion_judge = (read_champion_scores(champion_scores) if champion_scores is not None
                                      else (None, None))
    return gate_comparison(
        candidate, champion_table, beta=cfg.train.beta,
        champion_version=champion["version"] if champion is not None else None, gate_set_id=pairs["gate_set_id"],
        candidate_judge=candidate_judge, champion_judge=champion_judge,
        judge=comparison["summary"].get("judge") if comparison is not None else None,
        bootstrap_samples=cfg.eval.bootstrap_samples, confidence=cfg.eval.confidence, seed=cfg.eval.seed,
    )


def _download_json(tracker: RunTracker, run_id: str, path: str) -> Any:
    with tempfile.TemporaryDirectory() as tmp:
        local = download_run_file(tracker, run_id, path, Path(tmp))
        return json.loads(local.read_text()) if local is not None else None


def log_lineage(tracker: RunTracker, run_id: str, cfg: RunConfig, pairs: dict[str, Any],
                champion: dict[str, Any] | None) -> dict[str, Any]:
    """The data lineage of this run on its MLflow run (dpo_data.lineage): the report (`lineage/report.json`, `.md`),
    the profile and the ids of the train pairs (read back by the next run), and the gate pairs (pinned by the
    next run when this version becomes champion). Returns the lineage record."""
    train = split_pairs(pairs, "train")
    profile = data_profile(train, pairs["report"])
    previous = previous_version(cfg, config_hash=cfg.config_hash(), fingerprint=pairs["fingerprint"],
                                tracker=tracker)
    new_pairs = len(train) if previous is None else None  # the first version: every pair is new
    if previous is not None:
        with tempfile.TemporaryDirectory() as tmp:
            ids_file = download_run_file(tracker, previous["run_id"], TRAIN_IDS_FILE, Path(tmp))
            if ids_file is not None:
                new_pairs = len(set(train["pair_id"]) - set(ids_file.read_text().split()))
    champion_profile = _download_json(tracker, champion["run_id"], PROFILE_FILE) if champion is not None else None
    lineage = lineage_record(pairs["report"], profile, champion_profile=champion_profile,
                             champion_version=champion["version"] if champion is not None else None,
                             new_pairs=new_pairs, previous_version=previous["version"] if previous else None)
    with tempfile.TemporaryDirectory() as tmp:
        gate_file = write_pairs(split_pairs(pairs, pairs["gate_split"]), Path(tmp) / Path(GATE_PAIRS_FILE).name)
        log_lineage_files(tracker, run_id, train_ids=train["pair_id"].tolist(), profile=profile, lineage=lineage,
                          lineage_md=lineage_markdown(lineage), gate_pairs_file=gate_file)
    tracker.set_tags(run_id, {"data.train_fingerprint": pairs["train_fingerprint"],
                              "data.gate_set_id": pairs["gate_set_id"],
                              "data.new_pairs": "" if new_pairs is None else new_pairs})
    return lineage


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
    champion: dict[str, Any] | None = None,
    champion_scores: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """`champion`: the champion this run scored (tasks.champion.champion_lookup), `champion_scores` its gate scores;
    both None when there is no champion yet."""
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
        # unpaired eval sets (KTO's data) are logged beside the pairs' sets; the gate reads the pairs' alone
        per_set = {row["eval_set"]: row for row in (*metrics["metrics"], *metrics.get("unpaired_metrics", []))}
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
        lineage = log_lineage(tracker, run_id, cfg, pairs, champion)
        gate = head_to_head(cfg, pairs, metrics, comparison, champion, champion_scores)
        flat = gate_metrics(metrics, comparison)
        result = register_policy(
            cfg, run_id=run_id, model_dir=policy_dir(trained), metrics=flat, fingerprint=pairs["fingerprint"],
            config_hash=cfg.config_hash(), flow_run_id=flow_run_id, gate=gate, tracker=tracker,
            tags={TAG_TRAIN_FINGERPRINT: pairs["train_fingerprint"], TAG_GATE_SET: pairs["gate_set_id"],
                  "data.new_pairs": "" if lineage["new_pairs"] is None else str(lineage["new_pairs"]),
                  "data.train_pairs": str(pairs["report"]["pairs"].get("train", 0))},
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
        create_markdown_artifact(markdown=decision_markdown(result.name, result.version, result.decision, gate),
                                 key="promotion-decision",
                                 description="candidate vs champion on the same gate pairs, and the decision")
        create_markdown_artifact(markdown=lineage_markdown(lineage), key="data-lineage",
                                 description="files, new pairs, drift against the champion's data")
    except Exception as exc:
        logger.warning("could not publish the MLflow link / decision / lineage artifacts: %s", exc)
    out = json.loads(json.dumps(vars(result) if hasattr(result, "__dict__") else dict(result), default=str))
    out.update({"run_id": run_id, "run_url": url, "tracking_uri": tracker.uri, "gate": gate, "lineage": lineage})
    logger.info("registered %s version %s (champion: %s)", out.get("name"), out.get("version"),
                out.get("champion_version"))
    return out


def mark_failed(cfg: RunConfig, *, flow_run_id: str, flow_run_name: str, reason: str) -> str:
    """The flow run's MLflow run (created when it failed before registration opened one) tagged `failure.reason`
    and marked FAILED; two quick tries, for a failure hook. Returns the MLflow run id."""
    tracker = RunTracker(cfg, retry=RetryPolicy(tries=2, base_delay=1.0))
    run_id = tracker.start_run(cfg, flow_run_id=flow_run_id, flow_run_name=flow_run_name)
    tracker.set_tags(run_id, {"failure.reason": reason[:5000]})
    tracker.end_run(run_id, "FAILED")
    return run_id
