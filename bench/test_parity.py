"""Parity with TRL's DPOTrainer on the embedded SmolLM2 (~1-2 min on 2 cores): `.venv/bin/python -m pytest
bench/test_parity.py`. The tiny-model case runs in `make test` (tests/test_bench_parity.py).
"""

from __future__ import annotations

import pytest

from bench.parity import run


@pytest.mark.slow
def test_ours_equals_trl_on_smollm2():
    report = run("smollm2", n_pairs=4)
    assert report.rows, "nothing was compared"
    assert report.ok, report.render()
