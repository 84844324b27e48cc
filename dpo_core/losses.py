"""Preference-optimisation objectives, one small function per objective (in the style of torchtune's rlhf losses).

Every function takes per-pair sequence log-probs (sums over response tokens, shape ``[B]``) and returns a
``LossOutput`` of per-pair losses ``[B]`` plus the implicit rewards of chosen and rejected ``[B]`` (detached).
Reference log-probs are detached too: gradients flow only through the policy. The formulas follow TRL's
``DPOTrainer`` / ``CPOTrainer`` so that numbers are comparable with what people know. Notation:

    z = (log pi(y_w|x) - log pi(y_l|x)) - (log pi_ref(y_w|x) - log pi_ref(y_l|x))     (the "logits" of TRL)

and r_w = beta (log pi(y_w|x) - log pi_ref(y_w|x)), r_l likewise (the implicit rewards). Unless a docstring says
otherwise, rewards are r_w and r_l, as TRL reports them.

The unpaired objective KTO (``kto_loss``) sees rows (prompt, completion, label) instead of pairs, with a KL
reference point estimated from mismatched rows (``kto_kl``); it returns an ``UnpairedLossOutput``.

``preference_loss(loss_type, ...)`` dispatches on one name of ``TrainConfig.loss`` (the pairwise ones). The losses that see the pair only
through z also take an ``FDivergence`` (f-DPO), which replaces each log-ratio log(pi / pi_ref) by the derivative
f'(pi / pi_ref) of the divergence's generator.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F

from collections.abc import Callable

from dpo_core.config import LOSS_SETTINGS, LOSS_TYPES, UNPAIRED_LOSSES, loss_settings_error

__all__ = [
    "LossError",
    "LossOutput",
    "LOSS_TYPES",
    "dpo_sigmoid_loss",
    "robust_dpo_loss",
    "ipo_loss",
    "hinge_loss",
    "sigmoid_norm_loss",
    "simpo_loss",
    "exo_pair_loss",
    "nca_pair_loss",
    "bco_pair_loss",
    "sppo_hard_loss",
    "aot_loss",
    "aot_unpaired_loss",
    "apo_zero_loss",
    "apo_down_loss",
    "discopop_loss",
    "sft_loss",
    "orpo_loss",
    "cpo_loss",
    "UnpairedLossOutput",
    "kto_kl",
    "kto_loss",
    "FDivergence",
    "REVERSE_KL",
    "preference_loss",
    "MixtureOutput",
    "mixture_loss",
    "ld_logps",
    "wpo_weights",
]


class LossError(ValueError):
    """A loss was asked for with arguments it cannot use (unknown type, missing token counts, bad smoothing)."""


class LossOutput(NamedTuple):
    """losses Float[B] (per pair, not reduced), chosen_rewards Float[B], rejected_rewards Float[B] (detached)."""

    losses: torch.Tensor
    chosen_rewards: torch.Tensor
    rejected_rewards: torch.Tensor


def _smoothed_sigmoid(logits: torch.Tensor, label_smoothing: float) -> torch.Tensor:
    """-(1 - eps) log sigma(logits) - eps log sigma(-logits): the (conservative) logistic loss."""
    return -F.logsigmoid(logits) * (1 - label_smoothing) - F.logsigmoid(-logits) * label_smoothing


def _per_token(logps: torch.Tensor, tokens: torch.Tensor | None, name: str) -> torch.Tensor:
    if tokens is None:
        raise LossError(f"this loss averages log-probs over tokens: pass {name}")
    return logps / tokens.to(logps.dtype).clamp(min=1)


def _log_ratios(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps):
    """(log pi(y_w|x) - log pi_ref(y_w|x), the same for y_l), Float[B] each; the reference is detached."""
    return policy_chosen_logps - ref_chosen_logps.detach(), policy_rejected_logps - ref_rejected_logps.detach()


@dataclass(frozen=True)
class FDivergence:
    """f-DPO (Wang et al. 2023, arXiv 2309.16240): regularising with an f-divergence instead of
    the reverse KL turns the implicit reward beta log(pi / pi_ref) into beta f'(u), u = pi / pi_ref. With l = log u:

        reverse_kl:  f'(u) = log u                                  = l
        forward_kl:  f'(u) = 1 - 1/u (the paper's -1/u plus 1)      = 1 - exp(-l)
        js:          f'(u) = log(2u / (1 + u))                      = log 2 + log sigma(l)
        alpha:       f'(u) = (u^(a - 1) - 1) / (a - 1)              = (exp((a - 1) l) - 1) / (a - 1)

    ``alpha`` uses TRL's coefficient ``a`` (``f_alpha_divergence_coef``; the paper's alpha is 1 - a): a -> 1 is the
    reverse KL, a = 0 the forward KL. As in TRL, (a - 1) l is clamped at 80 so that exp stays finite in float32.
    Constants cancel in the chosen - rejected difference.
    """

    kind: str = "reverse_kl"
    alpha: float = 0.5

    def __call__(self, log_ratio: torch.Tensor) -> torch.Tensor:
        """f'(pi / pi_ref) from log(pi / pi_ref), elementwise."""
        if self.kind == "reverse_kl" or (self.kind == "alpha" and abs(self.alpha - 1.0) < 1e-6):
            return log_ratio
        if self.kind == "forward_kl":
            return 1 - torch.exp(-log_ratio)
        if self.kind == "js":
            return math.log(2) + F.logsigmoid(log_ratio)
        if self.kind == "alpha":
            return (torch.exp(torch.clamp((self.alpha - 1) * log_ratio, max=80.0)) - 1) / (self.alpha - 1)
        raise LossError(f"unknown f-divergence {self.kind!r}; expected reverse_kl, forward_kl, js or alpha")


REVERSE_KL = FDivergence()


def dpo_sigmoid_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    *,
    beta: float,
    label_smoothing: float = 0.0,
    divergence: FDivergence = REVERSE_KL,
) -> LossOutput:
    """DPO (Rafailov et al. 2023, arXiv 2305.18290, eq. 7) with conservative-DPO label smoothing (cDPO).

        loss = -(1 - eps) log sigma(beta z) - eps log sigma(-beta z)
        rewards = beta (log pi(y|x) - log pi_ref(y|x))

    ``label_smoothing`` eps = 0 is plain DPO; eps > 0 assumes labels are flipped with probability eps (cDPO,
    Mitchell 2023).
    """
    chosen_ratio, rejected_ratio = _log_ratios(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps,
                                               ref_rejected_logps)
    losses = _smoothed_sigmoid(beta * (divergence(chosen_ratio) - divergence(rejected_ratio)), label_smoothing)
    return LossOutput(losses, (beta * chosen_ratio).detach(), (beta * rejected_ratio).detach())


def robust_dpo_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    *,
    beta: float,
    label_smoothing: float,
    divergence: FDivergence = REVERSE_KL,
) -> LossOutput:
    """Robust DPO (Chowdhury et al. 2024, arXiv 2403.00409, eq. 10): an unbiased loss under label noise eps.

        loss = ( -(1 - eps) log sigma(beta z) + eps log sigma(-beta z) ) / (1 - 2 eps),     eps < 1/2
    """
    if not 0.0 <= label_smoothing < 0.5:
        raise LossError(f"robust DPO needs 0 <= label_smoothing < 0.5, got {label_smoothing}")
    chosen_ratio, rejected_ratio = _log_ratios(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps,
                                               ref_rejected_logps)
    logits = beta * (divergence(chosen_ratio) - divergence(rejected_ratio))
    losses = (-F.logsigmoid(logits) * (1 - label_smoothing) + F.logsigmoid(-logits) * label_smoothing) / (
        1 - 2 * label_smoothing
    )
    return LossOutput(losses, (beta * chosen_ratio).detach(), (beta * rejected_ratio).detach())


def hinge_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    *,
    beta: float,
    divergence: FDivergence = REVERSE_KL,
) -> LossOutput:
    """SLiC-HF hinge loss (Zhao et al. 2023, arXiv 2305.10425) on the DPO logits, as in TRL:

        loss = max(0, 1 - beta z)
    """
    chosen_ratio, rejected_ratio = _log_ratios(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps,
                                               ref_rejected_logps)
    losses = torch.relu(1 - beta * (divergence(chosen_ratio) - divergence(rejected_ratio)))
    return LossOutput(losses, (beta * chosen_ratio).detach(), (beta * rejected_ratio).detach())


def ipo_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    *,
    beta: float,
    chosen_tokens: torch.Tensor,
    rejected_tokens: torch.Tensor,
    divergence: FDivergence = REVERSE_KL,
) -> LossOutput:
    """IPO (Azar et al. 2023, arXiv 2310.12036, eq. 17; beta plays the role of tau):

        loss = (z_avg - 1 / (2 beta))^2

    where, as in TRL, every log-prob is first averaged over its response tokens
    (z_avg = (lp_w/|y_w| - lp_l/|y_l|) - (ref_w/|y_w| - ref_l/|y_l|)). Rewards: beta * averaged log-ratio (TRL reports
    the sums' log-ratios). With an f-divergence, each f'(u) is averaged instead of each log-ratio.
    """
    chosen_ratio, rejected_ratio = _log_ratios(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps,
                                               ref_rejected_logps)
    chosen_avg = _per_token(divergence(chosen_ratio), chosen_tokens, "chosen_tokens")
    rejected_avg = _per_token(divergence(rejected_ratio), rejected_tokens, "rejected_tokens")
    losses = (chosen_avg - rejected_avg - 1 / (2 * beta)) ** 2
    return LossOutput(losses, (beta * _per_token(chosen_ratio, chosen_tokens, "chosen_tokens")).detach(),
                      (beta * _per_token(rejected_ratio, rejected_tokens, "rejected_tokens")).detach())


def sigmoid_norm_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    *,
    beta: float,
    chosen_tokens: torch.Tensor,
    rejected_tokens: torch.Tensor,
    label_smoothing: float = 0.0,
    divergence: FDivergence = REVERSE_KL,
) -> LossOutput:
    """Length-normalised DPO (TRL's ``sigmoid_norm``): DPO on log-ratios divided by response length.

        loss = -(1 - eps) log sigma(beta d) - eps log sigma(-beta d),
        d = (lp_w - ref_w) / |y_w| - (lp_l - ref_l) / |y_l|

    Rewards are the normalised ones, beta (lp - ref) / |y|, so that their margin is what the loss sees.
    """
    chosen_ratio, rejected_ratio = _log_ratios(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps,
                                               ref_rejected_logps)
    chosen_avg = _per_token(divergence(chosen_ratio), chosen_tokens, "chosen_tokens")
    rejected_avg = _per_token(divergence(rejected_ratio), rejected_tokens, "rejected_tokens")
    losses = _smoothed_sigmoid(beta * (chosen_avg - rejected_avg), label_smoothing)
    return LossOutput(losses, (beta * _per_token(chosen_ratio, chosen_tokens, "chosen_tokens")).detach(),
                      (beta * _per_token(rejected_ratio, rejected_tokens, "rejected_tokens")).detach())


def simpo_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    *,
    beta: float,
    gamma: float,
    chosen_tokens: torch.Tensor,
    rejected_tokens: torch.Tensor,
    label_smoothing: float = 0.0,
) -> LossOutput:
    """SimPO (Meng et al. 2024, arXiv 2405.14734, eq. 6): reference-free, average log-prob reward, target margin.

        loss = -log sigma( beta/|y_w| log pi(y_w|x) - beta/|y_l| log pi(y_l|x) - gamma )
        rewards = beta/|y| log pi(y|x)

    ``gamma`` is the paper's margin (TRL's ``simpo_gamma`` = gamma_beta_ratio * beta); label smoothing as cDPO.
    """
    chosen_avg = _per_token(policy_chosen_logps, chosen_tokens, "chosen_tokens")
    rejected_avg = _per_token(policy_rejected_logps, rejected_tokens, "rejected_tokens")
    losses = _smoothed_sigmoid(beta * (chosen_avg - rejected_avg) - gamma, label_smoothing)
    return LossOutput(losses, (beta * chosen_avg).detach(), (beta * rejected_avg).detach())


def exo_pair_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    *,
    beta: float,
    label_smoothing: float,
    divergence: FDivergence = REVERSE_KL,
) -> LossOutput:
    """EXO-pref (Ji et al. 2024, arXiv 2402.00856, eq. 16 with K = 2): the reverse KL from the policy's preference
    distribution over the pair to the label distribution [1 - eps, eps]:

        q_w = sigma(beta z),  q_l = sigma(-beta z) = 1 - q_w
        loss = q_w (log q_w - log(1 - eps)) + q_l (log q_l - log eps),     0 < eps < 1

    ``label_smoothing`` is eps (the paper recommends 1e-3); eps = 0 would put log 0 in the loss.
    """
    if not 0.0 < label_smoothing < 1.0:
        raise LossError(f"exo_pair needs 0 < label_smoothing < 1 (the paper uses 1e-3), got {label_smoothing}")
    chosen_ratio, rejected_ratio = _log_ratios(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps,
                                               ref_rejected_logps)
    logits = beta * (divergence(chosen_ratio) - divergence(rejected_ratio))
    log_qw, log_ql = F.logsigmoid(logits), F.logsigmoid(-logits)
    losses = (log_qw.exp() * (log_qw - math.log1p(-label_smoothing))
              + log_ql.exp() * (log_ql - math.log(label_smoothing)))
    return LossOutput(losses, (beta * chosen_ratio).detach(), (beta * rejected_ratio).detach())


def nca_pair_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    *,
    beta: float,
) -> LossOutput:
    """NCA (Chen et al. 2024, arXiv 2402.05369), for a pair: noise-contrastive alignment, which scores each
    response on its own reward and so pushes the chosen likelihood up rather than only the margin:

        loss = -log sigma(r_w) - 1/2 log sigma(-r_w) - 1/2 log sigma(-r_l)
    """
    chosen_ratio, rejected_ratio = _log_ratios(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps,
                                               ref_rejected_logps)
    r_w, r_l = beta * chosen_ratio, beta * rejected_ratio
    losses = -F.logsigmoid(r_w) - 0.5 * F.logsigmoid(-r_w) - 0.5 * F.logsigmoid(-r_l)
    return LossOutput(losses, r_w.detach(), r_l.detach())


def bco_pair_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    *,
    beta: float,
    delta: float = 0.0,
) -> LossOutput:
    """BCO on pairs (Jung et al. 2024, arXiv 2404.04656): a binary classifier whose logit is the reward,
    chosen labelled 1 and rejected 0, around a reward shift delta:

        loss = -log sigma(r_w - delta) - log sigma(-(r_l - delta))

    ``delta = 0`` is TRL ``DPOTrainer``'s ``bco_pair``. The paper's delta is the running mean of all rewards seen so
    far; the trainer keeps it (``train.bco_running_delta``) and passes it here as a constant.
    """
    chosen_ratio, rejected_ratio = _log_ratios(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps,
                                               ref_rejected_logps)
    r_w, r_l = beta * chosen_ratio, beta * rejected_ratio
    losses = -F.logsigmoid(r_w - delta) - F.logsigmoid(-(r_l - delta))
    return LossOutput(losses, r_w.detach(), r_l.detach())


def sppo_hard_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    *,
    beta: float,
) -> LossOutput:
    """SPPO with hard labels (Wu et al. 2024, arXiv 2405.00675, eq. 4.7 of Algorithm 1 with P(y_w > y_l) = 1 for the
    winner and 0 for the loser, as TRL implements it; eta = 1 / beta):

        loss = (log(pi/pi_ref)(y_w) - 1 / (2 beta))^2 + (log(pi/pi_ref)(y_l) + 1 / (2 beta))^2
    """
    chosen_ratio, rejected_ratio = _log_ratios(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps,
                                               ref_rejected_logps)
    losses = (chosen_ratio - 0.5 / beta) ** 2 + (rejected_ratio + 0.5 / beta) ** 2
    return LossOutput(losses, (beta * chosen_ratio).detach(), (beta * rejected_ratio).detach())


def aot_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    *,
    beta: float,
    label_smoothing: float = 0.0,
) -> LossOutput:
    """AOT, paired (Melnyk et al. 2024, arXiv 2406.05882): distributional alignment by optimal transport in
    one dimension, i.e. the logistic loss between the *sorted* policy and reference log-ratio margins of the batch:

        m = sort_B(log pi(y_w|x) - log pi(y_l|x)),  m_ref = sort_B(log pi_ref(y_w|x) - log pi_ref(y_l|x))
        loss_k = -(1 - eps) log sigma(beta (m_k - m_ref_k)) - eps log sigma(-beta (m_k - m_ref_k))

    Entry k of ``losses`` belongs to the k-th quantile of the batch, not to pair k (rewards are per pair). The pairs of
    a batch are coupled: the trainer sorts within each micro-batch (per process), as TRL sorts within its batch.
    """
    chosen_ratio, rejected_ratio = _log_ratios(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps,
                                               ref_rejected_logps)
    margins, _ = torch.sort(policy_chosen_logps - policy_rejected_logps, dim=0)
    ref_margins, _ = torch.sort((ref_chosen_logps - ref_rejected_logps).detach(), dim=0)
    losses = _smoothed_sigmoid(beta * (margins - ref_margins), label_smoothing)
    return LossOutput(losses, (beta * chosen_ratio).detach(), (beta * rejected_ratio).detach())


def aot_unpaired_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    *,
    beta: float,
    label_smoothing: float = 0.0,
) -> LossOutput:
    """AOT, unpaired (Melnyk et al. 2024, arXiv 2406.05882): the chosen log-ratios' distribution should
    dominate the rejected ones' quantile by quantile, so each is sorted on its own:

        u = sort_B(log(pi/pi_ref)(y_w)),  v = sort_B(log(pi/pi_ref)(y_l))
        loss_k = -(1 - eps) log sigma(beta (u_k - v_k)) - eps log sigma(-beta (u_k - v_k))

    As for ``aot_loss``, entry k of ``losses`` is the k-th quantile and sorting is within the micro-batch.
    """
    chosen_ratio, rejected_ratio = _log_ratios(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps,
                                               ref_rejected_logps)
    chosen_sorted, _ = torch.sort(chosen_ratio, dim=0)
    rejected_sorted, _ = torch.sort(rejected_ratio, dim=0)
    losses = _smoothed_sigmoid(beta * (chosen_sorted - rejected_sorted), label_smoothing)
    return LossOutput(losses, (beta * chosen_ratio).detach(), (beta * rejected_ratio).detach())


def apo_zero_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    *,
    beta: float,
) -> LossOutput:
    """APO-zero (D'Oosterlinck et al. 2024, arXiv 2408.06266, eq. 7): for chosen answers better than the model's
    own, raise the chosen likelihood and lower the rejected one, each anchored at zero reward:

        loss = (1 - sigma(r_w)) + sigma(r_l)
    """
    chosen_ratio, rejected_ratio = _log_ratios(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps,
                                               ref_rejected_logps)
    r_w, r_l = beta * chosen_ratio, beta * rejected_ratio
    losses = 1 - torch.sigmoid(r_w) + torch.sigmoid(r_l)
    return LossOutput(losses, r_w.detach(), r_l.detach())


def apo_down_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    *,
    beta: float,
) -> LossOutput:
    """APO-down (D'Oosterlinck et al. 2024, arXiv 2408.06266, eq. 8): for chosen answers worse than the model's own,
    lower both likelihoods, the rejected one more:

        loss = sigma(r_w) + (1 - sigma(r_w - r_l))
    """
    chosen_ratio, rejected_ratio = _log_ratios(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps,
                                               ref_rejected_logps)
    r_w, r_l = beta * chosen_ratio, beta * rejected_ratio
    losses = torch.sigmoid(r_w) + 1 - torch.sigmoid(r_w - r_l)
    return LossOutput(losses, r_w.detach(), r_l.detach())


def discopop_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    *,
    beta: float,
    tau: float = 0.05,
    divergence: FDivergence = REVERSE_KL,
) -> LossOutput:
    """DiscoPOP / log-ratio modulated loss (Chris Lu et al. 2024, arXiv 2406.08414, eq. 5): a blend of the logistic
    and the exponential loss on beta z, mixed by sigma(beta z / tau):

        m = sigma(beta z / tau)
        loss = (1 - m) (-log sigma(beta z)) + m exp(-beta z)

    ``tau`` is TRL's ``discopop_tau`` (the paper's 0.05). The loss is not monotonic in z: with tau = 0.05 its slope
    at z = 0 is 5 (1 - log 2) - 3/4 = +0.78, so from policy = reference it first lowers the loss by lowering the margin,
    down to a minimum at a small negative margin.
    """
    chosen_ratio, rejected_ratio = _log_ratios(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps,
                                               ref_rejected_logps)
    logits = beta * (divergence(chosen_ratio) - divergence(rejected_ratio))
    mix = torch.sigmoid(logits / tau)
    losses = -F.logsigmoid(logits) * (1 - mix) + torch.exp(-logits) * mix
    return LossOutput(losses, (beta * chosen_ratio).detach(), (beta * rejected_ratio).detach())


def sft_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor | None,
    ref_rejected_logps: torch.Tensor | None,
    *,
    beta: float,
    chosen_tokens: torch.Tensor,
    rejected_tokens: torch.Tensor,
) -> LossOutput:
    """The NLL of the chosen response, token-averaged per pair: RPO's extra term (Pang et al. 2024, arXiv 2404.19733)
    and MPO's ``sft`` component (Wang et al. 2024, arXiv 2411.10442):

        loss = -log pi(y_w|x) / |y_w|

    TRL's ``sft`` averages over all chosen tokens of the batch instead of per pair (equal when the lengths are).
    Rewards: r_w, r_l with a reference; without one, the reference-free beta log pi(y|x) / |y| (as SimPO's).
    """
    chosen_avg = _per_token(policy_chosen_logps, chosen_tokens, "chosen_tokens")
    rejected_avg = _per_token(policy_rejected_logps, rejected_tokens, "rejected_tokens")
    if ref_chosen_logps is None or ref_rejected_logps is None:
        chosen_reward, rejected_reward = beta * chosen_avg, beta * rejected_avg
    else:
        chosen_ratio, rejected_ratio = _log_ratios(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps,
                                                   ref_rejected_logps)
        chosen_reward, rejected_reward = beta * chosen_ratio, beta * rejected_ratio
    return LossOutput(-chosen_avg, chosen_reward.detach(), rejected_reward.detach())


def orpo_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    *,
    beta: float,
    chosen_tokens: torch.Tensor,
    rejected_tokens: torch.Tensor,
) -> LossOutput:
    """ORPO (Hong et al. 2024, arXiv 2403.07691, eqs. 4 and 7): reference-free, the chosen answer's NLL plus an
    odds-ratio term, on token-averaged log-probs a = log pi(y|x) / |y|:

        log odds(y) = a - log(1 - e^a)
        loss = -a_w - beta log sigma(log odds(y_w) - log odds(y_l))
        rewards = beta a

    ``beta`` is the paper's lambda (TRL's ``ORPOConfig.beta``). The NLL is per pair, token-averaged; TRL's
    ``ORPOTrainer`` averages it over all chosen tokens of the batch (equal when the lengths are).
    """
    chosen_avg = _per_token(policy_chosen_logps, chosen_tokens, "chosen_tokens")
    rejected_avg = _per_token(policy_rejected_logps, rejected_tokens, "rejected_tokens")
    log_odds = (chosen_avg - rejected_avg) - (_log1mexp(chosen_avg) - _log1mexp(rejected_avg))
    losses = -chosen_avg - beta * F.logsigmoid(log_odds)
    return LossOutput(losses, (beta * chosen_avg).detach(), (beta * rejected_avg).detach())


def _log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 - e^x) for x < 0, without cancellation near 0 (Maechler 2012: switch at -log 2)."""
    return torch.where(x < -math.log(2), torch.log1p(-torch.exp(x)), torch.log(-torch.expm1(x)))


def cpo_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    *,
    beta: float,
    chosen_tokens: torch.Tensor,
    alpha: float = 1.0,
    label_smoothing: float = 0.0,
) -> LossOutput:
    """CPO (Xu et al. 2024, arXiv 2401.08417, eq. 3 plus the NLL term): DPO with a uniform reference (beta -> 0 of the
    reference term), on summed log-probs, plus the chosen answer's NLL:

        loss = -(1 - eps) log sigma(beta (log pi(y_w|x) - log pi(y_l|x))) - eps log sigma(-...)
               + alpha (-log pi(y_w|x) / |y_w|)
        rewards = beta log pi(y|x)

    ``alpha`` is TRL's ``cpo_alpha``. The NLL is per pair, token-averaged; TRL's ``CPOTrainer`` averages it over all
    chosen tokens of the batch (equal when the lengths are).
    """
    nll = -_per_token(policy_chosen_logps, chosen_tokens, "chosen_tokens")
    losses = _smoothed_sigmoid(beta * (policy_chosen_logps - policy_rejected_logps), label_smoothing) + alpha * nll
    return LossOutput(losses, (beta * policy_chosen_logps).detach(), (beta * policy_rejected_logps).detach())


class UnpairedLossOutput(NamedTuple):
    """losses Float[B] (per row, weighted, not reduced), rewards Float[B] (beta times each row's log-ratio,
    detached) and kl Float[] (the reference point z_0 the losses used, detached)."""

    losses: torch.Tensor
    rewards: torch.Tensor
    kl: torch.Tensor


# (sum, count) of this process -> (sum, count) over every process (an all-reduce); see kto_kl
Gather = Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


def kto_kl(policy_kl_logps: torch.Tensor, ref_kl_logps: torch.Tensor, *, gather: Gather | None = None) -> torch.Tensor:
    """KTO's reference point (Ethayarajh et al. 2024, arXiv 2402.01306, section 4.1): z_0 = KL(pi || pi_ref),
    estimated as TRL's ``KTOTrainer`` does from mismatched rows, row i's prompt x_i with another row's completion y'_i:

        z_0 = max(0, mean_i [log pi(y'_i|x_i) - log pi_ref(y'_i|x_i)])

    Inputs Float[B] (sequence log-probs of the mismatched completions); returns Float[], detached: no gradient flows
    through the reference point. ``gather`` turns this process's (sum, count) into those of every process (the
    trainer passes an all-reduce under DDP/FSDP), so that z_0 is the mean over the whole micro-batch.
    """
    ratios = (policy_kl_logps - ref_kl_logps.detach()).detach().float()
    total, count = ratios.sum(), torch.tensor(float(ratios.numel()), device=ratios.device)
    if gather is not None:
        total, count = gather(total, count)
    return (total / count.clamp(min=1.0)).clamp(min=0.0)


def kto_loss(
    policy_logps: torch.Tensor,
    ref_logps: torch.Tensor,
    labels: torch.Tensor,
    kl: torch.Tensor,
    *,
    beta: float,
    desirable_weight: float = 1.0,
    undesirable_weight: float = 1.0,
) -> UnpairedLossOutput:
    """KTO (Ethayarajh et al. 2024, arXiv 2402.01306, the KTO loss of section 4.1; TRL's ``KTOTrainer``,
    ``loss_type="kto"``): a prospect-theoretic value of each completion on its own, relative to the reference point
    z_0 (``kto_kl``), with r = log pi(y|x) - log pi_ref(y|x):

        desirable (label True):     loss = lambda_D (1 - sigma(beta (r - z_0)))
        undesirable (label False):  loss = lambda_U (1 - sigma(beta (z_0 - r)))
        rewards = beta r

    ``policy_logps``, ``ref_logps`` Float[B] (sequence log-probs of each row's completion), ``labels`` Bool[B],
    ``kl`` Float[] (detached). lambda_D, lambda_U are ``desirable_weight``, ``undesirable_weight``. The batch loss is
    the mean of ``losses`` over the rows, as TRL's.
    """
    ratio = policy_logps - ref_logps.detach()
    kl = kl.detach().to(ratio.dtype)
    desirable = labels.to(torch.bool)
    losses = torch.where(desirable, desirable_weight * (1 - torch.sigmoid(beta * (ratio - kl))),
                         undesirable_weight * (1 - torch.sigmoid(beta * (kl - ratio))))
    return UnpairedLossOutput(losses, (beta * ratio).detach(), kl)


def preference_loss(
    loss_type: str,
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor | None,
    ref_rejected_logps: torch.Tensor | None,
    *,
    beta: float,
    chosen_tokens: torch.Tensor | None = None,
    rejected_tokens: torch.Tensor | None = None,
    label_smoothing: float = 0.0,
    simpo_gamma: float = 0.5,
    f_divergence: str = "reverse_kl",
    f_alpha: float = 0.5,
    discopop_tau: float = 0.05,
    cpo_alpha: float = 1.0,
    bco_delta: float = 0.0,
) -> LossOutput:
    """Dispatch on ``loss_type`` (one name of ``TrainConfig.loss``); all inputs Float[B], token counts Long[B].

    The keyword settings are the ``TrainConfig`` fields of the same names (``bco_delta`` is the trainer's running
    shift). Reference log-probs may be None only for the reference-free losses. A setting the chosen loss does not
    read is an error rather than silently ignored (the rule ``TrainConfig`` applies when a config loads).
    """
    if loss_type not in LOSS_TYPES:
        raise LossError(f"unknown loss type {loss_type!r}; expected one of {list(LOSS_TYPES)}")
    if loss_type in UNPAIRED_LOSSES:
        raise LossError(f"loss {loss_type!r} scores unpaired rows, not pairs: call kto_loss with labels and kto_kl")
    if beta <= 0:
        raise LossError(f"beta must be > 0, got {beta}")
    settings = {"label_smoothing": label_smoothing, "simpo_gamma": simpo_gamma, "f_divergence": f_divergence,
                "f_alpha": f_alpha, "discopop_tau": discopop_tau, "cpo_alpha": cpo_alpha}
    problem = loss_settings_error(loss_type, settings)
    if problem:
        raise LossError(problem)
    policy = (policy_chosen_logps, policy_rejected_logps)
    tokens = {"chosen_tokens": chosen_tokens, "rejected_tokens": rejected_tokens}
    if loss_type == "simpo":
        return simpo_loss(*policy, beta=beta, gamma=simpo_gamma, label_smoothing=label_smoothing, **tokens)
    if loss_type == "sft":
        return sft_loss(*policy, ref_chosen_logps, ref_rejected_logps, beta=beta, **tokens)
    if loss_type == "orpo":
        return orpo_loss(*policy, beta=beta, **tokens)
    if loss_type == "cpo":
        return cpo_loss(*policy, beta=beta, alpha=cpo_alpha, label_smoothing=label_smoothing,
                        chosen_tokens=chosen_tokens)
    if ref_chosen_logps is None or ref_rejected_logps is None:
        raise LossError(f"loss {loss_type!r} needs reference log-probs")
    both = (*policy, ref_chosen_logps, ref_rejected_logps)
    div = FDivergence(f_divergence, f_alpha)
    if loss_type == "sigmoid":
        return dpo_sigmoid_loss(*both, beta=beta, label_smoothing=label_smoothing, divergence=div)
    if loss_type == "robust":
        return robust_dpo_loss(*both, beta=beta, label_smoothing=label_smoothing, divergence=div)
    if loss_type == "hinge":
        return hinge_loss(*both, beta=beta, divergence=div)
    if loss_type == "ipo":
        return ipo_loss(*both, beta=beta, divergence=div, **tokens)
    if loss_type == "sigmoid_norm":
        return sigmoid_norm_loss(*both, beta=beta, label_smoothing=label_smoothing, divergence=div, **tokens)
    if loss_type == "exo_pair":
        return exo_pair_loss(*both, beta=beta, label_smoothing=label_smoothing, divergence=div)
    if loss_type == "discopop":
        return discopop_loss(*both, beta=beta, tau=discopop_tau, divergence=div)
    if loss_type == "bco_pair":
        return bco_pair_loss(*both, beta=beta, delta=bco_delta)
    if loss_type == "aot":
        return aot_loss(*both, beta=beta, label_smoothing=label_smoothing)
    if loss_type == "aot_unpaired":
        return aot_unpaired_loss(*both, beta=beta, label_smoothing=label_smoothing)
    if loss_type == "nca_pair":
        return nca_pair_loss(*both, beta=beta)
    if loss_type == "sppo_hard":
        return sppo_hard_loss(*both, beta=beta)
    if loss_type == "apo_zero":
        return apo_zero_loss(*both, beta=beta)
    return apo_down_loss(*both, beta=beta)


class MixtureOutput(NamedTuple):
    """losses Float[B]: the weighted sum of the components per pair; chosen_rewards, rejected_rewards Float[B]: those
    of the first component; components: each component's own ``LossOutput`` (unweighted), by loss name."""

    losses: torch.Tensor
    chosen_rewards: torch.Tensor
    rejected_rewards: torch.Tensor
    components: dict[str, LossOutput]


def mixture_loss(
    objective: list[tuple[str, float]],
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor | None,
    ref_rejected_logps: torch.Tensor | None,
    *,
    beta: float,
    chosen_tokens: torch.Tensor | None = None,
    rejected_tokens: torch.Tensor | None = None,
    pair_weights: torch.Tensor | None = None,
    bco_delta: float = 0.0,
    **settings,
) -> MixtureOutput:
    """A weighted sum of objectives (MPO, Wang et al. 2024, arXiv 2411.10442), e.g. ``[("sigmoid", 0.8),
    ("bco_pair", 0.2), ("sft", 1.0)]``; ``TrainConfig.objective()`` builds the list. A single ``(name, 1.0)`` is that
    objective alone.

        loss = w_pair * sum_i weight_i * loss_i

    ``settings`` are ``preference_loss``'s (``TrainConfig.loss_settings()``); each component gets those it reads.
    ``pair_weights`` Float[B] (detached), when given, multiply each pair's loss (WPO).
    """
    components = {}
    for name, _ in objective:
        own = {key: value for key, value in settings.items() if name in LOSS_SETTINGS[key]}
        if name == "bco_pair":
            own["bco_delta"] = bco_delta
        components[name] = preference_loss(name, policy_chosen_logps, policy_rejected_logps, ref_chosen_logps,
                                           ref_rejected_logps, beta=beta, chosen_tokens=chosen_tokens,
                                           rejected_tokens=rejected_tokens, **own)
    losses = sum(weight * components[name].losses for name, weight in objective)
    if pair_weights is not None:
        losses = losses * pair_weights.detach()
    first = components[objective[0][0]]
    return MixtureOutput(losses, first.chosen_rewards, first.rejected_rewards, components)


def ld_logps(logps: torch.Tensor, shared_logps: torch.Tensor, alpha: float) -> torch.Tensor:
    """LD-DPO's length-desensitised log-probs (Liu et al. 2024, arXiv 2409.06411): the tokens past the length
    l_p = min(|y_w|, |y_l|) that both responses share count with weight alpha, i.e. pi(y_{1:l_p}) pi(y_{l_p+1:})^alpha:

        log pi_ld(y|x) = log pi(y_{1:l_p}|x) + alpha (log pi(y|x) - log pi(y_{1:l_p}|x))

    ``logps`` and ``shared_logps`` Float[B] (``dpo_core.logprobs.SequenceScores``); alpha = 1 is plain DPO, alpha = 0
    drops the longer response's extra tokens. Used for the policy and the reference alike.
    """
    return shared_logps + alpha * (logps - shared_logps)


def wpo_weights(chosen_wpo_logps: torch.Tensor, rejected_wpo_logps: torch.Tensor, chosen_tokens: torch.Tensor,
                rejected_tokens: torch.Tensor) -> torch.Tensor:
    """WPO's per-pair weight (Zhou et al. 2024, arXiv 2406.11827, eq. 2, aligned as TRL's ``use_weighting``): how
    likely the current policy itself is to produce both responses,

        w(x, y_w, y_l) = exp( mean_t [log p(y_w,t) - log sum_v p_v^2] ) * exp( mean_t [log p(y_l,t) - log sum_v p_v^2] )

    Subtracting log sum_v p_v^2 at each position compares the token's probability with that of a token sampled from
    the policy itself. Inputs Float[B] sums (``SequenceScores.wpo_logps``) and token counts Long[B]; the result is
    detached: the weights scale the loss, they are not optimised.
    """
    chosen = chosen_wpo_logps / chosen_tokens.to(chosen_wpo_logps.dtype).clamp(min=1)
    rejected = rejected_wpo_logps / rejected_tokens.to(rejected_wpo_logps.dtype).clamp(min=1)
    return torch.exp(chosen + rejected).detach()
