"""The `dpo` flow end to end under `prefect_test_harness`, on a tiny random Llama (the real SmolLM2 tokenizer).

Covers what issue 4 asks: a full run, a second identical run fully Cached, a changed train parameter re-running
only train onward, an injected failure in train then a re-run resuming from the checkpoint, a deleted artifact
re-running its stage, and changed data re-running everything downstream of ingest.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
UPSTREAM = ("ingest", "judge", "template", "reference")
DOWNSTREAM = ("train", "evaluate", "compare")


@pytest.fixture()
def data_file(tmp_path) -> Path:
    """Ten shipped UltraFeedback pairs in a file of the test's own (so appending to it is safe)."""
    lines = (REPO / "data/ultrafeedback_binarized_sample/train.jsonl").read_text().splitlines()[:10]
    path = tmp_path / "pairs.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


def tiny_config(tiny_model_dir: Path, state: Path, data: Path, **train) -> dict:
    return {
        "model": {"name_or_path": str(tiny_model_dir)},
        "data": {"train": [{"path": str(data)}], "eval": None, "eval_fraction": 0.3},
        "template": {"max_length": 64, "max_prompt_length": 32},
        "train": {"batch_size": 2, "max_steps": 3, "checkpoint_every": 1, "learning_rate": 1e-3,
                  "warmup_ratio": 0.0, **train},
        "eval": {"batch_size": 4, "bootstrap_samples": 50, "n_generations": 2, "generation_batch_size": 2,
                 "max_new_tokens": 8},
        "registry": {"experiment": "test-pipeline", "model_name": "test-policy",
                     "tracking_uri": f"sqlite:///{state / 'mlflow.db'}"},
        "state_dir": str(state),
    }


def run_flow(cfg_dict: dict, overrides: list[str] | None = None) -> dict:
    from dpo_core.config import load_config
    from flows.dpo import dpo

    tree = json.loads(json.dumps(cfg_dict))
    cfg = load_config(None, {**_flatten(tree), **dict(_parse(o) for o in overrides or [])})
    return dpo(config=cfg)


def _parse(item: str):
    from dpo_core.config import parse_override

    return parse_override(item)


def _flatten(tree: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in tree.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and k not in ("fields",):
            out.update(_flatten(v, key + "."))
        else:
            out[key] = v
    return out


@pytest.mark.timeout(900)
def test_flow_runs_caches_and_reruns_only_what_changed(harness, tiny_model_dir, tmp_path, data_file):
    state = tmp_path / "state"
    cfg = tiny_config(tiny_model_dir, state, data_file)

    first = run_flow(cfg)
    assert all(first["stages"][s] == "Completed" for s in (*UPSTREAM, *DOWNSTREAM)), first["stages"]
    assert first["train"]["steps"] == 3 and first["train"]["resumed_from_step"] is None
    assert {row["eval_set"] for row in first["metrics"]} == {"eval"}
    # the default judge is trained (Bradley-Terry) and measured on the eval pairs; its validity rides with the win rate
    judge = first["judge"]
    assert judge["name"].startswith("bradley-terry") and judge["validity_n_pairs"] >= 1
    assert judge["validity_ci_low"] <= judge["validity"] <= judge["validity_ci_high"]
    comparison = first["comparison"]
    assert comparison["judge"] == judge["name"] and comparison["judge_validity"] == judge["validity"]
    assert comparison["win_rate_ci_low"] <= comparison["win_rate"] <= comparison["win_rate_ci_high"]
    assert 0.0 <= comparison["lc_win_rate"] <= 1.0
    reg = first["registration"]
    assert reg["version"] is not None and reg["promoted"] is True

    # the same inputs again: every cached stage comes back Cached, and registration reuses the version
    second = run_flow(cfg)
    assert all(second["stages"][s] == "Cached" for s in (*UPSTREAM, *DOWNSTREAM)), second["stages"]
    assert second["registration"]["version"] == reg["version"]

    # a training parameter only: ingest, template and reference are reused; train and what follows re-run
    third = run_flow(cfg, ["train.beta=0.2"])
    assert all(third["stages"][s] == "Cached" for s in UPSTREAM), third["stages"]
    assert all(third["stages"][s] == "Completed" for s in DOWNSTREAM), third["stages"]

    # a deleted artifact folder makes its stage run again instead of returning a dangling path
    from dpo_core.config import load_config
    from tasks.artifacts import artifact_dir
    from tasks.ingest import ingest_key

    cfg_obj = load_config(None, _flatten(json.loads(json.dumps(cfg))))
    shutil.rmtree(artifact_dir(cfg_obj, "ingest", ingest_key(cfg_obj)))
    fourth = run_flow(cfg)
    assert fourth["stages"]["ingest"] == "Completed", fourth["stages"]
    assert fourth["stages"]["template"] == "Cached"  # the rebuilt pairs have the same content hash

    # a file damaged inside a completed artifact (one flipped byte) is caught on the cache hit and rebuilt
    (table,) = (state / "artifacts" / "reference").glob("*/reference.parquet")
    data = bytearray(table.read_bytes())
    data[len(data) // 2] ^= 0xFF
    table.write_bytes(bytes(data))
    damaged = run_flow(cfg)
    assert damaged["stages"]["reference"] == "Completed", damaged["stages"]
    assert damaged["stages"]["train"] == "Cached"  # the rebuilt table has the same content hash

    # new data: everything downstream of ingest re-runs
    extra = (REPO / "data/ultrafeedback_binarized_sample/train.jsonl").read_text().splitlines()[10:14]
    with open(data_file, "a") as f:
        f.write("\n".join(extra) + "\n")
    fifth = run_flow(cfg)
    assert fifth["data_fingerprint"] != first["data_fingerprint"]
    assert all(fifth["stages"][s] == "Completed" for s in (*UPSTREAM, *DOWNSTREAM)), fifth["stages"]


@pytest.mark.timeout(900)
def test_failure_in_training_resumes_from_checkpoint(harness, tiny_model_dir, tmp_path, data_file, monkeypatch):
    state = tmp_path / "state"
    cfg = tiny_config(tiny_model_dir, state, data_file, max_steps=4)
    cfg["registry"]["enabled"] = False

    from dpo_core import train_main
    from faults.inject.step_failure import failing

    with monkeypatch.context() as patched:  # the train stage fails after step 2 (checkpointed: checkpoint_every 1)
        patched.setattr(train_main, "train", failing(train_main.train, after_step=2))
        with pytest.raises(Exception, match="injected failure on rank 0 after step 2"):
            run_flow(cfg)

    again = run_flow(cfg)
    assert all(again["stages"][s] == "Cached" for s in UPSTREAM), again["stages"]
    assert again["stages"]["train"] == "Completed"
    assert again["train"]["resumed_from_step"] == 2
    assert again["train"]["steps"] == 4


@pytest.mark.timeout(900)
def test_a_reference_free_objective_scores_the_reference_for_evaluation_only(harness, tiny_model_dir, tmp_path,
                                                                              data_file):
    """ORPO reads no reference: the reference stage scores the evaluation pairs alone (none of the training pairs),
    and evaluation still compares the policy with the reference on them."""
    import math

    import pandas as pd

    state = tmp_path / "state"
    out = run_flow(tiny_config(tiny_model_dir, state, data_file, loss="orpo"))
    assert all(out["stages"][s] == "Completed" for s in (*UPSTREAM, *DOWNSTREAM)), out["stages"]
    (tokenized,) = (state / "artifacts" / "template").glob("*/tokenized.parquet")
    (reference,) = (state / "artifacts" / "reference").glob("*/reference.parquet")
    splits = pd.read_parquet(tokenized).set_index("pair_id")["split"]
    scored = pd.read_parquet(reference)["pair_id"]
    assert set(scored) == set(splits[splits == "eval"].index) and len(scored) > 0
    (row,) = out["metrics"]
    assert row["eval_set"] == "eval" and math.isfinite(row["reference_accuracy"])


def _thumbs(path: Path) -> Path:
    """TRL unpaired rows in both forms: standard strings and conversational messages."""
    rows = [{"prompt": f"Question {i}?", "completion": f"Answer {i}.", "label": i % 2 == 0} for i in range(4)]
    rows += [{"prompt": [{"role": "user", "content": f"Chat {i}?"}],
              "completion": [{"role": "assistant", "content": f"Reply {i}."}], "label": i == 0} for i in range(2)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.mark.timeout(900)
def test_kto_flow_trains_on_pairs_split_in_two_and_evaluates_pairs_and_unpaired_rows(harness, tiny_model_dir,
                                                                                    tmp_path, data_file):
    """`train.loss=kto` end to end: the paired train data trains as two unpaired rows per pair, the eval split stays
    pairs (reward accuracy, the generation comparison and registration as for any objective), and an unpaired extra
    eval set gets the unpaired record."""
    cfg = tiny_config(tiny_model_dir, tmp_path / "state", data_file, loss="kto", desirable_weight=1.1)
    cfg["data"]["extra_eval"] = {"thumbs": {"path": str(_thumbs(tmp_path / "thumbs.jsonl"))}}
    summary = run_flow(cfg)
    assert all(summary["stages"][s] == "Completed" for s in (*UPSTREAM, *DOWNSTREAM, "register")), summary["stages"]
    assert summary["train"]["steps"] == 3
    history = [json.loads(line) for line in (Path(summary["train"]["path"]) / "history.jsonl").read_text().splitlines()]
    assert all("kl" in row and "loss/kto" in row for row in history) and history[0]["kl"] == 0.0
    (paired,) = summary["metrics"]
    assert paired["eval_set"] == "eval" and 0.0 <= paired["reward_accuracy"] <= 1.0
    (thumbs,) = summary["unpaired_metrics"]
    assert (thumbs["eval_set"], thumbs["n_rows"], thumbs["n_desirable"]) == ("thumbs", 6, 3)
    assert thumbs["sign_accuracy_ci_low"] <= thumbs["sign_accuracy"] <= thumbs["sign_accuracy_ci_high"]
    assert summary["comparison"]["win_rate_ci_low"] <= summary["comparison"]["win_rate"]
    assert summary["registration"]["version"] is not None


def test_unpaired_data_for_a_pairwise_objective_is_a_preflight_error(tiny_model_dir, tmp_path):
    from dpo_core.config import UserError, load_config
    from flows.preflight import preflight

    thumbs = str(_thumbs(tmp_path / "thumbs.jsonl"))
    tree = tiny_config(tiny_model_dir, tmp_path / "state", Path(thumbs))
    with pytest.raises(UserError, match=r"data.train\[0\]: .*thumbs.jsonl holds unpaired rows .* train.loss=sigmoid "
                                        "needs pairs: use train.loss=kto"):
        preflight(load_config(None, _flatten(tree)))
    kto = load_config(None, {**_flatten(tree), "train.loss": "kto", "data.eval": [{"path": thumbs}]})
    with pytest.raises(UserError, match="promotion gate scores pairs .*; the generation comparison .*; the "
                                        "bradley_terry judge trains on the train pairs"):
        preflight(kto)
    preflight(load_config(None, {**_flatten(tree), "train.loss": "kto", "eval.n_generations": 0}))  # fine
