"""`python -m flows.dpo` with test-only fault hooks, for the fault suite (tests/faults); never used in production.

The hooks are installed by wrapping functions the stages call, so the production code carries no fault-injection
branches. Each is switched on by an environment variable and is a no-op otherwise:

    DPO_FAULT_DIR          folder for markers (required when any hook below is set)
    DPO_FAULT_PAUSE        comma-separated points at which to stop: write `<dir>/<point>.<pid>`, then wait until
                           `<dir>/<point>.go` exists (the test SIGKILLs the process there, or creates the file):
                             ingest             pairs.parquet written into the ingest stage's temporary folder
                             reference          reference.parquet written *truncated to half* (a torn write)
                             after-ckpt-N       checkpoint step N complete (between two checkpoint writes)
                             in-ckpt-N          checkpoint step N's files written, its manifest not yet
                             train              inside the train stage's key lock, before training starts
                             train-finished     training done, final model saved, the train artifact not yet
                                                renamed into place
                             register           MLflow run started, before the model is logged and registered
    DPO_FAULT_ENOSPC       make one write fail with OSError(ENOSPC) ("No space left on device"):
                             ckpt-N             the model weights of checkpoint step N
                             reference          the reference table
    DPO_FAULT_BACKOFF      a factor on the sleeps between MLflow retries (tracking.retry.RetryPolicy): with 0.05 a
                           dead tracking server fails after the same 4 tries in 0.35 s instead of 7 s

Always recorded (cheap): `<dir>/train-calls` gets one line per call of the trainer (pid), `<dir>/lock-<stage>.<pid>`
is touched just before a stage key lock is requested, and the flow's summary is written to `<dir>/summary.<pid>.json`.

Usage: python tests/faults/launch.py --config cfg.yaml [--set k=v ...]   (the same arguments as `python -m flows.dpo`)
"""

from __future__ import annotations

import contextlib
import errno
import functools
import json
import os
import re
import sys
import time
from pathlib import Path
from typing import Any

FAULT_DIR = Path(os.environ.get("DPO_FAULT_DIR") or ".")
PAUSE = {p.strip() for p in os.environ.get("DPO_FAULT_PAUSE", "").split(",") if p.strip()}
ENOSPC = {p.strip() for p in os.environ.get("DPO_FAULT_ENOSPC", "").split(",") if p.strip()}
BACKOFF = float(os.environ.get("DPO_FAULT_BACKOFF") or 1.0)


def pause(point: str) -> None:
    """Mark that `point` was reached and wait until the test releases it (or kills this process)."""
    if point not in PAUSE:
        return
    (FAULT_DIR / f"{point}.{os.getpid()}").write_text(str(time.time()))
    go = FAULT_DIR / f"{point}.go"
    while not go.exists():
        time.sleep(0.1)


def no_space(path: Any) -> OSError:
    return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))


def _step_of_tmp(folder: Path) -> int | None:
    """The step of a checkpoint's temporary folder `.step-000003.tmp-xxxxxxxx` (None for other folders)."""
    match = re.match(r"^\.step-(\d+)\.tmp-", Path(folder).name)
    return int(match.group(1)) if match else None


def install() -> None:
    import dpo_core.checkpoints as checkpoints
    import dpo_core.train_main as train_main
    import dpo_core.trainer as trainer
    import flows.dpo as flow_module
    import tasks.artifacts as artifacts
    import tasks.ingest as ingest
    import tasks.reference as reference
    import tasks.register as register
    import tasks.train as train_task
    import tracking.retry as retry

    delays = retry.RetryPolicy.delays

    @functools.wraps(delays)
    def delays_hook(self):
        return [BACKOFF * d for d in delays(self)]

    retry.RetryPolicy.delays = delays_hook

    write_pairs = ingest.write_pairs

    @functools.wraps(write_pairs)
    def write_pairs_hook(df, path):
        write_pairs(df, path)
        pause("ingest")

    ingest.write_pairs = write_pairs_hook

    write_reference = reference.write_reference_table

    @functools.wraps(write_reference)
    def write_reference_hook(df, path):
        if "reference" in ENOSPC:
            raise no_space(path)
        write_reference(df, path)
        if "reference" in PAUSE:
            size = Path(path).stat().st_size
            with open(path, "r+b") as f:  # a torn write: only the first half reached the disk
                f.truncate(size // 2)
            pause("reference")

    reference.write_reference_table = write_reference_hook

    save_checkpoint = trainer.save_checkpoint

    @functools.wraps(save_checkpoint)
    def save_checkpoint_hook(root, step, **kwargs):
        out = save_checkpoint(root, step, **kwargs)
        pause(f"after-ckpt-{step}")
        return out

    trainer.save_checkpoint = save_checkpoint_hook

    write_manifest = checkpoints.write_manifest

    @functools.wraps(write_manifest)
    def write_manifest_hook(folder, *args, **kwargs):
        step = _step_of_tmp(folder)
        if step is not None:
            pause(f"in-ckpt-{step}")
        return write_manifest(folder, *args, **kwargs)

    checkpoints.write_manifest = write_manifest_hook

    save_tensors = checkpoints._save_tensors

    @functools.wraps(save_tensors)
    def save_tensors_hook(tensors, path):
        step = _step_of_tmp(Path(path).parent)
        if step is not None and f"ckpt-{step}" in ENOSPC:
            raise no_space(path)
        save_tensors(tensors, path)

    checkpoints._save_tensors = save_tensors_hook

    train_fn = train_main.train  # what the one training entry (run_train_job) calls

    @functools.wraps(train_fn)
    def train_hook(*args, **kwargs):
        with open(FAULT_DIR / "train-calls", "a") as f:
            f.write(f"{os.getpid()}\n")
        pause("train")
        return train_fn(*args, **kwargs)

    train_main.train = train_hook

    finish = train_task._finish

    @functools.wraps(finish)
    def finish_hook(*args, **kwargs):
        out = finish(*args, **kwargs)
        pause("train-finished")
        return out

    train_task._finish = finish_hook

    key_lock = artifacts.key_lock

    @contextlib.contextmanager
    def key_lock_hook(cfg, stage, key):
        (FAULT_DIR / f"lock-{stage}.{os.getpid()}").touch()
        with key_lock(cfg, stage, key):
            yield

    artifacts.key_lock = key_lock_hook

    register_policy = register.register_policy

    @functools.wraps(register_policy)
    def register_hook(*args, **kwargs):
        pause("register")
        return register_policy(*args, **kwargs)

    register.register_policy = register_hook

    print_summary = flow_module._print_summary

    def print_summary_hook(summary: dict[str, Any]) -> None:
        (FAULT_DIR / f"summary.{os.getpid()}.json").write_text(json.dumps(summary, default=str))
        print_summary(summary)

    flow_module._print_summary = print_summary_hook


def main() -> int:
    FAULT_DIR.mkdir(parents=True, exist_ok=True)
    install()
    from flows.dpo import main as flow_main

    return flow_main(sys.argv[1:])


if __name__ == "__main__":
    sys.exit(main())
