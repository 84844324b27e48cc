"""The `dpo` Prefect flow: materialise -> (champion) -> ingest -> template -> reference -> judge -> train -> evaluate |
compare -> (champion scores) -> register.

Run it locally (ephemeral Prefect, no server needed):

    python -m flows.dpo --config configs/default.yaml [--set train.beta=0.2 --set train.max_steps=10]

or as a deployment after `make up`: `prefect deployment run dpo/full`. Every stage is cached by content (see
tasks/artifacts.py): running the flow again after a crash returns completed stages as `Cached` and training
resumes from its newest checkpoint.

With the registry on, the flow looks up the champion first: when tonight's eval split differs from the gate set
stored with it, ingest runs again with the champion's pairs as the eval split (they never train); the champion is
scored on the gate pairs beside the candidate (the promotion gate); with `registry.skip_unchanged` a run whose
selected train pairs and config were already trained ends before loading any model. A failed run leaves a one-line
`failure-reason` artifact and its MLflow run FAILED (`on_failure` hook). README "Scheduled retraining".
"""

from __future__ import annotations

import os
from pathlib import Path


def _default_prefect_env() -> None:
    """Keep Prefect's results (and the ephemeral server's database) under the project's state folder, not in ~.

    Must run before `prefect` is imported. Explicit environment settings (tests, `make up`) win.
    """
    state = Path(os.environ.get("DPO_STATE_DIR") or ".dpo_state").resolve()
    os.environ.setdefault("PREFECT_RESULTS_LOCAL_STORAGE_PATH", str(state / "prefect" / "results"))
    if not os.environ.get("PREFECT_API_URL"):
        os.environ.setdefault("PREFECT_HOME", str(state / "prefect" / "home"))
        Path(os.environ["PREFECT_HOME"]).mkdir(parents=True, exist_ok=True)  # Prefect does not create parents
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    # a fresh ephemeral server migrates its database first: on a busy 2-core machine that can exceed the 20 s default
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "180")
    os.environ.setdefault("PREFECT_LOGGING_LEVEL", "INFO")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


_default_prefect_env()

import json  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from typing import Any  # noqa: E402

from prefect import flow, get_run_logger  # noqa: E402
from prefect.context import get_run_context  # noqa: E402
from prefect.artifacts import MarkdownArtifact, create_markdown_artifact, create_table_artifact  # noqa: E402

from dpo_core.config import RunConfig  # noqa: E402
from flows.preflight import cli_parser, load_checked_config, preflight, run_cli  # noqa: E402
from tasks.artifacts import needs_refresh  # noqa: E402
from tasks.champion import (  # noqa: E402
    champion_lookup,
    champion_model_stage,
    champion_scores_key,
    champion_scores_stage,
    pinned_gate_id,
    pinned_gate_stage,
    trained_before,
)
from tasks.common import preload_for_threads  # noqa: E402
from tasks.compare import compare_key, compare_stage  # noqa: E402
from tasks.evaluate import evaluate_key, evaluate_stage  # noqa: E402
from tasks.ingest import ingest_key, ingest_stage  # noqa: E402
from tasks.materialize import materialize_model  # noqa: E402
from tasks.reference import reference_key, reference_stage  # noqa: E402
from tasks.register import mark_failed, register_stage  # noqa: E402
from tasks.run_ledger import crash_prefect_flow_run, reap_killed, record_end, record_start  # noqa: E402
from tasks.judge import judge_data_config, judge_key, judge_stage  # noqa: E402
from tasks.reports import comparison_lines, comparison_markdown, data_report_markdown, generations_rows  # noqa: E402
from tasks.reports import judge_markdown, metrics_rows  # noqa: E402
from tasks.template import template_key, template_stage  # noqa: E402
from tasks.train import train_key, train_stage  # noqa: E402


def _configured(task: Any, cfg: RunConfig, stage: str, key: str | None, timeout: float | None) -> Any:
    """The task with its per-stage timeout, and a cache refresh when the artifact behind its key has gone."""
    options: dict[str, Any] = {"timeout_seconds": timeout}
    if key is not None and needs_refresh(cfg, stage, key):
        options["refresh_cache"] = True
    return task.with_options(**options)


def _run(task: Any, _states: dict[str, str], _times: dict[str, float], _name: str, **params: Any) -> Any:
    """Run one stage, record its final state name (Completed / Cached) and wall time; re-raise its failure."""
    started = time.perf_counter()
    state = task(**params, return_state=True)
    _times[_name] = round(time.perf_counter() - started, 3)
    _states[_name] = state.name
    return state.result()  # raises the stage's own exception when it failed


def _config_of(flow_run: Any) -> RunConfig | None:
    """The run's config rebuilt from its parameters (None when they do not make a valid config)."""
    params = flow_run.parameters or {}
    try:
        if params.get("config"):
            return RunConfig.model_validate(params["config"])
        return load_checked_config(params.get("config_path", "configs/default.yaml"), params.get("overrides") or [])
    except (OSError, ValueError):
        return None


def failure_reason(state: Any) -> str:
    """One line saying why a run failed: the exception's type and first line, else the state's message."""
    try:
        state.result()
    except BaseException as exc:  # noqa: BLE001 - reporting it, not handling it
        text = (str(exc).strip().splitlines() or [""])[0]
        return f"{type(exc).__name__}: {text}"[:500] if text else type(exc).__name__
    return (state.message or state.name or "failed").strip().splitlines()[0][:500]


def report_failure(flow: Any, flow_run: Any, state: Any) -> None:
    """`on_failure` hook: a `failure-reason` markdown artifact on the flow run and its MLflow run marked FAILED
    (created when the run failed before registration opened one). Never raises: a hook's own error must not hide
    the run's. Prefect automations can match this run's `prefect.flow-run.Failed` event (README "Scheduled
    retraining")."""
    reason = failure_reason(state)
    try:
        MarkdownArtifact(markdown=f"**Failed**: {reason}", key="failure-reason", description=reason,
                         flow_run_id=flow_run.id).create()
    except Exception as exc:  # noqa: BLE001
        print(f"could not publish the failure-reason artifact: {exc}", file=sys.stderr)
    cfg = _config_of(flow_run)
    if cfg is None or not cfg.registry.enabled:
        return
    try:
        mark_failed(cfg, flow_run_id=str(flow_run.id), flow_run_name=str(flow_run.name), reason=reason)
    except Exception as exc:  # noqa: BLE001 - MLflow may be what failed
        print(f"could not mark the MLflow run of flow run {flow_run.id} FAILED: {exc}", file=sys.stderr)


@flow(name="dpo", log_prints=True, on_failure=[report_failure])
def dpo(
    config_path: str | None = "configs/default.yaml",
    overrides: list[str] | None = None,
    config: RunConfig | None = None,
) -> dict[str, Any]:
    """Align a chat model with preference data by DPO (arXiv 2305.18290), end to end.

    Args:
        config_path: a YAML config (relative paths resolve against the working directory).
        overrides: dotted `section.key=value` overrides applied on top, e.g. `["train.beta=0.2"]`.
        config: a full typed config; when given, `config_path` and `overrides` are ignored.

    Raises a UserError (config, data or model path) before any stage runs when flows.preflight finds one.
    """
    cfg = config if config is not None else load_checked_config(config_path, overrides)
    preflight(cfg)
    flow_run_id = str(get_run_context().flow_run.id)
    _close_killed_runs(cfg, flow_run_id)
    entry = record_start(cfg.resolved_state_dir(), flow_run_id)  # dropped below; left behind only by a killed run
    try:
        return {**_stages(cfg), "flow_run_id": flow_run_id}
    finally:
        record_end(entry)


def _close_killed_runs(cfg: RunConfig, flow_run_id: str) -> None:
    """Mark earlier flow runs of this host whose process was killed `Crashed` (Prefect) / `KILLED` (MLflow)."""
    logger = get_run_logger()
    tracker = None

    def kill_mlflow_run(killed: str) -> None:
        nonlocal tracker
        if cfg.registry.enabled:
            from tracking.tracker import RunTracker

            tracker = tracker or RunTracker(cfg)
            tracker.kill_if_running(killed)

    for killed in reap_killed(cfg.resolved_state_dir(), current_flow_run_id=flow_run_id, kill_mlflow_run=kill_mlflow_run,
                              crash_flow_run=lambda killed: crash_prefect_flow_run(killed, closed_by=flow_run_id),
                              warn=logger.warning):
        logger.warning("flow run %s was killed without reporting its end: marked Crashed (and its MLflow run, if any, "
                       "KILLED)", killed)


def _ingested(cfg: RunConfig, stages: dict[str, str], timings: dict[str, float], gate: dict | None = None,
              name: str = "ingest") -> dict[str, Any]:
    """The ingest stage (with the champion's pinned eval pairs when `gate` is given); returns its manifest."""
    return _run(_configured(ingest_stage, cfg, "ingest", ingest_key(cfg, gate), cfg.timeouts.ingest), stages, timings,
                name, cfg=cfg, gate=gate)


def _tokenized(cfg: RunConfig, stages: dict[str, str], timings: dict[str, float], model: dict,
               pairs: dict) -> tuple[dict, dict]:
    """template -> reference on `model` (the base model, or the champion it starts from); returns both manifests."""
    t = cfg.timeouts
    create_markdown_artifact(markdown=data_report_markdown(pairs), key="data-report",
                             description="rows read, accepted, quarantined per reason, duplicates, splits")
    tokenized = _run(_configured(template_stage, cfg, "template", template_key(cfg, model, pairs), t.template),
                     stages, timings, "template", cfg=cfg, model=model, pairs=pairs)
    reference = _run(
        _configured(reference_stage, cfg, "reference", reference_key(cfg, model, tokenized), t.reference),
        stages, timings, "reference", cfg=cfg, model=model, tokenized=tokenized,
    )
    return tokenized, reference


def upstream_stages(cfg: RunConfig, stages: dict[str, str], timings: dict[str, float]) -> tuple[dict, ...]:
    """materialize -> ingest -> template -> reference: the stages a sweep's trials share. Returns their manifests
    (model, pairs, tokenized, reference); records each stage's state name and wall time."""
    model = _run(_configured(materialize_model, cfg, "materialize", None, cfg.timeouts.materialize), stages, timings,
                 "materialize", cfg=cfg)
    pairs = _ingested(cfg, stages, timings)
    return (model, pairs, *_tokenized(cfg, stages, timings, model, pairs))


def judge_stage_run(cfg: RunConfig, stages: dict[str, str], timings: dict[str, float],
                    pairs: dict[str, Any]) -> dict[str, Any]:
    """The judge stage (trained or loaded, then measured on the eval split); returns its manifest. It trains on every
    accepted train pair, not only the `data.max_train_pairs` DPO trains on: with that cap set, it gets an ingest
    without it."""
    judge_pairs = pairs
    if cfg.data.max_train_pairs is not None:
        judge_cfg = judge_data_config(cfg)
        judge_pairs = _run(_configured(ingest_stage, judge_cfg, "ingest", ingest_key(judge_cfg), cfg.timeouts.ingest),
                           stages, timings, "ingest-judge", cfg=judge_cfg)
    judge = _run(_configured(judge_stage, cfg, "judge", judge_key(cfg, judge_pairs), cfg.timeouts.judge), stages,
                 timings, "judge", cfg=cfg, pairs=judge_pairs)
    create_markdown_artifact(markdown=judge_markdown(judge), key="judge-validity",
                             description="the judge's own accuracy on held-out pairs, with its CI")
    return judge


def train_stage_run(cfg: RunConfig, stages: dict[str, str], timings: dict[str, float], model: dict,
                    tokenized: dict, reference: dict) -> dict[str, Any]:
    """The train stage on the upstream manifests; returns its manifest."""
    return _run(
        _configured(train_stage, cfg, "train", train_key(cfg, model, tokenized, reference), cfg.timeouts.train),
        stages, timings, "train", cfg=cfg, model=model, tokenized=tokenized, reference=reference,
    )


def _stages(cfg: RunConfig) -> dict[str, Any]:
    """The stages of the flow, in order; returns the run's summary."""
    logger = get_run_logger()
    t = cfg.timeouts
    stages: dict[str, str] = {}
    timings: dict[str, float] = {}

    base = _run(_configured(materialize_model, cfg, "materialize", None, t.materialize), stages, timings,
                "materialize", cfg=cfg)
    champion, registry_up = None, cfg.registry.enabled
    if cfg.registry.enabled:
        try:
            champion = _run(champion_lookup.with_options(timeout_seconds=t.registry), stages, timings, "champion",
                            cfg=cfg)
        except ConnectionError as exc:  # MLflow unreachable (after its retries): compute now, register on a re-run
            registry_up = False
            logger.warning("no champion lookup (%s): the gate set is not pinned, nothing-new is not checked, the "
                           "stages run and registration fails until MLflow is back", exc)
    pairs = _ingested(cfg, stages, timings)
    pinned_id = pinned_gate_id(champion) if champion is not None else None
    if cfg.registry.gate_set is None and pinned_id and pinned_id != pairs["gate_set_id"]:
        # the eval split drifted from the one stored with the champion: ingest again with that one pinned
        gate = _run(pinned_gate_stage.with_options(timeout_seconds=t.registry), stages, timings, "gate-set",
                    cfg=cfg, champion=champion)
        pairs = _ingested(cfg, stages, timings, gate, name="ingest-pinned")
    if registry_up and cfg.registry.skip_unchanged:
        same = _run(trained_before.with_options(timeout_seconds=t.registry), stages, timings, "trained-before",
                    cfg=cfg, pairs=pairs)
        if same is not None:
            return _nothing_new(cfg, pairs, same, stages, timings)

    # the policy starts from the base model, or from the champion (which is then its reference too)
    model = base
    if cfg.model.init_from == "champion":
        if champion is None:
            logger.info("model.init_from=champion: no champion yet, starting from %s", cfg.model.name_or_path)
        else:
            model = _run(champion_model_stage.with_options(timeout_seconds=t.registry), stages, timings,
                         "champion-model", cfg=cfg, champion=champion)
    tokenized, reference = _tokenized(cfg, stages, timings, model, pairs)
    judge = judge_stage_run(cfg, stages, timings, pairs) if cfg.eval.n_generations > 0 else None
    # the gate scores candidate and champion against the base model's log-probs on the gate pairs
    gate_reference = reference
    if model is not base:
        split = pairs["gate_split"]
        gate_reference = _run(
            _configured(reference_stage, cfg, "reference", reference_key(cfg, base, tokenized, split), t.reference),
            stages, timings, "gate-reference", cfg=cfg, model=base, tokenized=tokenized, only_split=split,
        )
    trained = train_stage_run(cfg, stages, timings, model, tokenized, reference)
    logger.info("training: %s steps (resumed from step %s)", trained["steps"], trained.get("resumed_from_step"))

    # evaluation and the generation comparison are independent: run them concurrently
    started = time.perf_counter()
    preload_for_threads(cfg.eval.judge.kind if cfg.eval.n_generations > 0 else None)
    evaluate_gate = gate_reference if gate_reference is not reference else None
    evaluate = _configured(evaluate_stage, cfg, "evaluate",
                           evaluate_key(cfg, trained, tokenized, reference, evaluate_gate, pairs["gate_split"]),
                           t.evaluate)
    eval_future = evaluate.submit(cfg=cfg, trained=trained, tokenized=tokenized, reference=reference,
                                  gate_reference=evaluate_gate, gate_split=pairs["gate_split"])
    compare_future = None
    if cfg.eval.n_generations > 0:
        compare = _configured(compare_stage, cfg, "compare", compare_key(cfg, base, pairs, trained, judge),
                              t.compare)
        compare_future = compare.submit(cfg=cfg, model=base, pairs=pairs, trained=trained, judge=judge)
    eval_future.wait()
    stages["evaluate"] = eval_future.state.name
    metrics = eval_future.result()
    comparison = None
    if compare_future is not None:
        compare_future.wait()
        stages["compare"] = compare_future.state.name
        comparison = compare_future.result()
    timings["evaluate_compare"] = round(time.perf_counter() - started, 3)

    create_table_artifact(table=metrics_rows(metrics), key="eval-metrics",
                          description="held-out preference metrics, policy vs reference")
    if comparison is not None:
        create_markdown_artifact(markdown=comparison_markdown(comparison["summary"]), key="generation-summary",
                                 description="win rates with CIs, beside the judge's own validity")
        create_table_artifact(table=generations_rows(comparison), key="generation-comparison",
                              description="reference vs policy answers on held-out prompts, with judge scores")

    registration = champion_scores = None
    if champion is not None:  # the champion, scored on the same gate pairs as the candidate
        champion_model = model if model is not base else _run(
            champion_model_stage.with_options(timeout_seconds=t.registry), stages, timings, "champion-model",
            cfg=cfg, champion=champion)
        key = champion_scores_key(cfg, champion_model, base, pairs, tokenized, gate_reference, judge)
        champion_scores = _run(_configured(champion_scores_stage, cfg, "champion-scores", key, t.evaluate), stages,
                               timings, "champion-scores", cfg=cfg, champion_model=champion_model, base_model=base,
                               pairs=pairs, tokenized=tokenized, gate_reference=gate_reference, judge=judge)
    if cfg.registry.enabled:
        registration = _run(
            register_stage.with_options(timeout_seconds=t.registry), stages, timings, "register",
            cfg=cfg, model=model, pairs=pairs, tokenized=tokenized, reference=reference, trained=trained,
            metrics=metrics, comparison=comparison, timings=timings, champion=champion,
            champion_scores=champion_scores,
        )
    summary = {
        "stages": stages,
        "timings_s": timings,
        "data_fingerprint": pairs["fingerprint"],
        "train_fingerprint": pairs["train_fingerprint"],
        "pairs": pairs["report"]["pairs"],
        "pairs_path": str(Path(pairs["path"]) / pairs["pairs_file"]),
        "skipped": None,
        "train": {k: trained.get(k) for k in ("steps", "resumed_from_step", "tokens", "train_seconds", "path",
                                              "selected_step", "validation")},
        "metrics": metrics["metrics"],
        "unpaired_metrics": metrics.get("unpaired_metrics", []),
        "judge": {"name": judge["name"], **judge["validity"]} if judge else None,
        "comparison": comparison["summary"] if comparison else None,
        "registration": registration,
    }
    logger.info("stages: %s", json.dumps(stages))
    return summary


def _nothing_new(cfg: RunConfig, pairs: dict[str, Any], version: dict[str, Any], stages: dict[str, str],
                 timings: dict[str, float]) -> dict[str, Any]:
    """End the run: nothing new to learn (a message, a `nothing-new` artifact, no model loaded, no version)."""
    n_train = pairs["report"]["pairs"].get("train", 0)
    role = "the champion" if version["champion"] else "not promoted"
    message = (f"Nothing new: the {n_train} selected train pairs (train fingerprint {pairs['train_fingerprint']}) "
               f"and the config ({cfg.config_hash()}) are those {version['name']} v{version['version']} ({role}) was "
               "trained on; no training, no new version.")
    get_run_logger().info(message)
    create_markdown_artifact(markdown=f"# Nothing new\n\n{message}\n", key="nothing-new", description=message)
    return {"stages": stages, "timings_s": timings, "data_fingerprint": pairs["fingerprint"],
            "train_fingerprint": pairs["train_fingerprint"], "pairs": pairs["report"]["pairs"],
            "pairs_path": str(Path(pairs["path"]) / pairs["pairs_file"]), "skipped": message, "train": None,
            "metrics": [], "comparison": None, "registration": None}


def _print_summary(summary: dict[str, Any]) -> None:
    print("\n== dpo flow finished ==")
    if summary.get("skipped"):
        print(f"  {summary['skipped']}")
    timings = summary["timings_s"]
    for stage, state in summary["stages"].items():
        if stage in ("evaluate", "compare"):  # they run concurrently: one wall time for both
            print(f"  {stage:<12} {state:<10} {timings.get('evaluate_compare', 0):8.1f} s (evaluate + compare)")
        else:
            print(f"  {stage:<12} {state:<10} {timings.get(stage, 0):8.1f} s")
    print(f"  {'total':<23} {sum(timings.values()):8.1f} s")
    for row in summary["metrics"]:
        print(
            f"  eval[{row.get('eval_set')}]: reward accuracy {row.get('reward_accuracy', float('nan')):.3f} "
            f"(CI {row.get('reward_accuracy_ci_low', float('nan')):.2f}-{row.get('reward_accuracy_ci_high', float('nan')):.2f}), "
            f"margin {row.get('margin_mean', float('nan')):.4f}, "
            f"reference's own accuracy {row.get('reference_accuracy', float('nan')):.3f}"
        )
    for row in summary.get("unpaired_metrics", []):
        print(f"  eval[{row['eval_set']}] (unpaired): reward sign agrees with the label on "
              f"{row['sign_accuracy']:.3f} of {row['n_rows']} rows (CI {row['sign_accuracy_ci_low']:.2f}-"
              f"{row['sign_accuracy_ci_high']:.2f}); mean reward desirable {row['desirable_reward_mean']}, "
              f"undesirable {row['undesirable_reward_mean']}")
    if summary.get("comparison"):
        for line in comparison_lines(summary["comparison"]):
            print(f"  {line}")
    if summary.get("registration"):
        r = summary["registration"]
        print(f"  registered {r.get('name')} v{r.get('version')} (champion: {r.get('champion_version')}); "
              f"MLflow run {r.get('run_url') or r.get('run_id')}")


def main(argv: list[str] | None = None) -> int:
    args = cli_parser("python -m flows.dpo", __doc__.splitlines()[0], "configs/default.yaml", "YAML config",
                      "override one config key, e.g. --set train.beta=0.2 (repeatable)",
                      "on a config, data or model-path error, print the traceback above the one-line message",
                      ).parse_args(argv)

    def run() -> dict[str, Any]:
        preflight(load_checked_config(args.config, args.overrides))  # before Prefect starts
        return dpo(config_path=args.config, overrides=args.overrides)

    code, summary = run_cli(run, debug=args.debug)
    if code == 0:
        _print_summary(summary)
    return code


if __name__ == "__main__":
    sys.exit(main())
