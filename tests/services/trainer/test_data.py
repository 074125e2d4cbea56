"""Collation spelled out token by token, the step plan (micro-batches, accumulation, epochs,
cursor), and the real read path: rows over gRPC from a real dataprep server, resumed exactly."""

import json
import time

import grpc
import numpy as np
import pytest
import torch
from prometheus_client import REGISTRY

from libs.common.errors import FailedPrecondition, InvalidArgument
from libs.dataset import client as dataprep_client, split
from libs.dataset.client import Cursor
from protos.tuneforge.dataprep.v1 import dataprep_pb2, dataprep_pb2_grpc
from protos.tuneforge.trainer.v1 import trainer_pb2
from services.dataprep.config import PrepareConfig
from services.trainer import client as trainer_client, data, evaluation
from services.trainer.config import TrainConfig
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


@pytest.fixture(scope="module")
def sharded_dataset(dataprep_address, default_model, tmp_path_factory):
    """23 rows in shards of 5, 5, 5, 5, 3, prepared by the real dataprep service."""
    root = tmp_path_factory.mktemp("sharded")
    raw = root / "rows.jsonl"
    raw.write_text("".join(json.dumps({"messages": [{"role": "user", "content": f"What is {i} plus {i}?"},
                                                    {"role": "assistant", "content": f"{2 * i}."}]}) + "\n"
                           for i in range(23)))
    manifest = dataprep_client.prepare(dataprep_address, PrepareConfig(
        model=str(default_model), dataset=[str(raw)], output_dir=str(root / "prepared"), shard_rows=5))
    assert [shard["rows"] for shard in manifest["shards"]] == [5, 5, 5, 5, 3]
    return str(root / "prepared")


def keys(source, epoch=0):
    return [row.key for row, _ in source.epoch_rows(DataCursor(epoch))]


def test_held_out_rows_are_the_same_in_every_epoch_order_and_number_of_ranks(dataprep_address, sharded_dataset):
    held = [k for k in range(23) if split.held_out(k, 0.25)]
    assert held == [0, 4, 8, 12, 16, 20]  # ceil(23 x 0.25) = 6, evenly spread
    base = dict(dataprep_address=dataprep_address, dataset=sharded_dataset, output_dir="unused", seed=3)
    for shuffle in (True, False):
        config = TrainConfig(**base, split_dataset_ratio=0.25, dataset_shuffle=shuffle)
        for world_size in (1, 2):
            for epoch in (0, 1):
                sources = [evaluation.sources(config, rank, world_size) for rank in range(world_size)]
                train = [keys(t, epoch) for t, _ in sources]
                evals = [keys(e, epoch) for _, e in sources]
                assert sorted(k for part in evals for k in part) == held, (shuffle, world_size, epoch)
                assert sorted(k for part in train for k in part) == [k for k in range(23) if k not in held]
                # each rank's count is exact from the manifest's 23 rows, and what it reads
                assert [len(part) for part in train] == [t.rows(23) for t, _ in sources]
                assert [len(part) for part in evals] == [e.rows(23) for _, e in sources]
    # shuffled: every epoch its own order, not file order, the same for the same seed
    config = TrainConfig(**base, split_dataset_ratio=0.25)
    train, _ = evaluation.sources(config)
    orders = [keys(train, epoch) for epoch in (0, 1)]
    assert orders == [keys(train, 0), keys(train, 1)]  # the same seed and epoch: the same order
    assert orders[0] != orders[1] and sorted(orders[0]) not in orders  # each epoch its own, not file order
    unsplit, none = evaluation.sources(TrainConfig(**base))
    assert none is None and sorted(keys(unsplit)) == list(range(23))


@pytest.mark.parametrize("world_size", [1, 2, 3])
def test_rank_counts_are_exact_and_every_rank_computes_the_same_total(dataprep_address, sharded_dataset,
                                                                       world_size):
    for ratio in (0.0, 0.1, 0.3):
        config = TrainConfig(dataprep_address=dataprep_address, dataset=sharded_dataset, output_dir="unused",
                             split_dataset_ratio=ratio, per_device_train_batch_size=2, gradient_accumulation_steps=2)
        sources = [evaluation.sources(config, rank, world_size)[0] for rank in range(world_size)]
        counts = [len(keys(source, epoch=1)) for source in sources]
        assert counts == [source.rows(23) for source in sources]
        assert sum(counts) == 23 - split.held_out_rows(23, ratio) and max(counts) - min(counts) <= 1
        # every rank takes rank 0's count, the largest: the same total without a collective
        assert {source.rows(23, rank=0) for source in sources} == {max(counts)}


def test_a_shuffled_epoch_resumes_exactly_from_every_step(dataprep_address, sharded_dataset):
    config = TrainConfig(dataprep_address=dataprep_address, dataset=sharded_dataset, output_dir="unused",
                         split_dataset_ratio=0.1, seed=5)
    source, _ = evaluation.sources(config, rank=1, world_size=2)
    assert source.shuffle and source.rows(23) == 10  # 20 train rows, every other one
    steps = data.step_batches(source, micro_batch_size=3, accumulation=1, collate_rows=lambda rows: rows)
    taken = [next(steps) for _ in range(9)]  # 4 steps an epoch (3 + 3 + 3 + 1 rows): into a third epoch
    assert [len(s.micro_batches[0]) for s in taken] == [3, 3, 3, 1] * 2 + [3]
    assert [s.cursor.epoch for s in taken] == [0, 0, 0, 1, 1, 1, 1, 2, 2]
    epoch_keys = lambda group: [r.key for s in group for r in s.micro_batches[0]]  # noqa: E731
    # the rank deals from a new order every epoch: other rows (as many), none held out
    assert epoch_keys(taken[:4]) != epoch_keys(taken[4:8])
    assert not {k for k in epoch_keys(taken) if split.held_out(k, 0.1)}
    for k in range(len(taken) - 1):
        resumed = data.step_batches(source, 3, 1, lambda rows: rows, start=taken[k].cursor)
        assert [r.key for r in next(resumed).micro_batches[0]] == [r.key for r in taken[k + 1].micro_batches[0]]


def test_a_cursor_resumes_only_in_the_order_it_was_read_in():
    data.check_order(data.order(True, 42), True, 42, "checkpoint-4")
    data.check_order(data.order(False, 42), False, 7, "checkpoint-4")  # file order: the seed plays no part
    data.check_order(None, False, 42, "checkpoint-4")  # saved before shuffling existed: file order
    with pytest.raises(InvalidArgument, match="^dataset_shuffle: checkpoint-4 read its rows in file order: resume it "
                                              "with --dataset_shuffle false$"):
        data.check_order(None, True, 42, "checkpoint-4")
    with pytest.raises(InvalidArgument, match="^dataset_shuffle: checkpoint-4 read its rows shuffled: resume it with "
                                              "--dataset_shuffle true$"):
        data.check_order(data.order(True, 42), False, 42, "checkpoint-4")
    with pytest.raises(InvalidArgument, match="^seed: checkpoint-4 shuffled its rows with seed 42: resume it with "
                                              "--seed 42$"):
        data.check_order(data.order(True, 42), True, 7, "checkpoint-4")


def describe_calls() -> float:
    return sum(REGISTRY.get_sample_value("tuneforge_dataprep_grpc_requests_total",
                                         {"method": "DescribeDataset", "code": code}) or 0 for code in ("OK",))


@pytest.mark.slow
def test_a_job_on_a_dataset_still_being_prepared_waits_for_it(trainer, dataprep_address, default_model, gated,
                                                              tmp_path):
    """Shuffled reads and the row count need the whole dataset: the job waits for the preparation
    (its total comes from all 10 rows, not those written when it started); cancelled while
    waiting, it ends CANCELLED having trained nothing."""
    gate, _ = gated
    raw = tmp_path / "rows.jsonl"
    raw.write_text("".join(json.dumps({"messages": [{"role": "user", "content": f"What is {i} plus {i}?"},
                                                    {"role": "assistant", "content": f"{2 * i}."}]}) + "\n"
                           for i in range(10)))

    out = tmp_path / "preparing"
    with grpc.insecure_channel(dataprep_address) as channel:
        dataprep_pb2_grpc.DataprepServiceStub(channel).PrepareDataset(dataprep_pb2.PrepareDatasetRequest(
            arguments=dataprep_pb2.PrepareArguments(model=str(default_model), dataset=[str(raw)], output_dir=str(out),
                                                    shard_rows=2)), timeout=10)
    next(dataprep_client.read_batches(dataprep_address, str(out), timeout=60))  # a shard is written

    def submit(dataset, output_dir):
        asked = describe_calls()
        job_id = trainer_client.submit(trainer.address, TrainConfig(
            dataset=dataset, dataprep_address=dataprep_address, output_dir=str(tmp_path / output_dir),
            per_device_train_batch_size=2, lora_dropout=0.0))
        deadline = time.monotonic() + 120
        while describe_calls() < asked + 3:  # SubmitJob's and the worker's checks, then the wait's first ask
            assert time.monotonic() < deadline
            time.sleep(0.1)
        assert trainer_client.get(trainer.address, job_id).total_steps == 0  # waiting, not started
        return job_id

    job_id = submit(str(out), "cancelled")
    trainer_client.cancel(trainer.address, job_id)
    job = trainer_client.wait(trainer.address, job_id)
    assert job.state == trainer_pb2.JOB_STATE_CANCELLED and job.error == "" and job.step == 0

    job_id = submit(str(out), "waited")
    gate.set()
    job = trainer_client.wait(trainer.address, job_id)
    assert job.state == trainer_pb2.JOB_STATE_SUCCEEDED and job.total_steps == job.step == 5  # 10 rows, 2 a step
