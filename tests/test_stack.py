"""The real local stack, started the way `make up` does (on free ports): a Prefect server, an MLflow server, the
work pool, the deployments and a worker, one stack for the module. `prefect deployment run dpo/smoke` must complete
and register a model, `dpo/nightly` must retrain on a newly delivered file, and `make down` must stop it all."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass
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


@dataclass
class Stack:
    state: Path
    prefect_port: int
    mlflow_port: int
    env: dict[str, str]  # this process's environment plus the stack's PREFECT_API_URL and MLFLOW_TRACKING_URI


@pytest.fixture(scope="module")
def running_stack(tmp_path_factory):
    """`make up` once for the module. The worker asks for work every second and a run waiting for the deployment's
    concurrency slot is retried after one second (Prefect's defaults: 10 s and 30 s), so runs start as soon as they
    may instead of up to half a minute later."""
    state = tmp_path_factory.mktemp("stack") / "state"
    prefect_port, mlflow_port = stack.free_port(), stack.free_port()
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("PREFECT_WORKER_QUERY_SECONDS", "1")
        patch.setenv("PREFECT_SERVER_DEPLOYMENTS_CONCURRENCY_SLOT_WAIT_SECONDS", "1")
        info = stack.up(state, prefect_port, mlflow_port, timeout_s=180)
    env = {**os.environ, **{k: info[k] for k in ("PREFECT_API_URL", "MLFLOW_TRACKING_URI")}}
    try:
        yield Stack(state, prefect_port, mlflow_port, env)
    finally:
        stack.down(state)  # a no-op once test_make_down_stops_the_stack_and_frees_its_ports has stopped it


@pytest.mark.stack
@pytest.mark.slow
@pytest.mark.timeout(900)
def test_make_up_then_deployment_run_smoke_completes_and_registers(running_stack, smollm2_dir):
    env = running_stack.env
    run = subprocess.run(
        [str(BIN / "prefect"), "deployment", "run", "dpo/smoke", "--watch", "--watch-timeout", "600"],
        env=env, capture_output=True, text=True, timeout=700,
    )
    out = run.stdout + run.stderr
    assert run.returncode == 0, out[-3000:]
    assert "Completed" in out, out[-3000:]

    import mlflow

    client = mlflow.MlflowClient(tracking_uri=env["MLFLOW_TRACKING_URI"])
    version = client.get_model_version_by_alias("dpo-policy-smoke", "champion")
    assert int(version.version) >= 1

    # two runs of the same deployment at once: concurrency_limit 1 + ENQUEUE makes the second wait its turn
    overlap = subprocess.run([sys.executable, "-c", OVERLAP_SCRIPT], env=env, capture_output=True, text=True,
                             timeout=600)
    assert overlap.returncode == 0, (overlap.stdout + overlap.stderr)[-3000:]
    first, second = sorted(json.loads(overlap.stdout.strip().splitlines()[-1]), key=lambda r: r["start"])
    assert first["state"] == second["state"] == "COMPLETED", (first, second)
    assert second["start"] >= first["end"] - 1.0, (first, second)  # never trained at the same time
    # the same config: the second found every stage Cached and registered no new version
    again = client.get_model_version_by_alias("dpo-policy-smoke", "champion")
    assert again.version == version.version


@pytest.mark.stack
@pytest.mark.timeout(1200)
def test_nightly_deployment_twice_with_a_file_added_in_between(running_stack, tmp_path, tiny_model_dir):
    """`prefect deployment run dpo/nightly` by hand, twice, through the real servers and worker: the second night
    trains on the newly delivered pairs and scores the champion on the gate pairs pinned by the first."""
    import mlflow

    from dpo_data.formats import make_pair_id

    folder = tmp_path / "incoming"
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
    env = running_stack.env
    client = mlflow.MlflowClient(tracking_uri=env["MLFLOW_TRACKING_URI"])

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


@pytest.mark.stack
def test_make_down_stops_the_stack_and_frees_its_ports(running_stack):
    """Last in the module: it stops the stack the tests above ran on."""
    assert stack.StackPaths(running_stack.state.resolve()).pids.exists()
    stopped = stack.down(running_stack.state)
    assert set(stopped) == {"prefect-server", "mlflow-server", "prefect-worker"}
    assert not stack.port_in_use(running_stack.prefect_port) and not stack.port_in_use(running_stack.mlflow_port)


def test_make_down_run_by_the_process_that_started_the_stack_does_not_wait_out_the_grace_period(tmp_path):
    """A server started by this process that exits on SIGTERM stays its zombie until reaped: `down` must count it
    as stopped at once (as the module fixture above relies on), not after `grace_s`."""
    server = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"], start_new_session=True)
    paths = stack.StackPaths(tmp_path)
    paths.stack.mkdir(parents=True)
    paths.pids.write_text(json.dumps({"prefect-server": server.pid}))
    started = time.monotonic()
    assert stack.down(tmp_path, grace_s=60) == ["prefect-server"]
    assert time.monotonic() - started < 20
    with pytest.raises(ProcessLookupError):
        os.kill(server.pid, 0)  # stopped and reaped
