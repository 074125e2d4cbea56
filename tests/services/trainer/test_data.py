"""Collation spelled out token by token, the step plan (micro-batches, accumulation, epochs,
cursor), and the real read path: rows over gRPC from a real dataprep server, resumed exactly."""

import numpy as np
import pytest
import torch

from libs.common.errors import FailedPrecondition
from libs.dataset.client import Cursor
from services.trainer import data
from services.trainer.data import DataCursor, Row

PAD = 0
COLLATE = lambda rows: data.collate(rows, PAD)  # noqa: E731


def row(ids, labels=None):
    ids = np.array(ids, dtype=np.int32)
    return Row(ids, np.array(labels if labels is not None else ids, dtype=np.int32))


def test_collate_right_pads_to_the_longest_row():
    batch = data.collate([row([5, 6, 7], [-100, 6, 7]), row([8], [8]), row([9, 10], [-100, -100])], pad_id=PAD)
    assert batch.input_ids.tolist() == [[5, 6, 7], [8, PAD, PAD], [9, 10, PAD]]
    assert batch.labels.tolist() == [[-100, 6, 7], [8, -100, -100], [-100, -100, -100]]
    assert batch.attention_mask.tolist() == [[1, 1, 1], [1, 0, 0], [1, 1, 0]]
    assert batch.input_ids.dtype == torch.long and batch.tokens == 6
    assert batch.trained_tokens == 2  # 6 and 7 (the first position is never a target)


class ListRows:
    """An in-memory RowSource: rows are their index, the cursor is (row index, skip)."""

    def __init__(self, n):
        self.rows = [row([i + 1] * (1 + i % 3)) for i in range(n)]

    def epoch_rows(self, cursor):
        start = cursor.start.row + cursor.skip
        for i in range(start, len(self.rows)):
            yield self.rows[i], DataCursor(cursor.epoch, Cursor(0, 0), i + 1)


def first_ids(step):
    return [mb.input_ids[:, 0].tolist() for mb in step.micro_batches]


def test_steps_group_micro_batches_within_an_epoch():
    steps = data.step_batches(ListRows(7), micro_batch_size=2, accumulation=2, collate_rows=COLLATE)
    plan = [first_ids(next(steps)) for _ in range(5)]
    # 7 rows: micro-batches [1,2] [3,4] [5,6] [7] -> steps of 2, the last epoch's step is short
    assert plan == [[[1, 2], [3, 4]], [[5, 6], [7]], [[1, 2], [3, 4]], [[5, 6], [7]], [[1, 2], [3, 4]]]
    assert data.steps_per_epoch(7, 2, 2) == 2


def test_step_cursor_resumes_exactly():
    source = ListRows(9)
    steps = data.step_batches(source, 2, 1, COLLATE)
    taken = [next(steps) for _ in range(3)]
    resumed = data.step_batches(source, 2, 1, COLLATE, start=taken[1].cursor)
    assert first_ids(next(resumed)) == first_ids(taken[2])
    # the last step of an epoch points at the start of the next
    for _ in range(2):
        last = next(steps)
    assert first_ids(last) == [[9]] and last.cursor == DataCursor(1)


def test_total_steps():
    assert data.total_steps(max_steps=5, num_train_epochs=3, rows=100, micro_batch_size=4, accumulation=2) == 5
    assert data.total_steps(-1, 1.0, 10, 4, 1) == 3  # 4 + 4 + 2 rows
    assert data.total_steps(-1, 2.0, 10, 4, 2) == 4
    assert data.total_steps(-1, 0.5, 10, 1, 1) == 5


def test_an_empty_dataset_fails_instead_of_spinning():
    with pytest.raises(FailedPrecondition, match="no rows"):
        next(data.step_batches(ListRows(0), 1, 1, COLLATE))
