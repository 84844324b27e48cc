"""Parity with TRL's DPOTrainer (the bench's own check): `.venv/bin/python -m pytest bench/test_parity.py`.

The tiny-model case is also in the unit suite (tests/test_bench_parity.py); the SmolLM2 case (~1-2 min on 2 cores)
lives only here.
"""

from __future__ import annotations

import pytest

pytest.importorskip("trl", reason="TRL is a bench-only dependency: pip install -e .[bench]")

from bench.parity import run  # noqa: E402


@pytest.mark.parametrize("model", ["tiny", pytest.param("smollm2", marks=pytest.mark.slow)])
def test_ours_equals_trl(model):
    report = run(model, n_pairs=4)
    assert report.rows, "nothing was compared"
    assert report.ok, report.render()
