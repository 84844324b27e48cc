"""The real local stack, started the way `make up` does (on free ports): a Prefect server, an MLflow server, the
work pool, the deployments and a worker. `prefect deployment run dpo/smoke` must complete and register a model."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from flows import stack

BIN = Path(sys.executable).parent

# Run in a subprocess with PREFECT_API_URL set: submits two runs of dpo/smoke at once and waits for both.
OVERLAP_SCRIPT = """
import asyncio, json
from prefect.client.orchestration import get_client
from prefect.deployments import run_deployment

async def main():
    runs = [await run_deployment("dpo/smoke", timeout=0) for _ in range(2)]
    async with get_client() as client:
        while True:
            states = [await client.read_flow_run(r.id) for r in runs]
            if all(s.state and s.state.is_final() for s in states):
                break
            await asyncio.sleep(2)
        out = []
        for fr in states:
            history = await client.read_flow_run_states(fr.id)
            out.append({"state": fr.state.type.value, "start": fr.start_time.timestamp(),
                        "end": fr.end_time.timestamp(), "states": [h.name for h in history]})
    print(json.dumps(out))

asyncio.run(main())
"""


@pytest.mark.stack
@pytest.mark.slow
@pytest.mark.timeout(900)
def test_make_up_deployment_run_smoke_make_down(tmp_path, smollm2_dir):
    state = tmp_path / "state"
    prefect_port, mlflow_port = stack.free_port(), stack.free_port()
    info = stack.up(state, prefect_port, mlflow_port, timeout_s=180)
    try:
        pids = stack.StackPaths(state.resolve()).pids
        assert pids.exists()
        env = {**os.environ, "PREFECT_API_URL": info["PREFECT_API_URL"],
               "MLFLOW_TRACKING_URI": info["MLFLOW_TRACKING_URI"]}
        run = subprocess.run(
            [str(BIN / "prefect"), "deployment", "run", "dpo/smoke", "--watch", "--watch-timeout", "600"],
            env=env, capture_output=True, text=True, timeout=700,
        )
        out = run.stdout + run.stderr
        assert run.returncode == 0, out[-3000:]
        assert "Completed" in out, out[-3000:]

        import mlflow

        client = mlflow.MlflowClient(tracking_uri=info["MLFLOW_TRACKING_URI"])
        version = client.get_model_version_by_alias("dpo-policy-smoke", "champion")
        assert int(version.version) >= 1

        # two runs of the same deployment at once: concurrency_limit 1 + ENQUEUE makes the second wait its turn
        overlap = subprocess.run([sys.executable, "-c", OVERLAP_SCRIPT], env=env, capture_output=True, text=True,
                                 timeout=600)
        assert overlap.returncode == 0, (overlap.stdout + overlap.stderr)[-3000:]
        import json

        first, second = sorted(json.loads(overlap.stdout.strip().splitlines()[-1]), key=lambda r: r["start"])
        assert first["state"] == second["state"] == "COMPLETED", (first, second)
        assert second["start"] >= first["end"] - 1.0, (first, second)  # never trained at the same time
        # the same config: the second found every stage Cached and registered no new version
        again = client.get_model_version_by_alias("dpo-policy-smoke", "champion")
        assert again.version == version.version
    finally:
        stopped = stack.down(state)
    assert set(stopped) == {"prefect-server", "mlflow-server", "prefect-worker"}
    assert not stack.port_in_use(prefect_port) and not stack.port_in_use(mlflow_port)


@pytest.mark.stack
@pytest.mark.timeout(1200)
def test_nightly_deployment_twice_with_a_file_added_in_between(tmp_path, tiny_model_dir):
    """`prefect deployment run dpo/nightly` by hand, twice, through the real servers and worker: the second night
    trains on the newly delivered pairs and scores the champion on the gate pairs pinned by the first."""
    import json

    import mlflow

    from dpo_data.formats import make_pair_id

    state, folder = tmp_path / "state", tmp_path / "incoming"
    folder.mkdir()

    def deliver(name: str, start: int, day: int) -> set[str]:
        records = [{"prompt": f"Question {i}?", "chosen": f"A helpful answer {i}.", "rejected": "No."}
                   for i in range(start, start + 16)]
        path = folder / name
        path.write_text("".join(json.dumps(r) + "\n" for r in records))
        os.utime(path, (1_700_000_000 + day * 86_400,) * 2)
        return {make_pair_id([{"role": "user", "content": r["prompt"]}], r["chosen"], r["rejected"]) for r in records}

    overrides = [f"model.name_or_path={tiny_model_dir}", f"data.train=[{{path: {folder}}}]",
                 "data.max_train_pairs=8", "data.max_eval_pairs=4", "data.eval_fraction=0.25",
                 "template.max_length=64", "template.max_prompt_length=32", "train.max_steps=2",
                 "train.batch_size=2", "eval.n_generations=0", "eval.bootstrap_samples=50"]
    prefect_port, mlflow_port = stack.free_port(), stack.free_port()
    info = stack.up(state, prefect_port, mlflow_port, timeout_s=180)
    try:
        env = {**os.environ, "PREFECT_API_URL": info["PREFECT_API_URL"],
               "MLFLOW_TRACKING_URI": info["MLFLOW_TRACKING_URI"]}
        client = mlflow.MlflowClient(tracking_uri=info["MLFLOW_TRACKING_URI"])

        def night() -> None:
            run = subprocess.run(
                [str(BIN / "prefect"), "deployment", "run", "dpo/nightly", "-p", f"overrides={json.dumps(overrides)}",
                 "--watch", "--watch-timeout", "500"], env=env, capture_output=True, text=True, timeout=560)
            out = run.stdout + run.stderr
            assert run.returncode == 0 and "Completed" in out, out[-3000:]

        first_ids = deliver("delivery-1.jsonl", 0, day=0)
        night()
        v1 = client.get_model_version_by_alias("dpo-policy-nightly", "champion")
        assert v1.version == "1"
        second_ids = deliver("delivery-2.jsonl", 100, day=1)
        night()
        v2 = client.get_model_version("dpo-policy-nightly", "2")
        trained = set(Path(client.download_artifacts(v2.run_id, "lineage/train_pair_ids.txt")).read_text().split())
        assert len(trained) == 8 and trained <= second_ids and not trained & first_ids
        assert v2.tags["gate_set_id"] == v1.tags["gate_set_id"] and v2.tags["data.new_pairs"] == "8"
        assert "gate.accuracy.champion" in v2.tags and v2.tags["promotion.decision"] in ("promoted", "candidate")
    finally:
        stack.down(state)
