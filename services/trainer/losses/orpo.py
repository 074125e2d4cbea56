"""The ORPO loss (Hong et al. 2024, arXiv 2403.07691), as TRL 1.16's ORPOTrainer computes it:
the odds-ratio term on each pair's mean log-probs per answer token. The chosen answers' NLL
that ORPO adds to it is losses.nll's, the one CPO and SimPO add too."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 - exp(x)) for x < 0, without the cancellation either form has on one side of -ln 2."""
    return torch.where(x < -math.log(2), torch.log1p(-torch.exp(x)), torch.log(-torch.expm1(x)))


def log_odds(chosen_logps: torch.Tensor, rejected_logps: torch.Tensor) -> torch.Tensor:
    """log(odds(chosen) / odds(rejected)) with odds(y) = p / (1 - p), p = exp(mean log-prob). [pairs]"""
    return (chosen_logps - rejected_logps) - (log1mexp(chosen_logps) - log1mexp(rejected_logps))


def orpo_loss(chosen_logps: torch.Tensor, rejected_logps: torch.Tensor,
              beta: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(losses, log-odds ratios, chosen rewards, rejected rewards), each [pairs].

    chosen_logps, rejected_logps: [pairs] mean log-prob per answer token (ORPO's odds are of
    the length-normalised likelihood). losses = -beta * log sigmoid(log odds ratio): what the
    pair adds to the chosen NLL (beta is the paper's lambda). The rewards are beta x the mean
    log-probs, detached (TRL's logged `rewards/*`)."""
    chosen_logps, rejected_logps = chosen_logps.float(), rejected_logps.float()
    ratio = log_odds(chosen_logps, rejected_logps)
    losses = -beta * F.logsigmoid(ratio)
    return losses, ratio, beta * chosen_logps.detach(), beta * rejected_logps.detach()
