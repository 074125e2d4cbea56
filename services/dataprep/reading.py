"""Which rows of a prepared dataset one reader gets, in what batches, and the
cursor after each batch: row i of the dataset (shards in manifest order, or in
a seeded shuffled order) goes to rank i % world_size. Pure arithmetic, plus the
Arrow IPC framing of a batch."""

from __future__ import annotations

import dataclasses
from typing import Iterator

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
    """Rows range(start, stop, step) of shard `shard_index`, and the position after the last."""

    shard_index: int
    start: int
    stop: int
    step: int
    next: Position

    @property
    def num_rows(self) -> int:
        return len(range(self.start, self.stop, self.step))


def check(shard_rows: list[int], rank: int, world_size: int, start: Position, max_batch_rows: int) -> None:
    """All problems of a read request at once."""
    problems = []
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
         max_batch_rows: int = DEFAULT_BATCH_ROWS) -> Iterator[Batch]:
    """This rank's rows from `start` on, in batches of at most `max_batch_rows`
    that never cross a shard. `next` is the position after a batch's last row."""
    offset = sum(shard_rows[:start.shard_index])  # global index of the shard's first row
    for index in range(start.shard_index, len(shard_rows)):
        rows = shard_rows[index]
        first = offset + (start.row if index == start.shard_index else 0)
        first += (rank - first) % world_size  # the first global row at or after `first` that is ours
        mine = range(first - offset, rows, world_size)
        for begin in range(0, len(mine), max_batch_rows):
            chunk = mine[begin:begin + max_batch_rows]
            after = chunk[-1] + 1
            yield Batch(index, chunk.start, chunk.stop, world_size,
                        Position(index, after) if after < rows else Position(index + 1, 0))
        offset += rows


def _rng(seed: int, epoch: int, *more: int) -> np.random.Generator:
    return np.random.default_rng([seed % 2**64, epoch % 2**32, *more])


def shard_order(num_shards: int, seed: int, epoch: int) -> list[int]:
    """A shuffled read: the manifest index of the shard served v-th (a block
    shuffle: shards permuted, then each shard's rows, see row_order)."""
    return [int(i) for i in _rng(seed, epoch).permutation(num_shards)]


def row_order(rows: int, seed: int, epoch: int, shard: int) -> np.ndarray:
    """A shuffled read: the order of the rows of manifest shard `shard`."""
    return _rng(seed, epoch, 1, shard).permutation(rows)


def table_rows(batch: Batch, order: np.ndarray | None = None) -> np.ndarray:
    """The rows of its shard's table a batch serves, in serving order (`order`: a shuffled
    read's row order of that shard)."""
    positions = np.arange(batch.start, batch.stop, batch.step, dtype=np.int64)
    return positions if order is None else np.asarray(order, dtype=np.int64)[positions]


def take(table: pa.Table, batch: Batch, order: np.ndarray | None = None) -> pa.RecordBatch:
    """The batch's rows of its shard's table, as one record batch; `order` (a
    shuffled read) maps the batch's row positions to the table's rows."""
    if order is not None:
        rows = table.take(pa.array(order[batch.start:batch.stop:batch.step], type=pa.int64()))
    elif batch.step == 1:
        rows = table.slice(batch.start, batch.stop - batch.start)
    else:
        rows = table.take(pa.array(range(batch.start, batch.stop, batch.step), type=pa.int64()))
    return rows.combine_chunks().to_batches()[0] if rows.num_rows else pa.RecordBatch.from_pylist([], schema=table.schema)
