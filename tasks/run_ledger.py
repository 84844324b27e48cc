"""Close the books of flow runs that were killed: Prefect `Crashed`, MLflow `KILLED`, on the next run.

Nothing reports the end of a flow run whose process died by SIGKILL (the OOM killer, `kill -9`, a lost VM): the
Prefect server keeps it `Running` (a worker marks the runs it started `Crashed`; a CLI run has no worker) and, if it
died during registration, its MLflow run stays `RUNNING`. So every flow run records itself in
`<state_dir>/runs/<flow_run_id>.json` (host, pid) when it starts and removes the entry when it ends (any end its
process lives to see: completed, failed, cancelled). The next flow run started on the same host reads the ledger: an
entry whose process no longer exists belongs to a killed run, which it marks `Crashed` in Prefect and `KILLED` in
MLflow, then drops. Entries of live processes (a concurrent run) and of other hosts are left alone; an entry whose
bookkeeping fails (a server down) stays for the run after.
"""

from __future__ import annotations

import json
import logging
import os
import socket
from collections.abc import Callable
from pathlib import Path

from dpo_core.fileio import atomic_file

log = logging.getLogger(__name__)

__all__ = ["record_start", "record_end", "reap_killed", "process_alive"]


def _ledger(state_dir: Path) -> Path:
    return Path(state_dir) / "runs"


def record_start(state_dir: Path, flow_run_id: str) -> Path:
    """Write this process's ledger entry for `flow_run_id` (atomically) and return its path."""
    entry = _ledger(state_dir) / f"{flow_run_id}.json"
    with atomic_file(entry) as handle:
        handle.write(json.dumps({"flow_run_id": flow_run_id, "host": socket.gethostname(), "pid": os.getpid()}))
    return entry


def record_end(entry: Path) -> None:
    """Drop the entry (the run's process saw its end)."""
    entry.unlink(missing_ok=True)


def process_alive(pid: int) -> bool:
    """Whether a process with this pid exists on this host (a reused pid counts as alive: the safe side)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def reap_killed(
    state_dir: Path,
    *,
    current_flow_run_id: str,
    crash_flow_run: Callable[[str], None],
    kill_mlflow_run: Callable[[str], None] | None = None,
    warn: Callable[[str], None] = log.warning,
) -> list[str]:
    """Close every ledger entry of this host whose process is gone; return their flow run ids.

    `crash_flow_run(id)` sets the Prefect flow run `Crashed` (if it is not already final); `kill_mlflow_run(id)` sets
    the MLflow run tagged with that flow run `KILLED` (if it is `RUNNING`). An entry stays when either raises
    (`warn` gets a one-line message).
    """
    folder, host, reaped = _ledger(state_dir), socket.gethostname(), []
    if not folder.is_dir():
        return reaped
    for entry in sorted(folder.glob("*.json")):
        try:
            record = json.loads(entry.read_text())
            flow_run_id, pid = str(record["flow_run_id"]), int(record["pid"])
        except (OSError, ValueError, KeyError, TypeError) as exc:
            warn(f"run ledger: unreadable entry {entry.name} dropped ({exc})")
            entry.unlink(missing_ok=True)
            continue
        if flow_run_id == current_flow_run_id or record.get("host") != host or process_alive(pid):
            continue
        try:
            crash_flow_run(flow_run_id)
            if kill_mlflow_run is not None:
                kill_mlflow_run(flow_run_id)
        except Exception as exc:  # a server down: try again on the next run
            warn(f"run ledger: could not close killed flow run {flow_run_id} yet (tried again on the next run): {exc}")
            continue
        entry.unlink(missing_ok=True)
        reaped.append(flow_run_id)
    return reaped


def crash_prefect_flow_run(flow_run_id: str, *, closed_by: str) -> None:
    """Set a flow run that is not in a final state to `Crashed` (a flow run the server no longer knows is skipped)."""
    from prefect.client.orchestration import get_client
    from prefect.exceptions import ObjectNotFound
    from prefect.states import Crashed

    with get_client(sync_client=True) as client:
        try:
            run = client.read_flow_run(flow_run_id)
        except ObjectNotFound:
            return
        if run.state is not None and run.state.is_final():
            return
        message = (f"its process died without reporting an end (killed, e.g. SIGKILL or out of memory); "
                   f"closed by flow run {closed_by}")
        client.set_flow_run_state(flow_run_id, Crashed(message=message), force=True)

