"""Preference-optimisation objectives, one small function per objective (in the style of torchtune's rlhf losses).

Every function takes per-pair sequence log-probs (sums over response tokens, shape ``[B]``) and returns a
``LossOutput`` of per-pair losses ``[B]`` plus the implicit rewards of chosen and rejected ``[B]`` (detached).
Reference log-probs are detached too: gradients flow only through the policy. The formulas follow TRL's
``DPOTrainer`` / ``CPOTrainer`` so that numbers are comparable with what people know. Notation:

    z = (log pi(y_w|x) - log pi(y_l|x)) - (log pi_ref(y_w|x) - log pi_ref(y_l|x))     (the "logits" of TRL)

``preference_loss(loss_type, ...)`` dispatches on ``TrainConfig.loss``; ``sft_nll`` is RPO's extra term.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F

from dpo_core.config import LOSS_TYPES, loss_settings_error

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
    "preference_loss",
    "sft_nll",
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


def dpo_sigmoid_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    *,
    beta: float,
    label_smoothing: float = 0.0,
) -> LossOutput:
    """DPO (Rafailov et al. 2023, arXiv 2305.18290, eq. 7) with conservative-DPO label smoothing (cDPO).

        loss = -(1 - eps) log sigma(beta z) - eps log sigma(-beta z)
        rewards = beta (log pi(y|x) - log pi_ref(y|x))

    ``label_smoothing`` eps = 0 is plain DPO; eps > 0 assumes labels are flipped with probability eps (cDPO,
    Mitchell 2023).
    """
    chosen_ratio = policy_chosen_logps - ref_chosen_logps.detach()
    rejected_ratio = policy_rejected_logps - ref_rejected_logps.detach()
    losses = _smoothed_sigmoid(beta * (chosen_ratio - rejected_ratio), label_smoothing)
    return LossOutput(losses, (beta * chosen_ratio).detach(), (beta * rejected_ratio).detach())


def robust_dpo_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    *,
    beta: float,
    label_smoothing: float,
) -> LossOutput:
    """Robust DPO (Chowdhury et al. 2024, arXiv 2403.00409, eq. 10): an unbiased loss under label noise eps.

        loss = ( -(1 - eps) log sigma(beta z) + eps log sigma(-beta z) ) / (1 - 2 eps),     eps < 1/2
    """
    if not 0.0 <= label_smoothing < 0.5:
        raise LossError(f"robust DPO needs 0 <= label_smoothing < 0.5, got {label_smoothing}")
    chosen_ratio = policy_chosen_logps - ref_chosen_logps.detach()
    rejected_ratio = policy_rejected_logps - ref_rejected_logps.detach()
    logits = beta * (chosen_ratio - rejected_ratio)
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
) -> LossOutput:
    """SLiC-HF hinge loss (Zhao et al. 2023, arXiv 2305.10425) on the DPO logits, as in TRL:

        loss = max(0, 1 - beta z)
    """
    chosen_ratio = policy_chosen_logps - ref_chosen_logps.detach()
    rejected_ratio = policy_rejected_logps - ref_rejected_logps.detach()
    losses = torch.relu(1 - beta * (chosen_ratio - rejected_ratio))
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
) -> LossOutput:
    """IPO (Azar et al. 2023, arXiv 2310.12036, eq. 17; beta plays the role of tau):

        loss = (z_avg - 1 / (2 beta))^2

    where, as in TRL, every log-prob is first averaged over its response tokens
    (z_avg = (lp_w/|y_w| - lp_l/|y_l|) - (ref_w/|y_w| - ref_l/|y_l|)). Rewards: beta * averaged log-ratio.
    """
    chosen_ratio = _per_token(policy_chosen_logps - ref_chosen_logps.detach(), chosen_tokens, "chosen_tokens")
    rejected_ratio = _per_token(policy_rejected_logps - ref_rejected_logps.detach(), rejected_tokens, "rejected_tokens")
    losses = (chosen_ratio - rejected_ratio - 1 / (2 * beta)) ** 2
    return LossOutput(losses, (beta * chosen_ratio).detach(), (beta * rejected_ratio).detach())


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
) -> LossOutput:
    """Length-normalised DPO (TRL's ``sigmoid_norm``): DPO on log-ratios divided by response length.

        loss = -(1 - eps) log sigma(beta d) - eps log sigma(-beta d),
        d = (lp_w - ref_w) / |y_w| - (lp_l - ref_l) / |y_l|

    Rewards are the normalised ones, beta (lp - ref) / |y|, so that their margin is what the loss sees.
    """
    chosen_ratio = _per_token(policy_chosen_logps - ref_chosen_logps.detach(), chosen_tokens, "chosen_tokens")
    rejected_ratio = _per_token(policy_rejected_logps - ref_rejected_logps.detach(), rejected_tokens, "rejected_tokens")
    losses = _smoothed_sigmoid(beta * (chosen_ratio - rejected_ratio), label_smoothing)
    return LossOutput(losses, (beta * chosen_ratio).detach(), (beta * rejected_ratio).detach())


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


def preference_loss(
    loss_type: str,
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor | None,
    ref_rejected_logps: torch.Tensor | None,
    *,
    beta: float,
    label_smoothing: float = 0.0,
    simpo_gamma: float = 0.5,
    chosen_tokens: torch.Tensor | None = None,
    rejected_tokens: torch.Tensor | None = None,
) -> LossOutput:
    """Dispatch on ``loss_type`` (``TrainConfig.loss``); all inputs Float[B], token counts Long[B].

    Reference log-probs may be None only for ``simpo``. A ``label_smoothing`` or ``simpo_gamma`` the chosen loss does
    not read is an error rather than silently ignored (the same rule ``TrainConfig`` applies when a config loads).
    """
    if loss_type not in LOSS_TYPES:
        raise LossError(f"unknown loss type {loss_type!r}; expected one of {list(LOSS_TYPES)}")
    if beta <= 0:
        raise LossError(f"beta must be > 0, got {beta}")
    problem = loss_settings_error(loss_type, {"label_smoothing": label_smoothing, "simpo_gamma": simpo_gamma})
    if problem:
        raise LossError(problem)
    policy = (policy_chosen_logps, policy_rejected_logps)
    if loss_type == "simpo":
        return simpo_loss(*policy, beta=beta, gamma=simpo_gamma, chosen_tokens=chosen_tokens,
                          rejected_tokens=rejected_tokens, label_smoothing=label_smoothing)
    if ref_chosen_logps is None or ref_rejected_logps is None:
        raise LossError(f"loss {loss_type!r} needs reference log-probs")
    both = (*policy, ref_chosen_logps, ref_rejected_logps)
    if loss_type == "sigmoid":
        return dpo_sigmoid_loss(*both, beta=beta, label_smoothing=label_smoothing)
    if loss_type == "robust":
        return robust_dpo_loss(*both, beta=beta, label_smoothing=label_smoothing)
    if loss_type == "hinge":
        return hinge_loss(*both, beta=beta)
    if loss_type == "ipo":
        return ipo_loss(*both, beta=beta, chosen_tokens=chosen_tokens, rejected_tokens=rejected_tokens)
    return sigmoid_norm_loss(*both, beta=beta, chosen_tokens=chosen_tokens, rejected_tokens=rejected_tokens,
                             label_smoothing=label_smoothing)


def sft_nll(chosen_logps: torch.Tensor, chosen_tokens: torch.Tensor) -> torch.Tensor:
    """RPO's NLL term on the chosen response (Pang et al. 2024, arXiv 2404.19733), per pair, token-averaged:

        nll = -log pi(y_w|x) / |y_w|

    The trainer adds ``sft_weight * nll`` to the preference loss (TRL's ``rpo_alpha``).
    """
    return -chosen_logps / chosen_tokens.to(chosen_logps.dtype).clamp(min=1)
