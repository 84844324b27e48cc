"""MLflow tracking: one MLflow run per Prefect flow run, browsable in the MLflow UI.

Plain functions around an explicit `MlflowClient` and an explicit `run_id` (no fluent "active run" global), so they
work from any Prefect task, thread or process, and no Prefect server is needed to import or test them. The flow calls:

    tracker = RunTracker(cfg)
    run_id = tracker.start_run(cfg, flow_run_id=..., flow_run_name=..., prefect_ui_url=...)
    tracker.log_config(run_id, cfg); tracker.log_dataset(run_id, fingerprint, source, pairs_df); ...
    tracker.end_run(run_id, "FINISHED")

Every call to MLflow goes through `tracking.retry.RetryPolicy.call`: transient failures (server down, connection
refused, SQLite locked) are retried with exponential backoff, then `TrackingUnavailable` is raised with a one-line
message naming the tracking URI. Errors that retrying cannot fix (a bad parameter value) are raised at once.

Default store (MLflow 3 deprecates the file store and the registry needs a database): SQLite at
`<state_dir>/mlflow/mlflow.db`, artifacts under `<state_dir>/mlflow/artifacts`. Browse it with
`mlflow ui --backend-store-uri sqlite:///<state_dir>/mlflow/mlflow.db`.
"""

from __future__ import annotations

import json
import logging
import math
import os
import subprocess
import tempfile
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import pandas as pd
import yaml

from dpo_core.config import RunConfig
from tracking.retry import RetryPolicy

log = logging.getLogger(__name__)

T = TypeVar("T")

REPO_ROOT = Path(__file__).resolve().parents[1]
MAX_PARAM_VALUE = 500  # MLflow 3 accepts 6000 chars; 500 keeps params readable and portable to older servers
PARAMS_PER_BATCH = 100  # MLflow's limit of params + tags per log_batch
METRICS_PER_BATCH = 1000  # MLflow's limit of metrics per log_batch
QUARANTINE_SAMPLE_LINES = 50
RUN_STATUSES = ("FINISHED", "FAILED", "KILLED")

# ----------------------------------------------------------------------------------------------------------------------
# Where runs go
# ----------------------------------------------------------------------------------------------------------------------


def default_store(cfg: RunConfig) -> tuple[str, Path]:
    """The embedded default: (`sqlite:///<state_dir>/mlflow/mlflow.db`, `<state_dir>/mlflow/artifacts`)."""
    root = cfg.resolved_state_dir() / "mlflow"
    return f"sqlite:///{root / 'mlflow.db'}", root / "artifacts"


def tracking_uri(cfg: RunConfig) -> str:
    """cfg.registry.tracking_uri, else $MLFLOW_TRACKING_URI, else SQLite under the state folder (created on demand)."""
    uri = cfg.registry.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")
    if uri:
        return uri
    uri, artifacts = default_store(cfg)
    artifacts.parent.mkdir(parents=True, exist_ok=True)
    return uri


def artifact_location(cfg: RunConfig, uri: str) -> str | None:
    """Artifact root for a new experiment: `artifacts/` beside a SQLite file (the state folder for the default
    store; MLflow would otherwise write ./mlruns in the current directory); the server's choice otherwise."""
    default_uri, artifacts = default_store(cfg)
    if uri == default_uri:
        return artifacts.as_uri()
    if uri.startswith("sqlite:///") and uri != "sqlite:///:memory:":
        return (Path(uri[len("sqlite:///"):]).resolve().parent / "artifacts").as_uri()
    return None


def _quiet_http_retries() -> None:
    """MLflow's own HTTP client retries 7 times with backoff (minutes against a dead server) under our retries;
    cap it unless the user set it."""
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")


# ----------------------------------------------------------------------------------------------------------------------
# Pure helpers (no MLflow): flattening, metric selection, reports
# ----------------------------------------------------------------------------------------------------------------------


def flatten_params(tree: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """{'train': {'beta': 0.1}} -> {'train.beta': '0.1'}; lists/None as JSON; values cut to MAX_PARAM_VALUE chars
    (a cut value ends with '...[N chars]' so the cut is visible; the full config is the YAML artifact)."""
    out: dict[str, str] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            out.update(flatten_params(value, prefix=f"{name}."))
            continue
        text = value if isinstance(value, str) else json.dumps(value, sort_keys=True, default=str)
        if len(text) > MAX_PARAM_VALUE:
            suffix = f"...[{len(text)} chars]"
            text = text[: MAX_PARAM_VALUE - len(suffix)] + suffix
        out[name] = text
    return out


def as_number(value: Any) -> float | None:
    """A python/numpy int or float as float (NaN and inf included); None for anything else (bools included)."""
    if isinstance(value, (bool, np.bool_)):
        return None
    if isinstance(value, (int, float, np.integer, np.floating)):
        return float(value)
    return None


def flatten_metrics(tree: Mapping[str, Any], prefix: str) -> tuple[dict[str, float], list[str]]:
    """Numeric leaves of a nested dict as `prefix + dotted/key` -> float; also the keys that were not numbers.

    Pairs/tuples of numbers (e.g. a CI) become `<key>_low` / `<key>_high`; NaN is kept (MLflow stores it)."""
    metrics: dict[str, float] = {}
    skipped: list[str] = []
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            sub, sub_skipped = flatten_metrics(value, prefix=f"{name}/")
            metrics.update(sub)
            skipped.extend(sub_skipped)
        elif isinstance(value, (list, tuple)) and len(value) == 2 and all(as_number(v) is not None for v in value):
            metrics[f"{name}_low"], metrics[f"{name}_high"] = (float(v) for v in value)
        elif (number := as_number(value)) is not None:
            metrics[name] = number
        else:
            skipped.append(name)
    return metrics, skipped


def training_metric_rows(history: Sequence[Mapping[str, Any]]) -> list[tuple[str, float, int]]:
    """(name, value, step) for every TRL metric of every history record, names prefixed `train/`; validation metrics
    scored during training keep their own `val/` names (`val/loss`, `val/rewards/accuracies`, ...).

    Raises ValueError when a record has no integer `step` (steps are the x axis; a guess would mislabel curves)."""
    rows: list[tuple[str, float, int]] = []
    ignored: set[str] = set()
    for i, record in enumerate(history):
        step = record.get("step")
        if isinstance(step, (bool, np.bool_)) or not isinstance(step, (int, np.integer)):
            raise ValueError(f"training history record {i} has no integer 'step' (got {step!r})")
        for key, value in record.items():
            if key == "step":
                continue
            number = as_number(value)
            if number is None:
                ignored.add(key)
                continue
            rows.append((key if key.startswith("val/") else f"train/{key}", number, int(step)))
    if ignored:
        log.warning("training history fields that are not numbers were not logged as metrics: %s",
                    ", ".join(sorted(ignored)))
    return rows


def _with_ci(summary: Mapping[str, Any], key: str, digits: int = 3) -> str:
    """`value (CI low-high)` of `summary[key]` and its `_ci_low` / `_ci_high`; `n/a` when it is missing or not a number."""
    value = as_number(summary.get(key))
    if value is None or math.isnan(value):
        return "n/a"
    low, high = as_number(summary.get(f"{key}_ci_low")), as_number(summary.get(f"{key}_ci_high"))
    if low is None or high is None:
        return f"{value:.{digits}f}"
    return f"{value:.{digits}f} (CI {low:.{digits}f}-{high:.{digits}f})"


def comparison_lines(summary: Mapping[str, Any]) -> list[str]:
    """The generation comparison in words: the judge and its own validity first, then every win rate with its CI
    (raw, the judge's soft preference, length-controlled), then length, end-of-turn and repetition with theirs."""
    confidence = as_number(summary.get("confidence"))
    level = f"{confidence:.0%} " if confidence is not None else ""
    if as_number(summary.get("judge_validity")) is not None:
        validity = (f"validity {_with_ci(summary, 'judge_validity')} "
                    f"({'validated' if summary.get('judge_validated') else 'NOT validated: CI reaches 0.5'})")
    else:
        validity = f"validity not measured ({summary.get('judge_validity_note') or 'unknown'})"
    return [
        f"judge: {summary.get('judge')}; {validity}",
        f"win rate {_with_ci(summary, 'win_rate')} over {summary.get('n_prompts')} prompts (policy wins "
        f"{summary.get('policy_wins')}, reference wins {summary.get('reference_wins')}, ties {summary.get('ties')}); "
        f"judge's preference {_with_ci(summary, 'win_rate_soft')}, length-controlled {_with_ci(summary, 'lc_win_rate')}"
        f" [{level}bootstrap CIs]",
        f"length ratio policy/reference {_with_ci(summary, 'length_ratio')}; end-of-turn rate policy "
        f"{_with_ci(summary, 'policy_eot_rate', 2)}, reference {_with_ci(summary, 'reference_eot_rate', 2)}; "
        f"distinct-2 policy {_with_ci(summary, 'policy_distinct_2_mean')}, reference "
        f"{_with_ci(summary, 'reference_distinct_2_mean')}; longest repeat policy "
        f"{_with_ci(summary, 'policy_longest_repeat_mean', 1)}, reference "
        f"{_with_ci(summary, 'reference_longest_repeat_mean', 1)} tokens",
    ]


def evaluation_report(metrics: Mapping[str, Mapping[str, Any]], summary: Mapping[str, Any] | None,
                      generations_df: pd.DataFrame | None, *, max_examples: int = 3) -> str:
    """A markdown evaluation report: one metrics table per eval set, the generation summary (the judge's validity
    beside its win rates, `comparison_lines`, then every number), a few examples."""
    lines = ["# Evaluation report", ""]
    for eval_set, values in metrics.items():
        lines += [f"## Preference metrics: `{eval_set}`", "", "| metric | value |", "|---|---|"]
        for key, value in values.items():
            shown = f"{value:.4f}" if isinstance(value, float) else str(value)
            lines.append(f"| {key} | {shown} |")
        lines.append("")
    if summary:
        lines += ["## Generation comparison (reference vs policy)", ""]
        lines += [f"- {line}" for line in comparison_lines(summary)]
        lines += ["", "| metric | value |", "|---|---|"]
        for key, value in summary.items():
            shown = f"{value:.4f}" if isinstance(value, float) else str(value)
            lines.append(f"| {key} | {shown} |")
        lines.append("")
    if generations_df is not None and len(generations_df):
        lines += [f"## Examples (first {min(max_examples, len(generations_df))} of {len(generations_df)})", ""]
        for _, row in generations_df.head(max_examples).iterrows():
            for col in generations_df.columns:
                text = str(row[col])
                if len(text) > 600:
                    text = text[:600] + " ..."
                lines.append(f"- **{col}**: {text}")
            lines.append("")
    return "\n".join(lines).rstrip() + "\n"


def git_commit(repo: Path = REPO_ROOT) -> str:
    """`git rev-parse HEAD` of the project checkout, or 'unknown' when it is not a git repository.

    Asked of `repo` whatever the caller's working directory, with git's repository-selecting variables (`GIT_DIR`,
    `GIT_WORK_TREE`, ... as a git hook or another tool may set them) removed, so it names this checkout's commit.
    """
    env = {k: v for k, v in os.environ.items() if not k.startswith("GIT_")}
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=repo, env=env, capture_output=True, text=True,
                             timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
    return out.stdout.strip() if out.returncode == 0 and out.stdout.strip() else "unknown"


def _head_lines(path: Path, n: int) -> tuple[list[str], int]:
    """The first n lines of a text file and its total line count (0, [] when the file does not exist)."""
    if not path.is_file():
        return [], 0
    first: list[str] = []
    total = 0
    with path.open(encoding="utf-8", errors="replace") as fh:
        for line in fh:
            if total < n:
                first.append(line.rstrip("\n"))
            total += 1
    return first, total


# ----------------------------------------------------------------------------------------------------------------------
# The tracker
# ----------------------------------------------------------------------------------------------------------------------


class RunTracker:
    """Logs one pipeline run to MLflow. Every method takes the run id explicitly and is safe to call again on a
    retried flow run (params are the same, the dataset is deduplicated, already-logged training steps are skipped,
    an identical generations table is not appended twice)."""

    def __init__(self, cfg: RunConfig, *, retry: RetryPolicy | None = None, uri: str | None = None) -> None:
        from mlflow import MlflowClient

        _quiet_http_retries()
        self.cfg = cfg
        self.uri = uri or tracking_uri(cfg)
        self.retry = retry or RetryPolicy()
        self.client = MlflowClient(tracking_uri=self.uri, registry_uri=self.uri)

    # -- plumbing ------------------------------------------------------------------------------------------------

    def call(self, what: str, fn: Callable[[], T]) -> T:
        """`fn()` (an MLflow call) under this tracker's retry policy; `what` names it in errors and warnings."""
        return self.retry.call(fn, uri=self.uri, what=what)

    def experiment_id(self, name: str | None = None) -> str:
        """The id of the configured experiment, created (with the state-folder artifact root by default) if absent."""
        from mlflow.exceptions import MlflowException

        name = name or self.cfg.registry.experiment
        experiment = self.call("get_experiment_by_name", lambda: self.client.get_experiment_by_name(name))
        if experiment is not None:
            if experiment.lifecycle_stage == "deleted":
                raise ValueError(
                    f"MLflow experiment '{name}' at {self.uri} is deleted; restore it (mlflow experiments restore) "
                    "or set registry.experiment to another name"
                )
            return experiment.experiment_id
        location = artifact_location(self.cfg, self.uri)
        try:
            return self.call("create_experiment",
                              lambda: self.client.create_experiment(name, artifact_location=location))
        except MlflowException as exc:  # created concurrently by another process
            if exc.error_code != "RESOURCE_ALREADY_EXISTS":
                raise
            return self.client.get_experiment_by_name(name).experiment_id

    def _log_batch(self, run_id: str, *, metrics=(), params=(), tags=()) -> None:
        from mlflow.entities import Param, RunTag

        params = [Param(k, v) for k, v in params]
        tags = [RunTag(k, v) for k, v in tags]
        metrics = list(metrics)
        for i in range(0, len(params), PARAMS_PER_BATCH):
            chunk = params[i : i + PARAMS_PER_BATCH]
            self.call("log_batch(params)", lambda: self.client.log_batch(run_id, params=chunk))
        for i in range(0, len(tags), PARAMS_PER_BATCH):
            chunk = tags[i : i + PARAMS_PER_BATCH]
            self.call("log_batch(tags)", lambda: self.client.log_batch(run_id, tags=chunk))
        for i in range(0, len(metrics), METRICS_PER_BATCH):
            chunk = metrics[i : i + METRICS_PER_BATCH]
            self.call("log_batch(metrics)", lambda: self.client.log_batch(run_id, metrics=chunk))

    def _log_text(self, run_id: str, text: str, artifact_file: str) -> None:
        self.call(f"log_text({artifact_file})", lambda: self.client.log_text(run_id, text, artifact_file))

    def set_tags(self, run_id: str, tags: Mapping[str, Any]) -> None:
        self._log_batch(run_id, tags=[(k, str(v)) for k, v in tags.items()])

    # -- lifecycle -------------------------------------------------------------------------------------------------

    def find_run(self, flow_run_id: str) -> str | None:
        """The run tagged with this Prefect flow run id (a retried flow run), or None."""
        experiment_id = self.experiment_id()
        runs = self.call(
            "search_runs",
            lambda: self.client.search_runs(
                [experiment_id], filter_string=f"tags.`prefect.flow_run_id` = '{flow_run_id}'", max_results=1,
                order_by=["attributes.start_time ASC"],
            ),
        )
        return runs[0].info.run_id if runs else None

    def start_run(self, cfg: RunConfig, *, flow_run_id: str, flow_run_name: str, prefect_ui_url: str | None = None,
                  device: str | None = None, parent_run_id: str | None = None) -> str:
        """One MLflow run per Prefect flow run: reuse the run tagged with `flow_run_id` if it exists (set back to
        RUNNING), else create it named `flow_run_name`; `parent_run_id` nests it under that run (a sweep's trial).
        Returns the MLflow run id."""
        if not flow_run_id or not str(flow_run_id).strip():
            raise ValueError("start_run needs a non-empty Prefect flow_run_id")
        if device is None:
            from dpo_core.models import pick_device

            device = str(pick_device(cfg.model).device)
        tags = {
            "prefect.flow_run_id": flow_run_id,
            "prefect.flow_run_name": flow_run_name,
            "prefect.flow_run_url": prefect_ui_url or "",
            "git_commit": (commit := git_commit()),
            "mlflow.source.git.commit": commit,
            "base_model": cfg.model.name_or_path,
            "device": device,
            "config_hash": cfg.config_hash(),
            **({"mlflow.parentRunId": parent_run_id} if parent_run_id else {}),
        }
        run_id = self.find_run(flow_run_id)
        if run_id is not None:
            log.info("reusing MLflow run %s for flow run %s", run_id, flow_run_id)
            self.call("update_run", lambda: self.client.update_run(run_id, status="RUNNING"))
        else:
            experiment_id = self.experiment_id()
            run = self.call(
                "create_run",
                lambda: self.client.create_run(experiment_id, run_name=flow_run_name, tags={"mlflow.runName":
                                                                                          flow_run_name}),
            )
            run_id = run.info.run_id
        self.set_tags(run_id, tags)
        return run_id

    def kill_if_running(self, flow_run_id: str) -> str | None:
        """Mark the MLflow run of a flow run that was killed `KILLED` if it is still `RUNNING`; its run id or None."""
        run_id = self.find_run(flow_run_id)
        if run_id is None:
            return None
        status = self.call("get_run", lambda: self.client.get_run(run_id).info.status)
        if status != "RUNNING":
            return None
        self.end_run(run_id, "KILLED")
        return run_id

    def end_run(self, run_id: str, status: str = "FINISHED") -> None:
        """Mark the run FINISHED, FAILED or KILLED."""
        if status not in RUN_STATUSES:
            raise ValueError(f"end_run status must be one of {RUN_STATUSES}, got {status!r}")
        self.call("set_terminated", lambda: self.client.set_terminated(run_id, status=status))

    # -- what gets logged ------------------------------------------------------------------------------------------

    def log_config(self, run_id: str, cfg: RunConfig) -> dict[str, str]:
        """All config fields as dotted params (batched by 100) + the resolved config as `config/resolved.yaml`."""
        tree = cfg.model_dump(mode="json")
        params = flatten_params(tree)
        self._log_batch(run_id, params=sorted(params.items()))
        self._log_text(run_id, yaml.safe_dump(tree, sort_keys=False), "config/resolved.yaml")
        return params

    def log_dataset(self, run_id: str, fingerprint: str, source: str, pairs_df: pd.DataFrame,
                    *, name: str = "preference-pairs", context: str = "training") -> None:
        """The canonical pairs as the run's dataset input (digest = the data fingerprint) + a `data.fingerprint` tag."""
        import mlflow.data
        from mlflow.entities import Dataset, DatasetInput, InputTag
        from mlflow.utils.mlflow_tags import MLFLOW_DATASET_CONTEXT

        if not fingerprint:
            raise ValueError("log_dataset needs the data fingerprint (got an empty string)")
        if not source.strip():
            log.warning("log_dataset: no data source given; the dataset input is recorded with source 'unspecified'")
            source = "unspecified"
        # nested columns (prompt: list of messages) are shown as JSON text; MLflow's schema inference needs scalars
        frame = pairs_df.copy()
        for col in frame.columns:
            if frame[col].map(lambda v: isinstance(v, (list, dict)) or hasattr(v, "tolist")).any():
                frame[col] = frame[col].map(lambda v: json.dumps(v.tolist() if hasattr(v, "tolist") else v,
                                                                 default=str))
        with warnings.catch_warnings():  # "source can be interpreted in multiple ways": a local path, as intended
            warnings.filterwarnings("ignore", message="The specified dataset source", category=UserWarning)
            dataset = mlflow.data.from_pandas(frame, source=source, name=name, digest=fingerprint)
        dataset_input = DatasetInput(dataset=Dataset(**dataset.to_dict()),
                                     tags=[InputTag(key=MLFLOW_DATASET_CONTEXT, value=context)])
        self.call("log_inputs", lambda: self.client.log_inputs(run_id, datasets=[dataset_input]))
        split_counts = pairs_df["split"].value_counts().to_dict() if "split" in pairs_df else {}
        self.set_tags(run_id, {"data.fingerprint": fingerprint, "data.source": source[:MAX_PARAM_VALUE],
                               "data.pairs": len(pairs_df),
                               **{f"data.pairs.{k}": v for k, v in sorted(split_counts.items())}})

    def log_data_report(self, run_id: str, report: Mapping[str, Any], quarantine_path: Path | str | None) -> None:
        """The ingest report as `data/report.json` and the first 50 quarantined rows as `data/quarantine_sample.jsonl`
        (with the total count as tag `data.quarantined_lines`)."""
        self.call("log_dict(report)", lambda: self.client.log_dict(run_id, _jsonable(report), "data/report.json"))
        if quarantine_path is None:
            return
        first, total = _head_lines(Path(quarantine_path), QUARANTINE_SAMPLE_LINES)
        self.set_tags(run_id, {"data.quarantined_lines": total})
        if first:  # plain JSONL (the first lines); the total count is the tag above
            self._log_text(run_id, "\n".join(first) + "\n", "data/quarantine_sample.jsonl")

    def logged_steps(self, run_id: str, key: str = "train/loss") -> set[int]:
        """Steps already logged for `key` on this run (so a re-logged history adds nothing twice)."""
        history = self.call("get_metric_history", lambda: self.client.get_metric_history(run_id, key))
        return {m.step for m in history}

    def log_training(self, run_id: str, history: Sequence[Mapping[str, Any]], history_offset: int | None = None,
                     *, curves: bool = True) -> int:
        """Every step's TRL metrics as `train/<name>` at step=record['step'] (log_batch, 1000 per call) + the curves
        PNG `training/curves.png`. `history_offset`: skip that many leading records (already logged); None: skip
        the steps this run already has for `train/loss`. Returns the number of metric values logged."""
        from mlflow.entities import Metric

        if history_offset is not None and history_offset < 0:
            raise ValueError(f"history_offset must be >= 0, got {history_offset}")
        records = list(history)
        if history_offset is not None:
            todo = records[history_offset:]
        else:
            done = self.logged_steps(run_id)
            todo = [r for r in records if r.get("step") not in done]
        now = int(time.time() * 1000)
        metrics = [Metric(key, value, now, step) for key, value, step in training_metric_rows(todo)]
        self._log_batch(run_id, metrics=metrics)
        if curves and records:
            from tracking.curves import plot_training_curves

            objective = self.cfg.train.objective_name()
            figure = plot_training_curves(records, loss_type=objective,
                                          title=f"DPO training ({objective}, beta={self.cfg.train.beta})")
            self.log_figure(run_id, figure, "training/curves.png")
        return len(metrics)

    def log_eval(self, run_id: str, metrics: Mapping[str, Mapping[str, Any]], generations_df: pd.DataFrame | None,
                 summary: Mapping[str, Any] | None, *, table_file: str = "generations.json",
                 step: int | None = None) -> dict[str, float]:
        """`eval/<set>/<metric>` metrics (nested dicts flattened, CI pairs as _low/_high), `eval/generation/<key>`
        from the comparison summary, the generation comparison as an MLflow table (`table_file`, one per stage)
        and `eval/report.md`. Returns the flat metrics logged."""
        from mlflow.entities import Metric

        flat: dict[str, float] = {}
        skipped: list[str] = []
        for eval_set, values in metrics.items():
            m, s = flatten_metrics(values, prefix=f"eval/{eval_set}/")
            flat.update(m)
            skipped += s
        if summary:
            m, s = flatten_metrics(summary, prefix="eval/generation/")
            flat.update(m)
            skipped += s
        if skipped:
            log.info("not logged as metrics (not numbers; they are in eval/report.md): %s", ", ".join(skipped))
        now = int(time.time() * 1000)
        self._log_batch(run_id, metrics=[Metric(k, v, now, step or 0) for k, v in sorted(flat.items())])
        if generations_df is not None and len(generations_df):
            self.log_table(run_id, generations_df, table_file)
        report = evaluation_report(metrics, summary, generations_df)
        self._log_text(run_id, report, "eval/report.md")
        if summary:
            self.call("log_dict(summary)", lambda: self.client.log_dict(run_id, _jsonable(summary),
                                                                         "eval/generation_summary.json"))
        return flat

    def log_metrics(self, run_id: str, metrics: Mapping[str, float], step: int = 0) -> None:
        """Plain `name -> number` metrics at `step` (non-numbers are a ValueError)."""
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        rows = []
        for key, value in metrics.items():
            number = as_number(value)
            if number is None:
                raise ValueError(f"metric '{key}' must be a number, got {value!r}")
            rows.append(Metric(key, number, now, step))
        self._log_batch(run_id, metrics=rows)

    def log_figure(self, run_id: str, figure: Any, artifact_file: str) -> None:
        """A matplotlib figure as a PNG artifact; the figure is closed afterwards."""
        import matplotlib.pyplot as plt

        try:
            self.call(f"log_figure({artifact_file})", lambda: self.client.log_figure(run_id, figure, artifact_file))
        finally:
            plt.close(figure)

    def log_table(self, run_id: str, df: pd.DataFrame, artifact_file: str) -> None:
        """A table artifact the MLflow UI shows (`artifact_file` ends in .json). MLflow's log_table appends to an
        existing table file: on a retried run, the same rows are not appended again."""
        frame = df.copy()
        for col in frame.columns:  # token-id lists and message lists -> JSON text (the table viewer shows strings)
            if frame[col].map(lambda v: isinstance(v, (list, dict)) or hasattr(v, "tolist")).any():
                frame[col] = frame[col].map(lambda v: json.dumps(v.tolist() if hasattr(v, "tolist") else v,
                                                                 default=str))
        existing = self.call("list_artifacts", lambda: self.client.list_artifacts(run_id))
        if any(a.path == artifact_file for a in existing):
            with tempfile.TemporaryDirectory() as tmp:
                local = self.call("download_artifacts",
                                   lambda: self.client.download_artifacts(run_id, artifact_file, tmp))
                payload = json.loads(Path(local).read_text())
            if payload.get("columns") == list(frame.columns) and len(payload.get("data", [])) >= len(frame):
                log.info("table %s already logged on run %s; not appending it again", artifact_file, run_id)
                return
        self.call(f"log_table({artifact_file})", lambda: self.client.log_table(run_id, frame, artifact_file))

    def log_timings(self, run_id: str, seconds: Mapping[str, float], tokens_per_second: float | None = None) -> None:
        """`time/<stage>_s` per stage (and `time/total_s`) + `tokens_per_second` when given."""
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        metrics = []
        for stage, value in seconds.items():
            number = as_number(value)
            if number is None or number < 0:
                raise ValueError(f"timing for stage '{stage}' must be a non-negative number, got {value!r}")
            metrics.append(Metric(f"time/{stage}_s", number, now, 0))
        if seconds:
            metrics.append(Metric("time/total_s", float(sum(float(v) for v in seconds.values())), now, 0))
        if tokens_per_second is not None:
            metrics.append(Metric("tokens_per_second", float(tokens_per_second), now, 0))
        self._log_batch(run_id, metrics=metrics)


def _jsonable(obj: Any) -> Any:
    """A JSON-safe copy (numpy scalars -> python, NaN -> None, tuples -> lists)."""
    if isinstance(obj, Mapping):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if hasattr(obj, "item") and callable(obj.item):
        try:
            obj = obj.item()
        except (ValueError, TypeError):
            return str(obj)
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, (str, int, float, bool)) or obj is None:
        return obj
    return str(obj)
