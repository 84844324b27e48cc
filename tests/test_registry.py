"""Model registry against a temporary SQLite store: log + register the tiny Llama, load it back through
`models:/dpo-policy@champion`, the promotion gate, idempotent re-registration."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest

from dpo_core.config import RunConfig, load_config
from tracking.registry import (
    ACCURACY_METRIC,
    CANDIDATE,
    CHAMPION,
    TAG_DECISION,
    WIN_RATE_METRIC,
    evaluation_set_id,
    promotion_decision,
    register_policy,
)
from tracking.retry import RetryPolicy, TrackingUnavailable
from tracking.tracker import RunTracker

FAST = RetryPolicy(tries=2, base_delay=0.0, max_delay=0.0)


@pytest.fixture()
def cfg(tmp_path, monkeypatch) -> RunConfig:
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    return load_config(overrides={"state_dir": str(tmp_path / "state"), "registry.promotion_tolerance": 0.02})


def _gate(candidate, champion, eval_sets=("e1", "e1")):
    return promotion_decision(candidate, champion, tolerance=0.02, candidate_eval_set=eval_sets[0],
                              champion_eval_set=eval_sets[1], champion_version="1" if champion else None)


def test_promotion_gate_rules():
    acc, win = ACCURACY_METRIC, WIN_RATE_METRIC
    assert _gate({acc: 0.5}, None)["promote"] is True
    better = _gate({acc: 0.70, win: 0.60}, {acc: 0.66, win: 0.55})
    assert better["promote"] is True and better["checks"][acc]["delta"] == pytest.approx(0.04)
    within = _gate({acc: 0.65, win: 0.54}, {acc: 0.66, win: 0.55})  # worse, but by less than the tolerance
    assert within["promote"] is True
    worse_win = _gate({acc: 0.70, win: 0.50}, {acc: 0.66, win: 0.55})
    assert worse_win["promote"] is False and worse_win["checks"][win]["passed"] is False
    assert "champion remains v1" in worse_win["reason"]
    no_win = _gate({acc: 0.67}, {acc: 0.66, win: 0.55})
    assert no_win["promote"] is True and f"{win} not compared (missing on the candidate)" in no_win["reason"]
    no_champion_acc = _gate({acc: 0.9, win: 0.9}, {win: 0.1})
    assert no_champion_acc["promote"] is False and "has no 'eval_reward_accuracy'" in no_champion_acc["reason"]
    other_set = _gate({acc: 0.9, win: 0.9}, {acc: 0.66, win: 0.55}, eval_sets=("e2", "e1"))
    assert other_set["promote"] is False and "another eval set" in other_set["reason"]
    with pytest.raises(ValueError, match="lack"):
        _gate({win: 0.9}, None)


def test_evaluation_set_id_tracks_the_eval_set_only(cfg):
    base = evaluation_set_id(cfg)
    cfg.train.beta = 0.5
    assert evaluation_set_id(cfg) == base
    cfg.data.max_eval_pairs = 10
    assert evaluation_set_id(cfg) != base


def test_bad_inputs_fail_before_mlflow(cfg, tiny_model_dir, tmp_path):
    kw = dict(run_id="r", fingerprint="fp", config_hash="h", flow_run_id="f")
    with pytest.raises(FileNotFoundError, match="no config.json"):
        register_policy(cfg, model_dir=tmp_path, metrics={ACCURACY_METRIC: 0.5}, **kw)
    with pytest.raises(ValueError, match="finite number"):
        register_policy(cfg, model_dir=tiny_model_dir, metrics={ACCURACY_METRIC: float("nan")}, **kw)
    with pytest.raises(ValueError, match="lack 'eval_reward_accuracy'"):
        register_policy(cfg, model_dir=tiny_model_dir, metrics={WIN_RATE_METRIC: 0.5}, **kw)
    assert not (tmp_path / "state" / "mlflow").exists()


def test_unreachable_tracking_server_names_the_uri(cfg, tiny_model_dir, monkeypatch):
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "2")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cfg.registry.tracking_uri = f"http://127.0.0.1:{port}"
    with pytest.raises(TrackingUnavailable, match=f"http://127.0.0.1:{port}"):
        register_policy(cfg, run_id="r", model_dir=tiny_model_dir, metrics={ACCURACY_METRIC: 0.5}, fingerprint="fp",
                        config_hash="h", flow_run_id="f", retry=FAST)


def test_register_load_back_promote_and_reuse(cfg, tiny_model_dir):
    import mlflow

    tracker = RunTracker(cfg, retry=FAST)
    client = tracker.client
    name = cfg.registry.model_name

    def register(run_id, config_hash, acc, win):
        return register_policy(cfg, run_id=run_id, model_dir=tiny_model_dir,
                               metrics={ACCURACY_METRIC: acc, WIN_RATE_METRIC: win, "eval_margin": 0.1},
                               fingerprint="fp-data-1", config_hash=config_hash, flow_run_id=f"fr-{config_hash}",
                               tracker=tracker)

    run1 = tracker.start_run(cfg, flow_run_id="fr-h1", flow_run_name="first", device="cpu")
    first = register(run1, "h1", 0.60, 0.50)
    assert (first.version, first.promoted, first.champion_version, first.reused) == ("1", True, "1", False)
    assert first.decision["reason"] == "first version: no champion yet"
    mv = client.get_model_version(name, "1")
    assert mv.tags["data_fingerprint"] == "fp-data-1" and mv.tags["config_hash"] == "h1"
    assert mv.tags["base_model"] == cfg.model.name_or_path and mv.tags["flow_run_id"] == "fr-h1"
    assert float(mv.tags[f"metric.{ACCURACY_METRIC}"]) == 0.60 and mv.tags["metric.eval_margin"] == "0.1"
    assert mv.tags[TAG_DECISION] == "promoted"
    assert mv.run_id == run1
    assert client.get_run(run1).data.tags["registry.promoted"] == "true"

    # load back through the alias: a transformers pipeline and a pyfunc chat model, both generate
    uri = f"models:/{name}@{CHAMPION}"
    mlflow.set_tracking_uri(tracker.uri)
    mlflow.set_registry_uri(tracker.uri)
    try:
        pipe = mlflow.transformers.load_model(uri)
        out = pipe("Hello", max_new_tokens=4, do_sample=False)
        assert out[0]["generated_text"].startswith("Hello") and len(out[0]["generated_text"]) > len("Hello")
        chat = mlflow.pyfunc.load_model(uri)
        [reply] = chat.predict({"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4})
        assert reply["choices"][0]["message"]["role"] == "assistant"
        assert reply["usage"]["completion_tokens"] == 4
    finally:
        mlflow.set_tracking_uri(None)
        mlflow.set_registry_uri(None)
        os.environ.pop("MLFLOW_REGISTRY_URI", None)

    # a worse version (accuracy 0.10 below, tolerance 0.02) stays candidate
    run2 = tracker.start_run(cfg, flow_run_id="fr-h2", flow_run_name="second", device="cpu")
    worse = register(run2, "h2", 0.50, 0.50)
    assert (worse.version, worse.promoted, worse.champion_version) == ("2", False, "1")
    assert str(client.get_model_version_by_alias(name, CANDIDATE).version) == "2"
    assert str(client.get_model_version_by_alias(name, CHAMPION).version) == "1"
    decision = client.download_artifacts(run2, "registry/decision-v2.json")
    assert '"promote": false' in Path(decision).read_text()

    # a better one becomes champion
    better = register(run2, "h3", 0.62, 0.55)
    assert (better.version, better.promoted, better.champion_version) == ("3", True, "3")
    assert str(client.get_model_version_by_alias(name, CHAMPION).version) == "3"

    # re-registering the same config hash + data fingerprint returns the same version, no new one
    run3 = tracker.start_run(cfg, flow_run_id="fr-rerun", flow_run_name="cached-rerun", device="cpu")
    again = register(run3, "h3", 0.62, 0.55)
    assert (again.version, again.reused, again.promoted) == ("3", True, True)
    assert client.get_run(run3).data.tags["registry.reused"] == "true"
    assert again.decision["promote"] is True
    assert len(client.search_model_versions(f"name='{name}'")) == 3

    # a registration that stopped before the gate (no decision tag) is finished, not duplicated
    client.delete_model_version_tag(name, "2", TAG_DECISION)
    resumed = register(run2, "h2", 0.50, 0.50)
    assert (resumed.version, resumed.reused, resumed.promoted, resumed.champion_version) == ("2", False, False, "3")
    assert client.get_model_version(name, "2").tags[TAG_DECISION] == "candidate"
    assert len(client.search_model_versions(f"name='{name}'")) == 3
    assert str(client.get_model_version_by_alias(name, CANDIDATE).version) == "3"  # not moved back to the older one


@pytest.mark.slow
def test_real_smollm2_registers_and_chats_through_champion(cfg, smollm2_dir):
    """The embedded SmolLM2-135M-Instruct (its own chat template) through the chat task and back via @champion."""
    import mlflow

    tracker = RunTracker(cfg, retry=FAST)
    run_id = tracker.start_run(cfg, flow_run_id="fr-real", flow_run_name="real", device="cpu")
    result = register_policy(cfg, run_id=run_id, model_dir=smollm2_dir, metrics={ACCURACY_METRIC: 0.6},
                             fingerprint="fp", config_hash="h-real", flow_run_id="fr-real", tracker=tracker)
    assert (result.version, result.promoted) == ("1", True)
    mlflow.set_tracking_uri(tracker.uri)
    mlflow.set_registry_uri(tracker.uri)
    try:
        chat = mlflow.pyfunc.load_model(f"models:/{cfg.registry.model_name}@{CHAMPION}")
        [reply] = chat.predict({"messages": [{"role": "user", "content": "What is the capital of France?"}],
                                "max_tokens": 8})
    finally:
        mlflow.set_tracking_uri(None)
        mlflow.set_registry_uri(None)
        os.environ.pop("MLFLOW_REGISTRY_URI", None)
    message = reply["choices"][0]["message"]
    assert message["role"] == "assistant" and message["content"].strip()
    assert reply["usage"]["prompt_tokens"] > 10  # the chat template wrapped the question (system + user turns)


def test_registry_calls_restore_the_process_wide_mlflow_uris(tmp_path, monkeypatch):
    """`_mlflow_uris` points MLflow's globals at the run's store for one call, then puts back what was there."""
    import mlflow

    from tracking.registry import _mlflow_uris

    store = f"sqlite:///{tmp_path / 'mlflow.db'}"
    for name in ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI"):
        monkeypatch.delenv(name, raising=False)
    try:
        mlflow.set_tracking_uri(None)
        mlflow.set_registry_uri(None)
        with _mlflow_uris(store):
            assert mlflow.get_tracking_uri() == store and mlflow.get_registry_uri() == store
        assert not mlflow.is_tracking_uri_set()  # unset stays unset
        assert "MLFLOW_TRACKING_URI" not in os.environ and "MLFLOW_REGISTRY_URI" not in os.environ

        user_tracking, user_registry = "http://127.0.0.1:5999", f"sqlite:///{tmp_path / 'registry.db'}"
        monkeypatch.setenv("MLFLOW_TRACKING_URI", user_tracking)
        mlflow.set_registry_uri(user_registry)
        with _mlflow_uris(store):
            assert mlflow.get_tracking_uri() == store and mlflow.get_registry_uri() == store
        assert mlflow.get_tracking_uri() == user_tracking and os.environ["MLFLOW_TRACKING_URI"] == user_tracking
        assert mlflow.get_registry_uri() == user_registry and os.environ["MLFLOW_REGISTRY_URI"] == user_registry
    finally:
        mlflow.set_tracking_uri(None)
        mlflow.set_registry_uri(None)
        os.environ.pop("MLFLOW_REGISTRY_URI", None)
