"""Preference pairs as the pair methods (dpo, orpo, cpo, simpo, rm) take them: one micro-batch
holding every pair's chosen and rejected sequence, and which sample is which.

Unpacked pairs are laid out as TRL's concatenated forward does: the micro-batch's chosen
sequences, then its rejected ones, one a row. Packed pairs (dataprep's --packing on
preference data) stay in their packed rows, each pair's chosen then rejected sample side by
side, kept apart as every packed row is (services.trainer.packing): what TRL cannot do
(trl#2469). Or, with `padding_free`, every sequence of the micro-batch, packed or not, is
laid out anew into as few rows as first-fit decreasing finds, none longer than the longest
sequence: never more rows, nor longer ones, than padding them, so less padding to compute
through, and the same log-probs."""

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
    layout, owned = _plan(rows, padding_free)
    micro = data.collate(layout, pad_id)
    # each row's samples are its pairs' chosen and rejected sequences in turn
    chosen = torch.tensor([samples[k] for samples in owned for k in range(0, len(samples), 2)], dtype=torch.long)
    rejected = torch.tensor([samples[k] for samples in owned for k in range(1, len(samples), 2)], dtype=torch.long)
    if isinstance(rows[0], data.PairRow):
        margins = [np.nan if row.margin is None else row.margin for row in rows]
    else:
        margins = np.concatenate([row.margins for row in rows]).tolist()
    micro.extras.update(chosen=chosen, rejected=rejected, margins=torch.tensor(margins, dtype=torch.float64))
    if all(row.ref_logps is not None for row in rows):
        ref = torch.zeros(micro.num_samples, dtype=torch.float32)
        for row, samples in zip(rows, owned):
            ref[samples] = torch.as_tensor(row.ref_logps, dtype=torch.float32)
        micro.extras["ref_logps"] = ref
    return micro


def _plan(rows: list[data.PairRow | data.Row], padding_free: bool) -> tuple[list[data.Row], list[list[int]]]:
    """(the rows the micro-batch lays out, each given row's sample indices in it, in the row's
    own order). `padding_free` re-lays every sequence, a packed row's samples too, into rows
    of at most the longest sequence: a masked attention row costs its length squared however
    little of it one sample attends to, so short rows cost less than long packed ones."""
    if all(isinstance(row, data.PairRow) for row in rows):
        sequences = [row.chosen for row in rows] + [row.rejected for row in rows]
        owned = [[i, len(rows) + i] for i in range(len(rows))]
    elif all(isinstance(row, data.Row) and row.margins is not None for row in rows):
        if not padding_free:  # the packed rows as dataprep packed them
            starts = np.cumsum([0] + [len(row.samples) for row in rows])
            return rows, [list(range(a, b)) for a, b in zip(starts[:-1], starts[1:])]
        sequences, owned = [], []
        for row in rows:
            owned.append(list(range(len(sequences), len(sequences) + len(row.samples))))
            bounds = np.cumsum([0] + row.samples)
            sequences += [data.Row(row.input_ids[a:b], row.labels[a:b]) for a, b in zip(bounds[:-1], bounds[1:])]
    else:
        raise ValueError("a pair method needs preference pairs (chosen/rejected or packed pairs with margins)")
    layout, position = _layout(sequences, padding_free)
    return layout, [[position[j] for j in samples] for samples in owned]


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
    return _plan(rows, padding_free)[1]


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
