"""Run a training (or reference) job on several processes with torchrun; stream the ranks' output into Prefect.

``launch_training(job, processes)`` (``launch_reference`` likewise) writes the job file, runs

    python -m torch.distributed.run --standalone --nproc_per_node N --tee 3 -m dpo_core.train_main JOB.json

(with ``train.nnodes > 1``: ``--nnodes M --nproc_per_node N/M --rdzv-backend c10d --rdzv-endpoint host:port
--rdzv-id ID`` instead of ``--standalone``; the same command must then be started on the other nodes, against the same
job file and output folder on a shared filesystem: this launcher starts only this node's part)

and reads every output line as it comes: torchrun prefixes rank r's lines with ``[default<r>]:``; rank 0's
``DPO_PROGRESS {json}`` lines become ``on_progress(dict)`` calls, everything else goes to the logger. If a rank
dies, torchrun stops the others and names the first failure ("Root Cause"); ``RankFailedError`` then says which
rank it was, its exit code and its last lines.
"""

from __future__ import annotations

import collections
import json
import logging
import os
import re
import subprocess
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

from dpo_core.train_main import PROGRESS_PREFIX, RESULT_FILE, ReferenceJob, TrainJob, read_result

__all__ = ["RankFailedError", "torchrun_command", "launch_training", "launch_reference"]

JOB_FILE = "train_job.json"
REFERENCE_JOB_FILE = "reference_job.json"
_RANK_LINE = re.compile(r"^\[[A-Za-z_]*?(\d+)\]:(.*)$")
_ROOT_CAUSE = re.compile(r"Root Cause.*?rank\s*:\s*(\d+).*?exitcode\s*:\s*(-?\d+)", re.S)
_LAST_LINES = 20


class RankFailedError(RuntimeError):
    """A training rank died: ``rank`` (None if torchrun itself failed), ``exit_code`` and ``last_lines``."""

    def __init__(self, rank: int | None, exit_code: int, last_lines: list[str], world: int) -> None:
        self.rank, self.exit_code, self.last_lines = rank, exit_code, last_lines
        who = f"rank {rank} of {world}" if rank is not None else f"torchrun ({world} processes)"
        tail = "\n".join(f"    {line}" for line in last_lines) or "    (no output)"
        super().__init__(f"distributed run failed: {who} exited with code {exit_code}; its last lines:\n{tail}")


def _logger() -> logging.Logger | logging.LoggerAdapter:
    """The Prefect run logger inside a flow/task run, this module's logger otherwise."""
    try:
        from prefect.exceptions import MissingContextError
        from prefect.logging import get_run_logger

        try:
            return get_run_logger()
        except MissingContextError:
            pass
    except ImportError:  # pragma: no cover - prefect is a dependency of tasks/
        pass
    return logging.getLogger(__name__)


def torchrun_command(job_path: Path, processes: int, *, nnodes: int = 1, rdzv_endpoint: str | None = None,
                     rdzv_id: str = "dpo") -> list[str]:
    """The torchrun command line for ``processes`` ranks: on this machine (``--standalone``), or with ``nnodes > 1``
    ``processes / nnodes`` ranks on each of ``nnodes`` machines that meet at the c10d rendezvous ``rdzv_endpoint``
    (host:port; the same command is started on every node)."""
    if nnodes == 1:
        where = ["--standalone", f"--nproc_per_node={processes}"]
    else:
        if processes % nnodes:
            raise ValueError(f"{processes} processes cannot be split evenly over {nnodes} nodes")
        if not rdzv_endpoint:
            raise ValueError(f"{nnodes} nodes need a rendezvous endpoint (host:port)")
        where = [f"--nnodes={nnodes}", f"--nproc_per_node={processes // nnodes}", "--rdzv-backend=c10d",
                 f"--rdzv-endpoint={rdzv_endpoint}", f"--rdzv-id={rdzv_id}"]
    return [sys.executable, "-m", "torch.distributed.run", *where, "--tee=3", "-m", "dpo_core.train_main",
            str(job_path)]


def launch_training(
    job: TrainJob,
    processes: int,
    *,
    on_progress: Callable[[dict[str, Any]], None] | None = None,
    logger: logging.Logger | logging.LoggerAdapter | None = None,
    env: dict[str, str] | None = None,
    timeout_s: float | None = None,
) -> dict[str, Any]:
    """Run ``job`` on ``processes`` ranks; return rank 0's result record (see ``dpo_core.train_main.run_train_job``).

    ``on_progress`` gets each optimizer step's metrics (TRL names, ``step``, ``total_steps``). Raises
    ``RankFailedError`` naming the rank that died and its last lines; ``TimeoutError`` after ``timeout_s``
    (torchrun and its ranks are stopped).
    """
    if job.train.processes != processes:
        raise ValueError(f"job.train.processes={job.train.processes} but {processes} processes were requested")
    return _launch(job, job.result_dir / JOB_FILE, processes, on_progress, logger, env, timeout_s)


def launch_reference(
    job: ReferenceJob,
    *,
    on_progress: Callable[[dict[str, Any]], None] | None = None,
    logger: logging.Logger | logging.LoggerAdapter | None = None,
    env: dict[str, str] | None = None,
    timeout_s: float | None = None,
) -> dict[str, Any]:
    """The reference precompute on ``job.processes`` ranks (rows split, one table gathered and written by rank 0).

    ``on_progress`` gets ``{"done": pairs, "total": pairs}`` (rank 0's share scaled to the whole table).
    """
    return _launch(job, job.result_dir / REFERENCE_JOB_FILE, job.processes, on_progress, logger, env, timeout_s)


def _launch(job: TrainJob | ReferenceJob, job_file: Path, processes: int, on_progress, logger, env,
            timeout_s) -> dict[str, Any]:
    if processes < 2:
        raise ValueError(f"torchrun launches are for 2 or more processes, got {processes}; run in this process")
    log = logger or _logger()
    out_dir = job.result_dir
    job_path = job.write(job_file)
    (out_dir / RESULT_FILE).unlink(missing_ok=True)  # never read a previous attempt's result
    train = job.train if isinstance(job, TrainJob) else None
    nodes = {"nnodes": train.nnodes, "rdzv_endpoint": train.rdzv_endpoint, "rdzv_id": train.rdzv_id} if train else {}
    cmd = torchrun_command(job_path, processes, **nodes)
    log.info("launching %d %s processes: %s", processes, job.kind, " ".join(cmd))
    if train is not None and train.nnodes > 1:
        log.info("start the same command on the other %d node(s); they must see %s at the same path",
                 train.nnodes - 1, job_path)
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    tails: dict[int | None, collections.deque[str]] = collections.defaultdict(
        lambda: collections.deque(maxlen=_LAST_LINES))
    launcher_lines: list[str] = []  # torchrun's own output (holds the failure summary)
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=full_env,
                            start_new_session=True)
    expired = threading.Event()

    def expire() -> None:
        expired.set()
        _kill_group(proc)

    timer = threading.Timer(timeout_s, expire) if timeout_s else None
    if timer is not None:
        timer.start()
    try:
        assert proc.stdout is not None
        for raw in proc.stdout:
            line = raw.rstrip("\n")
            match = _RANK_LINE.match(line)
            if match is None:
                launcher_lines.append(line)
                tails[None].append(line)
                log.info("[torchrun] %s", line)
                continue
            rank, text = int(match.group(1)), match.group(2)
            tails[rank].append(text)
            if rank == 0 and text.startswith(PROGRESS_PREFIX):
                try:
                    info = json.loads(text[len(PROGRESS_PREFIX):])
                except json.JSONDecodeError:  # progress is for display: a damaged line is logged, never fatal
                    log.warning("[rank 0] unreadable progress line: %s", text)
                    continue
                if on_progress is not None:
                    on_progress(info)
                continue
            log.info("[rank %d] %s", rank, text)
        code = proc.wait()
    except BaseException:
        _kill_group(proc)
        raise
    finally:
        if timer is not None:
            timer.cancel()
        proc.stdout.close()
    if expired.is_set():
        raise TimeoutError(f"distributed training did not finish within {timeout_s} s; its processes were stopped")
    if code != 0:
        rank, rank_code = _failed_rank("\n".join(launcher_lines), tails)
        raise RankFailedError(rank, rank_code if rank_code is not None else code, list(tails[rank]), processes)
    return read_result(out_dir)


def _failed_rank(launcher_output: str, tails: dict[int | None, Any]) -> tuple[int | None, int | None]:
    """(rank, exit code) of torchrun's "Root Cause" entry; else the first rank that printed a traceback."""
    match = _ROOT_CAUSE.search(launcher_output)
    if match:
        return int(match.group(1)), int(match.group(2))
    for rank in sorted(r for r in tails if r is not None):
        if any(line.startswith("Traceback") for line in tails[rank]):
            return rank, None
    return None, None


def _kill_group(proc: subprocess.Popen) -> None:
    """Stop torchrun and its ranks (they share the session this launcher started)."""
    import signal

    if proc.poll() is None:
        try:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(timeout=30)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
