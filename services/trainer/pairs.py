"""Preference pairs as the pair methods (dpo, orpo, cpo, simpo, rm) take them: one micro-batch
holding every pair's chosen and rejected sequence, and which sample is which.

Unpacked pairs are laid out as TRL's concatenated forward does: the micro-batch's chosen
sequences, then its rejected ones, one a row. Packed pairs (dataprep's --packing on
preference data) stay in their packed rows, each pair's chosen then rejected sample side by
side, kept apart by the block-diagonal mask: what TRL cannot do (trl#2469)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from services.trainer import data
from services.trainer.logprobs import sequence_logps


def collate(rows: list[data.PairRow | data.Row], pad_id: int) -> data.MicroBatch:
    """A micro-batch of pairs with extras `chosen` and `rejected` ([pairs] sample indices) and
    `margins` ([pairs] float64, NaN where a pair has none)."""
    if all(isinstance(row, data.PairRow) for row in rows):
        micro = data.collate([row.chosen for row in rows] + [row.rejected for row in rows], pad_id)
        pairs = len(rows)
        chosen, rejected = torch.arange(pairs), torch.arange(pairs, 2 * pairs)
        margins = [np.nan if row.margin is None else row.margin for row in rows]
    elif all(isinstance(row, data.Row) and row.margins is not None for row in rows):
        micro = data.collate(rows, pad_id)
        chosen, rejected = torch.arange(0, micro.num_samples, 2), torch.arange(1, micro.num_samples, 2)
        margins = np.concatenate([row.margins for row in rows]).tolist()
    else:
        raise ValueError("a pair method needs preference pairs (chosen/rejected or packed pairs with margins)")
    micro.extras.update(chosen=chosen, rejected=rejected, margins=torch.tensor(margins, dtype=torch.float64))
    return micro


def count(micro: data.MicroBatch) -> int:
    return int(micro.extras["chosen"].numel())


@dataclass
class PairLogps:
    """Per pair: the summed log-probs of its chosen and rejected answers' tokens, and how many
    tokens each has (for methods that average them)."""

    chosen: torch.Tensor  # [pairs]
    rejected: torch.Tensor  # [pairs]
    chosen_tokens: torch.Tensor  # [pairs] int64
    rejected_tokens: torch.Tensor  # [pairs] int64


def pair_logps(logits: torch.Tensor, micro: data.MicroBatch) -> PairLogps:
    """The pairs' log-probs from the logits of one forward over the micro-batch."""
    sums, counts = sequence_logps(logits, micro.labels, micro.sample_ids, micro.num_samples)
    chosen, rejected = micro.extras["chosen"], micro.extras["rejected"]
    return PairLogps(sums[chosen], sums[rejected], counts[chosen], counts[rejected])
