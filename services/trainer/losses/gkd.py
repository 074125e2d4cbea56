"""The GKD loss (Agarwal et al., 2024, eq. 1): the generalized Jensen-Shannon divergence between the
student's and the teacher's next-token distributions, per token. With M = beta T + (1 - beta) S:
JSD_beta = beta KL(T || M) + (1 - beta) KL(S || M); beta 0 is the forward KL(T || S) and beta 1 the
reverse KL(S || T) (TRL's and ms-swift's convention). The method sums it over a micro-batch's
trained tokens and divides by the step's trained tokens (TRL's batchmean over one batch)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def generalized_jsd(student_logits: torch.Tensor, teacher_logits: torch.Tensor, beta: float,
                    temperature: float = 1.0) -> torch.Tensor:
    """The divergence at each position, [...] for logits [..., vocab] (same vocabulary); both
    distributions are softmax(logits / temperature)."""
    if not 0.0 <= beta <= 1.0:
        raise ValueError(f"beta must lie in [0, 1], got {beta}")
    student = F.log_softmax(student_logits.float() / temperature, dim=-1)
    teacher = F.log_softmax(teacher_logits.float() / temperature, dim=-1)
    if beta == 0.0:
        return _kl(teacher, student)
    if beta == 1.0:
        return _kl(student, teacher)
    mixture = torch.logsumexp(torch.stack([student + math.log1p(-beta), teacher + math.log(beta)]), dim=0)
    return beta * _kl(teacher, mixture) + (1.0 - beta) * _kl(student, mixture)


def _kl(p_log: torch.Tensor, q_log: torch.Tensor) -> torch.Tensor:
    """KL(P || Q) over the last dimension from log-probabilities."""
    return (p_log.exp() * (p_log - q_log)).sum(dim=-1)
