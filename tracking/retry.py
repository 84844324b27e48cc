"""Retry rules: which failures a retry can fix, and the backoff for MLflow calls.

`is_transient` is the one classifier. `RetryPolicy.call` uses it around every MLflow call (tracking.tracker,
tracking.registry), and the stage tasks use it as Prefect's `retry_condition_fn` (tasks.common.retry_transient_only).

Transient: I/O hiccups (OSError, TimeoutError, ConnectionError), a locked or unreachable SQLite store (SQLAlchemy's
OperationalError) and MLflow errors whose code is not in PERMANENT_MLFLOW_CODES (a server restarting answers
INTERNAL_ERROR or TEMPORARILY_UNAVAILABLE). Permanent: bad data or a bad config (every ValueError, which includes
DataError, ContractError and pydantic's ValidationError), a missing or unreadable path (PERMANENT_OS_ERRORS), an MLflow
error that says the request itself is wrong, and anything else (a bug).
"""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TypeVar

log = logging.getLogger(__name__)

T = TypeVar("T")

TRANSIENT_ERRORS: tuple[type[BaseException], ...] = (OSError, TimeoutError, ConnectionError)
# OSErrors that say the input is wrong, not that the machine hiccupped: retrying them only delays the error
PERMANENT_OS_ERRORS: tuple[type[BaseException], ...] = (FileNotFoundError, IsADirectoryError, NotADirectoryError,
                                                        PermissionError)
# MLflow error codes that retrying cannot fix
PERMANENT_MLFLOW_CODES = frozenset(
    {"INVALID_PARAMETER_VALUE", "RESOURCE_ALREADY_EXISTS", "RESOURCE_DOES_NOT_EXIST", "BAD_REQUEST", "INVALID_STATE",
     "PERMISSION_DENIED", "UNAUTHENTICATED", "NOT_FOUND"}
)


class TrackingUnavailable(ConnectionError):
    """MLflow could not be reached after all retries; the message names the tracking URI and the failed call."""


def _loaded_class(module: str, name: str) -> type | None:
    """`module.name` if the module is imported already, else None (then no exception of that class can exist, and a
    stage that never used MLflow does not pay ~2 s importing it just to classify its failure)."""
    loaded = sys.modules.get(module)
    return getattr(loaded, name, None) if loaded is not None else None


def is_transient(exc: BaseException) -> bool:
    """True for a failure a retry can fix; False for bad data, a bad config, a missing file, a bad request or a bug."""
    mlflow_error = _loaded_class("mlflow.exceptions", "MlflowException")
    if mlflow_error is not None and isinstance(exc, mlflow_error):
        return exc.error_code not in PERMANENT_MLFLOW_CODES
    if isinstance(exc, (ValueError, *PERMANENT_OS_ERRORS)):
        return False
    if isinstance(exc, TRANSIENT_ERRORS):
        return True
    sqlite_error = _loaded_class("sqlalchemy.exc", "OperationalError")  # a locked or unreachable SQLite store
    return sqlite_error is not None and isinstance(exc, sqlite_error)


@dataclass(frozen=True)
class RetryPolicy:
    """Exponential backoff: `tries` attempts, sleeping base_delay * 2**k seconds (capped at max_delay) in between."""

    tries: int = 4
    base_delay: float = 1.0
    max_delay: float = 8.0
    # injectable so tests can record the backoff without patching time.sleep for every thread in the process
    sleep: Callable[[float], None] = field(default=time.sleep, compare=False, repr=False)

    def __post_init__(self) -> None:
        if self.tries < 1:
            raise ValueError(f"RetryPolicy.tries must be >= 1, got {self.tries}")
        if self.base_delay < 0 or self.max_delay < 0:
            raise ValueError("RetryPolicy delays must be >= 0")

    def delays(self) -> list[float]:
        return [min(self.max_delay, self.base_delay * 2**k) for k in range(self.tries - 1)]

    def call(self, fn: Callable[[], T], *, uri: str, what: str) -> T:
        """Run `fn`, retrying transient failures; raise TrackingUnavailable naming `uri` when they persist."""
        delays = self.delays()
        for attempt in range(self.tries):
            try:
                return fn()
            except Exception as exc:
                if not is_transient(exc):
                    raise
                first_line = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:300]
                if attempt == self.tries - 1:
                    raise TrackingUnavailable(
                        f"MLflow tracking at {uri} unavailable: {what} failed {self.tries} times; last error: "
                        f"{type(exc).__name__}: {first_line}"
                    ) from exc
                log.warning("MLflow %s failed (attempt %d/%d, retrying in %.1fs): %s", what, attempt + 1,
                            self.tries, delays[attempt], first_line)
                self.sleep(delays[attempt])
        raise AssertionError("unreachable")  # pragma: no cover
