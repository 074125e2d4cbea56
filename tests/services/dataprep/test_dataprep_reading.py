"""Dealing rows to ranks, batching and cursors (pure arithmetic), and the IPC framing."""

import itertools

import numpy as np
import pyarrow as pa
import pytest

from libs.common.errors import InvalidArgument
from libs.dataset import split
from libs.dataset.split import Holdout
from libs.dataset.ipc import from_ipc_stream, to_ipc_stream
from services.dataprep import reading, shards
from services.dataprep.reading import Position

SHARDS = [5, 3, 0, 7, 1]  # 16 rows, an empty shard and a one-row shard included


def global_rows(shard_rows, batches):
    offsets = list(itertools.accumulate([0, *shard_rows]))
    return [offsets[b.shard_index] + int(r) for b in batches for r in b.positions]


@pytest.mark.parametrize("world_size", [1, 2, 3, 5, 20])
@pytest.mark.parametrize("max_batch_rows", [1, 2, 4, 256])
def test_ranks_get_row_i_modulo_world_size(world_size, max_batch_rows):
    total = sum(SHARDS)
    for rank in range(world_size):
        batches = list(reading.plan(SHARDS, rank, world_size, Position(), max_batch_rows))
        assert global_rows(SHARDS, batches) == list(range(rank, total, world_size))
        assert all(0 < b.num_rows <= max_batch_rows for b in batches)


@pytest.mark.parametrize("world_size", [1, 2, 3])
@pytest.mark.parametrize("max_batch_rows", [1, 2, 3])
def test_resuming_from_any_batch_cursor_continues_exactly(world_size, max_batch_rows):
    for rank in range(world_size):
        full = list(reading.plan(SHARDS, rank, world_size, Position(), max_batch_rows))
        for k, batch in enumerate(full):
            rest = list(reading.plan(SHARDS, rank, world_size, batch.next, max_batch_rows))
            assert global_rows(SHARDS, rest) == global_rows(SHARDS, full[k + 1:])
        last = global_rows(SHARDS, full)[-1]
        offsets = list(itertools.accumulate([0, *SHARDS]))
        assert offsets[full[-1].next.shard_index] + full[-1].next.row == last + 1


def test_cursor_is_the_position_after_the_last_row_served():
    batches = list(reading.plan([4, 4], rank=1, world_size=2, start=Position(), max_batch_rows=1))
    assert [(b.shard_index, b.positions[0], b.next) for b in batches] == [
        (0, 1, Position(0, 2)), (0, 3, Position(1, 0)), (1, 1, Position(1, 2)), (1, 3, Position(2, 0))]


def test_start_in_the_middle_of_a_shard_skips_to_this_ranks_next_row():
    batches = list(reading.plan([10], rank=0, world_size=3, start=Position(0, 4), max_batch_rows=10))
    assert global_rows([10], batches) == [6, 9]


@pytest.mark.parametrize("rank, world_size, start, max_batch_rows, field", [
    (2, 2, Position(), 1, "rank"),
    (-1, 2, Position(), 1, "rank"),
    (0, 0, Position(), 1, "world_size"),
    (0, 1, Position(), 0, "max_batch_rows"),
    (0, 1, Position(6, 0), 1, "start"),
    (0, 1, Position(1, 4), 1, "start"),
    (0, 1, Position(0, -1), 1, "start"),
])
def test_bad_requests_name_the_field(rank, world_size, start, max_batch_rows, field):
    with pytest.raises(InvalidArgument) as error:
        reading.check(SHARDS, rank, world_size, start, max_batch_rows)
    assert error.value.field == field


def test_end_position_is_a_valid_start():
    reading.check(SHARDS, 0, 1, Position(len(SHARDS), 0), 1)
    reading.check(SHARDS, 0, 1, Position(1, 3), 1)
    assert list(reading.plan(SHARDS, 0, 1, Position(len(SHARDS), 0))) == []


def test_take_and_ipc_round_trip():
    table = pa.Table.from_batches([shards.to_batch([[i] * (i + 1) for i in range(6)],
                                                   [[-100] * (i + 1) for i in range(6)])])
    for positions in (range(1, 6, 2), range(2, 4), np.array([0, 3, 4])):
        records = reading.take(table, reading.Batch(0, positions, Position(0, 6)))
        back = from_ipc_stream(to_ipc_stream(records))
        assert back.schema.equals(shards.SCHEMA)
        assert back.column("input_ids").to_pylist() == [[i] * (i + 1) for i in positions]
        assert back.column("length").to_pylist() == [i + 1 for i in positions]


@pytest.mark.parametrize("world_size", [1, 2, 3])
@pytest.mark.parametrize("held_out", [True, False])
def test_one_side_of_a_split_is_dealt_round_robin_and_resumes_exactly(world_size, held_out):
    """The split comes before dealing: the i-th row of the side goes to rank i % world_size."""
    side = Holdout(0.3, held_out)
    offsets = list(itertools.accumulate([0, *SHARDS]))
    dealt = lambda index: np.flatnonzero(side.keeps(offsets[index] + np.arange(SHARDS[index])))  # noqa: E731
    rows = [i for i in range(sum(SHARDS)) if split.held_out(i, 0.3) == held_out]
    assert len(rows) == side.rows(sum(SHARDS)) == (5 if held_out else 11)
    for rank in range(world_size):
        full = list(reading.plan(SHARDS, rank, world_size, Position(), 2, dealt))
        assert global_rows(SHARDS, full) == rows[rank::world_size]
        assert all(0 < b.num_rows <= 2 for b in full)
        for k, batch in enumerate(full):
            rest = list(reading.plan(SHARDS, rank, world_size, batch.next, 2, dealt))
            assert global_rows(SHARDS, rest) == global_rows(SHARDS, full[k + 1:])
        # a cursor between two dealt rows (a position whose row is on the other side) resumes too
        start = Position(3, 2)
        resumed = global_rows(SHARDS, reading.plan(SHARDS, rank, world_size, start, 2, dealt))
        assert resumed == [i for i in rows[rank::world_size] if i >= offsets[3] + 2]


def test_a_split_ratio_outside_0_1_is_invalid_argument():
    for ratio in (0.0, 1.0, -0.5, 2.0, float("nan"), float("inf")):
        with pytest.raises(InvalidArgument) as error:
            reading.check(SHARDS, 0, 1, Position(), 1, holdout_ratio=ratio)
        assert error.value.field == "holdout"
    reading.check(SHARDS, 0, 1, Position(), 1, holdout_ratio=0.5)
