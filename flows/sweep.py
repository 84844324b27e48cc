"""The `dpo-sweep` Prefect flow: a grid or seeded random search over any config keys, chosen on validation only.

    python -m flows.sweep --config configs/sweep.yaml [--set sweep.concurrency=2 --set train.epochs=2]

or as a deployment after `make up`: `prefect deployment run dpo-sweep/sweep`. The sweep file is described in
`dpo_core/sweep.py`; `--set sweep.<field>=...` changes the sweep, any other `--set` every trial's run config.

1. The stages every trial shares (materialise, ingest, template, reference) run once for the base config.
2. Each trial is a `dpo-sweep-trial` subflow: the same stages (found `Cached`) and `train`, with its own nested
   MLflow run. Up to `sweep.concurrency` trials run at once, each in a worker process of its own (Prefect's
   `ProcessPoolTaskRunner`). A failed trial is recorded with its error; the others go on.
3. The winner is the trial with the best validation metric (`sweep.metric`); the test split plays no part.
4. Only the winner is scored on the eval (test) split, once: the `dpo` flow runs as a subflow on its config (its
   training is `Cached`), evaluates, compares generations and registers it as `candidate`; the promotion gate decides
   whether it becomes `champion`.
5. The parent MLflow run gets the comparison table, a plot of the validation metric against each swept key, the
   winner and its test-split numbers.
"""

# no `from __future__ import annotations` here: the trial task and flow travel to worker processes by value
# (cloudpickle), and Prefect validates their parameters from the annotations, which must then be the classes
# themselves rather than names to look up in this module

import contextlib
import importlib
import os
import sys
from collections.abc import Iterator
from typing import Any

# flows.dpo before prefect: importing it keeps Prefect's results and ephemeral database under the state folder
from flows.dpo import dpo, train_stage_run, upstream_stages

import yaml
from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE
from prefect.context import get_run_context
from prefect.futures import wait
from prefect.settings import PREFECT_API_URL
from prefect.task_runners import ProcessPoolTaskRunner

from dpo_core.config import RunConfig, UserError
from dpo_core.sweep import SweepSpec, Trial, base_config, load_sweep, pick_winner, plan_trials, trial_config
from flows.preflight import cli_parser, config_error_line, preflight, run_cli
from tasks.sweep import TrialRun, log_sweep, start_sweep_run


def load_checked_sweep(path: str, sets: list[str] | None = None,
                       spec: SweepSpec | None = None) -> tuple[SweepSpec, RunConfig, list[Trial]]:
    """The sweep (read from `path` with `sets` applied, unless `spec` is given), its base run config and its trials;
    any problem with the file, the base config, its model or its data as one UserError line."""
    try:
        spec = spec if spec is not None else load_sweep(path, sets)
        base = base_config(spec)
        trials = plan_trials(spec.sweep)
    except (OSError, ValueError, yaml.YAMLError) as exc:
        raise UserError(f"sweep {path}: {config_error_line(exc)}") from exc
    preflight(base)
    return spec, base, trials


@flow(name="dpo-sweep-trial", flow_run_name="{trial.name}", log_prints=True)
def sweep_trial(spec: SweepSpec, trial: Trial, parent_run_id: str | None = None) -> dict[str, Any]:
    """One trial: the shared stages (Cached) and training on the trial's config; returns its record (swept values,
    stage states, the selected step's validation metrics). Its MLflow run nests under `parent_run_id` when given."""
    record: dict[str, Any] = {"index": trial.index, "name": trial.name, "params": trial.params,
                              "status": "failed", "stages": {}, "timings": {}}
    run = TrialRun(base_config(spec), trial, parent_run_id) if parent_run_id else None
    if run is not None:
        record["run_id"] = run.run_id
    try:
        cfg = trial_config(spec, trial)
        model, pairs, tokenized, reference = upstream_stages(cfg, record["stages"], record["timings"])
        trained = train_stage_run(cfg, record["stages"], record["timings"], model, tokenized, reference)
        if run is not None:
            run.finished(cfg, trained)
    except BaseException as exc:
        if run is not None:
            run.failed(error_line(exc))
        raise
    record.update(status="completed", validation=trained["validation"], selected_step=trained["selected_step"],
                  steps=trained["steps"], train_seconds=trained.get("train_seconds"), train_path=trained["path"])
    return record


class TrialFailed(RuntimeError):
    """A trial's error as one line (any exception type becomes this one, so it always reaches the sweep intact)."""


@task(name="sweep-trial", task_run_name="{trial.name}", cache_policy=NO_CACHE)
def run_trial(spec: SweepSpec, trial: Trial, parent_run_id: str | None) -> dict[str, Any]:
    """A trial in a worker process of the sweep's process pool."""
    try:
        return sweep_trial(spec, trial, parent_run_id)
    except Exception as exc:
        raise TrialFailed(error_line(exc)) from None


def error_line(exc: BaseException) -> str:
    """`Type: first line of the message` (what a failed trial's record and MLflow run keep)."""
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0] if text else ''}".rstrip(": ")


@contextlib.contextmanager
def _workers_use_this_api() -> Iterator[None]:
    """Worker processes report to the Prefect API this flow uses. Without PREFECT_API_URL the flow runs on an
    ephemeral server that child processes would not find (each would start a server of its own): point them at it."""
    if PREFECT_API_URL.value():
        yield
        return
    os.environ["PREFECT_API_URL"] = str(get_run_context().client.api_url)
    try:
        yield
    finally:
        os.environ.pop("PREFECT_API_URL", None)


def _run_trials(spec: SweepSpec, trials: list[Trial], parent_run_id: str | None) -> list[dict[str, Any]]:
    """Every trial, at most `sweep.concurrency` at once; a failed one becomes a record with its error."""
    logger = get_run_logger()
    # the task from this module's canonical name, which worker processes import it by (a deployment loads this file
    # as `sweep`, `python -m flows.sweep` as `__main__`)
    trial_task = importlib.import_module("flows.sweep").run_trial
    with _workers_use_this_api(), ProcessPoolTaskRunner(max_workers=spec.sweep.concurrency) as runner:
        futures = [runner.submit(trial_task, {"spec": spec, "trial": t, "parent_run_id": parent_run_id})
                   for t in trials]
        wait(futures)
        records = []
        for trial, future in zip(trials, futures):
            try:
                records.append(future.result())
            except Exception as exc:  # the trial's TrialFailed, or a worker process that died
                error = str(exc) if isinstance(exc, TrialFailed) else error_line(exc)
                logger.warning("trial %s failed: %s", trial.name, error)
                records.append({"index": trial.index, "name": trial.name, "params": trial.params,
                                "status": "failed", "error": error, "stages": {}})
    return records


@flow(name="dpo-sweep", log_prints=True)
def dpo_sweep(
    config_path: str | None = "configs/sweep.yaml",
    overrides: list[str] | None = None,
    spec: SweepSpec | None = None,
) -> dict[str, Any]:
    """A hyperparameter sweep of the DPO pipeline, chosen on validation, the winner tested once and registered.

    Args:
        config_path: a sweep file (see `dpo_core/sweep.py`).
        overrides: `--set` items: `sweep.<field>=...` change the sweep, others every trial's run config.
        spec: a full typed sweep; when given, `config_path` and `overrides` are ignored.
    """
    logger = get_run_logger()
    spec, base, trials = load_checked_sweep(config_path, overrides or [], spec)
    logger.info("%d trials over %s, %d at a time; winner by %s on validation", len(trials),
                ", ".join(spec.sweep.params), spec.sweep.concurrency, spec.sweep.metric)
    tracker, parent_run_id = start_sweep_run(base, spec, trials) if base.registry.enabled else (None, None)
    try:
        shared: dict[str, str] = {}
        upstream_stages(base, shared, {})  # built once here: every trial finds them Cached
        records = _run_trials(spec, trials, parent_run_id)
        winner = pick_winner(records, spec.sweep.metric)
        final = None
        if winner is not None:
            logger.info("winner %s %s: %s = %.4f on validation", winner["name"], winner["params"],
                        spec.sweep.metric, winner["validation"][spec.sweep.metric])
            winner_trial = Trial(index=winner["index"], name=winner["name"], params=winner["params"])
            final = dpo(config=trial_config(spec, winner_trial))  # the test split, scored for the winner only
        rows = log_sweep(base, spec, parent_run_id, records, winner, final)
        if winner is None:
            errors = "; ".join(f"{r['name']}: {r.get('error')}" for r in records)
            raise RuntimeError(f"no trial of the sweep completed with {spec.sweep.metric}: {errors}"[:2000])
    except BaseException:
        if tracker is not None:
            tracker.end_run(parent_run_id, "FAILED")
        raise
    if tracker is not None:
        tracker.end_run(parent_run_id, "FINISHED")
    return {"upstream": shared, "trials": records, "table": rows, "winner": winner, "final": final,
            "parent_run_id": parent_run_id}


def _print_summary(summary: dict[str, Any], spec: SweepSpec) -> None:
    print("\n== dpo sweep finished ==")
    for row in summary["table"]:
        metric = spec.sweep.metric
        value = row.get(metric)
        shown = f"{value:.4f}" if isinstance(value, float) else "-"
        params = " ".join(f"{key}={row[key]}" for key in spec.sweep.params)
        flag = "  <- winner" if row["winner"] else ""
        print(f"  {row['name']:<10} {row['status']:<9} {metric} {shown:>8}  {params}{flag}"
              + (f"  ({row['error']})" if row["error"] else ""))
    final = summary.get("final") or {}
    for row in final.get("metrics", []):
        print(f"  winner on the test split [{row['eval_set']}]: reward accuracy {row['reward_accuracy']:.3f} "
              f"(CI {row['reward_accuracy_ci_low']:.2f}-{row['reward_accuracy_ci_high']:.2f})")
    registration = final.get("registration") or {}
    if registration:
        print(f"  registered {registration.get('name')} v{registration.get('version')} as candidate "
              f"(champion: v{registration.get('champion_version')})")


def main(argv: list[str] | None = None) -> int:
    args = cli_parser("python -m flows.sweep", __doc__.splitlines()[0], "configs/sweep.yaml", "sweep file",
                      "sweep.<field>=... changes the sweep; any other key every trial's config (repeatable)",
                      "on a sweep, config, data or model-path error, print the traceback above the message",
                      ).parse_args(argv)

    def run() -> tuple[Any, dict[str, Any]]:
        spec, _, _ = load_checked_sweep(args.config, args.overrides)  # before Prefect starts
        return spec, dpo_sweep(config_path=args.config, overrides=args.overrides)

    code, result = run_cli(run, debug=args.debug)
    if code == 0:
        _print_summary(result[1], result[0])
    return code


if __name__ == "__main__":
    sys.exit(main())
