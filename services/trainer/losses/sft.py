"""The SFT loss: next-token cross-entropy summed over trained tokens and divided by the
number of trained tokens in the whole accumulated batch.

Dividing each micro-batch's summed loss by the trained tokens of the *whole* optimizer step
(not by its own) makes gradient accumulation equal to one big batch: every trained token
weighs the same however rows are split into micro-batches or padded.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from libs.dataset.schema import IGNORE_INDEX


def trained_tokens(labels: torch.Tensor) -> int:
    """Tokens a causal LM is trained on: label positions after the causal shift that are
    not IGNORE_INDEX. labels: [batch, seq]."""
    return int((labels[..., 1:] != IGNORE_INDEX).sum())


def sft_loss(logits: torch.Tensor, labels: torch.Tensor, num_trained_tokens: int) -> torch.Tensor:
    """Sum of the token losses of this micro-batch / `num_trained_tokens` of the step.

    logits: [batch, seq, vocab]; labels: [batch, seq] aligned with the inputs (the standard
    causal shift happens here: position t predicts label t + 1)."""
    vocab = logits.size(-1)
    shift_logits = logits[..., :-1, :].float()  # [batch, seq - 1, vocab]
    shift_labels = labels[..., 1:].to(shift_logits.device)  # [batch, seq - 1]
    total = F.cross_entropy(shift_logits.reshape(-1, vocab), shift_labels.reshape(-1),
                            ignore_index=IGNORE_INDEX, reduction="sum")
    # A step with no trained token contributes no gradient rather than NaN.
    return total / max(num_trained_tokens, 1)
