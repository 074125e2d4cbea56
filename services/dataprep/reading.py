"""Which rows of a prepared dataset one reader gets, in what batches, and the
cursor after each batch: row i of the dataset (shards in manifest order, or in
a seeded shuffled order; only one side of an eval split when asked) goes to rank
i % world_size. Pure arithmetic, plus the Arrow IPC framing of a batch."""

from __future__ import annotations

import bisect
import dataclasses
import math
from typing import Callable, Iterator, Sequence

import numpy as np
import pyarrow as pa

from libs.common.errors import InvalidArgument

DEFAULT_BATCH_ROWS = 256


@dataclasses.dataclass(frozen=True)
class Position:
    """A place in the dataset: row `row` of shard `shard_index`; (len(shards), 0) is the end."""

    shard_index: int = 0
    row: int = 0


@dataclasses.dataclass(frozen=True)
class Batch:
    """Rows `positions` (ascending) of shard `shard_index` as served, and the position after the last."""

    shard_index: int
    positions: Sequence[int]  # a range, or [rows] int64 when an eval split leaves gaps
    next: Position

    @property
    def num_rows(self) -> int:
        return len(self.positions)


def check(shard_rows: list[int], rank: int, world_size: int, start: Position, max_batch_rows: int,
          holdout_ratio: float | None = None) -> None:
    """All problems of a read request at once (`holdout_ratio`: an eval split's, when one is asked)."""
    problems = []
    if holdout_ratio is not None and not (math.isfinite(holdout_ratio) and 0 < holdout_ratio < 1):
        problems.append(InvalidArgument(f"its ratio must be in (0, 1); got {holdout_ratio}", field="holdout"))
    if world_size < 1:
        problems.append(InvalidArgument(f"expected a positive number; got {world_size}", field="world_size"))
    elif not 0 <= rank < world_size:
        problems.append(InvalidArgument(f"expected 0 <= rank < world_size ({world_size}); got {rank}", field="rank"))
    if max_batch_rows < 1:
        problems.append(InvalidArgument(f"expected a positive number; got {max_batch_rows}", field="max_batch_rows"))
    if not 0 <= start.shard_index <= len(shard_rows):
        problems.append(InvalidArgument(
            f"shard_index {start.shard_index} is outside the dataset's {len(shard_rows)} shards", field="start"))
    else:
        rows = shard_rows[start.shard_index] if start.shard_index < len(shard_rows) else 0
        if not 0 <= start.row <= rows:
            problems.append(InvalidArgument(
                f"row {start.row} is outside shard {start.shard_index} ({rows} rows)", field="start"))
    if len(problems) == 1:
        raise problems[0]
    if problems:
        raise InvalidArgument("; ".join(str(p) for p in problems))


def plan(shard_rows: list[int], rank: int, world_size: int, start: Position,
         max_batch_rows: int = DEFAULT_BATCH_ROWS,
         dealt: Callable[[int], Sequence[int]] | None = None) -> Iterator[Batch]:
    """This rank's rows from `start` on, in batches of at most `max_batch_rows`
    that never cross a shard. `next` is the position after a batch's last row.
    `dealt(shard)`: the positions (ascending) of a shard whose rows are dealt at all
    (one side of an eval split); every row when None. The i-th row dealt, counting
    from the first shard, goes to rank i % world_size."""
    dealt = dealt or (lambda index: range(shard_rows[index]))
    before = sum(len(dealt(index)) for index in range(start.shard_index))  # rows dealt before the start shard
    for index in range(start.shard_index, len(shard_rows)):
        positions = dealt(index)
        first = before + (bisect.bisect_left(positions, start.row) if index == start.shard_index else 0)
        first += (rank - first) % world_size  # the first row dealt at or after `start` that is ours
        mine = positions[first - before::world_size]
        for begin in range(0, len(mine), max_batch_rows):
            chunk = mine[begin:begin + max_batch_rows]
            after = int(chunk[-1]) + 1
            yield Batch(index, chunk, Position(index, after) if after < shard_rows[index] else Position(index + 1, 0))
        before += len(positions)


def _rng(seed: int, epoch: int, *more: int) -> np.random.Generator:
    return np.random.default_rng([seed % 2**64, epoch % 2**32, *more])


def shard_order(num_shards: int, seed: int, epoch: int) -> list[int]:
    """A shuffled read: the manifest index of the shard served v-th (a block
    shuffle: shards permuted, then each shard's rows, see row_order)."""
    return [int(i) for i in _rng(seed, epoch).permutation(num_shards)]


def row_order(rows: int, seed: int, epoch: int, shard: int) -> np.ndarray:
    """A shuffled read: the order of the rows of manifest shard `shard`."""
    return _rng(seed, epoch, 1, shard).permutation(rows)


def table_rows(positions: Sequence[int], order: np.ndarray | None = None) -> np.ndarray:
    """The rows of a shard's table at served `positions` ([rows] int64; `order`: a shuffled
    read's row order of that shard)."""
    positions = np.asarray(positions, dtype=np.int64)
    return positions if order is None else np.asarray(order, dtype=np.int64)[positions]


def take(table: pa.Table, batch: Batch, order: np.ndarray | None = None) -> pa.RecordBatch:
    """The batch's rows of its shard's table, as one record batch; `order` (a
    shuffled read) maps the batch's row positions to the table's rows."""
    positions = batch.positions
    if order is None and isinstance(positions, range) and positions.step == 1:
        rows = table.slice(positions.start, len(positions))
    else:
        rows = table.take(pa.array(table_rows(positions, order), type=pa.int64()))
    return rows.combine_chunks().to_batches()[0] if rows.num_rows else pa.RecordBatch.from_pylist([], schema=table.schema)
