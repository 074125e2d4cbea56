"""The chosen answers' negative log-likelihood that ORPO, CPO and SimPO add to their preference
term: the chosen answer tokens' summed -log p over the chosen answer tokens of the whole step.
With the step as one batch that is TRL's cross-entropy mean over the chosen labels."""

from __future__ import annotations

import torch


def chosen_nll(chosen_logps: torch.Tensor, num_chosen_tokens: int) -> torch.Tensor:
    """chosen_logps: [pairs] summed log-probs of this micro-batch's chosen answers;
    num_chosen_tokens: their answer tokens over the whole step (every micro-batch and rank)."""
    # A step with no chosen token (none reach the trainer: dataprep refuses them) gives 0, not NaN.
    return -chosen_logps.float().sum() / max(num_chosen_tokens, 1)
