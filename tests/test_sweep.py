"""Sweeps: the sweep file and its trials (pure), and the `dpo-sweep` flow on a tiny model under
`prefect_test_harness`: a 2x2 grid reuses the upstream artifacts, writes nested MLflow runs, picks its winner by
validation only (the test split is scored for the winner alone), and a failing trial is recorded while the sweep
goes on."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from pydantic import ValidationError

from dpo_core.sweep import SweepSettings, SweepSpec, base_config, load_sweep, pick_winner, plan_trials, trial_config

REPO = Path(__file__).resolve().parents[1]


# ----------------------------------------------------------------------------------------------------- the plan


def test_grid_is_every_combination_first_key_slowest():
    trials = plan_trials(SweepSettings(params={"train.beta": [0.1, 0.2], "train.loss": ["sigmoid", "ipo", "hinge"]}))
    assert [t.params for t in trials] == [
        {"train.beta": b, "train.loss": loss} for b in (0.1, 0.2) for loss in ("sigmoid", "ipo", "hinge")]
    assert [t.name for t in trials] == [f"trial-{i}" for i in range(6)] and trials[5].index == 5


def test_random_search_is_seeded_distinct_and_in_range():
    settings = SweepSettings(method="random", trials=12, seed=7, params={
        "train.learning_rate": {"low": 1e-6, "high": 1e-4, "log": True}, "train.loss": ["sigmoid", "ipo"]})
    trials = plan_trials(settings)
    assert [t.params for t in trials] == [t.params for t in plan_trials(settings)]  # same seed, same trials
    assert [t.params for t in trials] != [t.params for t in plan_trials(settings.model_copy(update={"seed": 8}))]
    assert len(trials) == 12 and len({json.dumps(t.params, sort_keys=True) for t in trials}) == 12
    rates = [t.params["train.learning_rate"] for t in trials]
    assert all(1e-6 <= r <= 1e-4 for r in rates) and min(rates) < 1e-5 < max(rates)  # log-uniform spreads decades
    assert {t.params["train.loss"] for t in trials} == {"sigmoid", "ipo"}
    # a small discrete space holds fewer distinct trials than asked for: each appears once
    small = plan_trials(SweepSettings(method="random", trials=5, params={"train.beta": [0.1, 0.2]}))
    assert sorted(t.params["train.beta"] for t in small) == [0.1, 0.2]


@pytest.mark.parametrize("settings, message", [
    ({"params": {}}, "sweep.params is empty"),
    ({"params": {"beta": [0.1]}}, "section.key"),
    ({"params": {"train.beta": []}}, "lists no values"),
    ({"params": {"train.beta": {"low": 0.1, "high": 0.5}}}, "a grid needs a list"),
    ({"method": "random", "params": {"train.beta": [0.1]}}, "needs sweep.trials"),
    ({"method": "random", "trials": 2, "params": {"train.beta": {"low": 0.5, "high": 0.1}}}, "low < high"),
    ({"params": {"train.beta": [0.1]}, "metric": "eval/reward_accuracy"}, "'val/rewards/accuracies'"),
])
def test_bad_sweep_settings_are_one_clear_error(settings, message):
    with pytest.raises(ValidationError, match=message):
        SweepSettings(**settings)


def test_load_sweep_routes_set_items_and_builds_trial_configs(tmp_path):
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump({"config": str(REPO / "configs/default.yaml"),
                                    "overrides": ["data.validation_fraction=0.1"],
                                    "sweep": {"params": {"train.beta": [0.1, 0.2]}}}))
    spec = load_sweep(path, ["sweep.concurrency=3", "sweep.params.train.learning_rate=[1.0e-6, 2.0e-6]",
                             "train.epochs=2"])
    assert spec.sweep.concurrency == 3 and spec.overrides == ["data.validation_fraction=0.1", "train.epochs=2"]
    trials = plan_trials(spec.sweep)
    assert len(trials) == 4
    cfg = trial_config(spec, trials[3])
    assert (cfg.train.beta, cfg.train.learning_rate, cfg.train.epochs) == (0.2, 2e-6, 2)
    assert cfg.data.validation_fraction == 0.1
    # the shipped sweep file loads and plans
    shipped = load_sweep(REPO / "configs/sweep.yaml")
    assert base_config(shipped).train.select == "best_val" and len(plan_trials(shipped.sweep)) == 3
    with pytest.raises(ValueError, match="picks its winner on the validation split"):
        base_config(spec.model_copy(update={"overrides": ["data.validation_fraction=0", "train.eval_every=null",
                                                          "train.select=last"]}))
    with pytest.raises(FileNotFoundError, match="sweep file not found"):
        load_sweep(tmp_path / "missing.yaml")


def test_winner_by_validation_metric_only():
    def rec(i, acc, loss, status="completed"):
        return {"index": i, "status": status, "validation": {"val/rewards/accuracies": acc, "val/loss": loss}}

    records = [rec(0, 0.5, 0.60), rec(1, 0.75, 0.70), rec(2, 0.75, 0.65), rec(3, 0.9, 0.1, "failed"),
               {"index": 4, "status": "failed", "error": "boom"}]
    assert pick_winner(records, "val/rewards/accuracies")["index"] == 1  # tie 0.75: the earlier trial
    assert pick_winner(records, "val/loss")["index"] == 0  # lower is better; the failed trial never wins
    assert pick_winner([records[4]], "val/loss") is None


# ----------------------------------------------------------------------------------------------------- the flow


def _tiny_run_config(tmp_path: Path, tiny_model_dir: Path) -> Path:
    """A run config on the tiny Llama and 16 shipped pairs: eval and validation both hashed from them."""
    lines = (REPO / "data/ultrafeedback_binarized_sample/train.jsonl").read_text().splitlines()[:16]
    data = tmp_path / "pairs.jsonl"
    data.write_text("\n".join(lines) + "\n")
    state = tmp_path / "state"
    cfg = {
        "model": {"name_or_path": str(tiny_model_dir)},
        "data": {"train": [{"path": str(data)}], "eval": None, "eval_fraction": 0.25, "validation_fraction": 0.3},
        "template": {"max_length": 64, "max_prompt_length": 32},
        "train": {"batch_size": 2, "max_steps": 3, "checkpoint_every": 1, "warmup_ratio": 0.0, "eval_every": 1,
                  "select": "best_val"},
        "eval": {"batch_size": 4, "bootstrap_samples": 50, "n_generations": 2, "generation_batch_size": 2,
                 "max_new_tokens": 8},
        "registry": {"experiment": "test-sweep", "model_name": "test-sweep-policy",
                     "tracking_uri": f"sqlite:///{state / 'mlflow.db'}"},
        "state_dir": str(state),
    }
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def _children(client, experiment_id: str, parent_run_id: str) -> list:
    return client.search_runs([experiment_id], filter_string=f"tags.`mlflow.parentRunId` = '{parent_run_id}'")


@pytest.mark.timeout(1500)
def test_sweep_grid_reuses_upstream_picks_on_validation_and_records_a_failed_trial(harness, tiny_model_dir, tmp_path,
                                                                                     monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    from mlflow import MlflowClient

    from dpo_core.config import load_config
    from flows.sweep import dpo_sweep

    run_yaml = _tiny_run_config(tmp_path, tiny_model_dir)
    cfg = load_config(run_yaml)
    state = cfg.resolved_state_dir()
    spec = SweepSpec(config=str(run_yaml), sweep=SweepSettings(
        params={"train.learning_rate": [1e-3, 3e-3], "train.beta": [0.1, 0.5]}, concurrency=2))

    summary = dpo_sweep(spec=spec)

    # the shared stages ran once in the sweep; every trial found them Cached and trained its own model
    assert all(summary["upstream"][s] == "Completed" for s in ("ingest", "template", "reference"))
    records = summary["trials"]
    assert [r["status"] for r in records] == ["completed"] * 4
    for r in records:
        assert all(r["stages"][s] == "Cached" for s in ("ingest", "template", "reference")), r["stages"]
        assert r["stages"]["train"] == "Completed"
        assert set(r["validation"]) >= {"val/rewards/accuracies", "val/loss"} and 1 <= r["selected_step"] <= 3
    # the winner: the best validation accuracy, ties to the earlier trial
    best = max(r["validation"]["val/rewards/accuracies"] for r in records)
    expected = min(r["index"] for r in records if r["validation"]["val/rewards/accuracies"] == best)
    winner = summary["winner"]
    assert winner["index"] == expected
    # the test split was scored once, for the winner alone: one evaluate and one compare artifact, on its weights
    final = summary["final"]
    assert final["stages"]["train"] == "Cached" and final["train"]["path"] == winner["train_path"]
    assert len(list((state / "artifacts" / "evaluate").glob("[!.]*"))) == 1
    assert len(list((state / "artifacts" / "compare").glob("[!.]*"))) == 1
    assert len(list((state / "artifacts" / "train").glob("[!.]*"))) == 4
    assert final["registration"]["version"] is not None

    # MLflow: a parent run, one nested child per trial, the winner's test run nested too
    client = MlflowClient(tracking_uri=cfg.registry.tracking_uri)
    experiment_id = client.get_experiment_by_name("test-sweep").experiment_id
    parent = client.get_run(summary["parent_run_id"])
    assert parent.info.status == "FINISHED" and parent.data.tags["sweep.winner"] == winner["name"]
    children = _children(client, experiment_id, parent.info.run_id)
    trial_runs = {c.data.tags["sweep.trial"]: c for c in children if c.data.tags.get("sweep.role") == "trial"}
    assert sorted(trial_runs) == sorted(r["name"] for r in records)
    for r in records:
        run = trial_runs[r["name"]]
        assert run.info.status == "FINISHED" and run.data.params["train.beta"] == str(r["params"]["train.beta"])
        assert run.data.metrics["selected/val/rewards/accuracies"] == pytest.approx(
            r["validation"]["val/rewards/accuracies"])
        assert len(client.get_metric_history(run.info.run_id, "val/loss")) == 3  # scored after every step
    (test_run,) = [c for c in children if c.data.tags.get("sweep.role") == "test"]
    assert test_run.info.run_id == final["registration"]["run_id"]
    assert parent.data.metrics["test/eval/reward_accuracy"] == pytest.approx(final["metrics"][0]["reward_accuracy"])
    artifacts = {a.path for a in client.list_artifacts(parent.info.run_id, "sweep")}
    assert {"sweep/trials.json", "sweep/val_rewards_accuracies_vs_params.png", "sweep/plan.json"} <= artifacts
    table = json.loads(open(client.download_artifacts(parent.info.run_id, "sweep/trials.json")).read())
    assert len(table["data"]) == 4 and "train.learning_rate" in table["columns"]
    version = client.get_model_version_by_alias("test-sweep-policy", "candidate")
    assert str(version.version) == str(final["registration"]["version"]) and version.run_id == test_run.info.run_id

    # a trial that fails at run time (an attention kernel this machine lacks) is recorded; the sweep goes on
    failing = SweepSpec(config=str(run_yaml), overrides=["eval.n_generations=0"], sweep=SweepSettings(
        params={"model.attn_implementation": ["eager", "flash_attention_2"]}, concurrency=2))
    second = dpo_sweep(spec=failing)
    ok, bad = second["trials"]
    assert ok["status"] == "completed" and bad["status"] == "failed" and "flash" in bad["error"].lower()
    assert second["winner"]["index"] == 0 and second["table"][1]["error"] == bad["error"]
    failed_runs = [c for c in _children(client, experiment_id, second["parent_run_id"])
                   if c.data.tags.get("sweep.trial") == bad["name"]]
    assert [r.info.status for r in failed_runs] == ["FAILED"] and "flash" in failed_runs[0].data.tags["sweep.error"].lower()
    assert client.get_run(second["parent_run_id"]).data.tags["sweep.failed_trials"] == "1"


def test_sweep_cli_fails_fast_on_a_bad_sweep_file(tmp_path, capsys):
    from flows.sweep import main

    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump({"config": str(REPO / "configs/default.yaml"),
                                    "overrides": ["data.validation_fraction=0", "train.eval_every=null",
                                                  "train.select=last"],
                                    "sweep": {"params": {"train.beta": [0.1]}}}))
    assert main(["--config", str(path)]) == 2
    assert "picks its winner on the validation split" in capsys.readouterr().err
    assert main(["--config", str(path), "--set", "sweep.method=random"]) == 2
    assert "needs sweep.trials" in capsys.readouterr().err


def test_sweep_plot_has_a_panel_per_key_and_marks_the_winner():
    from tracking.curves import plot_sweep

    rows = [{"trial": i, "status": "completed", "train.learning_rate": lr, "train.loss": loss,
             "val/rewards/accuracies": acc}
            for i, (lr, loss, acc) in enumerate([(1e-6, "sigmoid", 0.5), (1e-4, "ipo", 0.7), (1e-5, "sigmoid", 0.6)])]
    rows.append({"trial": 3, "status": "failed", "train.learning_rate": 1e-3, "train.loss": "ipo",
                 "val/rewards/accuracies": None})
    fig = plot_sweep(rows, ["train.learning_rate", "train.loss"], "val/rewards/accuracies", winner=1)
    rate_ax, loss_ax = fig.axes
    assert rate_ax.get_xscale() == "log" and rate_ax.get_xlabel() == "train.learning_rate"
    assert [t.get_text() for t in loss_ax.get_xticklabels()] == ["sigmoid", "ipo"]
    winner_points = [c for c in rate_ax.collections if c.get_label() == "winner"]
    assert len(winner_points) == 1 and list(winner_points[0].get_offsets()[0]) == [1e-4, 0.7]
    assert "3 completed, 1 failed" in fig._suptitle.get_text()
