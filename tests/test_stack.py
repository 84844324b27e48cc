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
