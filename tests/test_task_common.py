"""Which failures are retried (tracking.retry.is_transient, used by MLflow calls and by the stage tasks' Prefect
retry condition): I/O hiccups and a restarting tracking store yes; bad data, bad config, missing files, bad requests
and bugs no."""

from __future__ import annotations

import errno

import pytest
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import RESOURCE_DOES_NOT_EXIST, TEMPORARILY_UNAVAILABLE
from pydantic import ValidationError
from sqlalchemy.exc import OperationalError

from data_contracts.errors import ContractError, DataError
from dpo_core.config import TrainConfig
from tasks.common import retry_transient_only
from tracking.retry import TrackingUnavailable, is_transient


def _validation_error() -> ValidationError:
    try:
        TrainConfig(loss="ipo", label_smoothing=0.1)
    except ValidationError as exc:
        return exc
    raise AssertionError("TrainConfig accepted label_smoothing with ipo")


CASES = [
    (OSError(errno.EIO, "I/O error"), True),
    (TimeoutError("slow disk"), True),
    (ConnectionError("tracking server restarting"), True),
    (TrackingUnavailable("MLflow tracking at http://127.0.0.1:5000 unavailable"), True),
    (MlflowException("database is locked"), True),  # INTERNAL_ERROR
    (MlflowException("try later", error_code=TEMPORARILY_UNAVAILABLE), True),
    (OperationalError("INSERT ...", {}, Exception("database is locked")), True),
    (MlflowException.invalid_parameter_value("bad param"), False),
    (MlflowException("no such model", error_code=RESOURCE_DOES_NOT_EXIST), False),
    (DataError("12 of 100 rows failed check chosen_ne_rejected"), False),
    (ContractError("pairs", {"chosen_ne_rejected": 3}), False),
    (ValueError("template.max_length must be > 0"), False),
    (_validation_error(), False),
    (FileNotFoundError("data/missing.jsonl"), False),
    (IsADirectoryError("data/"), False),
    (PermissionError("read-only"), False),
    (KeyError("bug"), False),
    (RuntimeError("bug"), False),
]


@pytest.mark.parametrize("exc, expected", CASES, ids=[f"{type(e).__name__}-{i}" for i, (e, _) in enumerate(CASES)])
def test_only_transient_failures_are_retried(exc, expected):
    assert is_transient(exc) is expected


class _FailedState:
    """The part of a Prefect state the retry condition reads: `result()` re-raises the task's exception."""

    def __init__(self, exc: BaseException | None) -> None:
        self.exc = exc

    def result(self):
        if self.exc is not None:
            raise self.exc
        return "ok"


def test_the_stage_tasks_retry_condition_uses_the_same_rule():
    assert retry_transient_only(None, None, _FailedState(OSError(errno.EIO, "I/O error"))) is True
    assert retry_transient_only(None, None, _FailedState(MlflowException("database is locked"))) is True
    assert retry_transient_only(None, None, _FailedState(DataError("too many invalid rows"))) is False
    assert retry_transient_only(None, None, _FailedState(FileNotFoundError("data/x.jsonl"))) is False
    assert retry_transient_only(None, None, _FailedState(None)) is False
