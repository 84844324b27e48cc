"""Each preference loss against its closed form on hand-made numbers; gradients reach only the policy."""

from __future__ import annotations

import math

import pytest
import torch

from dpo_core.losses import LOSS_TYPES, LossError, preference_loss, sft_nll

# two pairs: policy / reference sequence log-probs and response lengths
PC, PR = [-10.0, -20.0], [-12.0, -15.0]
RC, RR = [-11.0, -19.0], [-11.5, -16.0]
NC, NR = [5, 10], [4, 8]
BETA = 0.1


def logsig(x: float) -> float:
    return -math.log1p(math.exp(-x))


def _run(loss_type, **kw):
    t = lambda v: torch.tensor(v, dtype=torch.float64)  # noqa: E731
    return preference_loss(
        loss_type, t(PC), t(PR), t(RC), t(RR), beta=kw.pop("beta", BETA),
        chosen_tokens=torch.tensor(NC), rejected_tokens=torch.tensor(NR), **kw,
    )


# softplus values the literals below are built from: -log sigma(x) = log(1 + e^-x), and -log sigma(-x) = that + x
SP_015, SP_M02 = 0.6209570477895321, 0.7981388693815918  # -log sigma(0.15), -log sigma(-0.2)


def _z(i):  # DPO logits
    return (PC[i] - PR[i]) - (RC[i] - RR[i])


def _close(out, losses, chosen, rejected):
    assert out.losses.tolist() == pytest.approx(losses, rel=1e-12, abs=1e-12)
    assert out.chosen_rewards.tolist() == pytest.approx(chosen, rel=1e-12, abs=1e-12)
    assert out.rejected_rewards.tolist() == pytest.approx(rejected, rel=1e-12, abs=1e-12)


def _dpo_rewards():  # beta (lp - ref): chosen 0.1 * (-10 + 11), 0.1 * (-20 + 19); rejected 0.1 * (-12 + 11.5), ..
    return [0.1, -0.1], [-0.05, 0.1]


def test_sigmoid_is_dpo():
    # z = (-10 + 12) - (-11 + 11.5) = 1.5 ; (-20 + 15) - (-19 + 16) = -2
    assert [_z(0), _z(1)] == [1.5, -2.0]
    _close(_run("sigmoid"), [SP_015, SP_M02], *_dpo_rewards())


def test_sigmoid_with_label_smoothing_is_conservative_dpo():
    # -(1 - eps) log sigma(b) - eps log sigma(-b) = softplus(-b) + eps * b, with b = beta z = 0.15 and -0.2, eps = 0.2
    expected = [SP_015 + 0.2 * 0.15, SP_M02 + 0.2 * -0.2]
    assert expected == pytest.approx([0.6509570477895321, 0.7581388693815918], abs=1e-15)
    _close(_run("sigmoid", label_smoothing=0.2), [0.6509570477895321, 0.7581388693815918], *_dpo_rewards())


def test_robust_dpo():
    # ((1 - eps) softplus(-b) - eps (softplus(-b) + b)) / (1 - 2 eps) = softplus(-b) - eps b / (1 - 2 eps), eps = 0.1
    expected = [SP_015 - 0.1 * 0.15 / 0.8, SP_M02 + 0.1 * 0.2 / 0.8]
    assert expected == pytest.approx([0.602207047789532, 0.8231388693815919], abs=1e-15)
    _close(_run("robust", label_smoothing=0.1), [0.602207047789532, 0.8231388693815919], *_dpo_rewards())
    # without noise it is plain DPO
    _close(_run("robust"), [SP_015, SP_M02], *_dpo_rewards())


def test_hinge_is_slic():
    _close(_run("hinge"), [max(0.0, 1 - 0.15), max(0.0, 1 + 0.2)], *_dpo_rewards())
    assert _run("hinge", beta=1.0).losses.tolist() == [0.0, 3.0]


def test_ipo_on_length_averaged_logratios():
    c = [(PC[i] - RC[i]) / NC[i] for i in range(2)]  # [0.2, -0.1]
    r = [(PR[i] - RR[i]) / NR[i] for i in range(2)]  # [-0.125, 0.125]
    expected = [(c[i] - r[i] - 1 / (2 * BETA)) ** 2 for i in range(2)]  # (0.325 - 5)^2, (-0.225 - 5)^2
    assert expected == pytest.approx([4.675**2, 5.225**2])
    _close(_run("ipo"), expected, [BETA * x for x in c], [BETA * x for x in r])


def test_sigmoid_norm_is_dpo_on_length_normalised_logratios():
    # (lp - ref) / |y|: chosen (-10 + 11) / 5 = 0.2, (-20 + 19) / 10 = -0.1; rejected -0.5 / 4 = -0.125, 1 / 8 = 0.125
    # beta d = 0.1 * (0.2 + 0.125) = 0.0325 and 0.1 * (-0.1 - 0.125) = -0.0225
    chosen, rejected = [0.02, -0.01], [-0.0125, 0.0125]
    _close(_run("sigmoid_norm"), [0.6770292059996041, 0.7044604604751515], chosen, rejected)  # softplus(-0.0325), ..
    # with label smoothing eps = 0.2: softplus(-b) + eps b
    _close(_run("sigmoid_norm", label_smoothing=0.2), [0.6770292059996041 + 0.2 * 0.0325,
                                                       0.7044604604751515 - 0.2 * 0.0225], chosen, rejected)


def test_simpo_is_reference_free_with_margin():
    beta, gamma = 2.0, 0.5
    c = [PC[i] / NC[i] for i in range(2)]  # [-2, -2]
    r = [PR[i] / NR[i] for i in range(2)]  # [-3, -1.875]
    expected = [-logsig(beta * (c[i] - r[i]) - gamma) for i in range(2)]  # -logsig(1.5), -logsig(-0.75)
    assert expected == pytest.approx([-logsig(1.5), -logsig(-0.75)])
    out = _run("simpo", beta=beta, simpo_gamma=gamma)
    _close(out, expected, [beta * x for x in c], [beta * x for x in r])
    # the reference plays no role
    alone = preference_loss("simpo", torch.tensor(PC), torch.tensor(PR), None, None, beta=beta, simpo_gamma=gamma,
                            chosen_tokens=torch.tensor(NC), rejected_tokens=torch.tensor(NR))
    assert alone.losses.tolist() == pytest.approx(expected)


def test_sft_nll_is_token_averaged_negative_log_likelihood():
    assert sft_nll(torch.tensor(PC), torch.tensor(NC)).tolist() == pytest.approx([2.0, 2.0])


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_gradients_flow_only_through_the_policy(loss_type):
    pc, pr = torch.tensor(PC, requires_grad=True), torch.tensor(PR, requires_grad=True)
    rc, rr = torch.tensor(RC, requires_grad=True), torch.tensor(RR, requires_grad=True)
    out = preference_loss(loss_type, pc, pr, rc, rr, beta=BETA, chosen_tokens=torch.tensor(NC),
                          rejected_tokens=torch.tensor(NR))
    assert not out.chosen_rewards.requires_grad and not out.rejected_rewards.requires_grad
    out.losses.sum().backward()
    assert pc.grad is not None and pr.grad is not None
    assert pc.grad.abs().sum() > 0 and pr.grad.abs().sum() > 0
    assert rc.grad is None and rr.grad is None


def test_bad_arguments_are_clear_errors():
    t = torch.tensor(PC)
    with pytest.raises(LossError, match="unknown loss type 'dpo'"):
        preference_loss("dpo", t, t, t, t, beta=0.1)
    with pytest.raises(LossError, match="chosen_tokens"):
        preference_loss("ipo", t, t, t, t, beta=0.1)
    with pytest.raises(LossError, match="needs reference"):
        preference_loss("sigmoid", t, t, None, None, beta=0.1)
    with pytest.raises(LossError, match="no meaning for loss 'hinge'"):
        preference_loss("hinge", t, t, t, t, beta=0.1, label_smoothing=0.1)
    with pytest.raises(LossError, match="simpo_gamma=0.3 has no meaning for loss 'sigmoid'"):
        preference_loss("sigmoid", t, t, t, t, beta=0.1, simpo_gamma=0.3)
    with pytest.raises(LossError, match="beta"):
        preference_loss("sigmoid", t, t, t, t, beta=0.0)
