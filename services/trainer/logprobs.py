"""Log-probabilities of the labelled tokens, per token and per sequence: what every
preference loss starts from (DPO, KTO, ORPO, CPO, SimPO all compare sums or means of them).

Positions follow the causal shift: the logits at t score label t + 1. A packed row's labels
are cut at each sample's first token (services.trainer.packing.cut_labels), so no sample's
log-prob takes a token of the sample before it."""

from __future__ import annotations

import torch

from libs.dataset.schema import IGNORE_INDEX


def token_logps(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(log p of each next label, mask of the labelled positions), both [batch, seq - 1];
    the log-prob is 0 where the label is IGNORE_INDEX. logits: [batch, seq, vocab]."""
    targets = labels[..., 1:]
    mask = targets != IGNORE_INDEX
    logps = torch.log_softmax(logits[..., :-1, :].float(), dim=-1)  # [batch, seq - 1, vocab]
    picked = torch.gather(logps, -1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return picked * mask, mask


def sequence_logps(logits: torch.Tensor, labels: torch.Tensor, sample_ids: torch.Tensor,
                   num_samples: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum of the labelled tokens' log-probs, their count), both [num_samples], per sample
    as numbered by `sample_ids` ([batch, seq], -1 on padding; see data.collate)."""
    picked, mask = token_logps(logits, labels)
    owner = sample_ids[..., 1:].clamp(min=0).reshape(-1)  # the label's sample (masked where -1 or unlabelled)
    sums = torch.zeros(num_samples, dtype=picked.dtype, device=picked.device)
    sums = sums.index_add(0, owner, picked.reshape(-1))
    counts = torch.zeros(num_samples, dtype=torch.long, device=picked.device)
    counts = counts.index_add(0, owner, mask.reshape(-1).long())
    return sums, counts
