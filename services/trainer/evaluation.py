"""Eval: the held-out split of a dataset (`--split_dataset_ratio`) or a separate prepared
dataset (`--val_dataset`), and the eval loss, normalised by trained tokens like the training
loss (sum of token losses over every eval row / their trained tokens).

The split is by row position in this rank's stream, deterministic and without a count:
row i is held out when ceil((i + 1) r) > ceil(i r). That is exactly ceil(n r) rows of n,
spread evenly, the first row always among them (so a small dataset still evaluates)."""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Callable, Iterator

import numpy as np
import torch

from services.trainer import data
from services.trainer.losses.sft import sft_loss


def held_out(index: int, ratio: float) -> bool:
    """Whether row `index` (0-based, this rank's stream) is an eval row."""
    return ratio > 0 and math.ceil((index + 1) * ratio) > math.ceil(index * ratio)


def held_out_count(rows: int, ratio: float) -> int:
    return math.ceil(rows * ratio) if ratio > 0 else 0


@dataclass
class Split:
    """The train or the eval part of a row source (a RowSource itself); cursors are the
    underlying source's, so resuming a split resumes the same rows."""

    source: data.RowSource
    ratio: float
    eval_part: bool

    def epoch_rows(self, cursor: data.DataCursor) -> Iterator[tuple[data.Row, data.DataCursor]]:
        for row, after in self.source.epoch_rows(cursor):
            if held_out(after.index - 1, self.ratio) == self.eval_part:
                yield row, after


@contextlib.contextmanager
def eval_mode(model) -> Iterator[None]:
    """Dropout off for the eval pass, training mode back after. bitsandbytes' 4-bit layers
    stay in training mode (they have no dropout): in eval mode on a CPU with AVX512-BF16 they
    repack their weights in place into a CPU-only layout, which fails for shapes that are not
    multiples of 32 and would leave the training weights changed."""
    model.eval()
    try:
        for module in model.modules():
            if type(module).__name__ == "Linear4bit":
                module.train()
        yield
    finally:
        model.train()


@dataclass
class EvalResult:
    loss_sum: float  # sum of the token losses
    trained_tokens: int
    rows: int

    @property
    def loss(self) -> float:
        return self.loss_sum / max(self.trained_tokens, 1)


def evaluate(forward: Callable[..., torch.Tensor], source: data.RowSource, micro_batch_size: int, pad_id: int,
             dtype: torch.dtype = torch.float32, world=None) -> EvalResult:
    """One pass over this rank's eval rows without gradients; `forward(**inputs)` returns the
    model output (the caller puts the model in eval mode and back).

    Distributed (`world`), every rank runs as many forwards as the rank with the most eval
    micro-batches: a forward of FSDP2, ZeRO-3 or DDP is itself a collective (parameter
    all-gathers, buffer broadcasts), and a rank whose slice is a row shorter would otherwise
    leave the others waiting. Its extra forwards are on one pad token and count for nothing."""
    loss_sum, trained, count = 0.0, 0, 0
    rows = [row for row, _ in source.epoch_rows(data.DataCursor())]
    batches = math.ceil(len(rows) / micro_batch_size)
    if world is not None and world.distributed:
        from services.trainer import distributed
        agreed = distributed.all_max(batches, world)
    else:
        agreed = batches
    filler = data.Row(np.array([pad_id], dtype=np.int32), np.array([data.IGNORE_INDEX], dtype=np.int32))
    with torch.no_grad():
        for index in range(agreed):
            if index >= batches:  # weight zero: only keeps this rank in step with the others
                forward(**data.collate([filler], pad_id).model_inputs(dtype))
                continue
            micro = data.collate(rows[index * micro_batch_size:(index + 1) * micro_batch_size], pad_id)
            logits = forward(**micro.model_inputs(dtype)).logits  # [b, s, vocab]
            loss_sum += float(sft_loss(logits, micro.labels, 1))  # the summed token losses
            trained += micro.trained_tokens
            count += micro.input_ids.size(0)
    return EvalResult(loss_sum, trained, count)


def sources(config, rows: data.DataprepRows) -> tuple[data.RowSource, data.RowSource | None]:
    """(train rows, eval rows or None) for a job: a split of `rows` by split_dataset_ratio, or
    `rows` and the val_dataset read the same way (same rank slice, same dataprep service)."""
    if config.val_dataset:
        return rows, data.DataprepRows(rows.address, config.val_dataset, rank=rows.rank, world_size=rows.world_size,
                                       timeout=rows.timeout)
    if config.split_dataset_ratio > 0:
        return Split(rows, config.split_dataset_ratio, False), Split(rows, config.split_dataset_ratio, True)
    return rows, None


def train_row_count(config, rows: data.DataprepRows) -> int:
    """This rank's training rows in one epoch (the eval split excluded)."""
    count = rows.count_rows()
    return count - held_out_count(count, config.split_dataset_ratio) if not config.val_dataset else count
