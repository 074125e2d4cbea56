"""The CPO loss (Xu et al. 2024, arXiv 2401.08417) and its loss types, as TRL 1.16's
CPOTrainer computes them: a DPO-like preference term on the policy's own log-probs (no
reference model). The chosen answers' NLL that CPO adds, weighted by cpo_alpha, is losses.nll's.

loss_type simpo is SimPO's loss (losses.simpo) on mean log-probs per answer token; ipo also
takes mean log-probs; sigmoid and hinge take summed ones (`AVERAGED`)."""

from __future__ import annotations

import torch

from services.trainer.losses.simpo import simpo_loss

AVERAGED = ("ipo", "simpo")  # loss types whose log-probs are means per answer token, not sums


def cpo_loss(chosen_logps: torch.Tensor, rejected_logps: torch.Tensor, beta: float, loss_type: str = "sigmoid",
             label_smoothing: float = 0.0, simpo_gamma: float = 1.0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(losses, chosen rewards, rejected rewards), each [pairs]; the rewards are beta x the
    log-probs, detached. chosen_logps, rejected_logps: [pairs], means per answer token for the
    loss types in AVERAGED, sums otherwise. With d = chosen - rejected:
      sigmoid: -(1 - eps) log sigmoid(beta d) - eps log sigmoid(-beta d)   (eps = label_smoothing)
      hinge:   relu(1 - beta d)
      ipo:     (d - 1 / (2 beta))^2
      simpo:   as sigmoid on beta d - simpo_gamma"""
    if loss_type in ("sigmoid", "simpo"):
        return simpo_loss(chosen_logps, rejected_logps, beta, simpo_gamma if loss_type == "simpo" else 0.0,
                          label_smoothing)
    chosen_logps, rejected_logps = chosen_logps.float(), rejected_logps.float()
    difference = chosen_logps - rejected_logps
    if loss_type == "hinge":
        losses = torch.relu(1 - beta * difference)
    elif loss_type == "ipo":
        losses = (difference - 1 / (2 * beta)) ** 2
    else:
        raise ValueError(f"unknown CPO loss_type {loss_type!r}")  # config.CpoConfig refuses it first
    return losses, beta * chosen_logps.detach(), beta * rejected_logps.detach()
