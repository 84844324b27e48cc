"""Test-only fault: rank R raises after optimizer step N, as if the process had failed there.

``failing(train_fn, after_step, rank)`` wraps ``dpo_core.trainer.train`` so that the ``on_step`` callback it is given
(after each step's checkpoint, if the step has one) is followed by a check that raises ``InjectedFailure`` on that
rank once step N is done. Nothing in the production code knows about it.

In the test process a test patches the name the entry path calls (``dpo_core.train_main.train``) with
``monkeypatch``. Processes a test starts (torchrun and its ranks) get it through the environment ``env()`` returns:
this folder first on ``PYTHONPATH``, so that Python imports the ``sitecustomize.py`` next to this file at start-up,
and the two variables below, which it reads:

    DPO_FAIL_AFTER_STEP   the optimizer step after which to raise
    DPO_FAIL_RANK         the rank that raises (default 0)
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

AFTER_STEP_ENV = "DPO_FAIL_AFTER_STEP"
RANK_ENV = "DPO_FAIL_RANK"
HERE = Path(__file__).resolve().parent


class InjectedFailure(RuntimeError):
    """Raised by the test-only step-failure hook."""


def failing(train_fn: Callable[..., Any], after_step: int, rank: int = 0) -> Callable[..., Any]:
    """``train_fn`` (``dpo_core.trainer.train``) whose rank ``rank`` raises once step ``after_step`` is done."""
    from dpo_core.distributed import current

    @functools.wraps(train_fn)
    def train(*args: Any, on_step: Callable[[dict], None] | None = None, **kwargs: Any):
        def step_done(metrics: dict) -> None:
            if on_step is not None:
                on_step(metrics)
            me = current().rank
            if me == rank and int(metrics["step"]) >= after_step:
                raise InjectedFailure(f"injected failure on rank {me} after step {metrics['step']}")

        return train_fn(*args, on_step=step_done, **kwargs)

    return train


def env(after_step: int, rank: int = 0) -> dict[str, str]:
    """Environment entries that make the processes a test starts fail as ``failing`` describes."""
    path = os.pathsep.join(p for p in (str(HERE), os.environ.get("PYTHONPATH", "")) if p)
    return {"PYTHONPATH": path, AFTER_STEP_ENV: str(after_step), RANK_ENV: str(rank)}


def install_from_env() -> None:
    """Patch ``dpo_core.trainer.train`` in this process when ``DPO_FAIL_AFTER_STEP`` is set (a no-op otherwise).

    Runs at interpreter start-up (``sitecustomize``), before ``dpo_core.train_main`` imports ``train``, so the
    patched function is the one every entry path calls.
    """
    after_step = os.environ.get(AFTER_STEP_ENV)
    if not after_step:
        return
    import dpo_core.trainer

    dpo_core.trainer.train = failing(dpo_core.trainer.train, int(after_step), int(os.environ.get(RANK_ENV) or 0))
