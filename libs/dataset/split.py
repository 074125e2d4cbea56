"""The eval split of a prepared dataset by row identity (the trainer's --split_dataset_ratio):
which rows are held out, and how many rows each side of the split and each rank get. Pure
arithmetic on row ids (a row's index in the whole dataset, shards in manifest order), shared
by dataprep's ReadShards, which serves one side, and the trainer, which counts it.

Row k is held out when ceil((k + 1) r) > ceil(k r): exactly ceil(n r) of any first n rows,
evenly spread, row 0 always among them (so a small dataset still evaluates). Being a function
of the id alone, it holds out the same rows whatever order, epoch or rank reads them."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np


def held_out(row_id: int, ratio: float) -> bool:
    """Whether row `row_id` is held out at `ratio`."""
    return ratio > 0 and math.ceil((row_id + 1) * ratio) > math.ceil(row_id * ratio)


def held_out_mask(row_ids: np.ndarray, ratio: float) -> np.ndarray:
    """held_out of every id of `row_ids` ([rows] int64) -> [rows] bool (the same float
    arithmetic as held_out, so the two always agree)."""
    ids = np.asarray(row_ids, dtype=np.int64)
    if ratio <= 0:
        return np.zeros(ids.shape, dtype=bool)
    return np.ceil((ids + 1) * ratio) > np.ceil(ids * ratio)


def held_out_rows(rows: int, ratio: float) -> int:
    """How many of rows 0 .. rows - 1 are held out."""
    return math.ceil(rows * ratio) if ratio > 0 else 0


def rank_rows(rows: int, rank: int, world_size: int) -> int:
    """The rows rank `rank` gets when `rows` rows are dealt round-robin (row j to rank j % world_size)."""
    return len(range(rank, rows, world_size))


@dataclass(frozen=True)
class Holdout:
    """One side of a split: the held-out rows (`held_out`) or the others, at `ratio` in (0, 1)."""

    ratio: float
    held_out: bool

    def keeps(self, row_ids: np.ndarray) -> np.ndarray:
        """[rows] bool: which of `row_ids` are on this side."""
        return held_out_mask(row_ids, self.ratio) == self.held_out

    def rows(self, total: int) -> int:
        """This side's rows in a dataset of `total` rows."""
        held = held_out_rows(total, self.ratio)
        return held if self.held_out else total - held
