"""Evaluate and compare run side by side in threads. When training was reused (a re-run, or a second overlapping
run), nothing has imported transformers' model classes before they start, and two threads resolving transformers'
lazy attributes at once fail with `ImportError: cannot import name 'AutoTokenizer' from 'transformers'` (seen in
5 of 6 fresh processes here). The flow therefore calls `tasks.common.preload_for_threads` first; this checks that
doing so makes the same concurrent first imports succeed, in a fresh interpreter (imports are once per process).
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]

SCRIPT = textwrap.dedent(
    """
    import threading
    from tasks.common import preload_for_threads

    preload_for_threads("bradley_terry")
    errors = []

    def evaluate_like():
        try:
            from transformers import AutoModelForCausalLM  # noqa: F401
        except Exception as exc:
            errors.append(repr(exc))

    def compare_like():
        try:
            from transformers import AutoTokenizer  # noqa: F401
            import sentence_transformers  # noqa: F401
        except Exception as exc:
            errors.append(repr(exc))

    threads = [threading.Thread(target=evaluate_like), threading.Thread(target=compare_like)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    print("errors:", errors)
    raise SystemExit(1 if errors else 0)
    """
)


@pytest.mark.timeout(300)
def test_concurrent_first_imports_succeed_after_preload():
    done = subprocess.run([sys.executable, "-c", SCRIPT], cwd=REPO, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, (done.stdout + done.stderr)[-3000:]
    assert "errors: []" in done.stdout
