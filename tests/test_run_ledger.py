"""The run ledger: a flow run killed without reporting its end is closed (Crashed / KILLED) by the next run."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import pytest

from tasks.run_ledger import process_alive, reap_killed, record_end, record_start


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def _entry(state, flow_run_id: str, pid: int, host: str | None = None) -> None:
    folder = state / "runs"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{flow_run_id}.json").write_text(
        json.dumps({"flow_run_id": flow_run_id, "host": host or socket.gethostname(), "pid": pid}))


def test_killed_runs_are_closed_live_and_foreign_ones_are_left_alone(tmp_path):
    alive = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        dead = _dead_pid()
        assert not process_alive(dead) and process_alive(alive.pid) and process_alive(os.getpid())
        _entry(tmp_path, "killed", dead)
        _entry(tmp_path, "concurrent", alive.pid)
        _entry(tmp_path, "other-host", dead, host="somewhere-else")
        mine = record_start(tmp_path, "current")
        (tmp_path / "runs" / "garbage.json").write_text("{not json")
        crashed, killed = [], []
        reaped = reap_killed(tmp_path, current_flow_run_id="current", crash_flow_run=crashed.append,
                             kill_mlflow_run=killed.append)
        assert reaped == crashed == killed == ["killed"]
        left = sorted(p.stem for p in (tmp_path / "runs").glob("*.json"))
        assert left == ["concurrent", "current", "other-host"]  # the unreadable entry is dropped with a warning
        record_end(mine)
        assert not mine.exists()
    finally:
        alive.kill()
        alive.wait()


def test_an_entry_whose_bookkeeping_fails_stays_for_the_next_run(tmp_path):
    _entry(tmp_path, "killed", _dead_pid())

    def server_down(flow_run_id: str) -> None:
        raise ConnectionError("MLflow at http://127.0.0.1:1 unavailable")

    assert reap_killed(tmp_path, current_flow_run_id="x", crash_flow_run=lambda _: None,
                       kill_mlflow_run=server_down) == []
    assert (tmp_path / "runs" / "killed.json").exists()
    assert reap_killed(tmp_path, current_flow_run_id="x", crash_flow_run=lambda _: None) == ["killed"]
    assert not (tmp_path / "runs" / "killed.json").exists()


@pytest.mark.parametrize("missing", [True, False])
def test_no_ledger_folder_is_nothing_to_do(tmp_path, missing):
    if not missing:
        (tmp_path / "runs").mkdir()
    assert reap_killed(tmp_path, current_flow_run_id="x", crash_flow_run=lambda _: None) == []
