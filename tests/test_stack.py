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
    finally:
        stopped = stack.down(state)
    assert set(stopped) == {"prefect-server", "mlflow-server", "prefect-worker"}
    assert not stack.port_in_use(prefect_port) and not stack.port_in_use(mlflow_port)
