"""Fixtures of the fault suite (helpers in faultkit.py): one real Prefect server per test module."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from faultkit import PrefectServer


@pytest.fixture(scope="module")
def prefect_server(tmp_path_factory) -> Iterator[PrefectServer]:
    """One real Prefect server for the whole test module (starting one per flow run would cost ~20 s each)."""
    server = PrefectServer(tmp_path_factory.mktemp("prefect-server"))
    server.start()
    try:
        yield server
    finally:
        server.stop()
