"""Fault suite, issue 7: crash anywhere, run again, lose nothing.

Every flow run is a real `python -m flows.dpo` process (through tests/faults/launch.py, which adds test-only pause
and ENOSPC hooks) against one real Prefect server per module, on the tiny random Llama, 8 pairs, 4 optimizer steps
with a checkpoint after every step. "Same weights" means the train artifact's content hash (sha256 of the final
model.safetensors) equals the one of two overlapping, uninterrupted runs of the same config.
"""

from __future__ import annotations

import json
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from faultkit import FlowRunner, free_port, make_runner, read_log, wait_for

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

UPSTREAM = ("ingest", "template", "reference")


# -------------------------------------------------------------------------------------------------------- helpers


def complete_artifacts(state: Path, stage: str) -> list[Path]:
    return sorted(p.parent for p in (state / "artifacts" / stage).glob("*/MANIFEST.json"))


def tmp_leftovers(state: Path) -> list[Path]:
    """Temporary folders of interrupted writes anywhere under the artifacts (artifacts and checkpoints)."""
    return sorted(p for p in (state / "artifacts").rglob(".*tmp*") if p.is_dir())


def checkpoint_root(state: Path) -> Path:
    works = sorted((state / "artifacts" / "train").glob(".*.work"))
    assert len(works) == 1, f"expected one training work folder, found {works}"
    return works[0] / "checkpoints"


def complete_checkpoints(state: Path) -> list[int]:
    from dpo_core.checkpoints import list_checkpoints
    from dpo_core.fileio import is_complete

    return [step for step, path in list_checkpoints(checkpoint_root(state)) if is_complete(path)]


def train_manifest(state: Path) -> dict:
    found = complete_artifacts(state, "train")
    assert len(found) == 1, f"expected one train artifact, found {found}"
    return json.loads((found[0] / "MANIFEST.json").read_text())


def final_weights(manifest: dict) -> Path:
    return Path(manifest["path"]) / manifest["model_subdir"] / "model.safetensors"


def stage_states(log: str) -> dict[str, str]:
    """Final state per task from a flow run's log lines `Task run 'train-1a2' - Finished in state Cached(...)`."""
    out = {}
    for line in log.splitlines():
        if "Task run '" in line and "Finished in state " in line:
            task = line.split("Task run '", 1)[1].split("'", 1)[0].rsplit("-", 1)[0]
            out[task] = line.split("Finished in state ", 1)[1].split("(", 1)[0].strip()
    return out


def flow_run_state(api_url: str, log: str) -> str:
    """The server's view of the flow run that wrote `log` (its id is in the `View at .../flow-run/<id>` line)."""
    run_id = log.split("/runs/flow-run/", 1)[1].split()[0].strip()
    with urllib.request.urlopen(f"{api_url}/flow_runs/{run_id}", timeout=10) as resp:
        return json.loads(resp.read())["state_type"]


def latest_artifact_data(api_url: str, key: str):
    body = json.dumps({"artifacts": {"key": {"any_": [key]}}, "sort": "CREATED_DESC", "limit": 1}).encode()
    request = urllib.request.Request(f"{api_url}/artifacts/filter", data=body,
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=10) as resp:
        found = json.loads(resp.read())
    return found[0]["data"] if found else None


# ------------------------------------------------------------------------------------------- uninterrupted baseline


@dataclass
class Overlap:
    runner: FlowRunner
    first: tuple[int, str, dict | None]
    second: tuple[int, str, dict | None]
    first_pid: int
    second_pid: int
    weights_hash: str
    weights: Path


@pytest.fixture(scope="module")
def uninterrupted(prefect_server, tiny_model_dir, tmp_path_factory) -> Overlap:
    """Two uninterrupted runs of one config started so that they overlap in training.

    The first pauses inside the train stage (holding its key lock); the second is started then and reaches the same
    lock; the first is released once the second is waiting. Their result is the reference for every other test.
    """
    runner = make_runner(prefect_server, tiny_model_dir, tmp_path_factory.mktemp("overlap"), registry=False)
    first = runner.start(pause="train")
    runner.wait_paused(first, "train")
    second = runner.start()
    wait_for(lambda: (runner.faults / f"lock-train.{second.pid}").exists(), 240, "the second run at the train lock",
             second)
    time.sleep(2)  # it is now blocked on the flock the first run holds
    assert second.poll() is None, "the second run did not wait for the first one's training"
    runner.release("train")
    r1, r2 = runner.finish(first), runner.finish(second)
    manifest = train_manifest(runner.state)
    return Overlap(runner, r1, r2, first.pid, second.pid, manifest["content_hash"], final_weights(manifest))


def test_overlapping_runs_train_once_and_share_the_artifact(uninterrupted):
    (rc1, log1, s1), (rc2, log2, s2) = uninterrupted.first, uninterrupted.second
    assert rc1 == 0, log1[-4000:]
    assert rc2 == 0, log2[-4000:]
    # the trainer ran once, in the first run; the second waited on the lock and reused its artifact
    assert uninterrupted.runner.train_calls() == [str(uninterrupted.first_pid)]
    assert s1["train"]["path"] == s2["train"]["path"]
    assert s1["train"]["steps"] == s2["train"]["steps"] == 4
    assert all(s2["stages"][s] == "Cached" for s in UPSTREAM), s2["stages"]
    assert s1["metrics"] == s2["metrics"]
    # nothing was corrupted: the shared artifact's weights still hash to what its manifest says
    from dpo_core.fileio import sha256_file

    assert sha256_file(uninterrupted.weights)[:16] == uninterrupted.weights_hash
    assert tmp_leftovers(uninterrupted.runner.state) == []
    # progress artifacts (sent from a background thread so a dead API never stalls training) still arrive
    assert latest_artifact_data(uninterrupted.runner.server.api_url, "training") == 100.0


# ------------------------------------------------------------------------------------------------- SIGKILL anywhere


def test_sigkill_at_every_stage_then_rerun_gives_the_uninterrupted_model(
    prefect_server, tiny_model_dir, tmp_path, uninterrupted
):
    runner = make_runner(prefect_server, tiny_model_dir, tmp_path / "kills", registry=True)
    state = runner.state

    # 1. during ingest: pairs.parquet written into the temporary folder, no manifest yet
    killed_log = runner.kill_at("ingest")
    assert complete_artifacts(state, "ingest") == []
    # nothing reports the end of a SIGKILLed CLI run: the server keeps it Running until the next run closes it
    assert flow_run_state(prefect_server.api_url, killed_log) == "RUNNING"
    assert len(list((state / "runs").glob("*.json"))) == 1  # its run-ledger entry stays behind
    assert tmp_leftovers(state), "the kill should have left the ingest stage's temporary folder behind"

    # 2. during the reference precompute, with a torn (half-written) reference.parquet on disk
    log = runner.kill_at("reference")
    # the run found run 1's process gone and closed it (tasks/run_ledger.py)
    assert flow_run_state(prefect_server.api_url, killed_log) == "CRASHED"
    assert "was killed without reporting its end: marked Crashed" in log, log[-3000:]
    assert len(complete_artifacts(state, "ingest")) == 1 and len(complete_artifacts(state, "template")) == 1
    assert complete_artifacts(state, "reference") == []
    torn = list((state / "artifacts" / "reference").glob(".*tmp*/reference.parquet"))
    assert len(torn) == 1, torn
    with pytest.raises(Exception):  # it really is unreadable: it must never be picked up
        import pandas as pd

        pd.read_parquet(torn[0])
    assert not list((state / "artifacts" / "ingest").glob(".*tmp*")), "stale ingest temp folder not swept"

    # 3. mid-training, between two checkpoint writes (step 2 complete)
    runner.kill_at("after-ckpt-2")
    assert complete_checkpoints(state) == [1, 2]
    assert not list((state / "artifacts" / "reference").glob(".*tmp*")), "the torn reference folder was not swept"

    # 4. during a checkpoint write: step 3's files are there, its manifest is not
    runner.kill_at("in-ckpt-3")
    assert complete_checkpoints(state) == [1, 2]
    assert list(checkpoint_root(state).glob(".step-000003.tmp-*")), "expected step 3's half-written folder"

    # 5. training finished (final model saved), the artifact not yet renamed into place: the checkpoints are kept
    runner.kill_at("train-finished")
    assert complete_artifacts(state, "train") == []
    assert complete_checkpoints(state) == [3, 4]  # step 3 rewritten: the re-run resumed from step 2

    # 6. during registration (the MLflow run is open, the model not yet logged)
    runner.kill_at("register")
    manifest = train_manifest(state)
    assert manifest["resumed_from_step"] == 4  # nothing trained twice
    assert manifest["steps"] == 4
    assert not (Path(manifest["path"]) / "checkpoints").exists()  # resume-only files dropped once in place
    assert manifest["content_hash"] == uninterrupted.weights_hash

    # 7. MLflow down: registration fails after its retries, naming the URI; every compute stage is Cached
    dead = f"http://127.0.0.1:{free_port()}"
    rc, log, _ = runner.run(f"registry.tracking_uri={dead}")
    log_7 = log
    assert rc != 0
    assert f"MLflow tracking at {dead} unavailable" in log, log[-4000:]
    states = stage_states(log)
    assert all(states.get(s) == "Cached" for s in (*UPSTREAM, "train", "evaluate", "compare")), states
    assert states.get("register") == "Failed", states

    # 8. everything back: the flow completes from the cache and registers the same weights
    rc, log, summary = runner.run()
    assert rc == 0, log[-4000:]
    assert all(summary["stages"][s] == "Cached" for s in (*UPSTREAM, "train", "evaluate", "compare")), summary
    assert summary["registration"]["version"] is not None
    assert summary["train"]["resumed_from_step"] == 4
    history = [json.loads(x) for x in (Path(manifest["path"]) / "history.jsonl").read_text().splitlines()]
    assert [row["step"] for row in history] == [1, 2, 3, 4]
    logged = sorted((tmp_path / "kills" / "mlflow" / "artifacts").glob("models/*/artifacts/model/model.safetensors"))
    assert len(logged) == 1, logged
    registered, expected = load_file(str(logged[0])), load_file(str(uninterrupted.weights))
    assert registered.keys() == expected.keys()
    assert all(torch.equal(registered[k], expected[k]) for k in expected)
    assert tmp_leftovers(state) == []  # no temporary folder survives a completed run
    # the MLflow run of the registration that was killed was closed as KILLED: not by run 7 (MLflow down, so its
    # ledger entry stayed), by run 8; no flow run of this test is left Running and no ledger entry is left behind
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'kills' / 'mlflow' / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("faults").experiment_id])
    assert sorted(r.info.status for r in runs) == ["FINISHED", "KILLED"]
    assert "could not close killed flow run" in log_7
    assert list((state / "runs").glob("*.json")) == []


# --------------------------------------------------------------------------------------- full disk, corrupt checkpoint


def test_full_disk_fails_clearly_and_a_corrupt_newest_checkpoint_is_skipped(
    prefect_server, tiny_model_dir, tmp_path, uninterrupted
):
    runner = make_runner(prefect_server, tiny_model_dir, tmp_path / "disk", registry=False)
    state = runner.state

    # the disk fills up while the reference table is written: the stage fails naming the error, nothing is kept
    rc, log, _ = runner.run(enospc="reference")
    assert rc != 0
    assert "No space left on device" in log and "reference.parquet" in log, log[-4000:]
    assert complete_artifacts(state, "reference") == []
    assert not list((state / "artifacts" / "reference").glob(".*tmp*"))

    # ... and while checkpoint 3 is written: a clear error naming the folder; checkpoints 1 and 2 stay intact
    rc, log, _ = runner.run(enospc="ckpt-3")
    assert rc != 0
    assert "could not write" in log and "step-000003: No space left on device" in log, log[-4000:]
    assert complete_checkpoints(state) == [1, 2]
    assert not list(checkpoint_root(state).glob(".*.tmp-*"))

    # the newest checkpoint gets truncated on disk: the re-run warns, resumes from step 1 and ends identical
    newest = checkpoint_root(state) / "step-000002" / "model.safetensors"
    newest.write_bytes(newest.read_bytes()[: newest.stat().st_size // 2])
    rc, log, summary = runner.run()
    assert rc == 0, log[-4000:]
    assert "skipping checkpoint" in log and "step-000002" in log, log[-4000:]
    assert summary["train"]["resumed_from_step"] == 1
    assert train_manifest(state)["content_hash"] == uninterrupted.weights_hash
    assert tmp_leftovers(state) == []


# ----------------------------------------------------------------------------------------- Prefect server restarted


def test_prefect_server_restart_during_training(prefect_server, uninterrupted):
    """The server is stopped while training runs, training continues offline, the server comes back (same port,
    same database) and the flow run reports its remaining states to it and finishes Completed."""
    runner = uninterrupted.runner
    proc = runner.start("train.seed=7", pause="after-ckpt-1")  # a new train key; upstream stages are Cached
    runner.wait_paused(proc, "after-ckpt-1")
    prefect_server.stop()
    assert not prefect_server.healthy()
    runner.release("after-ckpt-1")  # training goes on with the server down ...
    trained_before = len(complete_artifacts(runner.state, "train"))
    wait_for(lambda: len(complete_artifacts(runner.state, "train")) > trained_before, 240,
             "training to finish while the server is down", proc)
    time.sleep(1)  # ... and the run reports the train task's final state to the dead server
    assert proc.poll() is None, read_log(proc)[-4000:]
    prefect_server.start()
    rc, log, summary = runner.finish(proc)
    assert rc == 0, log[-4000:]
    assert summary["train"]["steps"] == 4
    assert summary["train"]["resumed_from_step"] is None
    assert flow_run_state(prefect_server.api_url, log) == "COMPLETED"
