"""Scheduled retraining night after night (README "Scheduled retraining"): the `dpo` flow under
prefect_test_harness on a tiny random Llama, with a real incoming folder that gets a new file between runs.

The pairs are made so that a tiny model learns them in a few steps and the lesson carries over to held-out pairs:
every chosen answer is the same helpful sentence and every rejected one the same curt reply. A file with the two
swapped ("reversed labels", a bad data drop) trains a model that is worse on the gate, deterministically.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pandas as pd
import pytest
from test_pipeline import run_flow, tiny_config

GOOD, CURT = "Here is a careful, friendly and helpful answer.", "Go away."
DAY = 86_400


def _write_pairs(path: Path, start: int, n: int, *, reversed_labels: bool = False, day: int = 0,
                 extra: list[dict] | None = None) -> list[str]:
    """n pairs (ids start..start+n) in a JSONL file modified on `day`; returns their pair ids."""
    from dpo_data.formats import make_pair_id

    chosen, rejected = (CURT, GOOD) if reversed_labels else (GOOD, CURT)
    records = [{"prompt": f"Question {i}: what should I cook tonight?", "chosen": chosen, "rejected": rejected}
               for i in range(start, start + n)] + (extra or [])
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    stamp = 1_700_000_000 + day * DAY
    os.utime(path, (stamp, stamp))
    return [make_pair_id([{"role": "user", "content": r["prompt"]}], r["chosen"], r["rejected"]) for r in records]


def _split_ids(summary: dict, split: str) -> list[str]:
    table = pd.read_parquet(summary["pairs_path"], columns=["pair_id", "split"])
    return table.loc[table["split"] == split, "pair_id"].tolist()


def _artifact(key: str, flow_run_id: str) -> str:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId, ArtifactFilterKey

    with get_client(sync_client=True) as client:
        found = client.read_artifacts(artifact_filter=ArtifactFilter(
            key=ArtifactFilterKey(any_=[key]), flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id])))
    assert found, f"no '{key}' artifact on flow run {flow_run_id}"
    return str(found[0].data)


def _nightly_config(tiny_model_dir: Path, state: Path, folder: Path, **registry) -> dict:
    cfg = tiny_config(tiny_model_dir, state, folder, max_steps=4, learning_rate=2e-3)
    cfg["data"].update({"select": "newest", "max_train_pairs": 8, "eval_fraction": 0.3, "max_eval_pairs": 4})
    cfg["registry"].update({"experiment": "test-nightly", "model_name": "nightly-policy", "skip_unchanged": True,
                            "promotion_tolerance": 0.0, **registry})
    # a judge that is not trained on the night's data: the champion's win rate is then comparable across nights
    cfg["eval"]["judge"] = {"kind": "similarity"}
    return cfg


@pytest.mark.timeout(1200)
def test_three_nights_new_data_trains_worse_is_not_promoted_nothing_new_skips(harness, tiny_model_dir, tmp_path):
    import mlflow

    state, folder = tmp_path / "state", tmp_path / "incoming"
    folder.mkdir()
    cfg = _nightly_config(tiny_model_dir, state, folder)
    client = mlflow.MlflowClient(cfg["registry"]["tracking_uri"])

    # night 1: twelve good pairs; the first version becomes champion and its eval split is pinned as the gate set
    night1_ids = _write_pairs(folder / "2026-01-01.jsonl", 0, 12, day=0)
    night1 = run_flow(cfg)
    train1, gate1 = _split_ids(night1, "train"), _split_ids(night1, "eval")
    assert set(train1) | set(gate1) <= set(night1_ids) and gate1
    reg1 = night1["registration"]
    assert (reg1["version"], reg1["promoted"]) == ("1", True)
    assert reg1["gate"]["pair_ids"] == sorted(gate1) and reg1["gate"]["champion"] is None
    v1 = client.get_model_version("nightly-policy", "1")
    assert client.download_artifacts(v1.run_id, "gate/pairs.parquet")  # stored with the version

    # night 2: a new file with reversed labels; the newest 8 train pairs are all new, the champion is re-scored
    night2_ids = _write_pairs(folder / "2026-01-02.jsonl", 100, 20, reversed_labels=True, day=1)
    night2 = run_flow(cfg)
    train2, gate2 = _split_ids(night2, "train"), _split_ids(night2, "eval")
    assert len(train2) == 8 and set(train2) <= set(night2_ids) and not set(train2) & set(train1)
    assert gate2 == gate1  # the pinned gate, although the new file holds held-out pairs too
    assert night2["stages"]["champion-scores"] == "Completed"
    gate = night2["registration"]["gate"]
    assert gate["pair_ids"] == sorted(gate1) and gate["champion_version"] == "1"
    # the champion's numbers on the gate are those it had as the candidate of night 1 (same pairs, same reference)
    assert gate["champion"]["accuracy"] == pytest.approx(reg1["gate"]["candidate"]["accuracy"])
    assert gate["champion"]["win_rate"] == pytest.approx(reg1["gate"]["candidate"]["win_rate"])
    assert gate["candidate"]["accuracy"] < gate["champion"]["accuracy"]
    reg2 = night2["registration"]
    assert (reg2["version"], reg2["promoted"], reg2["champion_version"]) == ("2", False, "1")
    assert reg2["decision"]["reason"].startswith("stays candidate, champion remains v1")
    tags = client.get_model_version("nightly-policy", "2").tags
    assert float(tags["gate.accuracy.champion"]) == gate["champion"]["accuracy"]
    assert float(tags["gate.accuracy.candidate"]) == gate["candidate"]["accuracy"]
    assert tags["gate_set_id"] == night1["registration"]["gate"]["gate_set_id"]
    decision = _artifact("promotion-decision", night2["flow_run_id"])
    assert "not promoted" in decision and "paired difference" in decision
    lineage = reg2["lineage"]
    assert lineage["new_pairs"] == 8 and lineage["previous_version"] == "1"
    files = {Path(name).name: info for name, info in lineage["files"].items()}
    assert files["2026-01-02.jsonl"]["records"] == 20 and len(files["2026-01-02.jsonl"]["sha256"]) == 64
    assert lineage["drift"]["pairs"]["champion"] == len(train1)

    # night 3: no new file: the selection is night 2's, already tried; nothing is loaded, trained or registered
    night3 = run_flow(cfg)
    assert night3["skipped"] and "v2 (not promoted)" in night3["skipped"]
    assert "train" not in night3["stages"] and night3["registration"] is None
    assert "Nothing new" in _artifact("nothing-new", night3["flow_run_id"])
    assert len(client.search_model_versions("name='nightly-policy'")) == 2
    assert str(client.get_model_version_by_alias("nightly-policy", "champion").version) == "1"


@pytest.mark.timeout(1200)
def test_a_better_candidate_is_promoted_and_gate_pairs_never_train(harness, tiny_model_dir, tmp_path):
    import mlflow

    state, folder = tmp_path / "state", tmp_path / "incoming"
    folder.mkdir()
    gate_ids = _write_pairs(tmp_path / "gate.jsonl", 500, 6)
    cfg = _nightly_config(tiny_model_dir, state, folder, gate_set={"path": str(tmp_path / "gate.jsonl")})
    cfg["eval"]["n_generations"] = 0  # accuracy alone decides (a tiny model's generations are noise)
    client = mlflow.MlflowClient(cfg["registry"]["tracking_uri"])

    # night 1: a bad data drop (reversed labels) becomes the first champion
    _write_pairs(folder / "a.jsonl", 0, 12, reversed_labels=True, day=0)
    night1 = run_flow(cfg)
    assert night1["registration"]["promoted"] is True and _split_ids(night1, "gate") == gate_ids

    # night 2: good pairs arrive, two of them copies of gate pairs: those never train
    gate_copies = [{"prompt": f"Question {i}: what should I cook tonight?", "chosen": GOOD, "rejected": CURT}
                   for i in (500, 501)]
    night2_ids = _write_pairs(folder / "b.jsonl", 200, 14, day=1, extra=gate_copies)
    night2 = run_flow(cfg)
    train2 = _split_ids(night2, "train")
    assert set(train2) <= set(night2_ids) - set(gate_ids) and not set(train2) & set(gate_ids)
    assert _split_ids(night2, "gate") == gate_ids
    gate = night2["registration"]["gate"]
    assert gate["pair_ids"] == sorted(gate_ids) and gate["champion_version"] == "1"
    assert gate["candidate"]["accuracy"] > gate["champion"]["accuracy"]
    assert gate["paired"]["accuracy"]["difference"] > 0
    reg2 = night2["registration"]
    assert (reg2["version"], reg2["promoted"], reg2["champion_version"]) == ("2", True, "2")
    assert str(client.get_model_version_by_alias("nightly-policy", "champion").version) == "2"


@pytest.mark.timeout(600)
def test_a_failed_night_leaves_a_reason_and_a_failed_mlflow_run(harness, tiny_model_dir, tmp_path):
    import mlflow

    state, folder = tmp_path / "state", tmp_path / "incoming"
    folder.mkdir()
    (folder / "empty.jsonl").write_text("")
    cfg = _nightly_config(tiny_model_dir, state, folder)
    with pytest.raises(Exception, match="holds no records"):
        run_flow(cfg)
    client = mlflow.MlflowClient(cfg["registry"]["tracking_uri"])
    experiment = client.get_experiment_by_name("test-nightly")
    [run] = client.search_runs([experiment.experiment_id])
    assert run.info.status == "FAILED" and "holds no records" in run.data.tags["failure.reason"]
    reason = _artifact("failure-reason", run.data.tags["prefect.flow_run_id"])
    assert "DataError" in reason and "holds no records" in reason
    assert not client.search_model_versions("name='nightly-policy'")


@pytest.mark.timeout(1200)
def test_init_from_champion_warm_starts_and_the_gate_keeps_the_base_reference(harness, tiny_model_dir, tmp_path):
    state, folder = tmp_path / "state", tmp_path / "incoming"
    folder.mkdir()
    cfg = _nightly_config(tiny_model_dir, state, folder)
    cfg["model"]["init_from"] = "champion"
    cfg["eval"]["n_generations"] = 0

    _write_pairs(folder / "a.jsonl", 0, 12, day=0)
    night1 = run_flow(cfg)  # no champion yet: starts from the base model
    assert "champion-model" not in night1["stages"] and night1["registration"]["promoted"] is True

    _write_pairs(folder / "b.jsonl", 100, 20, day=1)
    night2 = run_flow(cfg)
    # the policy and its reference are the champion: training starts at DPO's loss for policy == reference
    assert night2["stages"]["champion-model"] == "Completed" and night2["stages"]["reference"] == "Completed"
    from tasks.train_output import read_history

    first_step = read_history({"path": night2["train"]["path"], "history_file": "history.jsonl"})[0]
    assert first_step["loss"] == pytest.approx(0.6931, abs=1e-4)
    # the gate still scores against the base model: a separate reference pass over the gate pairs, and the
    # champion's gate numbers are those it had as night 1's candidate (against itself they would be 0)
    assert night2["stages"]["gate-reference"] == "Completed"
    gate = night2["registration"]["gate"]
    assert gate["champion"]["accuracy"] == pytest.approx(night1["registration"]["gate"]["candidate"]["accuracy"])
    assert gate["champion"]["accuracy"] > 0
