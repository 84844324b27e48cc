"""Helpers of the fault suite: a real Prefect server, and flow runs in killable subprocesses.

Every flow run is `tests/faults/launch.py` (= `python -m flows.dpo` plus the test-only hooks documented there) in a
subprocess of its own session, against the module's server, so a test can SIGKILL it at an exact point.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[2]
LAUNCH = Path(__file__).resolve().parent / "launch.py"
PREFECT = Path(sys.executable).parent / "prefect"
DATA = REPO / "data/ultrafeedback_binarized_sample/train.jsonl"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(predicate, timeout: float, what: str, proc: subprocess.Popen | None = None, interval: float = 0.1):
    """Poll `predicate` until it returns something truthy; fail clearly on timeout or if `proc` exits first."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        if proc is not None and proc.poll() is not None:
            value = predicate()
            if value:
                return value
            raise AssertionError(f"the flow exited ({proc.returncode}) before {what}:\n{read_log(proc)[-4000:]}")
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


@dataclass
class PrefectServer:
    """A `prefect server start` on a free 127.0.0.1 port with its home and SQLite database in a temporary folder."""

    home: Path
    port: int = field(default_factory=free_port)
    proc: subprocess.Popen | None = None

    @property
    def api_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/api"

    def env(self) -> dict[str, str]:
        return {
            **os.environ,
            "PREFECT_HOME": str(self.home),
            "PREFECT_API_DATABASE_CONNECTION_URL": f"sqlite+aiosqlite:///{self.home / 'prefect.db'}",
            "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
            "PREFECT_SERVER_UI_ENABLED": "false",
        }

    def healthy(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.api_url}/health", timeout=2) as resp:
                return resp.status == 200
        except OSError:
            return False

    def start(self, timeout: float = 180) -> None:
        self.home.mkdir(parents=True, exist_ok=True)
        log = open(self.home / "server.log", "ab")
        self.proc = subprocess.Popen(
            [str(PREFECT), "server", "start", "--host", "127.0.0.1", "--port", str(self.port)],
            env=self.env(), cwd=self.home, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
        deadline = time.monotonic() + timeout
        while not self.healthy():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                tail = (self.home / "server.log").read_text(errors="replace")[-3000:]
                self.stop()
                raise RuntimeError(f"prefect server did not become healthy on port {self.port}:\n{tail}")
            time.sleep(0.5)

    def stop(self) -> None:
        """SIGTERM the server's process group (uvicorn and its children), SIGKILL after 20 s."""
        if self.proc is None or self.proc.poll() is not None:
            return
        os.killpg(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=10)


def read_log(proc: subprocess.Popen) -> str:
    """The combined stdout/stderr of a run started by FlowRunner."""
    path = getattr(proc, "log_path", None)
    return Path(path).read_text(errors="replace") if path and Path(path).exists() else ""


@dataclass
class FlowRunner:
    """Starts flow runs of one config in subprocesses (all against the module's Prefect server)."""

    server: PrefectServer
    config: Path
    faults: Path
    state: Path
    count: int = 0

    def start(self, *overrides: str, pause: str = "", enospc: str = "", env: dict[str, str] | None = None
              ) -> subprocess.Popen:
        self.count += 1
        log_path = self.faults / f"run-{self.count}.log"
        cmd = [sys.executable, str(LAUNCH), "--config", str(self.config)]
        for item in overrides:
            cmd += ["--set", item]
        full_env = {
            **os.environ,
            "PREFECT_API_URL": self.server.api_url,
            "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
            "PREFECT_RESULTS_LOCAL_STORAGE_PATH": str(self.state / "prefect-results"),
            "PREFECT_LOGGING_LEVEL": "INFO",
            "DPO_FAULT_DIR": str(self.faults),
            "DPO_FAULT_PAUSE": pause,
            "DPO_FAULT_ENOSPC": enospc,
            "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0",  # a closed port fails at once; tracking.tracker retries itself
            "MLFLOW_HTTP_REQUEST_TIMEOUT": "5",
            "DPO_FAULT_BACKOFF": "0.05",  # the same retries against a dead MLflow, 20x shorter sleeps in between
            "PYTHONUNBUFFERED": "1",
            **(env or {}),
        }
        full_env.pop("PREFECT_HOME", None)
        with open(log_path, "wb") as log:
            proc = subprocess.Popen(cmd, cwd=REPO, env=full_env, stdout=log, stderr=subprocess.STDOUT,
                                    stdin=subprocess.DEVNULL, start_new_session=True)
        proc.log_path = log_path  # type: ignore[attr-defined]
        return proc

    def marker(self, point: str, proc: subprocess.Popen) -> Path:
        return self.faults / f"{point}.{proc.pid}"

    def wait_paused(self, proc: subprocess.Popen, point: str, timeout: float = 240) -> None:
        wait_for(lambda: self.marker(point, proc).exists(), timeout, f"pause point '{point}'", proc)

    def release(self, point: str) -> None:
        (self.faults / f"{point}.go").touch()

    def kill(self, proc: subprocess.Popen) -> None:
        """SIGKILL the flow's process (no cleanup, no finally blocks, no atexit)."""
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
        assert proc.returncode == -signal.SIGKILL

    def kill_at(self, point: str, *overrides: str) -> str:
        """Run the flow until `point`, SIGKILL it there; return its log."""
        proc = self.start(*overrides, pause=point)
        try:
            self.wait_paused(proc, point)
        finally:
            if proc.poll() is None:
                self.kill(proc)
        return read_log(proc)

    def finish(self, proc: subprocess.Popen, timeout: float = 300) -> tuple[int, str, dict | None]:
        """Wait for a run; return (exit code, log, its summary or None)."""
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill(proc)
            raise AssertionError(f"flow run did not finish in {timeout} s:\n{read_log(proc)[-4000:]}") from None
        summary_path = self.faults / f"summary.{proc.pid}.json"
        summary = json.loads(summary_path.read_text()) if summary_path.exists() else None
        return proc.returncode, read_log(proc), summary

    def run(self, *overrides: str, **kwargs) -> tuple[int, str, dict | None]:
        return self.finish(self.start(*overrides, **kwargs))

    def train_calls(self) -> list[str]:
        path = self.faults / "train-calls"
        return path.read_text().split() if path.exists() else []


def tiny_config(tiny_model_dir: Path, root: Path, *, registry: bool, pairs: int = 8) -> dict:
    """A flow config that runs in seconds: the tiny random Llama, `pairs` shipped pairs, 4 steps of 2 pairs."""
    data = root / "pairs.jsonl"
    data.write_text("\n".join(DATA.read_text().splitlines()[:pairs]) + "\n")
    state = root / "state"
    return {
        "model": {"name_or_path": str(tiny_model_dir)},
        "data": {"train": [{"path": str(data)}], "eval": None, "eval_fraction": 0.25},
        "template": {"max_length": 64, "max_prompt_length": 32},
        "train": {"batch_size": 1, "max_steps": 4, "checkpoint_every": 1, "keep_checkpoints": 2,
                  "learning_rate": 1e-3, "warmup_ratio": 0.0, "reference_batch_size": 4},
        "eval": {"batch_size": 4, "bootstrap_samples": 20, "n_generations": 1, "generation_batch_size": 1,
                 "max_new_tokens": 4},
        "registry": {"enabled": registry, "experiment": "faults", "model_name": "faults-policy",
                     "tracking_uri": f"sqlite:///{root / 'mlflow' / 'mlflow.db'}"},
        "state_dir": str(state),
    }


def make_runner(server: PrefectServer, tiny_model_dir: Path, root: Path, *, registry: bool) -> FlowRunner:
    root.mkdir(parents=True, exist_ok=True)
    cfg = tiny_config(tiny_model_dir, root, registry=registry)
    config = root / "config.yaml"
    config.write_text(yaml.safe_dump(cfg))
    faults = root / "faults"
    faults.mkdir()
    return FlowRunner(server, config, faults, Path(cfg["state_dir"]))
