"""Model registry against a temporary SQLite store: log + register the tiny Llama, load it back through
`models:/dpo-policy@champion` and as a Hugging Face folder, the head-to-head promotion gate, idempotent
re-registration."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from dpo_core.config import RunConfig, load_config
from tracking.registry import (
    ACCURACY_METRIC,
    CANDIDATE,
    CHAMPION,
    TAG_DECISION,
    WIN_RATE_METRIC,
    champion_info,
    download_model_version,
    gate_comparison,
    previous_version,
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


def _scores(correct: list[int], seed: int = 0) -> pd.DataFrame:
    """Gate scores where pair i's implicit reward accuracy is `correct[i]` (the same reference for every model)."""
    rng = np.random.default_rng(seed)
    n = len(correct)
    ref_c, ref_r = rng.normal(-50, 5, n), rng.normal(-50, 5, n)
    margin = np.where(np.asarray(correct) == 1, 1.0, -1.0)
    return pd.DataFrame({"pair_id": [f"{i:016x}" for i in range(n)], "policy_chosen_logps": ref_c + margin,
                         "policy_rejected_logps": ref_r - margin, "reference_chosen_logps": ref_c,
                         "reference_rejected_logps": ref_r})


def _gate(candidate: dict, champion: dict | None) -> dict:
    """A gate comparison result with the given numbers (a zero-width CI)."""
    paired = {k: {"difference": candidate[k] - champion[k], "ci_low": candidate[k] - champion[k],
                  "ci_high": candidate[k] - champion[k]} for k in candidate if champion and k in champion}
    return {"gate_set_id": "g1", "n_pairs": 64, "champion_version": "1" if champion else None,
            "candidate": candidate, "champion": champion, "paired": paired, "confidence": 0.95}


def test_gate_comparison_scores_both_models_on_the_same_pairs():
    candidate, champion = _scores([1, 1, 1, 0, 1, 1, 0, 1]), _scores([1, 0, 0, 0, 1, 0, 0, 1])
    judge_table = pd.DataFrame({"pair_id": candidate["pair_id"][:4], "policy_judge_score": [0.3, 0.1, 0.2, 0.0],
                                "reference_judge_score": [0.1, 0.1, 0.3, 0.1]})  # win, tie, loss, loss
    champion_judge = pd.DataFrame({"pair_id": candidate["pair_id"][:4][::-1], "judge_score": [0.0, 0.0, 0.2, 0.0]})
    gate = gate_comparison(candidate, champion.sample(frac=1.0, random_state=0), beta=0.1, champion_version="3",
                           gate_set_id="g", candidate_judge=judge_table, champion_judge=champion_judge,
                           bootstrap_samples=500)
    assert gate["candidate"] == {"accuracy": 0.75, "win_rate": pytest.approx(1.5 / 4)}
    # champion, aligned by pair id: loss, win, tie... its answers 0.0, 0.2, 0.0, 0.0 vs 0.1, 0.1, 0.3, 0.1
    assert gate["champion"] == {"accuracy": 0.375, "win_rate": pytest.approx(1.0 / 4)}
    acc = gate["paired"]["accuracy"]
    assert acc["difference"] == pytest.approx(0.375) and acc["ci_low"] <= 0.375 <= acc["ci_high"]
    assert gate["pair_ids"] == sorted(candidate["pair_id"]) and gate["n_prompts"] == 4
    with pytest.raises(ValueError, match="other pairs"):
        gate_comparison(candidate, champion.iloc[1:], beta=0.1, champion_version="3", gate_set_id="g")
    shifted = champion.assign(reference_chosen_logps=champion["reference_chosen_logps"] + 1)
    with pytest.raises(ValueError, match="other reference"):
        gate_comparison(candidate, shifted, beta=0.1, champion_version="3", gate_set_id="g")
    alone = gate_comparison(candidate, None, beta=0.1, champion_version=None, gate_set_id="g")
    assert alone["champion"] is None and alone["paired"] == {}


def test_promotion_gate_rules():
    tol = 0.02
    assert promotion_decision(_gate({"accuracy": 0.5}, None), tolerance=tol)["promote"] is True
    better = promotion_decision(_gate({"accuracy": 0.70, "win_rate": 0.60}, {"accuracy": 0.66, "win_rate": 0.55}),
                                tolerance=tol)
    assert better["promote"] is True and better["checks"]["accuracy"]["delta"] == pytest.approx(0.04)
    assert "0.7000 vs 0.6600" in better["reason"] and "CI" in better["reason"]
    within = promotion_decision(_gate({"accuracy": 0.65, "win_rate": 0.54}, {"accuracy": 0.66, "win_rate": 0.55}),
                                tolerance=tol)  # worse, but by less than the tolerance
    assert within["promote"] is True
    worse_win = promotion_decision(_gate({"accuracy": 0.70, "win_rate": 0.50}, {"accuracy": 0.66, "win_rate": 0.55}),
                                   tolerance=tol)
    assert worse_win["promote"] is False and worse_win["checks"]["win_rate"]["passed"] is False
    assert "champion remains v1" in worse_win["reason"]
    no_win = promotion_decision(_gate({"accuracy": 0.67}, {"accuracy": 0.66, "win_rate": 0.55}), tolerance=tol)
    assert no_win["promote"] is True and "win_rate not compared" in no_win["reason"]


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


def test_register_load_back_promote_and_reuse(cfg, tiny_model_dir, tmp_path):
    import mlflow

    tracker = RunTracker(cfg, retry=FAST)
    client = tracker.client
    name = cfg.registry.model_name
    assert champion_info(cfg, tracker) is None

    def register(run_id, config_hash, acc, win, champion=None):
        gate = _gate({"accuracy": acc, "win_rate": win}, champion)
        return register_policy(cfg, run_id=run_id, model_dir=tiny_model_dir,
                               metrics={ACCURACY_METRIC: acc, WIN_RATE_METRIC: win, "eval_margin": 0.1},
                               fingerprint="fp-data-1", config_hash=config_hash, flow_run_id=f"fr-{config_hash}",
                               gate=gate, tags={"train_fingerprint": "t1"}, tracker=tracker)

    run1 = tracker.start_run(cfg, flow_run_id="fr-h1", flow_run_name="first", device="cpu")
    first = register(run1, "h1", 0.60, 0.50)
    assert (first.version, first.promoted, first.champion_version, first.reused) == ("1", True, "1", False)
    assert first.decision["reason"] == "first version: no champion yet"
    mv = client.get_model_version(name, "1")
    assert mv.tags["data_fingerprint"] == "fp-data-1" and mv.tags["config_hash"] == "h1"
    assert mv.tags["base_model"] == cfg.model.name_or_path and mv.tags["flow_run_id"] == "fr-h1"
    assert float(mv.tags[f"metric.{ACCURACY_METRIC}"]) == 0.60 and mv.tags["metric.eval_margin"] == "0.1"
    assert mv.tags[TAG_DECISION] == "promoted" and mv.tags["train_fingerprint"] == "t1"
    assert mv.run_id == run1
    assert client.get_run(run1).data.tags["registry.promoted"] == "true"
    info = champion_info(cfg, tracker)
    assert (info["version"], info["run_id"], info["tags"]["config_hash"]) == ("1", run1, "h1")

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

    # and as a Hugging Face folder: the same weights and a tokenizer that loads
    from safetensors.torch import load_file

    from dpo_core.config import ModelConfig
    from dpo_core.models import load_tokenizer

    folder = download_model_version(tracker, name, "1", tmp_path / "champion")
    (weights,) = folder.glob("*.safetensors")
    original = load_file(next(tiny_model_dir.glob("*.safetensors")))
    assert all((load_file(weights)[k] == v).all() for k, v in original.items())
    assert load_tokenizer(folder, ModelConfig()).chat_template

    # a worse version (accuracy 0.10 below on the same gate pairs, tolerance 0.02) stays candidate
    run2 = tracker.start_run(cfg, flow_run_id="fr-h2", flow_run_name="second", device="cpu")
    worse = register(run2, "h2", 0.50, 0.50, champion={"accuracy": 0.60, "win_rate": 0.50})
    assert (worse.version, worse.promoted, worse.champion_version) == ("2", False, "1")
    assert str(client.get_model_version_by_alias(name, CANDIDATE).version) == "2"
    assert str(client.get_model_version_by_alias(name, CHAMPION).version) == "1"
    decision = client.download_artifacts(run2, "registry/decision-v2.json")
    assert '"promote": false' in Path(decision).read_text()
    tags = client.get_model_version(name, "2").tags
    assert float(tags["gate.accuracy.candidate"]) == 0.5 and float(tags["gate.accuracy.champion"]) == 0.6
    assert float(tags["gate.accuracy.difference"]) == pytest.approx(-0.1) and "ci_low" in " ".join(tags)
    assert tags["promotion.reason"].startswith("stays candidate")
    assert previous_version(cfg, config_hash="h3", fingerprint="fp-data-1", tracker=tracker)["version"] == "2"

    # a gate that scored another champion than the one now holding the alias does not promote
    stale = register_policy(cfg, run_id=run2, model_dir=tiny_model_dir, metrics={ACCURACY_METRIC: 0.9},
                            fingerprint="fp-data-1", config_hash="h-stale", flow_run_id="fr-stale",
                            gate={**_gate({"accuracy": 0.9}, {"accuracy": 0.1}), "champion_version": "7"},
                            tracker=tracker)
    assert stale.promoted is False and "changed during the run" in stale.decision["reason"]

    # a better one becomes champion
    better = register(run2, "h3", 0.62, 0.55, champion={"accuracy": 0.60, "win_rate": 0.50})
    assert (better.version, better.promoted, better.champion_version) == ("4", True, "4")
    assert str(client.get_model_version_by_alias(name, CHAMPION).version) == "4"

    # re-registering the same config hash + data fingerprint returns the same version, no new one
    run3 = tracker.start_run(cfg, flow_run_id="fr-rerun", flow_run_name="cached-rerun", device="cpu")
    again = register(run3, "h3", 0.62, 0.55, champion={"accuracy": 0.60, "win_rate": 0.50})
    assert (again.version, again.reused, again.promoted) == ("4", True, True)
    assert client.get_run(run3).data.tags["registry.reused"] == "true"
    assert again.decision["promote"] is True
    assert len(client.search_model_versions(f"name='{name}'")) == 4
    assert previous_version(cfg, config_hash="h3", fingerprint="fp-data-1", tracker=tracker)["version"] == "3"

    # a registration that stopped before the gate (no decision tag) is finished, not duplicated
    client.delete_model_version_tag(name, "2", TAG_DECISION)
    resumed = register(run2, "h2", 0.50, 0.50, champion={"accuracy": 0.62, "win_rate": 0.55})
    assert (resumed.version, resumed.reused, resumed.promoted, resumed.champion_version) == ("2", False, False, "4")
    assert client.get_model_version(name, "2").tags[TAG_DECISION] == "candidate"
    assert len(client.search_model_versions(f"name='{name}'")) == 4
    assert str(client.get_model_version_by_alias(name, CANDIDATE).version) == "4"  # not moved back to the older one


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
