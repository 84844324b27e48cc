"""Our log-probs, rewards and loss equal TRL DPOTrainer's on the same batch (tiny random Llama, float32).

TRL (pinned in the dev extra) is the one external check of the log-probs and the loss. The SmolLM2 version:
bench/test_parity.py.
"""

from __future__ import annotations

from bench.parity import ATOL, run


def test_ours_equals_trl_on_the_same_batch(smollm2_dir):
    report = run("tiny", n_pairs=4)
    names = {r[0].split("[")[0] for r in report.rows}
    assert {"policy logps/chosen", "ref table logps/rejected", "rewards/chosen", "loss"} <= names
    assert report.ok, report.render()
    # the loss itself (a mean of small numbers) must match to the absolute tolerance
    loss = next(r for r in report.rows if r[0] == "loss")
    assert loss[3] <= ATOL
