"""Which failures the stage tasks retry: I/O hiccups yes; bad data, bad config, missing files, bugs no."""

from __future__ import annotations

import errno

import pytest

from data_contracts.errors import DataError
from tasks.common import is_transient


@pytest.mark.parametrize(
    "exc, expected",
    [
        (OSError(errno.EIO, "I/O error"), True),
        (TimeoutError("slow disk"), True),
        (ConnectionError("tracking server restarting"), True),
        (DataError("12 of 100 rows failed check chosen_ne_rejected"), False),
        (ValueError("template.max_length must be > 0"), False),
        (FileNotFoundError("data/missing.jsonl"), False),
        (PermissionError("read-only"), False),
        (KeyError("bug"), False),
    ],
)
def test_only_transient_failures_are_retried(exc, expected):
    assert is_transient(exc) is expected
