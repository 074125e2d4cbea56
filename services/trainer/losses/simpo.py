"""The SimPO loss (Meng et al. 2024, arXiv 2405.14734): a sigmoid loss on length-normalised
rewards, beta x the mean log-prob per answer token, that asks the chosen answer's reward to
beat the rejected one's by a target margin gamma; no reference model.

With gamma 0 and summed log-probs it is CPO's sigmoid loss (losses.cpo takes it from here)."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def simpo_loss(chosen_logps: torch.Tensor, rejected_logps: torch.Tensor, beta: float, gamma: float,
               label_smoothing: float = 0.0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(losses, chosen rewards, rejected rewards), each [pairs].

    chosen_logps, rejected_logps: [pairs] mean log-prob per answer token. With
    m = beta * (chosen - rejected) - gamma, losses = -(1 - eps) log sigmoid(m) - eps log sigmoid(-m)
    (eps = label_smoothing: the conservative loss of cDPO). The rewards are beta x the log-probs,
    detached."""
    chosen_logps, rejected_logps = chosen_logps.float(), rejected_logps.float()
    margin = beta * (chosen_logps - rejected_logps) - gamma
    losses = -(1 - label_smoothing) * F.logsigmoid(margin) - label_smoothing * F.logsigmoid(-margin)
    return losses, beta * chosen_logps.detach(), beta * rejected_logps.detach()
