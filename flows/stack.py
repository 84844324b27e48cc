"""The local stack behind `make up` / `make down`: a Prefect server, an MLflow server, a process work pool with the
project's deployments, and a worker, all bound to 127.0.0.1 with their state under the project's state folder.

    python -m flows.stack up   [--state-dir .dpo_state] [--prefect-port 4200] [--mlflow-port 5000]
    python -m flows.stack down [--state-dir .dpo_state]

`up` records the PIDs it started (each in its own process group) in `<state>/stack/pids.json` and writes the
environment line other shells need to `<state>/stack/env.sh`; `down` stops exactly those process groups.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parents[1]
WORK_POOL = "dpo-local"
BIN = Path(sys.executable).parent


class StackError(RuntimeError):
    """The stack could not be started or stopped; the message says which process and where its log is."""


@dataclass
class StackPaths:
    root: Path

    @property
    def stack(self) -> Path:
        return self.root / "stack"

    @property
    def logs(self) -> Path:
        return self.stack / "logs"

    @property
    def pids(self) -> Path:
        return self.stack / "pids.json"

    @property
    def env_file(self) -> Path:
        return self.stack / "env.sh"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def port_in_use(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


def server_env(paths: StackPaths, prefect_port: int, mlflow_port: int) -> dict[str, str]:
    """The environment every stack process and every client shell uses."""
    env = dict(os.environ)
    env.update(
        {
            "PREFECT_HOME": str(paths.stack / "prefect-home"),
            "PREFECT_API_DATABASE_CONNECTION_URL": f"sqlite+aiosqlite:///{paths.stack / 'prefect.db'}",
            "PREFECT_SERVER_API_HOST": "127.0.0.1",
            "PREFECT_SERVER_API_PORT": str(prefect_port),
            "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
            "PREFECT_API_URL": f"http://127.0.0.1:{prefect_port}/api",
            "PREFECT_UI_URL": f"http://127.0.0.1:{prefect_port}",
            "MLFLOW_TRACKING_URI": f"http://127.0.0.1:{mlflow_port}",
            "DPO_STATE_DIR": str(paths.root),
            "DPO_WORK_POOL": WORK_POOL,
            "PREFECT_RESULTS_LOCAL_STORAGE_PATH": str(paths.root / "prefect" / "results"),
            "HF_HUB_OFFLINE": "1",
            "TOKENIZERS_PARALLELISM": "false",
        }
    )
    return env


def _spawn(name: str, cmd: list[str], env: dict[str, str], paths: StackPaths) -> int:
    paths.logs.mkdir(parents=True, exist_ok=True)
    log = open(paths.logs / f"{name}.log", "ab")
    proc = subprocess.Popen(cmd, env=env, cwd=PROJECT_ROOT, stdout=log, stderr=subprocess.STDOUT,
                            stdin=subprocess.DEVNULL, start_new_session=True)
    return proc.pid


def _wait_healthy(name: str, url: str, pid: int, paths: StackPaths, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            raise StackError(f"{name} exited during start-up; see {paths.logs / (name + '.log')}") from None
        try:
            with urllib.request.urlopen(url, timeout=2) as resp:
                if resp.status == 200:
                    return
        except OSError:
            pass
        time.sleep(1)
    raise StackError(f"{name} not healthy at {url} after {timeout_s:.0f} s; see {paths.logs / (name + '.log')}")


def _run(cmd: list[str], env: dict[str, str], what: str) -> None:
    done = subprocess.run(cmd, env=env, cwd=PROJECT_ROOT, capture_output=True, text=True)
    if done.returncode != 0:
        tail = "\n".join((done.stdout + done.stderr).strip().splitlines()[-15:])
        raise StackError(f"{what} failed (exit {done.returncode}):\n{tail}")


def up(state_dir: Path, prefect_port: int = 4200, mlflow_port: int = 5000, timeout_s: float = 120) -> dict[str, str]:
    """Start servers, create the pool, deploy, start a worker; return the UI addresses and the client env."""
    paths = StackPaths(Path(state_dir).resolve())
    if paths.pids.exists():
        raise StackError(f"a stack is already recorded in {paths.pids}; run `make down` first")
    for port in (prefect_port, mlflow_port):
        if port_in_use(port):
            raise StackError(f"port {port} on 127.0.0.1 is taken; pass another with --prefect-port/--mlflow-port")
    paths.stack.mkdir(parents=True, exist_ok=True)
    env = server_env(paths, prefect_port, mlflow_port)
    pids: dict[str, int] = {}

    def record() -> None:
        paths.pids.write_text(json.dumps(pids, indent=1))

    try:
        pids["prefect-server"] = _spawn(
            "prefect-server",
            [str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(prefect_port)], env, paths)
        record()
        artifacts = paths.stack / "mlflow-artifacts"
        pids["mlflow-server"] = _spawn(
            "mlflow-server",
            [str(BIN / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(mlflow_port), "--workers", "1",
             "--backend-store-uri", f"sqlite:///{paths.stack / 'mlflow.db'}",
             "--artifacts-destination", str(artifacts)], env, paths)
        record()
        _wait_healthy("prefect-server", f"http://127.0.0.1:{prefect_port}/api/health", pids["prefect-server"], paths,
                      timeout_s)
        _wait_healthy("mlflow-server", f"http://127.0.0.1:{mlflow_port}/health", pids["mlflow-server"], paths,
                      timeout_s)
        prefect = str(BIN / "prefect")
        _run([prefect, "work-pool", "create", WORK_POOL, "--type", "process", "--overwrite"], env,
             "creating the work pool")
        _run([prefect, "--no-prompt", "deploy", "--all"], env, "prefect deploy --all")
        pids["prefect-worker"] = _spawn("prefect-worker", [prefect, "worker", "start", "--pool", WORK_POOL], env, paths)
        record()
    except BaseException:
        down(paths.root)
        raise
    client = {k: env[k] for k in ("PREFECT_API_URL", "MLFLOW_TRACKING_URI", "DPO_STATE_DIR")}
    paths.env_file.write_text("".join(f"export {k}={v}\n" for k, v in client.items()))
    return {"prefect_ui": env["PREFECT_UI_URL"], "mlflow_ui": env["MLFLOW_TRACKING_URI"],
            "env_file": str(paths.env_file), **client}


def _alive(pid: int) -> bool:
    try:  # a child of this process (`up` ran here) that exited stays a zombie, which signal 0 reaches, until reaped
        if os.waitpid(pid, os.WNOHANG)[0] == pid:
            return False
    except ChildProcessError:  # not a child of this process
        pass
    try:
        os.kill(pid, 0)
        return True
    except ProcessLookupError:
        return False
    except PermissionError:
        return True


def down(state_dir: Path, grace_s: float = 15) -> list[str]:
    """Stop the process groups recorded by `up` (SIGTERM, then SIGKILL after `grace_s`); return what was stopped."""
    paths = StackPaths(Path(state_dir).resolve())
    if not paths.pids.exists():
        return []
    pids: dict[str, int] = json.loads(paths.pids.read_text())
    for pid in pids.values():
        try:
            os.killpg(pid, signal.SIGTERM)
        except (ProcessLookupError, PermissionError):
            pass
    deadline = time.monotonic() + grace_s
    while time.monotonic() < deadline and any(_alive(p) for p in pids.values()):
        time.sleep(0.3)
    for pid in pids.values():
        try:
            os.killpg(pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
    paths.pids.unlink(missing_ok=True)
    paths.env_file.unlink(missing_ok=True)
    return list(pids)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m flows.stack")
    parser.add_argument("command", choices=["up", "down"])
    parser.add_argument("--state-dir", default=os.environ.get("DPO_STATE_DIR") or ".dpo_state")
    parser.add_argument("--prefect-port", type=int, default=4200)
    parser.add_argument("--mlflow-port", type=int, default=5000)
    args = parser.parse_args(argv)
    try:
        if args.command == "up":
            info = up(Path(args.state_dir), args.prefect_port, args.mlflow_port)
            print(f"Prefect UI: {info['prefect_ui']}\nMLflow UI:  {info['mlflow_ui']}")
            print(f"In another shell: source {info['env_file']}   (or: export PREFECT_API_URL={info['PREFECT_API_URL']} "
                  f"MLFLOW_TRACKING_URI={info['MLFLOW_TRACKING_URI']})")
            print("Then: .venv/bin/prefect deployment run dpo/full     Stop everything: make down")
        else:
            stopped = down(Path(args.state_dir))
            print(f"stopped: {', '.join(stopped)}" if stopped else "no stack recorded; nothing to stop")
    except StackError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
