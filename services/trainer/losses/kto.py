"""The KTO loss (Kahneman-Tversky optimisation, arXiv:2402.01306) and its KL term, as TRL
1.16's KTOTrainer computes them: per row, desirable rows lose
lambda_D (1 - sigmoid(beta (log pi/ref - KL))) and undesirable rows
lambda_U (1 - sigmoid(beta (KL - log pi/ref))); `apo_zero_unpaired` (arXiv:2408.06266) drops
the KL term: 1 - sigmoid(beta log pi/ref) and sigmoid(beta log pi/ref).

The KL term is the mean of log pi - log ref over mismatched sequences (a row's prompt with
another row's completion), detached and clamped at 0: a baseline, not something trained."""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F


def kto_kl(policy_kl_logps: torch.Tensor, ref_kl_logps: torch.Tensor,
           all_sum: Callable[[torch.Tensor], torch.Tensor] | None = None) -> torch.Tensor:
    """The KL estimate: mean over the mismatched sequences of (policy - reference) log-prob,
    detached, at least 0. `all_sum` sums a [2] float64 tensor (the differences' sum, their
    count) over the data-parallel ranks, so every rank gets the same estimate from all their
    sequences (TRL gathers each rank's mean and averages them: the same with equal micro-batches).
    No sequence anywhere gives 0. policy_kl_logps, ref_kl_logps: [sequences]."""
    differences = (policy_kl_logps - ref_kl_logps).detach().double()
    totals = torch.stack([differences.sum(), differences.new_tensor(float(differences.numel()))])
    if all_sum is not None:
        totals = all_sum(totals)
    mean = totals[0] / totals[1].clamp(min=1)
    return mean.clamp(min=0).to(policy_kl_logps.dtype)


def kto_loss(policy_logps: torch.Tensor, ref_logps: torch.Tensor, desirable: torch.Tensor, kl: torch.Tensor,
             beta: float, loss_type: str = "kto", desirable_weight: float = 1.0,
             undesirable_weight: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """(losses, rewards), both [rows]: each row's weighted loss, and its implicit reward
    beta (log pi - log ref), detached. policy_logps, ref_logps: [rows] summed log-probs of the
    rows' completions; desirable: [rows] bool; kl: a scalar from `kto_kl` (unused by
    apo_zero_unpaired)."""
    logratios = policy_logps - ref_logps
    if loss_type == "kto":
        chosen = 1 - F.sigmoid(beta * (logratios - kl))
        rejected = 1 - F.sigmoid(beta * (kl - logratios))
    elif loss_type == "apo_zero_unpaired":
        chosen = 1 - F.sigmoid(beta * logratios)
        rejected = F.sigmoid(beta * logratios)
    else:
        raise ValueError(f"unknown KTO loss_type {loss_type!r}")
    losses = torch.where(desirable, desirable_weight * chosen, undesirable_weight * rejected)
    return losses, beta * logratios.detach()
