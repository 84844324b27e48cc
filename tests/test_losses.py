"""Each preference loss against its closed form on hand-made numbers; gradients reach only the policy."""

from __future__ import annotations

import math

import pytest
import torch

from dpo_core.config import PAIRWISE_LOSSES
from dpo_core.losses import (FDivergence, LossError, kto_kl, kto_loss, ld_logps, mixture_loss, preference_loss,
                             wpo_weights)

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


def test_sft_is_token_averaged_negative_log_likelihood_of_chosen():
    # -(-10) / 5 = 2, -(-20) / 10 = 2; rewards r_w, r_l with a reference
    _close(_run("sft"), [2.0, 2.0], *_dpo_rewards())
    # without one: beta * log pi / |y| = 0.1 * (-10 / 5), 0.1 * (-20 / 10); 0.1 * (-12 / 4), 0.1 * (-15 / 8)
    alone = preference_loss("sft", torch.tensor(PC, dtype=torch.float64), torch.tensor(PR, dtype=torch.float64), None,
                            None, beta=BETA,
                            chosen_tokens=torch.tensor(NC), rejected_tokens=torch.tensor(NR))
    _close(alone, [2.0, 2.0], [-0.2, -0.2], [-0.3, -0.1875])


def test_orpo_is_nll_plus_the_log_odds_ratio_of_average_log_probs():
    # a = lp / |y|: chosen [-2, -2], rejected [-3, -1.875]; log(1 - e^a): -0.14541345786885906 (a = -2),
    # -0.051069180942701596 (-3), -0.16647375935575462 (-1.875)
    # log odds ratio: (-2 + 3) - (-0.14541345786885906 + 0.051069180942701596) = 1.0943442769261575
    #                 (-2 + 1.875) - (-0.14541345786885906 + 0.16647375935575462) = -0.14606030148689556 (negative)
    # loss = -a_w + beta L(log odds), beta = 0.1: 2 + 0.1 * 0.28875078434462, 2 + 0.1 * 0.76884166569585
    out = preference_loss("orpo", torch.tensor(PC, dtype=torch.float64), torch.tensor(PR, dtype=torch.float64), None,
                          None, beta=BETA, chosen_tokens=torch.tensor(NC), rejected_tokens=torch.tensor(NR))
    _close(out, [2.028875078434462, 2.076884166569585], [-0.2, -0.2], [-0.3, -0.1875])


def test_cpo_is_reference_free_dpo_plus_nll():
    # L(beta (lp_w - lp_l)) + alpha * (-lp_w / |y_w|): beta (lp_w - lp_l) = 0.2 and -0.5; L(0.2) = 0.5981388693815918,
    # L(-0.5) = 0.9740769841801067; NLL 2 and 2
    out = preference_loss("cpo", torch.tensor(PC, dtype=torch.float64), torch.tensor(PR, dtype=torch.float64), None,
                          None, beta=BETA, chosen_tokens=torch.tensor(NC), rejected_tokens=torch.tensor(NR))
    _close(out, [2.5981388693815918, 2.9740769841801065], [-1.0, -2.0], [-1.2, -1.5])
    half = preference_loss("cpo", torch.tensor(PC, dtype=torch.float64), torch.tensor(PR, dtype=torch.float64), None,
                           None, beta=BETA, chosen_tokens=torch.tensor(NC), rejected_tokens=torch.tensor(NR),
                           cpo_alpha=0.5)
    assert half.losses.tolist() == pytest.approx([1.5981388693815918, 1.9740769841801067])


# Below, with the pairs above: chosen log-ratios c = [1, -1], rejected r = [-0.5, 1], rewards r_w = beta c =
# [0.1, -0.1], r_l = beta r = [-0.05, 0.1], z = c - r = [1.5, -2] (the second pair has a negative margin), and
# L(x) = -log sigma(x) = log(1 + e^-x):
L = {0.1: 0.6443966600735709, -0.1: 0.744396660073571, 0.05: 0.6684596480132863, -0.05: 0.7184596480132863,
     0.15: 0.6209570477895321, -0.2: 0.7981388693815918, 0.0: 0.6931471805599453}
SIG = {0.1: 0.52497918747894, -0.1: 0.47502081252106, -0.05: 0.4875026035157896, 0.15: 0.5374298453437496,
       -0.2: 0.45016600268752216}


def test_nca_pair():
    # L(r_w) + L(-r_w) / 2 + L(-r_l) / 2
    expected = [L[0.1] + L[-0.1] / 2 + L[0.05] / 2, L[-0.1] + L[0.1] / 2 + L[-0.1] / 2]
    assert expected == pytest.approx([1.3508248141169994, 1.438793320147142], abs=1e-15)
    _close(_run("nca_pair"), [1.3508248141169994, 1.438793320147142], *_dpo_rewards())


def test_bco_pair_without_and_with_a_reward_shift():
    # L(r_w - delta) + L(-(r_l - delta))
    _close(_run("bco_pair"), [L[0.1] + L[0.05], L[-0.1] + L[-0.1]], *_dpo_rewards())
    assert [L[0.1] + L[0.05], 2 * L[-0.1]] == pytest.approx([1.3128563080868572, 1.488793320147142], abs=1e-15)
    # delta = 0.1: L(0) + L(0.15), L(-0.2) + L(0)
    _close(_run("bco_pair", bco_delta=0.1), [1.3141042283494774, 1.4912860499415371], *_dpo_rewards())
    assert [L[0.0] + L[0.15], L[-0.2] + L[0.0]] == pytest.approx([1.3141042283494774, 1.4912860499415371], abs=1e-15)


def test_sppo_hard():
    # (c - 1/(2 beta))^2 + (r + 1/(2 beta))^2 with 1/(2 beta) = 5: (1 - 5)^2 + (4.5)^2, (-6)^2 + 6^2
    _close(_run("sppo_hard"), [36.25, 72.0], *_dpo_rewards())


def test_aot_sorts_policy_and_reference_margins():
    # policy margins lp_w - lp_l = [2, -5] -> sorted [-5, 2]; reference [0.5, -3] -> [-3, 0.5]; differences [-2, 1.5]
    _close(_run("aot"), [L[-0.2], L[0.15]], *_dpo_rewards())
    # with eps = 0.1: L(b) + eps * b at b = -0.2, 0.15
    _close(_run("aot", label_smoothing=0.1), [L[-0.2] - 0.02, L[0.15] + 0.015], *_dpo_rewards())


def test_aot_unpaired_sorts_chosen_and_rejected_log_ratios_apart():
    # c sorted [-1, 1], r sorted [-0.5, 1]: differences [-0.5, 0]
    _close(_run("aot_unpaired"), [L[-0.05], L[0.0]], *_dpo_rewards())


def test_apo_zero_and_apo_down():
    # zero: 1 - sigma(r_w) + sigma(r_l);  down: sigma(r_w) + 1 - sigma(r_w - r_l)
    _close(_run("apo_zero"), [1 - SIG[0.1] + SIG[-0.05], 1 - SIG[-0.1] + SIG[0.1]], *_dpo_rewards())
    _close(_run("apo_down"), [SIG[0.1] + 1 - SIG[0.15], SIG[-0.1] + 1 - SIG[-0.2]], *_dpo_rewards())
    assert [1 - SIG[0.1] + SIG[-0.05], SIG[0.1] + 1 - SIG[0.15]] == pytest.approx([0.96252341603685, 0.98754934213519])


def test_discopop():
    # m = sigma(beta z / tau), tau = 0.05: sigma(3) = 0.9525741268224334, sigma(-4) = 0.01798620996209156
    # (1 - m) L(beta z) + m exp(-beta z): exp(-0.15) = 0.8607079764250578, exp(0.2) = 1.2214027581601699
    expected = [0.0474258731775666 * L[0.15] + 0.9525741268224334 * 0.8607079764250578,
                0.98201379003790844 * L[-0.2] + 0.01798620996209156 * 1.2214027581601699]
    assert expected == pytest.approx([0.8493375792893856, 0.8057517825545347], abs=1e-12)
    _close(_run("discopop"), [0.8493375792893856, 0.8057517825545347], *_dpo_rewards())
    # a larger temperature mixes in more of the exponential loss at a negative margin
    assert _run("discopop", discopop_tau=1.0).losses[1] > 0.8057517825545347


def test_exo_pair():
    # q_w = sigma(beta z); q_w (log q_w - log(1 - eps)) + q_l (log q_l - log eps), eps = 0.1
    q = [SIG[0.15], SIG[-0.2]]
    expected = [q[i] * (math.log(q[i]) - math.log(0.9)) + (1 - q[i]) * (math.log(1 - q[i]) - math.log(0.1))
                for i in range(2)]
    assert expected == pytest.approx([0.43138845722278607, 0.6252972180887233], abs=1e-12)
    _close(_run("exo_pair", label_smoothing=0.1), [0.43138845722278607, 0.6252972180887233], *_dpo_rewards())


@pytest.mark.parametrize("kind, margins, losses", [
    # the margin f'(u_w) - f'(u_l) at c = [1, -1], r = [-0.5, 1], then L(beta * margin)
    ("forward_kl", [1.2808418295286859, -2.3504023872876028],  # (1 - e^-1) - (1 - e^0.5), (1 - e) - (1 - e^-1)
     [0.6311543835721054, 0.8175569521882898]),
    ("js", [0.6608152966618839, -1.0],  # log sigma(1) - log sigma(-0.5), log sigma(-1) - log sigma(1) = -1
     [0.6606521625101546, 0.744396660073571]),
    ("alpha", [1.354989513950216, -2.0843812219749895],  # a = 0.5: 2 (1 - e^(-l / 2)) at l = c, r
     [0.6276909470685579, 0.802787245169527]),
])
def test_f_divergences_replace_the_log_ratio(kind, margins, losses):
    div = FDivergence(kind, 0.5)
    got = (div(torch.tensor([1.0, -1.0], dtype=torch.float64)) - div(torch.tensor([-0.5, 1.0], dtype=torch.float64)))
    assert got.tolist() == pytest.approx(margins, abs=1e-12)
    _close(_run("sigmoid", f_divergence=kind), losses, *_dpo_rewards())  # rewards stay beta log(pi / pi_ref)


def test_alpha_divergence_ends_are_the_two_kls():
    x = torch.tensor([1.0, -1.0, -0.5], dtype=torch.float64)
    torch.testing.assert_close(FDivergence("alpha", 1.0)(x), x)
    torch.testing.assert_close(FDivergence("alpha", 0.0)(x), FDivergence("forward_kl")(x))


def test_mixture_is_the_weighted_sum_and_keeps_each_component():
    t = lambda v: torch.tensor(v, dtype=torch.float64)  # noqa: E731
    out = mixture_loss([("sigmoid", 0.8), ("bco_pair", 0.2), ("sft", 1.0)], t(PC), t(PR), t(RC), t(RR), beta=BETA,
                       chosen_tokens=torch.tensor(NC), rejected_tokens=torch.tensor(NR))
    # 0.8 L(beta z) + 0.2 (L(r_w) + L(-r_l)) + 1.0 * 2
    expected = [0.8 * L[0.15] + 0.2 * 1.3128563080868572 + 2.0, 0.8 * L[-0.2] + 0.2 * 1.488793320147142 + 2.0]
    assert out.losses.tolist() == pytest.approx(expected, abs=1e-12)
    assert list(out.components) == ["sigmoid", "bco_pair", "sft"]
    assert out.components["sft"].losses.tolist() == [2.0, 2.0]
    assert out.chosen_rewards.tolist() == pytest.approx(_dpo_rewards()[0])
    # label smoothing goes to the components that read it only (bco_pair would refuse it)
    smoothed = mixture_loss([("sigmoid", 1.0), ("bco_pair", 1.0)], t(PC), t(PR), t(RC), t(RR), beta=BETA,
                            label_smoothing=0.2)
    assert smoothed.components["sigmoid"].losses.tolist() == pytest.approx([0.6509570477895321, 0.7581388693815918])
    # per-pair weights (WPO) scale each pair's total
    weighted = mixture_loss([("sigmoid", 1.0)], t(PC), t(PR), t(RC), t(RR), beta=BETA, pair_weights=t([0.5, 2.0]))
    assert weighted.losses.tolist() == pytest.approx([0.5 * L[0.15], 2.0 * L[-0.2]])


def test_ld_logps_weight_the_unshared_tail():
    # shared + alpha (total - shared): -4 + 0.5 * (-10 + 4) = -7; a response no longer than the other: all shared
    out = ld_logps(torch.tensor([-10.0, -20.0]), torch.tensor([-4.0, -20.0]), 0.5)
    assert out.tolist() == [-7.0, -20.0]
    assert ld_logps(torch.tensor([-10.0]), torch.tensor([-4.0]), 1.0).tolist() == [-10.0]  # plain log-probs
    # LD-DPO's sigmoid loss: policy chosen -10 (shared -4), rejected -12 (all shared), reference chosen -13 (shared
    # -4), rejected -11.5; alpha = 0.5: log-ratios (-7 + 8.5) = 1.5 and -0.5, z = 2, beta z = 0.2: L(0.2)
    pc, rc = ld_logps(torch.tensor([-10.0]), torch.tensor([-4.0]), 0.5), ld_logps(torch.tensor([-13.0]),
                                                                                torch.tensor([-4.0]), 0.5)
    loss = preference_loss("sigmoid", pc, torch.tensor([-12.0]), rc, torch.tensor([-11.5]), beta=0.1)
    assert loss.losses.tolist() == pytest.approx([0.5981388693815918])  # log(1 + e^-0.2)


def test_wpo_weights_are_the_policys_own_mean_token_probabilities():
    # chosen sums [-2, -1] over [4, 2] tokens: means -0.5, -0.5; rejected [-3, 0] over [3, 5]: -1, 0
    w = wpo_weights(torch.tensor([-2.0, -1.0], requires_grad=True), torch.tensor([-3.0, 0.0]), torch.tensor([4, 2]),
                    torch.tensor([3, 5]))
    assert w.tolist() == pytest.approx([0.22313016014842982, 0.6065306597126334])  # e^-1.5, e^-0.5
    assert not w.requires_grad


# settings a loss cannot run without
NEEDS = {"exo_pair": {"label_smoothing": 1e-3}}


@pytest.mark.parametrize("loss_type", PAIRWISE_LOSSES)
def test_gradients_flow_only_through_the_policy(loss_type):
    pc, pr = torch.tensor(PC, requires_grad=True), torch.tensor(PR, requires_grad=True)
    rc, rr = torch.tensor(RC, requires_grad=True), torch.tensor(RR, requires_grad=True)
    out = preference_loss(loss_type, pc, pr, rc, rr, beta=BETA, chosen_tokens=torch.tensor(NC),
                          rejected_tokens=torch.tensor(NR), **NEEDS.get(loss_type, {}))
    assert not out.chosen_rewards.requires_grad and not out.rejected_rewards.requires_grad
    out.losses.sum().backward()
    assert pc.grad is not None and pc.grad.abs().sum() > 0
    if loss_type != "sft":  # the NLL of the chosen response only
        assert pr.grad is not None and pr.grad.abs().sum() > 0
    assert rc.grad is None and rr.grad is None


# four unpaired rows (two desirable, two undesirable): completion log-probs under the policy and the reference, and
# the mismatched (KL) completions' log-probs; log-ratios r = [1, -1, -0.5, 1], KL log-ratios [0.5, 0.3, -0.2, 0.2]
KP, KR, KLABELS = [-10.0, -20.0, -12.0, -15.0], [-11.0, -19.0, -11.5, -16.0], [True, True, False, False]
KL_P, KL_R = [-30.0, -25.0, -40.0, -22.0], [-30.5, -25.3, -39.8, -22.2]


def _kto(kl, **kw):
    t = lambda v: torch.tensor(v, dtype=torch.float64)  # noqa: E731
    return kto_loss(t(KP), t(KR), torch.tensor(KLABELS), kl, beta=BETA, **kw)


def test_kto_kl_is_the_clamped_mean_log_ratio_of_the_mismatched_completions():
    t = lambda v: torch.tensor(v, dtype=torch.float64)  # noqa: E731
    assert float(kto_kl(t(KL_P), t(KL_R))) == pytest.approx(0.2, abs=1e-6)  # (0.5 + 0.3 - 0.2 + 0.2) / 4
    assert float(kto_kl(t(KL_R), t(KL_P))) == 0.0  # a negative estimate (-0.2) is clamped at 0
    # gathered over processes: this process's (sum 0.8, count 4) plus another's (sum -0.2, count 2): 0.6 / 6
    other = lambda total, count: (total - 0.2, count + 2)  # noqa: E731
    assert float(kto_kl(t(KL_P), t(KL_R), gather=other)) == pytest.approx(0.1, abs=1e-6)


def test_kto_values_desirable_above_and_undesirable_below_the_reference_point():
    # z_0 = 0.2: desirable 1 - sigma(0.1 (r - 0.2)), undesirable 1 - sigma(0.1 (0.2 - r)); row 2 has r < z_0 < 0
    out = _kto(torch.tensor(0.2, dtype=torch.float64))
    assert out.losses.tolist() == pytest.approx([0.48001065984441815,  # 1 - sigma(0.08)
                                                 0.5299640517645718,  # 1 - sigma(-0.12)
                                                 0.48250714233361025,  # 1 - sigma(0.07)
                                                 0.5199893401555817], abs=1e-12)  # 1 - sigma(-0.08)
    assert out.rewards.tolist() == pytest.approx([0.1, -0.1, -0.05, 0.1], abs=1e-12)
    assert float(out.kl) == pytest.approx(0.2)
    # z_0 = 0 and the weights lambda_D = 2, lambda_U = 0.5
    out = _kto(torch.tensor(0.0), desirable_weight=2.0, undesirable_weight=0.5)
    assert out.losses.tolist() == pytest.approx([2 * 0.47502081252106, 2 * 0.52497918747894,  # 1 - sigma(+-0.1)
                                                 0.5 * 0.48750260351578967, 0.5 * 0.52497918747894], abs=1e-12)


def test_kto_gradients_flow_only_through_the_policy_completions():
    p = torch.tensor(KP, requires_grad=True)
    r = torch.tensor(KR, requires_grad=True)
    kl_p, kl_r = torch.tensor(KL_P, requires_grad=True), torch.tensor(KL_R, requires_grad=True)
    out = kto_loss(p, r, torch.tensor(KLABELS), kto_kl(kl_p, kl_r), beta=BETA)
    assert not out.rewards.requires_grad and not out.kl.requires_grad
    out.losses.sum().backward()
    # d/dr of 1 - sigma(beta (r - z)) is -beta sigma' < 0 for desirable rows: raising their likelihood lowers the loss
    assert (p.grad[:2] < 0).all() and (p.grad[2:] > 0).all()
    assert r.grad is None and kl_p.grad is None and kl_r.grad is None


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
    with pytest.raises(LossError, match="exo_pair' needs label_smoothing > 0"):
        preference_loss("exo_pair", t, t, t, t, beta=0.1)
    with pytest.raises(LossError, match="f_divergence=js has no meaning for loss 'bco_pair'"):
        preference_loss("bco_pair", t, t, t, t, beta=0.1, f_divergence="js")
    with pytest.raises(LossError, match="f_alpha=0.3 is read only with f_divergence=alpha"):
        preference_loss("sigmoid", t, t, t, t, beta=0.1, f_alpha=0.3)
    with pytest.raises(LossError, match="'kto' scores unpaired rows"):
        preference_loss("kto", t, t, t, t, beta=0.1)
    with pytest.raises(LossError, match="unknown f-divergence 'kl'"):
        preference_loss("sigmoid", t, t, t, t, beta=0.1, f_divergence="kl")
