"""Preference pairs as the pair methods (dpo, orpo, cpo, simpo, rm) take them: one micro-batch
holding every pair's chosen and rejected sequence, and which sample is which.

Unpacked pairs are laid out as TRL's concatenated forward does: the micro-batch's chosen
sequences, then its rejected ones, one a row; or, `padding_free`, those sequences packed into
as few rows as fit, none longer than the longest sequence (so never more rows, nor longer
ones, than padding them: less padding to compute through, the same log-probs). Packed pairs
(dataprep's --packing on preference data) stay in their packed rows, each pair's chosen then
rejected sample side by side, kept apart by the block-diagonal mask: what TRL cannot do
(trl#2469)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from libs.dataset.schema import IGNORE_INDEX
from services.trainer import data
from services.trainer.logprobs import sequence_logps

# What every pair method logs of its rewards and log-probs, under TRL's names.
REWARD_METRICS = ("rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins", "logps/chosen",
                  "logps/rejected")


def collate(rows: list[data.PairRow | data.Row], pad_id: int, padding_free: bool = False) -> data.MicroBatch:
    """A micro-batch of pairs with extras `chosen` and `rejected` ([pairs] sample indices),
    `margins` ([pairs] float64, NaN where a pair has none) and, when every row carries them
    (precomputed), `ref_logps` ([samples] float32, the reference's log-prob of each sample)."""
    if all(isinstance(row, data.PairRow) for row in rows):
        layout, position = _layout([row.chosen for row in rows] + [row.rejected for row in rows], padding_free)
        micro = data.collate(layout, pad_id)
        chosen, rejected = torch.tensor(position[:len(rows)]), torch.tensor(position[len(rows):])
        margins = [np.nan if row.margin is None else row.margin for row in rows]
    elif all(isinstance(row, data.Row) and row.margins is not None for row in rows):
        micro = data.collate(rows, pad_id)
        chosen, rejected = torch.arange(0, micro.num_samples, 2), torch.arange(1, micro.num_samples, 2)
        margins = np.concatenate([row.margins for row in rows]).tolist()
    else:
        raise ValueError("a pair method needs preference pairs (chosen/rejected or packed pairs with margins)")
    micro.extras.update(chosen=chosen, rejected=rejected, margins=torch.tensor(margins, dtype=torch.float64))
    if all(row.ref_logps is not None for row in rows):
        ref = torch.zeros(micro.num_samples, dtype=torch.float32)
        for row, samples in zip(rows, row_samples(rows, padding_free)):
            ref[samples] = torch.as_tensor(row.ref_logps, dtype=torch.float32)
        micro.extras["ref_logps"] = ref
    return micro


def _bins(lengths: list[int]) -> list[list[int]]:
    """Sequence indices packed first-fit decreasing into rows of at most the longest length."""
    capacity = max(lengths)
    bins: list[list[int]] = []
    room: list[int] = []
    for i in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        for b, free in enumerate(room):
            if lengths[i] <= free:
                bins[b].append(i)
                room[b] -= lengths[i]
                break
        else:
            bins.append([i])
            room.append(capacity - lengths[i])
    return bins


def _layout(sequences: list[data.Row], padding_free: bool) -> tuple[list[data.Row], list[int]]:
    """(the rows of the micro-batch, the sample index of each sequence in it)."""
    if not padding_free:
        return sequences, list(range(len(sequences)))
    rows, position, sample = [], [0] * len(sequences), 0
    for members in _bins([len(s.input_ids) for s in sequences]):
        for j in members:
            position[j], sample = sample, sample + 1
        if len(members) == 1:  # alone in its row: no mask needed
            rows.append(sequences[members[0]])
            continue
        parts = [sequences[j] for j in members]
        rows.append(data.Row(np.concatenate([p.input_ids for p in parts]), np.concatenate([p.labels for p in parts]),
                             np.array([len(p.input_ids) for p in parts], dtype=np.int32)))
    return rows, position


def row_samples(rows: list[data.PairRow | data.Row], padding_free: bool = False) -> list[list[int]]:
    """For each row, the indices of its samples in the micro-batch `collate` makes of `rows`,
    in the row's own order (a pair: chosen, rejected; a packed row: its samples as packed)."""
    if all(isinstance(row, data.PairRow) for row in rows):
        _, position = _layout([row.chosen for row in rows] + [row.rejected for row in rows], padding_free)
        return [[position[i], position[len(rows) + i]] for i in range(len(rows))]
    out, start = [], 0
    for row in rows:
        out.append(list(range(start, start + len(row.samples))))
        start += len(row.samples)
    return out


def count(micro: data.MicroBatch) -> int:
    return int(micro.extras["chosen"].numel())


def chosen_tokens(micro: data.MicroBatch) -> int:
    """The labelled tokens of the micro-batch's chosen answers (what a chosen-NLL term is
    normalised by), counted as pair_logps counts them, without a forward."""
    labelled = micro.labels[..., 1:] != IGNORE_INDEX  # [batch, seq - 1], the causal shift's labels
    chosen = torch.isin(micro.sample_ids[..., 1:], micro.extras["chosen"].to(micro.sample_ids.device))
    return int((labelled & chosen).sum())


@dataclass
class PairLogps:
    """Per pair: the summed log-probs of its chosen and rejected answers' tokens, and how many
    tokens each has (for methods that average them)."""

    chosen: torch.Tensor  # [pairs]
    rejected: torch.Tensor  # [pairs]
    chosen_tokens: torch.Tensor  # [pairs] int64
    rejected_tokens: torch.Tensor  # [pairs] int64

    def means(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The chosen and rejected answers' mean log-prob per token ([pairs] each), for the
        methods that length-normalise (ORPO, SimPO, CPO's ipo and simpo)."""
        # dataprep refuses answers without a trained token; the clamp only keeps a 0 from being NaN
        return self.chosen / self.chosen_tokens.clamp(min=1), self.rejected / self.rejected_tokens.clamp(min=1)


def pair_logps(logits: torch.Tensor, micro: data.MicroBatch) -> PairLogps:
    """The pairs' log-probs from the logits of one forward over the micro-batch."""
    sums, counts = sequence_logps(logits, micro.labels, micro.sample_ids, micro.num_samples)
    chosen, rejected = micro.extras["chosen"], micro.extras["rejected"]
    return PairLogps(sums[chosen], sums[rejected], counts[chosen], counts[rejected])


def reward_metrics(chosen_rewards: torch.Tensor, rejected_rewards: torch.Tensor, chosen_logps: torch.Tensor,
                   rejected_logps: torch.Tensor, num_pairs: int) -> dict[str, torch.Tensor]:
    """REWARD_METRICS of this micro-batch's pairs ([pairs] each), summed and divided by the
    step's `num_pairs`: the engine's sum over micro-batches and ranks is then TRL's mean over
    the step's pairs. The log-probs are the ones the loss took (sums or means per token)."""
    def share(values: torch.Tensor) -> torch.Tensor:
        return values.detach().float().sum() / max(num_pairs, 1)

    return {"rewards/chosen": share(chosen_rewards), "rewards/rejected": share(rejected_rewards),
            "rewards/accuracies": share(chosen_rewards > rejected_rewards),
            "rewards/margins": share(chosen_rewards - rejected_rewards),
            "logps/chosen": share(chosen_logps), "logps/rejected": share(rejected_logps)}
