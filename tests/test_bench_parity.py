"""Our log-probs, rewards, loss and policy gradients equal TRL DPOTrainer's on the same batch (tiny random Llama,
float32), and so do the loss, rewards and gradients of every objective TRL has (bench.parity.OBJECTIVE_CASES).

TRL (pinned in the dev extra) is the one external check of the log-probs and the losses. The SmolLM2 version:
bench/test_parity.py.
"""

from __future__ import annotations

import pytest

from bench.parity import (ATOL, KTO_CASES, OBJECTIVE_CASES, REFERENCE_FREE_CASES, kto_parity, objective_parity,
                          reference_free_parity, run, trl_setup)


@pytest.fixture(scope="module")
def setup(smollm2_dir):
    with trl_setup("tiny", n_pairs=4) as built:
        yield built


def test_ours_equals_trl_on_the_same_batch(setup):
    report = run(setup=setup)
    names = {r[0].split("[")[0] for r in report.rows}
    assert {"policy logps/chosen", "ref table logps/rejected", "rewards/chosen", "loss"} <= names
    grads = [r for r in report.rows if r[0].startswith("grad ")]
    assert len(grads) == sum(p.requires_grad for p in setup.policy.parameters())  # every parameter compared
    assert report.ok, report.render()
    # the loss itself (a mean of small numbers) must match to the absolute tolerance
    loss = next(r for r in report.rows if r[0] == "loss")
    assert loss[3] <= ATOL


@pytest.mark.parametrize("label, objective, settings", OBJECTIVE_CASES, ids=[c[0] for c in OBJECTIVE_CASES])
def test_every_trl_objective_matches_loss_rewards_and_gradients(setup, label, objective, settings):
    report = objective_parity(setup, objective, **settings)
    grads = next(r for r in report.rows if r[0].startswith("d loss / d logps"))
    assert grads[2] != 0.0, "TRL's gradient is zero: nothing was compared"
    assert report.ok, report.render()


@pytest.mark.parametrize("label, loss, settings", REFERENCE_FREE_CASES, ids=[c[0] for c in REFERENCE_FREE_CASES])
def test_orpo_and_cpo_match_trls_experimental_trainers(setup, label, loss, settings):
    report = reference_free_parity(setup, loss, **settings)
    assert next(r for r in report.rows if r[0].startswith("d term"))[2] != 0.0
    assert report.ok, report.render()


@pytest.mark.parametrize("label, settings", KTO_CASES, ids=[c[0] for c in KTO_CASES])
def test_kto_matches_trls_kto_trainer(setup, label, settings):
    report = kto_parity(setup, **settings)
    rows = {r[0]: r for r in report.rows}
    assert rows["d loss / d logps[0]"][2] != 0.0, "TRL's gradient is zero: nothing was compared"
    if "kl_shift" in settings:
        assert rows["kl"][2] == 0.0  # TRL's estimate was clamped too
    else:
        assert rows["kl"][2] > 0.0, "the KL reference point is 0: its estimate was not compared"
    assert report.ok, report.render()


def test_the_benchmark_report_keeps_the_whole_parity_report(tmp_path):
    from bench.run import _parity_from_log

    log = tmp_path / "parity.log"
    log.write_text("loading...\nquantity  ours  TRL\nloss  0.7  0.7  0\n/x.py:3: UserWarning: noise\n  warnings.warn(\n"
                   "PARITY OK\n\nobjective  loss\nsigmoid  0.7  True\nOBJECTIVES OK\n")
    report = _parity_from_log(log, True, 1.0)
    assert report["table"] == ["quantity  ours  TRL", "loss  0.7  0.7  0", "PARITY OK", "objective  loss",
                               "sigmoid  0.7  True", "OBJECTIVES OK"]
