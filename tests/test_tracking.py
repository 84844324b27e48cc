"""MLflow tracking against a temporary SQLite store: run lifecycle, params, dataset, metrics, tables, retries."""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

from dpo_core.config import RunConfig, load_config
from tracking.curves import ema, plot_training_curves, save_training_curves
from tracking.retry import RetryPolicy, TrackingUnavailable
from tracking.tracker import (
    MAX_PARAM_VALUE,
    RunTracker,
    artifact_location,
    flatten_metrics,
    git_commit,
    flatten_params,
    tracking_uri,
    training_metric_rows,
)

FAST = RetryPolicy(tries=2, base_delay=0.0, max_delay=0.0)


@pytest.fixture(scope="module")
def state_dir(tmp_path_factory):
    """One SQLite store for the module (creating MLflow's schema takes seconds); each test has its own run."""
    return tmp_path_factory.mktemp("tracking") / "state"


@pytest.fixture()
def cfg(state_dir, monkeypatch) -> RunConfig:
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    return load_config(overrides={"state_dir": str(state_dir), "registry.experiment": "dpo-test"})


@pytest.fixture()
def tracker(cfg) -> RunTracker:
    return RunTracker(cfg, retry=FAST)


@pytest.fixture()
def run_id(tracker, cfg, request) -> str:
    flow_run_id = f"fr-{request.node.name}"
    return tracker.start_run(cfg, flow_run_id=flow_run_id, flow_run_name="brave-otter",
                             prefect_ui_url=f"http://ui/{flow_run_id}", device="cpu")


def _history(n: int, start: int = 1) -> list[dict]:
    rng = np.random.default_rng(0)
    return [
        {
            "step": s,
            "epoch": s / n,
            "loss": float(0.69 - 0.01 * s + rng.normal(0, 0.01)),
            "rewards/chosen": 0.01 * s,
            "rewards/rejected": -0.01 * s,
            "rewards/accuracies": float(rng.uniform(0.4, 1.0)),
            "rewards/margins": 0.02 * s,
            "logps/chosen": -50.0 + s,
            "logps/rejected": -55.0 - s,
            "grad_norm": 1.5,
            "learning_rate": 1e-5,
            "tokens_per_second": 80.0,
        }
        for s in range(start, start + n)
    ]


def test_tracking_uri_precedence(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    cfg = load_config(overrides={"state_dir": str(tmp_path)})
    assert tracking_uri(cfg) == f"sqlite:///{tmp_path.resolve()}/mlflow/mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5000")
    assert tracking_uri(cfg) == "http://127.0.0.1:5000"
    cfg = load_config(overrides={"state_dir": str(tmp_path), "registry.tracking_uri": f"sqlite:///{tmp_path}/o.db"})
    assert tracking_uri(cfg) == f"sqlite:///{tmp_path}/o.db"
    assert artifact_location(cfg, tracking_uri(cfg)) == (tmp_path / "artifacts").resolve().as_uri()
    assert artifact_location(cfg, "http://127.0.0.1:5000") is None  # the server decides


def test_flatten_params_dotted_json_and_cut():
    params = flatten_params({"train": {"beta": 0.1, "lora": None, "mods": ["q", "v"]}, "long": "x" * 2000, "e": {}})
    assert params["train.beta"] == "0.1"
    assert params["train.lora"] == "null"
    assert params["train.mods"] == '["q", "v"]'
    assert params["e"] == "{}"
    assert len(params["long"]) == MAX_PARAM_VALUE and params["long"].endswith("...[2000 chars]")


def test_flatten_metrics_nested_ci_and_skipped():
    flat, skipped = flatten_metrics({"acc": 0.7, "ci": (0.6, 0.8), "n": np.int64(64), "sub": {"x": 1}, "name": "t",
                                     "ok": True}, prefix="eval/test/")
    assert flat == {"eval/test/acc": 0.7, "eval/test/ci_low": 0.6, "eval/test/ci_high": 0.8, "eval/test/n": 64.0,
                    "eval/test/sub/x": 1.0}
    assert sorted(skipped) == ["eval/test/name", "eval/test/ok"]


REPO = Path(__file__).resolve().parents[1]


@pytest.mark.skipif(not (REPO / ".git").exists(), reason="not run from a git checkout")
def test_git_commit_is_this_checkouts_head_from_any_working_directory(tmp_path, monkeypatch):
    clean_env = {k: v for k, v in os.environ.items() if not k.startswith("GIT_")}
    head = subprocess.run(["git", "-C", str(REPO), "log", "-1", "--format=%H"], env=clean_env, capture_output=True,
                          text=True, check=True).stdout.strip()
    assert re.fullmatch(r"[0-9a-f]{40}", head), head
    monkeypatch.chdir(tmp_path)  # not a git repository
    monkeypatch.setenv("GIT_DIR", str(tmp_path))  # as a git hook would set it: must not redirect the lookup
    assert git_commit() == head


def test_start_run_tags_and_reuse_on_retried_flow_run(tracker, cfg, run_id, state_dir):
    run = tracker.client.get_run(run_id)
    assert run.info.run_name == "brave-otter"
    tags = run.data.tags
    fr = "fr-test_start_run_tags_and_reuse_on_retried_flow_run"
    assert tags["prefect.flow_run_id"] == fr
    assert tags["prefect.flow_run_url"] == f"http://ui/{fr}"
    assert tags["base_model"] == cfg.model.name_or_path
    assert tags["device"] == "cpu"
    assert tags["git_commit"] == tags["mlflow.source.git.commit"] == git_commit()
    experiment = tracker.client.get_experiment(run.info.experiment_id)
    assert experiment.name == "dpo-test"
    assert experiment.artifact_location == (state_dir / "mlflow" / "artifacts").resolve().as_uri()

    tracker.end_run(run_id, "FAILED")
    again = tracker.start_run(cfg, flow_run_id=fr, flow_run_name="brave-otter", device="cpu")
    assert again == run_id
    assert tracker.client.get_run(run_id).info.status == "RUNNING"
    other = tracker.start_run(cfg, flow_run_id=f"{fr}-2", flow_run_name="calm-heron", device="cpu")
    assert other != run_id
    tracker.end_run(run_id, "FINISHED")
    assert tracker.client.get_run(run_id).info.status == "FINISHED"
    with pytest.raises(ValueError, match="end_run status"):
        tracker.end_run(run_id, "DONE")


def test_log_config_all_params_batched_and_yaml(tracker, cfg, run_id):
    cfg.train.beta = 0.25
    params = tracker.log_config(run_id, cfg)
    logged = tracker.client.get_run(run_id).data.params
    assert logged == params
    assert logged["train.beta"] == "0.25"
    assert "data.train" in logged and "registry.model_name" in logged
    path = tracker.client.download_artifacts(run_id, "config/resolved.yaml")
    with open(path) as fh:
        assert yaml.safe_load(fh) == cfg.model_dump(mode="json")
    tracker.log_config(run_id, cfg)  # the same values again (a retried flow run) is fine


def test_log_config_batches_over_100_params(tracker, cfg, run_id):
    cfg.data.extra_eval = {f"set{i:03d}": {"path": f"data/x{i}.jsonl"} for i in range(30)}  # 30 x 5 more params
    params = tracker.log_config(run_id, cfg)
    assert len(params) > 100
    assert len(tracker.client.get_run(run_id).data.params) == len(params)


def test_log_dataset_digest_is_fingerprint(tracker, run_id):
    pairs = pd.DataFrame({
        "pair_id": ["a", "b"],
        "prompt": [[{"role": "user", "content": "hi"}], [{"role": "user", "content": "yo"}]],
        "chosen": ["c1", "c2"], "rejected": ["r1", "r2"], "source": ["s", "s"], "meta": ["{}", "{}"],
        "split": ["train", "eval"],
    })
    tracker.log_dataset(run_id, "fp0123456789abcd", "data/ultrafeedback/train.jsonl", pairs)
    run = tracker.client.get_run(run_id)
    [inp] = run.inputs.dataset_inputs
    assert inp.dataset.digest == "fp0123456789abcd"
    assert inp.dataset.name == "preference-pairs"
    assert {t.key: t.value for t in inp.tags}["mlflow.data.context"] == "training"
    assert run.data.tags["data.fingerprint"] == "fp0123456789abcd"
    assert run.data.tags["data.pairs.train"] == "1"
    with pytest.raises(ValueError, match="fingerprint"):
        tracker.log_dataset(run_id, "", "x", pairs)


def test_log_data_report_and_quarantine_sample(tracker, run_id, tmp_path):
    quarantine = tmp_path / "quarantine.jsonl"
    quarantine.write_text("".join(json.dumps({"row": i, "reason": "empty chosen"}) + "\n" for i in range(120)))
    tracker.log_data_report(run_id, {"read": 1000, "accepted": 880, "quarantined": 120}, quarantine)
    report = json.loads(Path(tracker.client.download_artifacts(run_id, "data/report.json")).read_text())
    assert report["quarantined"] == 120
    sample = Path(tracker.client.download_artifacts(run_id, "data/quarantine_sample.jsonl")).read_text().splitlines()
    assert len(sample) == 50 and json.loads(sample[0])["row"] == 0
    assert tracker.client.get_run(run_id).data.tags["data.quarantined_lines"] == "120"


def test_log_training_every_step_idempotent_with_curves(tracker, run_id):
    history = _history(12)
    assert tracker.log_training(run_id, history[:5]) == 5 * 11
    assert tracker.log_training(run_id, history) == 7 * 11  # auto: skips the 5 steps already logged
    assert tracker.log_training(run_id, history) == 0
    losses = tracker.client.get_metric_history(run_id, "train/loss")
    assert sorted(m.step for m in losses) == list(range(1, 13))
    assert {m.step: m.value for m in losses}[3] == pytest.approx(history[2]["loss"])
    metrics = tracker.client.get_run(run_id).data.metrics
    for name in ("rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins", "logps/chosen",
                 "logps/rejected", "grad_norm", "learning_rate", "tokens_per_second", "epoch"):
        assert f"train/{name}" in metrics
    png = tracker.client.download_artifacts(run_id, "training/curves.png")
    assert Path(png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # explicit offset: the caller says how many leading records are already logged
    assert tracker.log_training(run_id, _history(3, start=13), history_offset=1, curves=False) == 2 * 11
    assert len(tracker.client.get_metric_history(run_id, "train/loss")) == 14
    with pytest.raises(ValueError, match="integer 'step'"):
        tracker.log_training(run_id, [{"loss": 0.5}], history_offset=0)


def test_validation_scored_during_training_keeps_its_val_names():
    rows = training_metric_rows([{"step": 4, "loss": 0.6, "val/loss": 0.65, "val/rewards/accuracies": 0.5}])
    assert sorted(rows) == [("train/loss", 0.6, 4), ("val/loss", 0.65, 4), ("val/rewards/accuracies", 0.5, 4)]


def test_log_eval_metrics_table_report(tracker, run_id):
    metrics = {"test": {"reward_accuracy": 0.66, "reward_accuracy_ci_low": 0.55, "n_pairs": 64, "eval_set": "test"},
               "hh_harmless": {"reward_accuracy": 0.51}}
    generations = pd.DataFrame({
        "prompt": ["Say hi", "Count to 3"], "reference": ["hello", "1 2 3"], "policy": ["hi!", "1, 2, 3"],
        "judge_winner": ["policy", "tie"], "policy_tokens": [[1, 2], [3]],
    })
    summary = {"judge": "bradley-terry(test)", "judge_validity": 0.61, "judge_validity_ci_low": 0.54,
               "judge_validity_ci_high": 0.68, "judge_validated": True, "win_rate": 0.75, "win_rate_ci_low": 0.5,
               "win_rate_ci_high": 1.0, "lc_win_rate": 0.6, "lc_win_rate_ci_low": 0.4, "lc_win_rate_ci_high": 0.8,
               "n_prompts": 2, "length_ratio": 1.1, "confidence": 0.95}
    flat = tracker.log_eval(run_id, metrics, generations, summary)
    logged = tracker.client.get_run(run_id).data.metrics
    assert logged["eval/test/reward_accuracy"] == pytest.approx(0.66)
    assert logged["eval/hh_harmless/reward_accuracy"] == pytest.approx(0.51)
    assert logged["eval/generation/win_rate"] == pytest.approx(0.75)
    # the judge's own validity is logged beside the win rate it produced
    assert logged["eval/generation/judge_validity"] == pytest.approx(0.61)
    assert logged["eval/generation/judge_validity_ci_low"] == pytest.approx(0.54)
    assert logged["eval/generation/lc_win_rate_ci_high"] == pytest.approx(0.8)
    assert "eval/test/eval_set" not in flat
    table = json.loads(Path(tracker.client.download_artifacts(run_id, "generations.json")).read_text())
    assert table["columns"] == list(generations.columns) and len(table["data"]) == 2
    report = Path(tracker.client.download_artifacts(run_id, "eval/report.md")).read_text()
    assert "reward_accuracy | 0.6600" in report and "win_rate | 0.7500" in report and "Say hi" in report
    assert "judge: bradley-terry(test); validity 0.610 (CI 0.540-0.680) (validated)" in report
    assert "win rate 0.750 (CI 0.500-1.000) over 2 prompts" in report and "length-controlled 0.600" in report
    tracker.log_eval(run_id, metrics, generations, summary)  # a retried flow run does not append the rows again
    table = json.loads(Path(tracker.client.download_artifacts(run_id, "generations.json")).read_text())
    assert len(table["data"]) == 2


def test_log_timings(tracker, run_id):
    tracker.log_timings(run_id, {"reference": 420.5, "train": 840.0}, tokens_per_second=81.5)
    metrics = tracker.client.get_run(run_id).data.metrics
    assert metrics["time/reference_s"] == 420.5 and metrics["time/total_s"] == 1260.5
    assert metrics["tokens_per_second"] == 81.5
    with pytest.raises(ValueError, match="stage 'train'"):
        tracker.log_timings(run_id, {"train": -1})


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_unreachable_server_retries_then_names_the_uri(cfg, monkeypatch):
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "2")
    uri = f"http://127.0.0.1:{_closed_port()}"
    cfg.registry.tracking_uri = uri
    sleeps: list[float] = []
    tracker = RunTracker(cfg, retry=RetryPolicy(tries=4, base_delay=1.0, max_delay=3.0, sleep=sleeps.append))
    t0 = time.monotonic()
    with pytest.raises(TrackingUnavailable, match=uri) as info:
        tracker.start_run(cfg, flow_run_id="fr-x", flow_run_name="x", device="cpu")
    assert time.monotonic() - t0 < 30
    assert "\n" not in str(info.value) and "4 times" in str(info.value)
    assert sleeps == [1.0, 2.0, 3.0]  # exponential backoff, capped


def test_retry_recovers_and_does_not_retry_bad_input():
    from mlflow.exceptions import MlflowException

    calls = []

    def flaky():
        calls.append(1)
        if len(calls) < 3:
            raise MlflowException("database is locked")  # INTERNAL_ERROR: transient
        return "ok"

    assert RetryPolicy(tries=4, base_delay=0.0).call(flaky, uri="sqlite:///x", what="flaky") == "ok"
    assert len(calls) == 3
    bad = []

    def invalid():
        bad.append(1)
        raise MlflowException.invalid_parameter_value("bad param")

    with pytest.raises(MlflowException, match="bad param"):
        RetryPolicy(tries=4, base_delay=0.0).call(invalid, uri="sqlite:///x", what="invalid")
    assert len(bad) == 1
    with pytest.raises(ValueError, match="tries"):
        RetryPolicy(tries=0)


def test_ema_and_curves_figure(tmp_path):
    assert ema([1.0, 1.0, 1.0], 0.9) == pytest.approx([1.0, 1.0, 1.0])  # bias-corrected: no warm-up dip
    assert ema([0.0, 1.0], 0.0) == [0.0, 1.0]
    smoothed = ema([1.0, float("nan"), 3.0], 0.5)
    assert np.isnan(smoothed[1]) and smoothed[2] == pytest.approx((0.25 * 1 + 0.5 * 3) / 0.75)
    fig = plot_training_curves(_history(20))
    titles = [ax.get_title() for ax in fig.axes]
    assert titles == ["Loss", "Reward accuracy", "Reward margin", "Implicit rewards"]
    assert all(ax.get_xlabel() == "optimizer step" and ax.get_ylabel() for ax in fig.axes)
    labels = [line.get_label() for line in fig.axes[3].get_lines()]
    assert "chosen (raw)" in labels and "rejected (raw)" in labels and any("EMA" in x for x in labels)
    sigmoid_fig = plot_training_curves(_history(3), loss_type="sigmoid")
    assert any("ln 2" in line.get_label() for line in sigmoid_fig.axes[0].get_lines())
    assert not any("ln 2" in line.get_label() for line in fig.axes[0].get_lines())  # only meaningful for sigmoid DPO
    scored = [{**r, "val/loss": r["loss"] + 0.05} if r["step"] % 5 == 0 else r for r in _history(20)]
    val_line = next(line for line in plot_training_curves(scored).axes[0].get_lines()
                    if line.get_label() == "loss (validation)")
    assert list(val_line.get_xdata()) == [5, 10, 15, 20]
    out = save_training_curves(_history(3), tmp_path / "c" / "curves.png")
    assert out.read_bytes()[:4] == b"\x89PNG"
    with pytest.raises(ValueError, match="at least one"):
        plot_training_curves([])
