"""Small helpers the stage tasks share: model loading one thread at a time, the import preload before stages run in
threads, the Prefect retry condition, and progress artifacts that never break or stall a run."""

from __future__ import annotations

import contextvars
import logging
import threading
import time
from typing import Any

from prefect.artifacts import create_progress_artifact, update_progress_artifact

from tracking.retry import is_transient

log = logging.getLogger(__name__)

# transformers' from_pretrained is not thread-safe (it initialises on the meta device and ties weights through
# process-wide state): evaluate and compare run concurrently in threads, so they load models one at a time.
MODEL_LOAD_LOCK = threading.Lock()


def load_model_locked(path, model_cfg, spec):
    """`dpo_core.models.load_model` under MODEL_LOAD_LOCK, in eval mode."""
    from dpo_core.models import load_model

    with MODEL_LOAD_LOCK:
        return load_model(path, model_cfg, spec).eval()


def preload_for_threads(judge_kind: str | None = None) -> None:
    """Import what concurrently running stages import, once, in the calling thread.

    transformers resolves its classes lazily; two threads doing that first import at once can make one of them fail
    with `ImportError: cannot import name 'AutoModelForCausalLM' from 'transformers'` (Python hands a partially
    initialised module to one thread to break an import-lock cycle). It happens when training was reused, so nothing
    imported these before evaluate and compare start side by side (tests/faults/test_thread_imports.py reproduces it).
    """
    import transformers

    for name in ("AutoConfig", "AutoModelForCausalLM", "AutoTokenizer", "GenerationConfig", "PreTrainedModel"):
        getattr(transformers, name)
    if judge_kind in ("bradley_terry", "similarity"):
        import sentence_transformers  # noqa: F401


def retry_transient_only(_task: Any, _task_run: Any, state: Any) -> bool:
    """Prefect `retry_condition_fn`: retry only when the failure was transient (`tracking.retry.is_transient`)."""
    try:
        state.result()
    except BaseException as exc:  # noqa: BLE001 - classifying, not handling
        return is_transient(exc)
    return False


class Progress:
    """A Prefect progress artifact updated at most every `every_s` seconds (a no-op outside a Prefect run)."""

    def __init__(self, key: str, description: str, every_s: float = 5.0, bar_unit: str | None = None) -> None:
        self.every_s = every_s
        self._last = 0.0
        self._id = None
        self._bar = None
        self._bar_unit = bar_unit
        self._description = description
        self._sender: threading.Thread | None = None
        try:
            self._id = create_progress_artifact(progress=0.0, key=key, description=description)
        except Exception as exc:  # outside a flow run, or the API is momentarily unreachable: progress is optional
            log.debug("no progress artifact: %s", exc)

    def update(self, done: int, total: int, force: bool = False) -> None:
        if self._bar_unit is not None:  # a terminal progress bar as well (stderr)
            from tqdm.auto import tqdm

            if self._bar is None:
                self._bar = tqdm(total=total, desc=self._description, unit=self._bar_unit, dynamic_ncols=True)
            self._bar.update(done - self._bar.n)
            if done >= total:
                self._bar.close()
        now = time.monotonic()
        if self._id is None or (not force and now - self._last < self.every_s and done < total):
            return
        self._last = now
        if self._sender is not None and self._sender.is_alive():
            if not force:
                return  # the API is slow or down (its client retries for ~1 min): skip, never make the work wait
            self._sender.join(timeout=2.0)  # keep the final update after the one in flight when that is quick
        # sent from a thread: an unreachable Prefect server must not stall training
        # (tests/faults: test_prefect_server_restart_during_training)
        context = contextvars.copy_context()  # the run's Prefect settings and client context
        self._sender = threading.Thread(target=context.run, args=(self._send, 100.0 * done / max(total, 1)),
                                        name="prefect-progress", daemon=True)
        self._sender.start()

    def _send(self, progress: float) -> None:
        try:
            update_progress_artifact(artifact_id=self._id, progress=progress)
        except Exception as exc:
            log.debug("progress update failed: %s", exc)
